"""The public API: configs, aliases, the callable shim, the registries, FqnToConfig, bad input."""

import copy
import dataclasses
import warnings

import pytest
import torch
from torch import nn

import aofx
from aofx.install import QuantizedModule
from aofx.registry import find_pass
from tests.common import scheme_of, two_layer


def test_public_names():
    assert set(aofx.__all__) >= {
        "quantize_", "AOBaseConfig", "Int4WeightOnlyConfig", "Int8WeightOnlyConfig",
        "Int8DynamicActivationInt8WeightConfig", "Float8WeightOnlyConfig",
        "Float8DynamicActivationFloat8WeightConfig", "PerTensor", "PerRow", "FqnToConfig", "ModuleFqnToConfig",
        "register_quantize_module_handler"}
    assert aofx.ModuleFqnToConfig is aofx.FqnToConfig


def test_snake_case_aliases_are_the_classes_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert aofx.int4_weight_only is aofx.Int4WeightOnlyConfig
        assert aofx.int8_weight_only is aofx.Int8WeightOnlyConfig
        assert aofx.int8_dynamic_activation_int8_weight is aofx.Int8DynamicActivationInt8WeightConfig
        assert aofx.float8_weight_only is aofx.Float8WeightOnlyConfig
        assert aofx.float8_dynamic_activation_float8_weight is aofx.Float8DynamicActivationFloat8WeightConfig
        assert aofx.int8_weight_only(group_size=128) == aofx.Int8WeightOnlyConfig(group_size=128)


@pytest.mark.parametrize("make,match", [
    (lambda: aofx.Int4WeightOnlyConfig(group_size=100), r"group_size=100 .*32, 64, 128, 256"),
    (lambda: aofx.Int4WeightOnlyConfig(group_size=None), r"group_size=None"),
    (lambda: aofx.Int8WeightOnlyConfig(group_size=48), r"32, 64, 128, 256 or None"),
    (lambda: aofx.Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2), r"float8_e4m3fn"),
    (lambda: aofx.Float8DynamicActivationFloat8WeightConfig(activation_dtype=torch.int8), r"activation_dtype"),
])
def test_bad_config_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_granularity_forms():
    cfg = aofx.Float8DynamicActivationFloat8WeightConfig(granularity=(aofx.PerRow(), aofx.PerTensor()))
    assert cfg.granularities == (aofx.PerRow(), aofx.PerTensor())
    assert aofx.Float8DynamicActivationFloat8WeightConfig().granularities == (aofx.PerTensor(),) * 2
    with pytest.raises(ValueError, match="PerTensor\\(\\), PerRow\\(\\)"):  # torchao's error type
        aofx.Float8DynamicActivationFloat8WeightConfig(granularity="row")
    with pytest.raises(ValueError):
        aofx.Float8DynamicActivationFloat8WeightConfig(granularity=(aofx.PerRow(),))


def test_registry_follows_mro():
    @dataclasses.dataclass
    class MyInt4(aofx.Int4WeightOnlyConfig):
        pass

    assert find_pass(MyInt4()) is find_pass(aofx.Int4WeightOnlyConfig())
    model = two_layer()
    aofx.quantize_(model, MyInt4(group_size=64))
    assert "qdata" in dict(model.up.named_buffers())


def test_unregistered_config_names_it_and_lists_registered():
    @dataclasses.dataclass
    class Unknown(aofx.AOBaseConfig):
        pass

    model = two_layer()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"Unknown.*Int4WeightOnlyConfig.*Int8WeightOnlyConfig"):
        aofx.quantize_(model, Unknown())
    assert _same_state(model, before)


def test_not_a_config():
    with pytest.raises(TypeError, match="config object"):
        aofx.quantize_(two_layer(), 42)
    with pytest.raises(TypeError, match="config object"):
        aofx.quantize_(two_layer(), aofx.Int4WeightOnlyConfig)  # the class, not an instance


@pytest.mark.parametrize("kw", ["apply_tensor_subclass", "tensor_subclass_inserter"])
def test_removed_keywords(kw):
    with pytest.raises(TypeError, match="config="):
        aofx.quantize_(two_layer(), **{kw: aofx.Int8WeightOnlyConfig()})


def test_config_keyword():
    model = two_layer()
    aofx.quantize_(model, config=aofx.Int8WeightOnlyConfig())
    assert "Int8WeightOnlyConfig" in repr(model)


def test_legacy_callable_applied_per_selected_module_with_one_warning():
    seen = []

    def to_half(module):
        seen.append(module)
        return module.half()

    model = two_layer()
    with pytest.warns(DeprecationWarning, match="config object") as record:
        aofx.quantize_(model, to_half)
    assert len([w for w in record if w.category is DeprecationWarning]) == 1
    assert seen == [model.up, model.down]
    assert model.up.weight.dtype == torch.float16


def test_module_handler_for_user_config():
    @dataclasses.dataclass
    class Scale2(aofx.AOBaseConfig):
        factor: float = 2.0

    @aofx.register_quantize_module_handler(Scale2)
    def _scale(module, config):
        with torch.no_grad():
            module.weight.mul_(config.factor)
        return module

    model = two_layer(dtype=torch.float32)
    w = model.up.weight.clone()
    aofx.quantize_(model, Scale2(3.0), filter_fn=lambda m, fqn: fqn == "up")
    torch.testing.assert_close(model.up.weight, 3 * w)


def test_handler_may_return_a_new_module():
    @dataclasses.dataclass
    class Swap(aofx.AOBaseConfig):
        pass

    aofx.register_quantize_module_handler(Swap)(lambda module, config: nn.Identity())
    model = two_layer()
    aofx.quantize_(model, Swap(), filter_fn=lambda m, fqn: fqn == "down")
    assert isinstance(model.down, nn.Identity)


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64, dtype=torch.bfloat16) for _ in range(3))
        self.head = nn.Linear(64, 32, dtype=torch.bfloat16)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _schemes(model):
    return {fqn: scheme_of(m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_fqn_to_config_precedence():
    cfg = aofx.FqnToConfig({
        "layers.1": aofx.Int8WeightOnlyConfig(),          # exact fqn beats the regex below
        "re:layers\\.[12]": aofx.Int4WeightOnlyConfig(group_size=32),
        "re:layers\\.\\d": None,                           # later regex: never reached for layers.1/2
        "_default": aofx.Float8WeightOnlyConfig(),
    })
    model = Tower()
    aofx.quantize_(model, cfg)
    assert _schemes(model) == {
        "layers.0": "", "layers.1": "Int8WeightOnlyConfig", "layers.2": "Int4WeightOnlyConfig",
        "head": "Float8WeightOnlyConfig"}


def test_fqn_to_config_none_skips_and_regex_fullmatches():
    model = Tower()
    aofx.quantize_(model, aofx.ModuleFqnToConfig({"re:layers": aofx.Int8WeightOnlyConfig(),  # no fullmatch
                                                  "head": None,
                                                  "_default": aofx.Int8WeightOnlyConfig()}))
    assert _schemes(model) == {"layers.0": "Int8WeightOnlyConfig", "layers.1": "Int8WeightOnlyConfig",
                               "layers.2": "Int8WeightOnlyConfig", "head": ""}


def test_filter_fn_selects():
    model = Tower()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.startswith("layers"))
    assert _schemes(model)["head"] == "" and _schemes(model)["layers.0"] == "Int8WeightOnlyConfig"


def _same_state(model, state):
    now = model.state_dict()
    if now.keys() != state.keys():
        return False
    for k in now:
        torch.testing.assert_close(now[k], state[k], rtol=0, atol=0, equal_nan=True)
    return True


def test_nan_weight_names_the_layer_and_changes_nothing():
    model = Tower()
    with torch.no_grad():
        model.layers[2].weight[3, 4] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layers\.2\.weight"):
        aofx.quantize_(model, aofx.Int4WeightOnlyConfig(group_size=32))
    assert _same_state(model, before)
    assert type(model.layers[0]) is nn.Linear


def test_inf_weight_whole_model_path_changes_nothing():
    model = Tower()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"head\.weight"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(torch.randn(2, 64).bfloat16(),))
    assert _same_state(model, before) and type(model.head) is nn.Linear


def test_incompatible_shapes_skipped_with_one_warning_listing_all():
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 40), nn.Linear(40, 64))
    with pytest.warns(UserWarning) as record:
        aofx.quantize_(model, aofx.Int4WeightOnlyConfig(group_size=64))
    msgs = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(msgs) == 1
    assert "0.weight: in_features=96 is not a multiple of group_size=64" in msgs[0]
    assert "2.weight: in_features=40" in msgs[0]
    assert scheme_of(model[1]) and "weight" in dict(model[0].named_parameters())

    fp8 = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 64))
    with pytest.warns(UserWarning, match=r"(?s)0\.weight: float8 .*multiples of 16.*1\.weight"):
        aofx.quantize_(fp8, aofx.Float8WeightOnlyConfig())


def test_quantize_twice_skips_with_warning_and_output_unchanged():
    model = two_layer()
    x = torch.randn(3, 256).bfloat16()
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig())
    y = model(x)
    with pytest.warns(UserWarning, match=r"up: already quantized \(Int4WeightOnlyConfig"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert torch.equal(model(x), y)


def test_fqn_to_config_parameter_regex_beats_module_regex():
    # torchao's order: exact parameter, exact module, then regexes on the parameter fqn, then on the module fqn
    model = Tower()
    aofx.quantize_(model, aofx.FqnToConfig({"re:layers\\.0": aofx.Int8WeightOnlyConfig(),
                                            "re:layers\\.0\\.weight": aofx.Int4WeightOnlyConfig(group_size=32)}))
    assert _schemes(model)["layers.0"] == "Int4WeightOnlyConfig"


def test_fqn_to_config_with_filter_fn_raises_before_anything_changes():
    model = Tower()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="filter_fn or an FqnToConfig"):
        aofx.quantize_(model, aofx.FqnToConfig({"head": aofx.Int8WeightOnlyConfig()}), filter_fn=lambda m, f: True)
    assert _same_state(model, before)


def test_filter_fn_selecting_a_container_says_so():
    model = Tower()
    with pytest.warns(UserWarning, match=r"layers: filter_fn selected this ModuleList, which holds no weight"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "layers")
    assert not any(_schemes(model).values())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64, bias=False)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_tied_weight_with_two_configs_raises_naming_both_and_changes_nothing():
    model = Tied()
    before = copy.deepcopy(model.state_dict())
    cfg = aofx.FqnToConfig({"a": aofx.Int8WeightOnlyConfig(), "b": aofx.Int4WeightOnlyConfig(group_size=32)})
    with pytest.raises(ValueError, match=r"a\.weight and b\.weight are one tied parameter"):
        aofx.quantize_(model, cfg)
    assert _same_state(model, before) and type(model.b) is nn.Linear
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig(group_size=32))  # one config: packed once, shared
    assert model.a.qdata is model.b.qdata and model(torch.randn(2, 64)).shape == (2, 64)


def test_device_moves_the_whole_model_as_torchao_does():
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 32))
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), device="meta")
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


def test_device_is_checked_before_anything_changes():
    model = Tower()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), device="no_such_device")
    assert _same_state(model, before)


def test_handler_config_gets_the_module_on_device():
    @dataclasses.dataclass
    class Where(aofx.AOBaseConfig):
        pass

    seen = []

    @aofx.register_quantize_module_handler(Where)
    def _where(module, config):
        seen.append(module.weight.device.type)
        return module

    aofx.quantize_(nn.Sequential(nn.Linear(8, 8)), Where(), device="meta")
    assert seen == ["meta"]


class Toy(nn.Module):  # torchao's ToyLinearModel
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(64, 32, bias=False)
        self.linear2 = nn.Linear(32, 64, bias=False)

    def forward(self, x):
        return self.linear2(self.linear1(x))


def test_a_parameter_regex_mapped_to_none_does_not_hide_a_later_one():
    # torchao's test_quantize_fqn_precedence_param_regex_over_module_regex
    fp8 = aofx.Float8DynamicActivationFloat8WeightConfig(granularity=aofx.PerTensor())
    model = Toy().bfloat16()
    aofx.quantize_(model, aofx.FqnToConfig({"re:linear.*": None, "re:linear.*.weight": fp8}))
    assert model.linear1.scale.numel() == 1 and model.linear2.scale.numel() == 1


def test_a_handler_chosen_for_the_root_is_not_run_again_inside_it():
    @dataclasses.dataclass
    class Seen(aofx.AOBaseConfig):
        pass

    seen = []
    aofx.register_quantize_module_handler(Seen)(lambda module, config: seen.append(type(module).__name__) or module)
    aofx.quantize_(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), Seen(), filter_fn=lambda m, fqn: True)
    assert seen == ["Sequential"]


def test_a_key_for_a_parameter_aofx_cannot_quantize_is_named():
    model = nn.Sequential(nn.Linear(128, 128))
    model[0].register_parameter("custom_param", nn.Parameter(torch.randn(128, 128)))
    with pytest.warns(UserWarning, match=r"0\.custom_param: aofx quantizes weights used as an F\.linear weight"):
        aofx.quantize_(model, aofx.FqnToConfig({"0.custom_param": aofx.Int8WeightOnlyConfig()}))
    assert isinstance(model[0].custom_param, nn.Parameter)


def test_a_parameter_key_for_a_handler_config_raises_before_anything_changes():
    @dataclasses.dataclass
    class ModuleOnly(aofx.AOBaseConfig):
        pass

    aofx.register_quantize_module_handler(ModuleOnly)(lambda module, config: module)
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 5))
    cfg = aofx.FqnToConfig({"1": aofx.Int8WeightOnlyConfig(), "0.weight": ModuleOnly()})
    with pytest.raises(NotImplementedError, match=r"ModuleOnly's handler does not yet support parameter "
                                                  r"quantization \(0\.weight\)"):  # torchao's wording
        aofx.quantize_(model, cfg)
    assert type(model[1]) is nn.Linear


def test_a_parameter_key_reaches_a_handler_that_takes_parameter_name():
    # torchao's parameter-level handlers: handler(module, config, parameter_name=...)
    @dataclasses.dataclass
    class ScaleParam(aofx.AOBaseConfig):
        factor: float = 2.0

    calls = []

    @aofx.register_quantize_module_handler(ScaleParam)
    def _scale(module, config, parameter_name=None):
        calls.append(parameter_name)
        with torch.no_grad():
            getattr(module, parameter_name).mul_(config.factor)
        return module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    w0 = model[0].weight.detach().clone()
    aofx.quantize_(model, aofx.FqnToConfig({"0.weight": ScaleParam(), "1": aofx.Int8WeightOnlyConfig()}))
    assert calls == ["weight"]
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, 2 * w0)
    assert isinstance(model[1], QuantizedModule)


def test_torchao_config_defaults_and_removed_versions():
    assert aofx.Int8WeightOnlyConfig().granularity == aofx.PerRow()
    assert aofx.Int8DynamicActivationInt8WeightConfig().granularity == aofx.PerRow()
    assert aofx.Float8WeightOnlyConfig().granularity == aofx.PerRow()
    assert aofx.Int8WeightOnlyConfig(group_size=64).granularity is None
    for make in (aofx.Int8WeightOnlyConfig, aofx.Int8DynamicActivationInt8WeightConfig):
        with pytest.raises(ValueError, match="version 1"):
            make(version=1)

    @dataclasses.dataclass
    class Mine(aofx.AOBaseConfig):
        pass

    assert Mine().version == 1  # torchao's default config version


def test_repr_reads_as_the_users_class_with_the_scheme():
    # torchao's test_fqn_to_config_repr_linear
    model = Toy()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert str(model.linear1).startswith("Linear(in_features=64, out_features=32, bias=False")
    assert "scheme=Int8WeightOnlyConfig" in str(model) and type(model.linear1).__name__ == "QuantizedLinear"
