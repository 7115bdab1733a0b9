"""The install contract (aofx/install.py): the generated ``Quantized<Class>`` subclass, ``weight``
reads and writes, dtype casts, pickling, ties, grads, attention modules and the meta device. CPU only."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aofx
from aofx.numerics import sqnr
from tests.common import CONFIGS, CONFIGS_WITH_FLOOR, TwoLayer, normal_weights, scheme_of, seeded, two_layer
from tests.install_helpers import (
    BF16, Block, MARGIN, ScaledLinear, WEIGHT_ONLY, one_layer, packed, quantize, randn, same_bits,
)


# ---------------------------------------------------------------- the generated subclass

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


# ---------------------------------------------------------------- weight reads and writes

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
    layer.weight.mul_(0)  # an in-place write into a read reaches the layer (quantized again)
    torch.testing.assert_close(layer(x), layer.bias.expand_as(y), rtol=0, atol=0)


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


# ---------------------------------------------------------------- dtype casts

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


# ---------------------------------------------------------------- pickling

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


# ---------------------------------------------------------------- ties

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


# ---------------------------------------------------------------- bias trainability and grads

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


# ---------------------------------------------------------------- attention modules

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
    default = copy.deepcopy(model)
    aofx.quantize_(default, cfg)  # as torchao's default filter: MHA's out_proj is not selected
    assert scheme_of((default.mha if isinstance(model, Attention) else default.self_attn).out_proj) == ""
    assert quantize(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear)) == []
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
    assert quantize(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear)) == []
    x = randn(2, 5, 128, dtype=torch.float32)
    y = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the meta device

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

