"""Real models, tiny and built from their configs: quantize, then use them the way people do.

Each float model (``tests/models.py``) is built once per module; every check quantizes a deepcopy
of it. A check runs on every scheme of ``tests.common.CASES`` where it is cheap, and on a rotating
subset where it is not (compile, export): every scheme still runs through each of those checks on
at least two models. CPU only; nothing is downloaded. (Over 400 lines: one check per way people use a
model, kept together so that the rotation across schemes is visible in one place.)
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import aofx
from aofx.numerics import sqnr
from tests.common import CASES
from tests.models import HIDDEN, SPECS, VOCAB

SCHEMES = {name: cfg for name, cfg, _ in CASES}
SCHEME_IDS = list(SCHEMES)
MODEL_IDS = list(SPECS)
LMS = [name for name in MODEL_IDS if SPECS[name].is_lm]
PACKED = ("qdata", "scale", "zero")

# Model-level SQNR floors (dB) of each model's output against its float output, 4-6 dB under the
# lowest value measured over the eight models (CPU, torch 2.13; the model is in the comment). Whole
# models compound the per-layer error, and a MoE router may pick another expert, so these sit under
# the single-layer floors of CASES; garbage (~0 dB) fails all of them.
FLOORS = {
    "int4wo-32": 11.0,  # 15.2 llama
    "int4wo-128": 10.0,  # 14.0 qwen2, mixtral
    "int8wo": 31.0,  # 35.9 mixtral
    "int8wo-g64": 31.0,  # 35.4 mixtral
    "int8dq": 29.0,  # 34.0 t5
    "fp8wo": 18.0,  # 22.3 mixtral
    "fp8dq-tensor": 18.0,  # 22.4 mixtral
    "fp8dq-row": 16.0,  # 20.7 mixtral
}
# Weight SQNR floors (dB) of a dequantized `.weight` against the float weight: CASES' single-layer
# floors less 3 dB.
WEIGHT_FLOORS = {name: floor - 3.0 for name, _, floor in CASES}


def rotate(k: int, stride: int) -> list:
    """``[pytest.param(model, scheme)]`` with ``k`` schemes per model, rotating through the list."""
    out = []
    for i, model in enumerate(MODEL_IDS):
        for j in range(k):
            scheme = SCHEME_IDS[(stride * i + j) % len(SCHEME_IDS)]
            out.append(pytest.param(model, scheme, id=f"{model}-{scheme}"))
    return out


ALL = [pytest.param(m, s, id=f"{m}-{s}") for m in MODEL_IDS for s in SCHEME_IDS]
LM_ALL = [pytest.param(m, s, id=f"{m}-{s}") for m in LMS for s in SCHEME_IDS]
COMPILE = rotate(2, 2)  # 16 runs, every scheme on two models
EXPORT = rotate(3, 3)  # 24 runs, every scheme on three models


# ---------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Float:
    model: torch.nn.Module
    inputs: dict
    ref: torch.Tensor  # float output on `inputs`


@dataclasses.dataclass
class Quantized:
    model: torch.nn.Module
    out: torch.Tensor  # eager quantized output on the float model's inputs
    warnings: list


class Zoo:
    """Float models built once, and quantized copies: shared (``quantized``) or new (``fresh``)."""

    def __init__(self):
        self._float, self._quant = {}, {}

    def float(self, name) -> Float:
        if name not in self._float:
            spec = SPECS[name]
            model = spec.build()
            inputs = spec.inputs()
            with torch.no_grad():
                ref = spec.output(model(**inputs))
            self._float[name] = Float(model, inputs, ref)
        return self._float[name]

    def fresh(self, name, scheme) -> Quantized:
        f = self.float(name)
        model = copy.deepcopy(f.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            aofx.quantize_(model, SCHEMES[scheme])
        return Quantized(model, run(name, model, f.inputs), [w for w in caught if w.category is UserWarning])

    def quantized(self, name, scheme) -> Quantized:
        """Shared between tests: tests that change the model must use ``fresh``."""
        key = (name, scheme)
        if key not in self._quant:
            try:
                self._quant[key] = self.fresh(name, scheme)
            except Exception as e:  # noqa: BLE001 (re-raised in every test that needs it)
                self._quant[key] = e
        if isinstance(self._quant[key], Exception):  # a new exception each time: the traceback stays short
            e = self._quant[key]
            raise RuntimeError(f"quantize_ of {name} with {scheme} failed: {type(e).__name__}: {e}") from e
        return self._quant[key]


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    return Zoo()


def run(name, model, inputs, **extra) -> torch.Tensor:
    with torch.no_grad():
        return SPECS[name].output(model(**inputs, **extra))


def cast_inputs(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v
            for k, v in inputs.items()}


def packed_modules(model) -> dict:
    """``{fqn: module}`` of the modules holding a quantized weight (a ``qdata`` buffer of their own)."""
    return {fqn: m for fqn, m in model.named_modules() if "qdata" in dict(m.named_buffers(recurse=False))}


def packed_buffers(model) -> dict:
    return {fqn: b for fqn, b in model.named_buffers() if fqn.rsplit(".", 1)[-1].endswith(PACKED)}


def same_outputs(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    diff = (a.float() - b.float()).abs().max().item()
    assert torch.equal(a, b), f"{what}: outputs differ (max abs diff {diff:.3g})"


# ---------------------------------------------------------------- quantize and accuracy


@pytest.mark.parametrize("name,scheme", ALL)
def test_quantize_accuracy(zoo, name, scheme):
    f, q = zoo.float(name), zoo.quantized(name, scheme)
    mods = packed_modules(q.model)
    assert mods, f"{name}: no layer was quantized with {scheme}"
    float_mods = dict(f.model.named_modules())
    for fqn, m in mods.items():  # a generated subclass of the module's own class, at the same fqn
        assert isinstance(m, type(float_mods[fqn])), f"{fqn}: {type(m)} is not a {type(float_mods[fqn])}"
    linears = [fqn for fqn, m in f.model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [fqn for fqn in linears if fqn not in mods]
    assert not missing, f"{name}/{scheme}: linears left float: {missing[:5]}"
    assert torch.isfinite(q.out).all()
    db = sqnr(f.ref, q.out)
    assert db >= FLOORS[scheme], f"{name}/{scheme}: model SQNR {db:.1f} dB < floor {FLOORS[scheme]} dB"


@pytest.mark.parametrize("name,scheme", ALL)
def test_weight_reads_dequantized(zoo, name, scheme):
    """``.weight`` of every quantized layer: the float weight's shape and dtype, close to it."""
    f, q = zoo.float(name), zoo.quantized(name, scheme)
    float_mods = dict(f.model.named_modules())
    worst = (float("inf"), None)
    for fqn, m in packed_modules(q.model).items():
        w, ref = m.weight, float_mods[fqn].weight
        assert isinstance(w, torch.Tensor), f"{fqn}.weight is {type(w)}"
        assert w.shape == ref.shape and w.dtype == ref.dtype, f"{fqn}.weight: {w.shape} {w.dtype}, want {ref.shape} {ref.dtype}"
        worst = min(worst, (sqnr(ref, w), fqn))
    if SPECS[name].is_lm:
        head, ref = q.model.get_output_embeddings(), f.model.get_output_embeddings().weight
        assert head.weight.shape == (VOCAB, HIDDEN) and head.weight.dtype == torch.bfloat16
        worst = min(worst, (sqnr(ref, head.weight), "output embeddings"))
    assert worst[0] >= WEIGHT_FLOORS[scheme], f"{worst[1]}.weight: SQNR {worst[0]:.1f} dB < {WEIGHT_FLOORS[scheme]}"


@pytest.mark.parametrize("name,scheme", LM_ALL)
def test_generate(zoo, name, scheme):
    f, q = zoo.float(name), zoo.quantized(name, scheme)
    ids, mask = f.inputs["input_ids"], f.inputs["attention_mask"]
    with torch.no_grad():
        out = q.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                               do_sample=False, pad_token_id=0)
    seq = 1 + 4 if name == "t5" else ids.shape[1] + 4  # T5 returns the decoder start token and new tokens
    assert out.shape == (ids.shape[0], seq) and out.dtype == torch.long, f"{out.shape} {out.dtype}"
    assert ((out >= 0) & (out < VOCAB)).all()
    if name != "t5":
        assert torch.equal(out[:, : ids.shape[1]], ids)
    # Loosely against the quantized model's own eager logits: the first new token is in its top 3.
    if name == "t5":
        logits = run(name, q.model, {**f.inputs, "decoder_input_ids": out[:, :1]})[:, -1]
    else:
        logits = run(name, q.model, f.inputs)[:, -1]
    first = out[:, -4]
    top3 = logits.float().topk(3, dim=-1).indices
    assert (top3 == first[:, None]).any(-1).all(), f"first new tokens {first.tolist()} vs top-3 {top3.tolist()}"


# ---------------------------------------------------------------- compile and export


def _call_inputs(name, inputs):
    return {**inputs, "use_cache": False} if SPECS[name].is_lm else inputs


@pytest.mark.parametrize("name,scheme", COMPILE)
def test_compile_fullgraph(zoo, name, scheme):
    """``torch.compile(fullgraph=True)`` with aot_eager, which traces the whole quantized model."""
    f, q = zoo.float(name), zoo.quantized(name, scheme)
    inputs = _call_inputs(name, f.inputs)
    eager = run(name, q.model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(q.model, fullgraph=True, backend="aot_eager")
    same_outputs(run(name, compiled, inputs), eager, "aot_eager vs eager")  # measured: bit for bit


@pytest.mark.parametrize("name,scheme", [pytest.param("llama", "int8dq", id="llama-int8dq"),
                                         pytest.param("gpt2", "int4wo-128", id="gpt2-int4wo-128")])
def test_compile_inductor(zoo, name, scheme):
    f, q = zoo.float(name), zoo.quantized(name, scheme)
    inputs = _call_inputs(name, f.inputs)
    eager = run(name, q.model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(q.model, fullgraph=True)  # inductor
    out = run(name, compiled, inputs)
    db = sqnr(eager, out)
    assert out.shape == eager.shape and db >= 30, f"inductor vs eager: SQNR {db:.1f} dB"
    db_ref = sqnr(f.ref, out)
    assert db_ref >= FLOORS[scheme], f"inductor vs float: SQNR {db_ref:.1f} dB"


@pytest.mark.parametrize("name,scheme", EXPORT)
def test_export(zoo, name, scheme):
    f, q = zoo.float(name), zoo.quantized(name, scheme)
    inputs = _call_inputs(name, f.inputs)
    ep = torch.export.export(q.model, (), inputs)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("aofx.") for t in targets), f"no aofx op in the exported graph: {sorted(targets)[:20]}"
    out = run(name, ep.module(), inputs)
    same_outputs(out, run(name, q.model, inputs), "exported vs eager")


# ---------------------------------------------------------------- save and load


def _shared_aliases(sd: dict) -> list:
    """Keys whose tensor shares storage with an earlier key (tied weights)."""
    seen, aliases = {}, []
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            aliases.append((seen[ptr], k))
        else:
            seen[ptr] = k
    return aliases


@pytest.mark.parametrize("name,scheme", ALL)
def test_state_dict_safetensors_roundtrip(zoo, name, scheme, tmp_path):
    """``state_dict`` -> ``save_file`` -> a fresh model, quantized the same way -> ``load_state_dict``."""
    q = zoo.quantized(name, scheme)
    sd = q.model.state_dict()
    assert all(type(t) is torch.Tensor for t in sd.values()), {k: type(t) for k, t in sd.items() if type(t) is not torch.Tensor}
    aliases = _shared_aliases(sd)
    tied_packed = [pair for pair in aliases if any(k.endswith(PACKED) for k in pair)]
    assert not tied_packed, f"packed tensors share storage: {tied_packed}"
    sd = {k: v.clone() if any(k == b for _, b in aliases) else v for k, v in sd.items()}  # tied float embeddings
    save_file(sd, tmp_path / "model.safetensors")
    fresh = SPECS[name].build(seed=1)  # other weights, same architecture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        aofx.quantize_(fresh, SCHEMES[scheme])
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    same_outputs(run(name, fresh, zoo.float(name).inputs), q.out, "reloaded vs original")


@pytest.mark.parametrize("name,scheme", ALL)
def test_save_load_quantized(zoo, name, scheme, tmp_path):
    q = zoo.quantized(name, scheme)
    path = tmp_path / "model.safetensors"
    aofx.save_quantized(q.model, path)
    fresh = SPECS[name].build(seed=1)
    aofx.load_quantized(fresh, path)
    assert packed_modules(fresh).keys() == packed_modules(q.model).keys()
    same_outputs(run(name, fresh, zoo.float(name).inputs), q.out, "load_quantized vs original")


# Models without non-persistent buffers (rotary inv_freq, BERT's position_ids): a meta-built model
# of theirs is fully restored by the file.
META = [pytest.param(m, s, id=f"{m}-{s}") for m in ("gpt2", "t5", "flux", "unet") for s in ("int4wo-128", "fp8dq-row")]


@pytest.mark.parametrize("name,scheme", META)
def test_load_quantized_into_meta_model(zoo, name, scheme, tmp_path):
    q = zoo.quantized(name, scheme)
    path = tmp_path / "model.safetensors"
    aofx.save_quantized(q.model, path)
    with torch.device("meta"):
        fresh = SPECS[name].build(seed=1)
    aofx.load_quantized(fresh, path)
    on_meta = [k for k, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    assert not on_meta, f"still on the meta device: {on_meta[:5]}"
    same_outputs(run(name, fresh, zoo.float(name).inputs), q.out, "load_quantized (meta) vs original")


# ---------------------------------------------------------------- dtype casts, pickling, deepcopy


CASTS = [pytest.param(lambda m: m.to(torch.float32), torch.float32, id="to-float32"),
         pytest.param(lambda m: m.half(), torch.float16, id="half")]


@pytest.mark.parametrize("name,scheme", ALL)
def test_dtype_casts_keep_packed_dtypes(zoo, name, scheme):
    q = zoo.fresh(name, scheme)  # changed in place below
    before = {k: (b.dtype, b.shape) for k, b in packed_buffers(q.model).items()}
    assert before
    for cast in (lambda m: m.to(torch.float32), lambda m: m.half(), lambda m: m.float()):
        cast(q.model)
        after = {k: (b.dtype, b.shape) for k, b in packed_buffers(q.model).items()}
        changed = {k: (before[k], v) for k, v in after.items() if before.get(k) != v}
        assert after.keys() == before.keys() and not changed, f"packed buffers changed: {changed}"


@pytest.mark.parametrize("cast,dtype", CASTS)
@pytest.mark.parametrize("name,scheme", rotate(2, 2))  # each new dtype captures every layer again: slow
def test_dtype_cast_model_runs(zoo, name, scheme, cast, dtype):
    q = zoo.fresh(name, scheme)  # changed in place below
    cast(q.model)
    out = run(name, q.model, cast_inputs(zoo.float(name).inputs, dtype))
    assert out.dtype == dtype, f"output {out.dtype} after casting the model to {dtype}"
    db = sqnr(q.out, out)  # the same quantized weights, another activation and compute precision
    assert torch.isfinite(out).all() and db >= 20, f"{dtype}: SQNR {db:.1f} dB against the bf16 quantized output"


@pytest.mark.parametrize("name,scheme", ALL)
def test_torch_save_load_pickle(zoo, name, scheme):
    q = zoo.quantized(name, scheme)
    buf = io.BytesIO()
    torch.save(q.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert packed_modules(loaded).keys() == packed_modules(q.model).keys()
    same_outputs(run(name, loaded, zoo.float(name).inputs), q.out, "torch.load vs original")


@pytest.mark.parametrize("name", MODEL_IDS)
def test_plain_pickle(zoo, name):
    q = zoo.quantized(name, "int4wo-128")
    loaded = pickle.loads(pickle.dumps(q.model))
    same_outputs(run(name, loaded, zoo.float(name).inputs), q.out, "pickle vs original")


@pytest.mark.parametrize("name,scheme", ALL)
def test_deepcopy(zoo, name, scheme):
    q = zoo.quantized(name, scheme)
    inputs = zoo.float(name).inputs
    dup = copy.deepcopy(q.model)
    same_outputs(run(name, dup, inputs), q.out, "deepcopy vs original")
    ptrs = {t.untyped_storage().data_ptr() for t in [*q.model.parameters(), *q.model.buffers()]}
    shared = [k for k, t in [*dup.named_parameters(), *dup.named_buffers()] if t.untyped_storage().data_ptr() in ptrs]
    assert not shared, f"the copy shares storage with the original: {shared[:5]}"
    with torch.no_grad():  # change the copy's codes: the original must not see it
        for k, b in packed_buffers(dup).items():
            if k.endswith("qdata"):
                b.zero_()
    same_outputs(run(name, q.model, inputs), q.out, "original after changing the copy")
    assert not torch.equal(run(name, dup, inputs), q.out), "zeroing the copy's codes changed nothing"


# ---------------------------------------------------------------- model-specific


@pytest.mark.parametrize("scheme", SCHEME_IDS)
def test_gpt2_conv1d_is_quantized(zoo, scheme):
    from transformers.pytorch_utils import Conv1D

    f, q = zoo.float("gpt2"), zoo.quantized("gpt2", scheme)
    convs = {fqn: m for fqn, m in f.model.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each of 2 blocks
    qmods = dict(q.model.named_modules())
    cfg = SCHEMES[scheme]
    for fqn, float_mod in convs.items():
        m = qmods[fqn]
        assert isinstance(m, Conv1D)
        names = dict(m.named_buffers(recurse=False))
        assert {"qdata", "scale"} <= names.keys(), f"{fqn}: buffers {sorted(names)}"
        assert "scheme=" in repr(m) and type(cfg).__name__ in repr(m), f"{fqn}: {m!r}"
        assert m.weight.shape == float_mod.weight.shape  # Conv1D's (K, N)


@pytest.mark.parametrize("scheme", SCHEME_IDS)
def test_falcon_linear_matmul_is_quantized(zoo, scheme):
    """FalconLinear's forward is ``x @ self.weight.T``, not F.linear: every one is rewritten, none skipped."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    f = zoo.float("falcon")
    linears = [fqn for fqn, m in f.model.named_modules() if isinstance(m, FalconLinear)]
    assert len(linears) == 8  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h in each of 2 blocks
    model = copy.deepcopy(f.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip warning would fail here
        aofx.quantize_(model, SCHEMES[scheme])
    qmods = dict(model.named_modules())
    for fqn in linears:
        assert isinstance(qmods[fqn], FalconLinear) and "qdata" in dict(qmods[fqn].named_buffers()), fqn


@pytest.mark.parametrize("scheme", SCHEME_IDS)
def test_t5_feed_forward_reads_wo_weight(zoo, scheme):
    """T5's feed-forward casts its input to ``self.wo.weight.dtype``: that must be the layer's dtype."""
    q = zoo.quantized("t5", scheme)
    wo = q.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert "qdata" in dict(wo.named_buffers(recurse=False))
    assert wo.weight.dtype == torch.bfloat16
    assert q.out.dtype == torch.bfloat16 and torch.isfinite(q.out).all()


@pytest.mark.parametrize("scheme", SCHEME_IDS)
def test_mixtral_warns_expert_weights_stay_float(zoo, scheme):
    f, q = zoo.float("mixtral"), zoo.quantized("mixtral", scheme)
    experts = {k: p for k, p in f.model.named_parameters() if p.dim() == 3}
    assert experts
    owners = {}  # module fqn -> parameters that stay float
    for k, p in experts.items():
        owners[k.rsplit(".", 1)[0]] = owners.get(k.rsplit(".", 1)[0], 0) + p.numel()
    messages = [str(w.message) for w in q.warnings]
    hits = [m for m in messages if "expert" in m.lower()]
    assert len(hits) == 1, f"want one warning about expert weights, got {messages}"
    total = sum(owners.values())
    if not any(f"{total:{fmt}}" in hits[0] for fmt in ("", ",", "_")):  # one total, or a count per module
        for fqn, n in owners.items():
            assert fqn in hits[0] and any(f"{n:{fmt}}" in hits[0] for fmt in ("", ",", "_")), \
                f"no count of {fqn}'s {n} float parameters (or the total {total}) in {hits[0]!r}"
    params = dict(q.model.named_parameters())
    for k in experts:  # still float parameters
        assert params[k].dtype == torch.bfloat16 and params[k].dim() == 3


@pytest.mark.parametrize("scheme", ["int8wo", "fp8dq-row"])
def test_rwkv_rescales_its_quantized_weights_in_place(scheme):
    """RWKV's first eval forward divides some weights in place (``weight.div_``) and scales the hidden
    states to match: the division must reach the quantized layers."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    cfg = RwkvConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, attention_hidden_size=HIDDEN,
                     intermediate_size=2 * HIDDEN, context_length=64, rescale_every=1)
    model = RwkvForCausalLM(cfg).to(torch.bfloat16).eval()
    quantized = copy.deepcopy(model)  # neither has run: both rescale on their first forward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aofx.quantize_(quantized, SCHEMES[scheme])
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert quantized.rwkv.layers_are_rescaled
    assert sqnr(want.float(), got.float()) >= FLOORS[scheme]
