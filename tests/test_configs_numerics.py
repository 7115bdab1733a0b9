"""Config details torchao users rely on, config (de)serialization, and numerics at the float edges.

Configs: torchao's keywords and granularity forms, group_size types, regex keys, docstrings, and the
``config_to_dict`` / ``config_from_dict`` pair. Numerics: finite weights near the float32 / bf16
maximum and all-subnormal groups through every quantizer. (Over 400 lines: the torchao keyword matrix.)
"""

import dataclasses
import inspect
import json
import re

import pytest
import torch
import torch.nn.functional as F

import aofx
from aofx import numerics
from aofx.configs import (
    AOBaseConfig,
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    ModuleFqnToConfig,
    PerRow,
    PerTensor,
    config_from_dict,
    config_to_dict,
    describe,
)
from tests.common import seeded, two_layer

TINY = torch.finfo(torch.float32).tiny
BF16_MAX = torch.finfo(torch.bfloat16).max
FP32_MAX = torch.finfo(torch.float32).max

# ---------------------------------------------------------------- FqnToConfig keywords


def test_module_fqn_to_config_keyword_and_positional_build_the_same_config():
    table = {"up": Int8WeightOnlyConfig(), "re:do.*": None, "_default": Int4WeightOnlyConfig(group_size=32)}
    by_old_keyword = ModuleFqnToConfig(module_fqn_to_config=table)
    by_keyword = FqnToConfig(fqn_to_config=table)
    by_position = ModuleFqnToConfig(table)
    assert by_old_keyword == by_keyword == by_position
    assert isinstance(by_old_keyword, FqnToConfig)
    assert by_old_keyword.fqn_to_config == table and by_old_keyword.module_fqn_to_config == table
    assert by_old_keyword.config_for("up") == Int8WeightOnlyConfig()
    assert by_old_keyword.config_for("down") is None
    assert by_old_keyword.config_for("head") == Int4WeightOnlyConfig(group_size=32)
    assert FqnToConfig().fqn_to_config == {} and ModuleFqnToConfig() == FqnToConfig({})


def test_module_fqn_to_config_keyword_is_validated():
    with pytest.raises(TypeError, match="'up'"):
        ModuleFqnToConfig(module_fqn_to_config={"up": "int8"})


@pytest.mark.parametrize("make", [
    lambda t, u: FqnToConfig(fqn_to_config=t, module_fqn_to_config=u),
    lambda t, u: ModuleFqnToConfig(t, module_fqn_to_config=u),
], ids=["both-keywords", "positional-and-old-keyword"])
def test_both_fqn_keywords_must_agree_as_in_torchao(make):
    table = {"up": Int8WeightOnlyConfig()}
    assert make(table, dict(table)) == FqnToConfig(table)
    with pytest.raises(ValueError, match="fqn_to_config and module_fqn_to_config .* differ"):
        make(table, {"down": Int8WeightOnlyConfig()})


def test_module_fqn_to_config_keyword_through_quantize_():
    model = two_layer()
    aofx.quantize_(model, ModuleFqnToConfig(module_fqn_to_config={"up": Int8WeightOnlyConfig(), "down": None}))
    assert "Int8WeightOnlyConfig" in repr(model.up) and "scheme=" not in repr(model.down)


@pytest.mark.parametrize("key", ["re:layers.[", "re:(", "re:*x", "re:a{2,1}"])
def test_bad_regex_key_is_a_value_error_naming_the_key(key):
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        FqnToConfig({key: Int8WeightOnlyConfig()})


# ---------------------------------------------------------------- fp8 granularity

FP8DQ = Float8DynamicActivationFloat8WeightConfig


@pytest.mark.parametrize("given,pair", [
    (None, [PerTensor(), PerTensor()]),
    (PerTensor(), [PerTensor(), PerTensor()]),
    (PerRow(), [PerRow(), PerRow()]),
    ((PerRow(), PerTensor()), [PerRow(), PerTensor()]),
    ([PerTensor(), PerRow()], [PerTensor(), PerRow()]),
    ([PerRow(), PerRow()], [PerRow(), PerRow()]),
], ids=["None", "PerTensor", "PerRow", "tuple", "list", "list-row"])
def test_granularity_normalized_to_an_activation_weight_list_as_torchao(given, pair):
    cfg = FP8DQ(granularity=given)
    assert cfg.granularity == pair and type(cfg.granularity) is list
    assert cfg.granularities == tuple(pair)
    assert cfg == FP8DQ(granularity=pair)
    assert dataclasses.replace(cfg) == cfg


def test_granularity_equalities_torchao_users_write():
    assert FP8DQ(granularity=PerRow()) == FP8DQ(granularity=(PerRow(), PerRow()))
    assert FP8DQ(granularity=None) == FP8DQ(granularity=PerTensor()) == FP8DQ()
    assert FP8DQ(granularity=PerRow()) != FP8DQ(granularity=PerTensor())
    assert FP8DQ(granularity=(PerRow(), PerTensor())) != FP8DQ(granularity=(PerTensor(), PerRow()))


@pytest.mark.parametrize("bad", ["row", PerRow, (PerRow(),), (PerRow(), PerRow(), PerRow()), (PerRow(), None)])
def test_bad_granularity_still_rejected(bad):
    with pytest.raises(ValueError, match="granularity"):
        FP8DQ(granularity=bad)


def test_describe_shows_the_normalized_pair():
    assert describe(FP8DQ(granularity=PerRow())) == (
        "Float8DynamicActivationFloat8WeightConfig(activation_dtype=torch.float8_e4m3fn, "
        "weight_dtype=torch.float8_e4m3fn, granularity=[PerRow(dim=-1), PerRow(dim=-1)])")
    assert describe(FP8DQ()) == describe(FP8DQ(granularity=(PerTensor(), PerTensor())))
    assert describe(Int4WeightOnlyConfig(group_size=64)) == "Int4WeightOnlyConfig(group_size=64)"


# ---------------------------------------------------------------- group_size types

@pytest.mark.parametrize("cls", [Int4WeightOnlyConfig, Int8WeightOnlyConfig])
@pytest.mark.parametrize("value", [128.0, 64.0, True, False, "128"])
def test_group_size_must_be_an_int(cls, value):
    with pytest.raises((TypeError, ValueError)) as info:
        cls(group_size=value)
    message = str(info.value)
    assert f"group_size={value!r}" in message and "32, 64, 128, 256" in message, message
    assert cls.__name__ in message


@pytest.mark.parametrize("cls", [Int4WeightOnlyConfig, Int8WeightOnlyConfig])
def test_float_group_size_is_a_type_error(cls):
    with pytest.raises(TypeError, match=r"group_size=128\.0 \(float\)"):
        cls(group_size=128.0)


def test_int_group_sizes_still_accepted():
    for gs in numerics.GROUP_SIZES:
        assert Int4WeightOnlyConfig(group_size=gs).group_size == gs
        assert type(Int8WeightOnlyConfig(group_size=gs).group_size) is int
    assert Int8WeightOnlyConfig(group_size=None).group_size is None


# ---------------------------------------------------------------- docstrings

CONFIG_CLASSES = [Int4WeightOnlyConfig, Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                  Float8WeightOnlyConfig, Float8DynamicActivationFloat8WeightConfig, FqnToConfig]
# what help(cls) must say about each field's allowed values
ALLOWED = {"group_size": ["32, 64, 128, 256"], "weight_dtype": ["torch.float8_e4m3fn"],
           "activation_dtype": ["torch.float8_e4m3fn"], "granularity": ["PerTensor()", "PerRow()", "None"],
           "fqn_to_config": ["re:", "_default", "None"]}


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_docstring_documents_every_field_default_and_allowed_values(cls):
    doc = inspect.getdoc(cls)
    assert doc and doc != inspect.getdoc(AOBaseConfig)
    fields = [f for f in dataclasses.fields(cls) if f.repr]  # aofx's own; torchao's others are below
    if not fields:
        assert "no fields of its own" in doc
    for f in dataclasses.fields(cls):
        assert f.name in doc, f"{cls.__name__}: field {f.name} undocumented"
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default_text = {dict: "empty"}.get(type(default), repr(default) if default is not None else "None")
        assert f"default {default_text}" in doc, f"{cls.__name__}.{f.name}: default {default_text} undocumented"
        for allowed in ALLOWED[f.name]:
            assert allowed in doc, f"{cls.__name__}.{f.name}: allowed value {allowed} undocumented"


def test_fqn_to_config_docstring_documents_precedence():
    doc = " ".join(inspect.getdoc(FqnToConfig).replace("``", "").split())
    for phrase in ["exact", "first", "dict order", "fullmatch", "_default", "None", ".weight", "module_fqn_to_config",
                   "ValueError"]:
        assert phrase in doc, phrase
    # the order is stated in the order it applies
    assert doc.index("the exact key") < doc.index('the first "re:" key') < doc.index('then "_default"')


# ---------------------------------------------------------------- serialization

SERIALIZED = [
    Int4WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=32), Int8WeightOnlyConfig(),
    Int8WeightOnlyConfig(group_size=256), Int8DynamicActivationInt8WeightConfig(), Float8WeightOnlyConfig(),
    FP8DQ(), FP8DQ(granularity=PerRow()), FP8DQ(granularity=(PerRow(), PerTensor())),
    FP8DQ(granularity=[PerTensor(), PerRow()]),
]


@pytest.mark.parametrize("config", SERIALIZED, ids=describe)
def test_config_round_trips_through_json(config):
    d = config_to_dict(config)
    assert d["type"] == type(config).__name__
    back = config_from_dict(json.loads(json.dumps(d)))
    assert back == config and type(back) is type(config)
    assert config_to_dict(back) == d


def test_config_to_dict_values():
    assert config_to_dict(Int8WeightOnlyConfig()) == {"type": "Int8WeightOnlyConfig", "group_size": None}
    assert config_to_dict(Int4WeightOnlyConfig(group_size=64)) == {"type": "Int4WeightOnlyConfig", "group_size": 64}
    assert config_to_dict(Int8DynamicActivationInt8WeightConfig()) == {"type": "Int8DynamicActivationInt8WeightConfig"}
    assert config_to_dict(FP8DQ(granularity=(PerRow(), PerTensor()))) == {
        "type": "Float8DynamicActivationFloat8WeightConfig", "activation_dtype": "float8_e4m3fn",
        "weight_dtype": "float8_e4m3fn", "granularity": ["PerRow", "PerTensor"]}
    assert config_to_dict(FP8DQ())["granularity"] == ["PerTensor", "PerTensor"]


def test_config_to_dict_refuses_configs_it_cannot_rebuild():
    @dataclasses.dataclass
    class MyInt4(Int4WeightOnlyConfig):
        pass

    @dataclasses.dataclass
    class Mine(AOBaseConfig):
        factor: float = 2.0

    for config, name in [(MyInt4(), "MyInt4"), (Mine(), "Mine"), (FqnToConfig({"up": None}), "FqnToConfig")]:
        with pytest.raises(ValueError, match=name):
            config_to_dict(config)


@pytest.mark.parametrize("d,match", [
    ({"type": "Int2WeightOnlyConfig"}, "Int2WeightOnlyConfig"),
    ({"type": "FqnToConfig", "fqn_to_config": {}}, "FqnToConfig"),
    ({"group_size": 128}, "type"),
    ({"type": "Int4WeightOnlyConfig", "groupsize": 128}, "groupsize"),
    ({"type": "Float8WeightOnlyConfig", "weight_dtype": "float9"}, "float9"),
    ({"type": "Float8WeightOnlyConfig", "weight_dtype": "Tensor"}, "Tensor"),
    ({"type": "Float8DynamicActivationFloat8WeightConfig", "granularity": ["PerRow", "PerBlock"]}, "PerBlock"),
], ids=["unknown-type", "fqn-table", "no-type", "unknown-field", "bad-dtype", "not-a-dtype", "bad-granularity"])
def test_config_from_dict_rejects_what_it_cannot_build(d, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(d)


def test_config_from_dict_runs_the_config_checks():
    with pytest.raises(ValueError, match="group_size=100"):
        config_from_dict({"type": "Int4WeightOnlyConfig", "group_size": 100})
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        config_from_dict({"type": "Float8WeightOnlyConfig", "weight_dtype": "float8_e5m2"})


# ---------------------------------------------------------------- numerics: near the float maximum

def _extreme_group(m: float, dtype) -> torch.Tensor:
    """(2, 64): every group of 32 spans -m .. m (both ends present)."""
    row = torch.linspace(-1.0, 1.0, 32, dtype=torch.float64) * m
    w = torch.stack([row, row.flip(0)]).repeat(1, 2)
    return w.to(dtype)


EXTREMES = [(3e38, torch.float32), (3e38, torch.bfloat16), (FP32_MAX, torch.float32), (BF16_MAX, torch.bfloat16)]
EXTREME_IDS = ["3e38-fp32", "3e38-bf16", "fp32max", "bf16max"]


@pytest.mark.parametrize("m,dtype", EXTREMES, ids=EXTREME_IDS)
def test_int4_near_float_max_is_finite_and_close(m, dtype):
    w = _extreme_group(m, dtype)
    assert torch.isfinite(w).all() and (w.float().amax() - w.float().amin()).isinf()  # hi - lo overflows fp32
    qdata, scale, zero = numerics.quantize_int4(w, 32)
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    deq = numerics.dequantize_int4(qdata, scale, zero, 32)
    assert torch.isfinite(deq).all() and torch.isfinite(deq.bfloat16()).all()
    # within 1.5 steps of 2m / 15 (half a step, plus the end codes given up at fp32's max)
    err = (deq.double() - w.double()).abs().max().item()
    assert err <= 1.5 * 2 * m / 15, f"max error {err:.3g} for weights in +-{m:.3g}"
    assert numerics.sqnr(w, deq) >= 18, f"SQNR {numerics.sqnr(w, deq):.1f} dB"
    assert torch.equal(deq[:, 0] < 0, w[:, 0] < 0)  # the ends keep their sign


def test_int4_linear_with_huge_weights_is_finite():
    w = _extreme_group(3e38, torch.bfloat16)
    x = (torch.randn(4, 64, generator=seeded(10)) * 1e-30).bfloat16()
    y = numerics.int4_weight_only_linear(x, *numerics.quantize_int4(w, 32), 32)
    assert torch.isfinite(y).all()
    db = numerics.sqnr(F.linear(x.float(), w.float()), y)
    assert db >= 15, f"SQNR {db:.1f} dB"


@pytest.mark.parametrize("m,dtype", EXTREMES, ids=EXTREME_IDS)
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_near_float_max_is_finite(m, dtype, group_size):
    w = _extreme_group(m, dtype)
    q, s = numerics.quantize_int8(w, group_size)
    deq = numerics.dequantize_int8(q, s)
    assert torch.isfinite(s).all() and torch.isfinite(deq).all() and torch.isfinite(deq.bfloat16()).all()
    assert numerics.sqnr(w, deq) >= 40, f"SQNR {numerics.sqnr(w, deq):.1f} dB"


@pytest.mark.parametrize("m,dtype", EXTREMES, ids=EXTREME_IDS)
@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_near_float_max_is_finite(m, dtype, per_row):
    w = _extreme_group(m, dtype)
    q, s = numerics.quantize_float8(w, per_row=per_row)
    deq = numerics.dequantize_float8(q, s)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all() and torch.isfinite(deq).all()
    if m <= BF16_MAX:  # above it the weight itself has no bf16 value
        assert torch.isfinite(deq.bfloat16()).all()
    assert numerics.sqnr(w, deq) >= 28, f"SQNR {numerics.sqnr(w, deq):.1f} dB"


# ---------------------------------------------------------------- numerics: all-subnormal groups

def _subnormal_cases():
    g = seeded(11)
    uniform = (torch.rand(8, 128, generator=g) * 2 - 1) * TINY * 0.99  # bf16 rounding stays below TINY
    sparse = uniform * (torch.rand(8, 128, generator=g) < 0.1)
    one_negative = torch.zeros(8, 128)
    one_negative[:, ::32] = -0.6 * TINY  # one weight per group, the rest zero
    one_positive = -one_negative
    deep = (torch.rand(8, 128, generator=g) * 2 - 1) * 1e-42
    constant = torch.full((8, 128), 3e-39)
    return {"uniform": uniform, "uniform-bf16": uniform.bfloat16(), "sparse": sparse,
            "sparse-bf16": sparse.bfloat16(), "one-negative": one_negative, "one-positive": one_positive,
            "deep": deep, "constant": constant}


SUBNORMAL = _subnormal_cases()


def _roundtrip(scheme, w):
    if scheme.startswith("int4"):
        gs = int(scheme.split("-")[1])
        return numerics.dequantize_int4(*numerics.quantize_int4(w, gs), gs)
    if scheme.startswith("int8"):
        return numerics.dequantize_int8(*numerics.quantize_int8(w, 32 if scheme == "int8-g32" else None))
    return numerics.dequantize_float8(*numerics.quantize_float8(w, per_row=scheme == "fp8-row"))


SCHEMES = ["int4-32", "int4-128", "int8", "int8-g32", "fp8-row", "fp8-tensor"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", list(SUBNORMAL))
def test_all_subnormal_groups_no_worse_than_zeros(scheme, case):
    w = SUBNORMAL[case]
    assert (w.float().abs() < TINY).all()
    deq = _roundtrip(scheme, w)
    assert not deq.isnan().any() and torch.isfinite(deq).all()
    wd, err = w.double().reshape(8, -1, 32), (w.double() - deq.double()).reshape(8, -1, 32)  # norms in float64
    ratio = err.norm(dim=-1) / wd.norm(dim=-1)
    bad = err.norm(dim=-1) > wd.norm(dim=-1)
    assert not bad.any(), f"{scheme} on {case}: group error / weight norm up to {ratio[bad].max():.2f}"
    assert (err.abs() <= wd.abs()).all(), f"{scheme} on {case}: an element came back farther than zero"


def test_all_subnormal_int4_codes_are_multiples_of_the_scale():
    w = SUBNORMAL["uniform"]
    qdata, scale, zero = numerics.quantize_int4(w, 32)
    assert torch.equal(scale.float(), torch.full_like(scale.float(), TINY))
    deq = numerics.dequantize_int4(qdata, scale, zero, 32)
    assert torch.equal(deq, torch.round(w / TINY) * TINY)


# ---------------------------------------------------------------- numerics: ordinary weights unchanged

@pytest.mark.parametrize("std", [1e-30, 1e-4, 0.02, 1.0, 1e4, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_scale_and_zero_are_the_fp32_formula_for_ordinary_weights(std, dtype):
    w = (torch.randn(16, 256, generator=seeded(12)) * std).to(dtype)
    w[3] = 0  # an all-zero row: exact zeros, codes 0 against zero = 8 * TINY
    qdata, scale, zero = numerics.quantize_int4(w, 64)
    wg = w.float().reshape(16, 4, 64)
    lo, hi = wg.amin(-1), wg.amax(-1)
    ref_scale = ((hi - lo) / torch.full_like(lo, 15.0)).clamp(min=TINY).bfloat16()
    ref_zero = (lo + 8 * ref_scale.float()).bfloat16()
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    ref_q = ((wg - ref_zero.float()[..., None]) / ref_scale.float()[..., None] + 8).round().clamp(0, 15)
    assert torch.equal(numerics.unpack_int4(qdata).float(), ref_q.reshape(16, 256))
    assert torch.equal(numerics.unpack_int4(qdata)[3], torch.zeros(256, dtype=torch.uint8))


@pytest.mark.parametrize("std", [1e-30, 0.02, 1e30])
def test_int8_codes_are_the_formula_for_ordinary_weights(std):
    w = torch.randn(16, 256, generator=seeded(13)) * std
    q, s = numerics.quantize_int8(w, 64)
    wg = w.reshape(16, 4, 64)
    assert torch.equal(s, (wg.abs().amax(-1) / 127.5).clamp(min=TINY))
    assert torch.equal(q, (wg / s[..., None]).round().clamp(-128, 127).to(torch.int8).reshape(16, 256))


@pytest.mark.parametrize("make, field_name", [
    (lambda: Int4WeightOnlyConfig(group_size=128, int4_choose_qparams_algorithm="hqq"), "int4_choose_qparams_algorithm"),
    (lambda: Int4WeightOnlyConfig(int4_packing_format="marlin_sparse"), "int4_packing_format"),
    (lambda: Int8WeightOnlyConfig(granularity=PerTensor()), "granularity"),
    (lambda: Int8DynamicActivationInt8WeightConfig(act_mapping_type="asymmetric"), "act_mapping_type"),
    (lambda: Int8DynamicActivationInt8WeightConfig(weight_only_decode=True), "weight_only_decode"),
    (lambda: Float8WeightOnlyConfig(granularity=PerTensor()), "granularity"),
    (lambda: Float8DynamicActivationFloat8WeightConfig(activation_value_ub=1200.0), "activation_value_ub"),
    (lambda: Float8DynamicActivationFloat8WeightConfig(version=3), "version"),
])
def test_torchao_fields_that_would_change_the_scheme_raise(make, field_name):
    with pytest.raises(ValueError, match=field_name):
        make()


def test_torchao_fields_that_change_nothing_are_accepted_and_invisible():
    """torchao's layout, kernel and Inductor knobs: accepted, equal to the default config, absent from repr
    and from the saved dict (so saved files and shared graphs do not depend on them)."""
    class Enum:  # stands in for torchao's enums: ``.name`` and ``.value``
        def __init__(self, name, value):
            self.name, self.value = name, value

    cases = [
        (Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d", version=1,
                              int4_choose_qparams_algorithm=Enum("TINYGEMM", "tinygemm"), set_inductor_config=False),
         Int4WeightOnlyConfig(group_size=64)),
        (Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False), Int8WeightOnlyConfig()),
        (Int8DynamicActivationInt8WeightConfig(act_mapping_type=Enum("SYMMETRIC", 1), granularity=PerRow(),
                                               reduce_range=False), Int8DynamicActivationInt8WeightConfig()),
        (Float8WeightOnlyConfig(granularity=PerRow(), version=2), Float8WeightOnlyConfig()),
        (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), kernel_preference="torch", mm_config=None,
                                                   packing_format="plain", alg_id=1),
         Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())),
    ]
    for given, plain in cases:
        assert given == plain and repr(given) == repr(plain)
        assert config_to_dict(given) == config_to_dict(plain)


def test_torchao_group_granularity_sets_group_size():
    class PerGroup:  # torchao's PerGroup(group_size)
        def __init__(self, group_size):
            self.group_size = group_size

    assert Int8WeightOnlyConfig(granularity=PerGroup(64)) == Int8WeightOnlyConfig(group_size=64)
    with pytest.raises(ValueError, match="contradicts"):
        Int8WeightOnlyConfig(group_size=32, granularity=PerGroup(64))
