"""The install contract (aofx/install.py, aofx/api.py): the generated ``Quantized<Class>`` subclass,
``weight`` reads and writes, dtype casts, pickling, per-unit capture, skipped layers, ties, grads,
attention modules, ``example_inputs``, the meta device, ``FqnToConfig`` and hooks. CPU only."""

import copy
import dataclasses
import io
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aofx
from aofx.numerics import sqnr
from tests.common import CONFIGS, CONFIGS_WITH_FLOOR, TwoLayer, normal_weights, scheme_of, seeded, two_layer

MARGIN = 3.0  # dB under a scheme's single-layer floor that a single-layer check may lose
WEIGHT_ONLY = (aofx.Int4WeightOnlyConfig, aofx.Int8WeightOnlyConfig, aofx.Float8WeightOnlyConfig)
BF16 = torch.bfloat16


def quantize(model, config, **kwargs) -> list:
    """``aofx.quantize_``; returns the messages of aofx's "skipped" UserWarnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aofx.quantize_(model, config, **kwargs)
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and str(w.message).startswith("aofx.quantize_")]


def names_in(message: str, fqn: str) -> bool:
    """Whether the skipped-warning ``message`` has a line for ``fqn`` (or a parameter of it)."""
    return re.search(rf"^\s+{re.escape(fqn)}(\.\w+)?:", message, re.M) is not None


def randn(*shape, dtype=BF16, seed=1, std=1.0):
    return (torch.randn(shape, generator=seeded(seed)) * std).to(dtype)


def one_layer(dtype=BF16, seed=0):
    return normal_weights(nn.Sequential(nn.Linear(256, 128, dtype=dtype)), seed=seed)


def packed(layer) -> dict:
    return {n: b for n, b in layer.named_buffers(recurse=False) if n in ("qdata", "scale", "zero")}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact view for torch.equal (float8 tensors compare poorly on CPU)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Module-level classes: pickling needs importable classes.

class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: the output times a buffer."""

    def __init__(self, *args, gain=3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("gain", torch.tensor(gain, dtype=self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.gain


class AlphaLinear(nn.Linear):
    """A Linear subclass whose forward uses a Python float attribute."""

    def __init__(self, *args, alpha=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.alpha


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 128, dtype=BF16)
        self.scaled = ScaledLinear(128, 128, gain=3.0, dtype=BF16)
        self.down = nn.Linear(128, 64, bias=False, dtype=BF16)

    def forward(self, x):
        return self.down(torch.relu(self.scaled(torch.relu(self.up(x)))))


# ---------------------------------------------------------------- 1. the generated subclass

@pytest.mark.parametrize("cfg", CONFIGS)
def test_generated_subclass(cfg):
    model = normal_weights(two_layer())
    up, down = model.up, model.down
    assert quantize(model, cfg) == []
    assert type(model) is TwoLayer
    assert model.up is up and model.down is down
    assert dict(model.named_modules()).keys() == {"", "up", "down"}
    for layer in (up, down):
        assert isinstance(layer, nn.Linear) and type(layer) is not nn.Linear
        assert type(layer).__name__ == "QuantizedLinear"
        assert "weight" not in layer._parameters
        assert f"scheme={type(cfg).__name__}" in repr(layer)
        assert scheme_of(layer) == type(cfg).__name__
    assert type(up) is type(down)
    assert "in_features=256" in repr(up) and f"scheme={type(cfg).__name__}" in repr(model)


# ---------------------------------------------------------------- 2. weight reads and writes

@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_weight_reads_the_dequantized_weight(cfg, floor):
    model = normal_weights(two_layer())
    orig = {n: getattr(model, n).weight.detach().clone() for n in ("up", "down")}
    assert quantize(model, cfg) == []
    for name, w0 in orig.items():
        w = getattr(model, name).weight
        assert w.shape == w0.shape and w.dtype == BF16
        assert not isinstance(w, nn.Parameter)
        db = sqnr(w0, w)
        assert db > floor - MARGIN, f"{name}: weight SQNR {db:.1f} dB"
        assert same_bits(getattr(model, name).weight, w)  # reads are stable
    x = randn(3, 5, 256)
    layer = model.up
    y = layer(x)
    via_weight = F.linear(x, layer.weight, layer.bias)
    if isinstance(cfg, WEIGHT_ONLY):  # the forward uses exactly this dequantization
        torch.testing.assert_close(y, via_weight)
    else:
        assert sqnr(via_weight, y) > floor - MARGIN
    layer.weight.mul_(0)  # in-place writes to a read do not reach the layer
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("wrap", [lambda t: t, nn.Parameter], ids=["tensor", "parameter"])
@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_assigning_weight_requantizes(cfg, floor, wrap):
    model = one_layer()
    old = model[0].weight.detach().clone()
    assert quantize(model, cfg) == []
    layer = model[0]
    keys = {k: (v.dtype, v.shape) for k, v in model.state_dict().items()}
    x = randn(4, 256)
    layer(x)  # captured before the write
    new = randn(128, 256, seed=7, std=0.05)
    layer.weight = wrap(new.clone())
    assert type(layer).__name__ == "QuantizedLinear" and "weight" not in layer._parameters
    assert {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} == keys
    assert sqnr(new, layer.weight) > floor - MARGIN
    y = model(x)
    assert sqnr(F.linear(x, new, layer.bias), y) > floor - MARGIN
    assert sqnr(F.linear(x, old, layer.bias), y) < 10  # no longer the old weight


@pytest.mark.parametrize("cfg", CONFIGS)
def test_assigning_incompatible_weight_raises(cfg):
    model = one_layer()
    assert quantize(model, cfg) == []
    layer = model[0]
    x = randn(4, 256)
    y = layer(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [randn(256), randn(2, 128, 256), torch.ones(128, 256, dtype=torch.int32), [[0.0] * 256] * 128, None]
    for value in bad:
        with pytest.raises((TypeError, ValueError), match=r"Linear\.weight.*quantized"):
            layer.weight = value
    if getattr(cfg, "group_size", None):  # in_features not a multiple of the group size
        with pytest.raises(ValueError, match=rf"Linear\.weight.*group_size={cfg.group_size}"):
            layer.weight = randn(128, 16 + 2 * cfg.group_size)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(same_bits(after[k], before[k]) for k in before)
    assert torch.equal(layer(x), y)


# ---------------------------------------------------------------- 3. dtype casts

CASTS = [
    pytest.param(lambda m: m.to(torch.float32), BF16, torch.float32, id="to-float32"),
    pytest.param(lambda m: m.half(), BF16, torch.float16, id="half"),
    pytest.param(lambda m: m.float(), BF16, torch.float32, id="float"),
    pytest.param(lambda m: m.bfloat16(), torch.float32, BF16, id="bfloat16"),
]


@pytest.mark.parametrize("cast,start,target", CASTS)
@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_dtype_cast_keeps_packed_tensors(cfg, floor, cast, start, target):
    model = one_layer(dtype=start)
    ref = copy.deepcopy(model)
    assert quantize(model, cfg) == []
    model(randn(2, 256, dtype=start))  # captured in the start dtype
    layer = model[0]
    before = {n: t.clone() for n, t in packed(layer).items()}
    assert model is cast(model)
    after = packed(layer)
    assert after.keys() == before.keys()
    for n in before:
        assert same_bits(after[n], before[n]), f"{n}: {before[n].dtype} -> {after[n].dtype}"
    if isinstance(cfg, aofx.Float8WeightOnlyConfig) or isinstance(cfg, aofx.Float8DynamicActivationFloat8WeightConfig):
        assert after["qdata"].dtype == torch.float8_e4m3fn
    if isinstance(cfg, aofx.Int4WeightOnlyConfig):
        assert after["scale"].dtype == BF16 and after["zero"].dtype == BF16
    assert layer.bias.dtype == target and isinstance(layer.bias, nn.Parameter)
    assert layer.weight.dtype == target
    x = randn(3, 256, dtype=target)
    y = model(x)
    assert y.dtype == target
    db = sqnr(cast(ref)(x), y)
    assert db > floor - MARGIN, f"SQNR {db:.1f} dB in {target}"


# ---------------------------------------------------------------- 4. pickling

def _torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUND_TRIPS = [pytest.param(_torch_save, id="torch.save"),
               pytest.param(lambda m: pickle.loads(pickle.dumps(m)), id="pickle"),
               pytest.param(copy.deepcopy, id="deepcopy")]


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.id not in ("int4wo-128", "fp8dq-row")])  # every layout
def test_round_trip_gives_identical_independent_model(cfg, round_trip):
    torch.manual_seed(0)
    model = normal_weights(Block())
    assert quantize(model, cfg) == []
    x, x3 = randn(4, 256), randn(2, 3, 256, seed=2)
    y, y3 = model(x), model(x3)
    clone = round_trip(model)
    assert type(clone) is Block
    assert type(clone.up).__name__ == "QuantizedLinear" and isinstance(clone.up, nn.Linear)
    assert isinstance(clone.scaled, ScaledLinear) and type(clone.scaled).__name__ == "QuantizedScaledLinear"
    assert scheme_of(clone.up) == scheme_of(clone.scaled) == type(cfg).__name__
    assert torch.equal(clone(x), y) and torch.equal(clone(x3), y3)
    sd, csd = model.state_dict(), clone.state_dict()
    assert sd.keys() == csd.keys() and all(same_bits(sd[k], csd[k]) for k in sd)
    for k in sd:  # independent storage
        assert sd[k].untyped_storage().data_ptr() != csd[k].untyped_storage().data_ptr(), k
    # Mutating the clone (its buffers, its weight) leaves the original alone.
    clone.up.qdata.zero_()
    clone.scaled.weight = randn(128, 128, seed=5, std=0.05)
    assert not torch.equal(clone(x), y)
    assert torch.equal(model(x), y)


# ---------------------------------------------------------------- 5. capture does not mix layers

class Mixed(nn.Module):
    """The same weight behind four forwards."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(256, 256, dtype=BF16)
        self.scaled = ScaledLinear(256, 256, gain=3.0, dtype=BF16)
        self.small = AlphaLinear(256, 256, alpha=0.5, dtype=BF16)
        self.big = AlphaLinear(256, 256, alpha=2.0, dtype=BF16)
        normal_weights(self.plain)
        for layer in (self.scaled, self.small, self.big):
            layer.load_state_dict(self.plain.state_dict(), strict=False)

    def forward(self, x):
        return {name: layer(x) for name, layer in self.named_children()}


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_each_layer_runs_its_own_forward(cfg, floor):
    model = Mixed()
    ref = copy.deepcopy(model)
    assert quantize(model, cfg) == []
    for name in ("plain", "scaled", "small", "big"):
        assert scheme_of(getattr(model, name)) == type(cfg).__name__, name
    for x in (randn(4, 256), randn(2, 3, 256, seed=2), randn(1, 256, seed=3)):
        want, got = ref(x), model(x)
        for name in want:
            db = sqnr(want[name], got[name])
            assert db > floor - MARGIN, f"{name}: SQNR {db:.1f} dB for input {tuple(x.shape)}"


# ---------------------------------------------------------------- 6. layers that must stay float

class TwiceLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.weight.sum()


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 2, self.bias)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(256, 256, dtype=BF16)
        self.twice = TwiceLinear(256, 256, dtype=BF16)
        self.doubled = DoubledLinear(256, 256, dtype=BF16)
        self.wn = torch.nn.utils.parametrizations.weight_norm(nn.Linear(256, 256, dtype=BF16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old hook is deprecated
            self.old_wn = torch.nn.utils.weight_norm(nn.Linear(256, 256, dtype=BF16))

    def forward(self, x):
        return {name: layer(x) for name, layer in self.named_children()}


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_weight_used_outside_linear_or_parametrized_stays_float(cfg, floor):
    torch.manual_seed(0)
    model = Odd()
    x = randn(3, 256)
    with torch.no_grad():
        want = model(x)  # (the old weight_norm hook makes the model impossible to deepcopy)
    classes = {name: type(m) for name, m in model.named_children()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    messages = quantize(model, cfg)
    assert len(messages) == 1, messages
    for name in ("twice", "doubled", "wn", "old_wn"):
        assert names_in(messages[0], name), f"{name} not named in:\n{messages[0]}"
    assert not names_in(messages[0], "plain")
    assert scheme_of(model.plain) == type(cfg).__name__
    for name in ("twice", "doubled", "wn", "old_wn"):
        layer = getattr(model, name)
        assert type(layer) is classes[name], name
        assert scheme_of(layer) == ""
    assert isinstance(model.twice.weight, nn.Parameter) and isinstance(model.doubled.weight, nn.Parameter)
    assert torch.nn.utils.parametrize.is_parametrized(model.wn, "weight")
    now = model.state_dict()
    for k, v in state.items():
        if not k.startswith("plain."):
            assert torch.equal(now[k], v), k
    with torch.no_grad():
        got = model(x)
    for name in ("twice", "doubled", "wn", "old_wn"):
        assert torch.equal(got[name], want[name]), name
    assert sqnr(want["plain"], got["plain"]) > floor - MARGIN


@pytest.mark.parametrize("cfg", CONFIGS)
def test_uninitialized_lazy_linear_raises_and_changes_nothing(cfg):
    model = nn.Sequential(nn.Linear(256, 128, dtype=BF16), nn.ReLU(), nn.LazyLinear(64, dtype=BF16))
    classes = [type(m) for m in model]
    first = {k: v.clone() for k, v in model[0].state_dict().items()}
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"2\.weight.*(lazy|initializ)"):
        aofx.quantize_(model, cfg)
    assert [type(m) for m in model] == classes
    assert list(model.state_dict()) == keys
    assert isinstance(model[0].weight, nn.Parameter)
    assert all(torch.equal(model[0].state_dict()[k], v) for k, v in first.items())
    assert isinstance(model[2].weight, nn.parameter.UninitializedParameter)


# ---------------------------------------------------------------- 7. ties

class TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 128, dtype=BF16)
        self.b = nn.Linear(256, 128, dtype=BF16)
        normal_weights(self)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.a(x), self.b(x)


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_tied_linears_share_packed_tensors(cfg, floor):
    model = TiedPair()
    w = model.a.weight.detach().clone()
    ref = copy.deepcopy(model)
    assert quantize(model, cfg) == []
    a, b = model.a, model.b
    assert scheme_of(a) == scheme_of(b) == type(cfg).__name__
    assert packed(a) and packed(a).keys() == packed(b).keys()
    for n in packed(a):
        assert getattr(a, n) is getattr(b, n), n
    assert same_bits(a.weight, b.weight) and sqnr(w, a.weight) > floor - MARGIN
    x = randn(4, 256)
    for got, want in zip(model(x), ref(x)):
        assert sqnr(want, got) > floor - MARGIN
    model.float()
    assert a.qdata is b.qdata
    assert all(torch.isfinite(t).all() for t in model(x.float()))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(512, 256, dtype=BF16)
        self.head = nn.Linear(256, 512, bias=False, dtype=BF16)
        normal_weights(self)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_embedding_tied_to_head_stays_float(cfg, floor):
    model = TiedLM()
    ref = copy.deepcopy(model)
    w = model.emb.weight.detach().clone()
    quantize(model, cfg)
    assert type(model.emb) is nn.Embedding and isinstance(model.emb.weight, nn.Parameter)
    assert torch.equal(model.emb.weight, w)
    assert scheme_of(model.head) == type(cfg).__name__
    assert sqnr(w, model.head.weight) > floor - MARGIN
    ids = torch.randint(0, 512, (2, 7), generator=seeded(3))
    assert torch.equal(model.emb(ids), ref.emb(ids))
    assert sqnr(ref(ids), model(ids)) > floor - MARGIN
    assert "emb.weight" in model.state_dict() and "head.qdata" in model.state_dict()


# ---------------------------------------------------------------- 8. bias trainability and grads

def _chain():
    model = normal_weights(nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 64)))
    model[1].bias.requires_grad_(False)
    return model


def _grads(model, x, g, bias):
    """``(x.grad, bias.grad)`` after ``model(x).backward(g)``."""
    bias.grad = None
    x = x.clone().requires_grad_(True)
    model(x).backward(g)
    return x.grad, bias.grad


@pytest.mark.parametrize("cfg", CONFIGS)
def test_bias_requires_grad_kept_and_backward(cfg, fresh_dynamo):
    model = _chain()
    assert quantize(model, cfg) == []
    assert isinstance(model[0].bias, nn.Parameter) and isinstance(model[1].bias, nn.Parameter)
    assert model[0].bias.requires_grad is True and model[1].bias.requires_grad is False
    # The float chain with the dequantized weights: the op's backward is through them.
    deq = _chain()
    with torch.no_grad():
        for i in (0, 1):
            deq[i].weight.copy_(model[i].weight)
    x, g = randn(4, 256, dtype=torch.float32), randn(4, 64, dtype=torch.float32, seed=2)
    want = _grads(deq, x, g, deq[0].bias)
    got = _grads(model, x, g, model[0].bias)
    assert got[1] is not None and model[1].bias.grad is None
    for w, v in zip(want, got):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, x, g, model[0].bias)
    for w, v in zip(want, got):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5)


def test_bias_grads_under_inductor(fresh_dynamo):
    model = _chain()
    assert quantize(model, aofx.Int8WeightOnlyConfig()) == []
    x, g = randn(4, 256, dtype=torch.float32), randn(4, 64, dtype=torch.float32, seed=2)
    want = _grads(model, x, g, model[0].bias)
    got = _grads(torch.compile(model, fullgraph=True), x, g, model[0].bias)
    for w, v in zip(want, got):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 9. attention modules

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(128, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def _encoder():
    return nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, dropout=0.0, batch_first=True)


@pytest.mark.parametrize("make", [Attention, _encoder], ids=["mha", "encoder"])
@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_attention_modules(cfg, floor, make):
    torch.manual_seed(0)
    model = normal_weights(make(), std=0.05)
    ref = copy.deepcopy(model)
    mha = model.mha if isinstance(model, Attention) else model.self_attn
    w = mha.out_proj.weight.detach().clone()
    assert quantize(model, cfg) == []
    assert scheme_of(mha.out_proj) == type(cfg).__name__ and isinstance(mha.out_proj, nn.Linear)
    assert isinstance(mha.in_proj_weight, nn.Parameter)
    assert mha.out_proj.weight.shape == (128, 128) and sqnr(w, mha.out_proj.weight) > floor - MARGIN
    x = randn(2, 5, 128, dtype=torch.float32)
    y = model(x)
    db = sqnr(ref(x), y)
    assert db > floor - MARGIN, f"SQNR {db:.1f} dB"
    model.eval()
    ref.eval()
    with torch.no_grad():  # the encoder's inference fast path reads the weights itself
        db = sqnr(ref(x), model(x))
        assert db > floor - MARGIN, f"SQNR {db:.1f} dB (eval, no_grad)"


@pytest.mark.parametrize("make", [Attention, _encoder], ids=["mha", "encoder"])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.id in ("int4wo-32", "int8dq", "fp8dq-row")])
def test_attention_modules_compile_fullgraph(cfg, make, fresh_dynamo):
    torch.manual_seed(0)
    model = normal_weights(make(), std=0.05)
    assert quantize(model, cfg) == []
    x = randn(2, 5, 128, dtype=torch.float32)
    y = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 10. example_inputs

class Custom(nn.Module):
    """Uses its own parameter through F.linear; a float arg, a bool keyword, a Dropout."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(128, 256, generator=seeded(4)) * 0.02)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, scale, flag=False):
        y = F.linear(x, self.w) * scale
        if flag:
            y = torch.tanh(y) - y
        return self.drop(y)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Custom()

    def forward(self, x, scale, flag=False):
        return self.inner(x, scale, flag=flag)


CALLS = [
    ("x1", (0.5,), {}),            # the example's signature
    ("x2", (2.0,), {}),            # another scale, batch 2
    ("x5", (0.5,), {"flag": True}),  # the other flag value, batch 5
    ("x1", (1.5,), {"flag": False}),
    ("x2", (), {"scale": 0.25, "flag": True}),  # scale by keyword
]


def _call(model, xs, name, args, kwargs):
    return model(xs[name], *args, **kwargs)


def _quantized_outer(cfg, train=False):
    """``(quantized Outer, float copy)``, quantized with a batch-1 example in eval (or train) mode."""
    model = Outer().train(train)
    ref = copy.deepcopy(model)
    example = randn(1, 256, dtype=torch.float32, seed=1)
    assert quantize(model, cfg, example_inputs=(example, 0.5)) == []
    assert type(model) is Outer and scheme_of(model.inner) == type(cfg).__name__
    assert isinstance(model.inner, Custom) and "w" not in model.inner._parameters
    return model, ref


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_example_inputs_custom_forward_other_signatures(cfg, floor):
    model, ref = _quantized_outer(cfg)
    model.eval()
    ref.eval()
    xs = {f"x{b}": randn(b, 256, dtype=torch.float32, seed=b) for b in (1, 2, 5)}
    deq = copy.deepcopy(ref)
    deq.inner.w.data = model.inner.w.detach().clone()  # the float model with the dequantized weight
    for name, args, kwargs in CALLS:
        got = _call(model, xs, name, args, kwargs)
        db = sqnr(_call(ref, xs, name, args, kwargs), got)
        assert db > floor - MARGIN, f"{name} {args} {kwargs}: SQNR {db:.1f} dB"
        if isinstance(cfg, WEIGHT_ONLY):
            torch.testing.assert_close(got, _call(deq, xs, name, args, kwargs), rtol=1e-4, atol=1e-5)
        assert torch.equal(_call(model, xs, name, args, kwargs), got)  # eval: deterministic
    assert torch.equal(model(x=xs["x2"], scale=2.0), model(xs["x2"], 2.0))  # all by keyword


DROPOUT_CONFIGS = [c for c in CONFIGS_WITH_FLOOR if c.id in ("int4wo-32", "int8dq", "fp8wo")]


@pytest.mark.parametrize("train", [False, True], ids=["example-in-eval", "example-in-train"])
@pytest.mark.parametrize("cfg,floor", DROPOUT_CONFIGS)
def test_example_inputs_dropout_follows_train_eval(cfg, floor, train):
    """The example's own signature, run in the other mode first: eval is deterministic and matches
    the float model; train drops about half (the rest doubled), differently on each call."""
    model = Outer().train(train)
    ref = copy.deepcopy(model).eval()
    x = randn(64, 256, dtype=torch.float32, seed=9)
    assert quantize(model, cfg, example_inputs=(x, 1.0)) == []

    def check_eval():
        model.eval()
        clean = model(x, 1.0)
        assert torch.equal(model(x, 1.0), clean), "eval mode: dropout is still on"
        assert sqnr(ref(x, 1.0), clean) > floor - MARGIN
        return clean

    def check_train(clean):
        model.train()
        a, b = model(x, 1.0), model(x, 1.0)
        assert not torch.equal(a, b), "train mode: dropout is off"
        kept = a != 0
        assert 0.35 < kept.float().mean().item() < 0.65
        if clean is not None:
            torch.testing.assert_close(a[kept], 2 * clean[kept], rtol=1e-4, atol=1e-5)

    if train:
        clean = check_eval()
        check_train(clean)
    else:
        check_train(None)
        check_train(check_eval())


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_example_inputs_compile_seen_signature(cfg, floor, fresh_dynamo):
    model, ref = _quantized_outer(cfg)
    model.eval()
    ref.eval()
    x = randn(2, 256, dtype=torch.float32, seed=2)
    y = model(x, 2.0)  # seen eagerly
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, 2.0)
    torch.testing.assert_close(got, y, rtol=1e-4, atol=1e-5)
    assert sqnr(ref(x, 2.0), got) > floor - MARGIN


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_example_inputs_sequential(cfg, floor):
    model = normal_weights(nn.Sequential(nn.Linear(256, 128, dtype=BF16), nn.ReLU(), nn.Linear(128, 64, dtype=BF16)))
    ref = copy.deepcopy(model)
    assert quantize(model, cfg, example_inputs=(randn(1, 256),)) == []
    assert type(model) is nn.Sequential
    assert scheme_of(model[0]) == scheme_of(model[2]) == type(cfg).__name__
    for x in (randn(1, 256, seed=2), randn(5, 256, seed=3), randn(2, 3, 256, seed=4)):
        db = sqnr(ref(x), model(x))
        assert db > floor - 2 * MARGIN, f"SQNR {db:.1f} dB for {tuple(x.shape)}"  # two layers


# ---------------------------------------------------------------- 11. the meta device

def _seq(dtype=BF16):
    return nn.Sequential(nn.Linear(256, 128, dtype=dtype), nn.ReLU(), nn.Linear(128, 64, bias=False, dtype=dtype))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_meta_device_quantize_then_assign(cfg):
    cpu = normal_weights(_seq())
    assert quantize(cpu, cfg) == []
    with torch.device("meta"):
        meta = _seq()
    assert quantize(meta, cfg) == []
    sd_meta, sd_cpu = meta.state_dict(), cpu.state_dict()
    assert list(sd_meta) == list(sd_cpu)
    for k, v in sd_meta.items():
        assert v.is_meta, k
        assert (v.dtype, v.shape) == (sd_cpu[k].dtype, sd_cpu[k].shape), k
    assert type(meta[0]) is type(cpu[0]) and scheme_of(meta[0]) == scheme_of(cpu[0])
    meta.load_state_dict(cpu.state_dict(), assign=True)
    assert not any(t.is_meta for t in meta.state_dict().values())
    for x in (randn(4, 256), randn(2, 3, 256, seed=2)):
        assert torch.equal(meta(x), cpu(x))
    assert same_bits(meta[0].weight, cpu[0].weight)


# ---------------------------------------------------------------- 12. FqnToConfig

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(256, dtype=BF16)
        self.lin = nn.Sequential(nn.Linear(256, 128, dtype=BF16), nn.ReLU(), nn.Linear(128, 64, dtype=BF16))

    def forward(self, x):
        return self.lin(self.norm(x))


def test_fqn_key_matching_nothing_is_named():
    model = Net()
    messages = quantize(model, aofx.FqnToConfig({"lin.7": aofx.Int8WeightOnlyConfig(),
                                                 "re:nothing\\..*": aofx.Int8WeightOnlyConfig(),
                                                 "lin.0": aofx.Int8WeightOnlyConfig()}))
    assert len(messages) == 1
    assert "lin.7" in messages[0] and "re:nothing\\..*" in messages[0]
    assert scheme_of(model.lin[0]) == "Int8WeightOnlyConfig" and scheme_of(model.lin[2]) == ""


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fqn_parameter_key_quantizes_that_layer(cfg):
    model = Net()
    assert quantize(model, aofx.FqnToConfig({"lin.0.weight": cfg})) == []
    assert scheme_of(model.lin[0]) == type(cfg).__name__
    assert scheme_of(model.lin[2]) == "" and isinstance(model.lin[2].weight, nn.Parameter)
    assert type(model.norm) is nn.LayerNorm and type(model.conv) is nn.Conv2d


def test_fqn_key_on_non_linear_with_builtin_config_is_named():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("norm.", "conv."))}
    messages = quantize(model, aofx.FqnToConfig({"norm": aofx.Int8WeightOnlyConfig(),
                                                 "conv": aofx.Int4WeightOnlyConfig(group_size=32),
                                                 "lin.2": aofx.Int8WeightOnlyConfig()}))
    assert len(messages) == 1
    assert names_in(messages[0], "norm") and names_in(messages[0], "conv"), messages[0]
    assert type(model.norm) is nn.LayerNorm and type(model.conv) is nn.Conv2d
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert scheme_of(model.lin[2]) == "Int8WeightOnlyConfig" and scheme_of(model.lin[0]) == ""


@dataclasses.dataclass
class TagConfig(aofx.AOBaseConfig):
    tag: str = ""


_TAGGED = []


@aofx.register_quantize_module_handler(TagConfig)
def _tag(module, config):
    _TAGGED.append((module, config))
    module.tag = config.tag
    return module


def test_registered_handler_reaches_non_linear_modules_by_fqn():
    _TAGGED.clear()
    model = Net()
    conv, norm = model.conv, model.norm
    cfg_conv, cfg_norm = TagConfig("c"), TagConfig("n")
    messages = quantize(model, aofx.FqnToConfig({"conv": cfg_conv, "norm": cfg_norm,
                                                 "_default": aofx.Int8WeightOnlyConfig()}))
    assert messages == []
    assert len(_TAGGED) == 2
    assert {(id(m), id(c)) for m, c in _TAGGED} == {(id(conv), id(cfg_conv)), (id(norm), id(cfg_norm))}
    assert model.conv.tag == "c" and model.norm.tag == "n"
    assert scheme_of(model.lin[0]) == scheme_of(model.lin[2]) == "Int8WeightOnlyConfig"


# ---------------------------------------------------------------- 13. hooks

@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_hooks_registered_before_quantize_run_once(cfg):
    model = Block()
    normal_weights(model)
    calls = {"up": 0, "scaled": 0, "pre": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
            return output * 2 if name == "up" else None
        return hook

    def pre(module, args):
        calls["pre"] += 1

    ref = copy.deepcopy(model)
    model.up.register_forward_hook(count("up"))
    model.scaled.register_forward_hook(count("scaled"))
    model.down.register_forward_pre_hook(pre)
    ref.up.register_forward_hook(lambda m, a, out: out * 2)
    assert quantize(model, cfg) == []
    calls.update(up=0, scaled=0, pre=0)
    x = randn(4, 256)
    for n in range(1, 4):
        model(x if n != 2 else randn(2, 3, 256, seed=2))
        assert calls == {"up": n, "scaled": n, "pre": n}
    assert sqnr(ref(x), model(x)) > 10  # the doubling hook applies (without it: about 6 dB)
