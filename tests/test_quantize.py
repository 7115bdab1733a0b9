"""quantize_ end to end on CPU: the model invariants (docs/design.md), the capture traps, compile and export."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.export import Dim

import aofx
from aofx.numerics import sqnr
from tests.common import CONFIGS, CONFIGS_WITH_FLOOR, TwoLayer, normal_weights, two_layer

WHOLE = [pytest.param(False, id="per-module"), pytest.param(True, id="example-inputs")]


def _quantized(config, whole=False, seed=0):
    model = normal_weights(two_layer(seed=seed), seed=seed)
    x = torch.randn(4, 256).bfloat16()
    aofx.quantize_(model, config, example_inputs=(x,) if whole else None)
    return model


@pytest.mark.parametrize("whole", WHOLE)
@pytest.mark.parametrize("config,floor", CONFIGS_WITH_FLOOR)
def test_model_invariants_and_accuracy(config, floor, whole):
    model = normal_weights(two_layer())
    up, down = model.up, model.down
    x = torch.randn(8, 256).bfloat16()
    ref = model(x).float()
    aofx.quantize_(model, config, example_inputs=(x,) if whole else None)
    assert model.up is up and model.down is down and isinstance(model.up, nn.Linear)
    assert type(model.up).__name__ == "QuantizedLinear" and type(model) is TwoLayer
    assert dict(model.named_modules()).keys() == {"", "up", "down"}
    assert f"scheme={type(config).__name__}" in repr(model)
    assert not any(k.endswith(".weight") for k in model.state_dict())
    assert all(type(t) is torch.Tensor for t in model.state_dict().values())
    db = sqnr(ref, model(x))  # two layers compound the error: allow 6 dB under the one-layer floor
    assert db >= floor - 6, f"SQNR {db:.1f} dB"


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_roundtrip_and_safetensors(config):
    model = _quantized(config)
    blob = st_save(model.state_dict())  # safetensors refuses shared or non-contiguous tensors
    fresh = normal_weights(two_layer(), seed=1)  # different weights, same structure
    aofx.quantize_(fresh, config)
    fresh.load_state_dict(st_load(blob))
    x = torch.randn(5, 256).bfloat16()
    assert torch.equal(fresh(x), model(x))


def test_documented_buffer_names():
    model = _quantized(aofx.Int4WeightOnlyConfig(group_size=64))
    sd = model.state_dict()
    assert set(sd) == {"up.qdata", "up.scale", "up.zero", "up.bias", "down.qdata", "down.scale", "down.zero"}
    assert sd["up.qdata"].shape == (128, 128) and sd["up.qdata"].dtype == torch.uint8
    assert sd["up.scale"].shape == (128, 4) and sd["up.zero"].dtype == torch.bfloat16


@pytest.mark.parametrize("config", CONFIGS)
def test_edge_inputs(config):
    model = _quantized(config)
    x = torch.randn(6, 256).bfloat16()
    ref = model(x)
    assert model(x[:0]).shape == (0, 64)
    xt = torch.randn(256, 6).bfloat16().t()  # non-contiguous
    torch.testing.assert_close(model(xt), model(xt.contiguous()), rtol=0, atol=0)
    torch.testing.assert_close(model(x.reshape(2, 3, 256)), ref.reshape(2, 3, 64), rtol=0, atol=0)
    torch.testing.assert_close(model(x.reshape(1, 2, 3, 256)), ref.reshape(1, 2, 3, 64), rtol=0, atol=0)
    zero = torch.zeros(2, 256).bfloat16()
    out = model(zero)
    assert torch.isfinite(out).all()
    # relu(bias) through the second layer: with zero activations only the bias survives
    torch.testing.assert_close(out.float(), model.down(torch.relu(model.up.bias).expand(2, -1)).float())


def test_all_zero_weight_rows():
    model = two_layer()
    with torch.no_grad():
        model.up.weight[:5] = 0
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig(group_size=32))
    y = model.up(torch.randn(3, 256).bfloat16())
    torch.testing.assert_close(y[:, :5], model.up.bias[:5].expand(3, 5))


@pytest.mark.parametrize("whole", WHOLE)
@pytest.mark.parametrize("config", CONFIGS)
def test_compile_fullgraph(config, whole):
    model = _quantized(config, whole)
    x = torch.randn(3, 256).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    # Inductor may fuse the fp32 scale math differently, moving an activation code by one step
    db = sqnr(model(x), compiled(x))
    floor = 28 if isinstance(config, aofx.Float8DynamicActivationFloat8WeightConfig) else 35
    assert db > floor, f"compiled vs eager: {db:.1f} dB"


@pytest.mark.parametrize("whole", WHOLE)
@pytest.mark.parametrize("config", CONFIGS)
def test_export_dynamic_batch_save_load(config, whole, tmp_path):
    model = _quantized(config, whole)
    ep = torch.export.export(model, (torch.randn(4, 256).bfloat16(),), dynamic_shapes=({0: Dim.AUTO},))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("aofx.") for t in targets) == 2 and "aten.linear.default" not in targets
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    for m in (1, 7, 33):
        x = torch.randn(m, 256).bfloat16()
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class Trappy(nn.Module):
    """The capture traps: no_grad in forward, a module called twice, tied weights, F.linear on a
    parameter of the root (which makes the root a capture unit of its own)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64, dtype=torch.bfloat16)
        self.inner = nn.Linear(64, 64, dtype=torch.bfloat16)
        self.shared = nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
        self.proj = nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16) * 0.05)
        self.head = nn.Linear(64, 50, bias=False, dtype=torch.bfloat16)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        with torch.no_grad():
            h = self.inner(h)
        h = self.shared(torch.relu(h)) + self.shared(h)
        h = F.linear(h, self.proj)
        return self.head(h)


@pytest.mark.parametrize("whole", WHOLE)
def test_capture_traps(whole):
    torch.manual_seed(0)
    model = Trappy()
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids).float()
    emb_weight = model.emb.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the embedding tied to the head is not reported
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(ids,) if whole else None)
    assert torch.equal(model.emb.weight, emb_weight)  # the tied embedding stays float and exact
    keys = set(model.state_dict())
    assert {"emb.weight", "head.qdata", "inner.qdata", "shared.qdata"} <= keys and "head.weight" not in keys
    # F.linear on a parameter is found only by running the example inputs
    assert ("proj_qdata" in keys and "proj" not in keys) if whole else ("proj" in keys)
    assert sqnr(ref, model(ids)) > 30
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(ids), model(ids))
    if whole:
        (capture,) = model._aofx.captures  # the root owns proj, so it is a unit with its children inlined
        ops = [str(n.target) for n in capture.gm.graph.nodes]
        assert ops.count("aofx.int8_weight_only_linear.default") == 4  # shared x2, proj, head
        assert "aten.linear.default" not in ops
        sub = capture.gm.submod_1  # the no_grad region
        assert [str(n.target) for n in sub.graph.nodes].count("aofx.int8_weight_only_linear.default") == 1
        # another batch and sequence length: the unit's graph accepts it, or it is captured again
        ids2 = torch.randint(0, 50, (3, 5))
        torch.testing.assert_close(model(ids2), model.forward(ids2))


def test_buffer_mutation_with_example_inputs():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32, dtype=torch.bfloat16)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.lin(x)

    model = Counter()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(torch.randn(2, 32).bfloat16(),))
    model(torch.randn(3, 32).bfloat16())
    model(torch.randn(3, 32).bfloat16())
    assert model.calls.item() == 3  # the example run is a real call
    assert type(model).forward is Counter.forward  # no parameter of its own uses F.linear: stays Python


def test_device_argument_moves_selected_modules():
    model = two_layer()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), device="cpu", filter_fn=lambda m, fqn: fqn == "up")
    assert model.up.qdata.device.type == "cpu" and "weight" in dict(model.down.named_parameters())


def test_module_to_after_quantize_keeps_working():
    model = _quantized(aofx.Int4WeightOnlyConfig())
    x = torch.randn(2, 256).bfloat16()
    y = model(x)
    model.to(torch.float32)  # casts the bias; the packed codes and scales keep their dtypes
    assert model.up.scale.dtype == torch.bfloat16 and model.up.qdata.dtype == torch.uint8
    assert model.up.bias.dtype == torch.float32 and model.up.weight.dtype == torch.float32
    torch.testing.assert_close(model(x.float()), y.float(), atol=0.02, rtol=0.02)


class SequentialOwner(nn.Sequential):
    """An nn.Sequential (children named "0", "2") that also applies a parameter of its own through F.linear."""

    def __init__(self):
        super().__init__(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
        self.w = nn.Parameter(torch.randn(32, 32) * 0.1)

    def forward(self, x):
        return F.linear(super().forward(x), self.w)


def test_sequential_unit_with_digit_children():
    torch.manual_seed(0)
    model = SequentialOwner()
    example, x = torch.randn(1, 32), torch.randn(3, 32)
    ref = model(x)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(example,))
    assert {"w_qdata", "0.qdata", "2.qdata"} <= set(model.state_dict())
    assert sqnr(ref, model(x)) > 35  # batch 3 after a batch-1 example: a second capture
    assert len(model._aofx.captures) == 2


class BatchBranch(nn.Linear):
    """Its forward branches on the batch size, so export narrows the batch range it is valid for."""

    def forward(self, x):
        return super().forward(x) * (2 if x.shape[0] > 2 else 1)


def test_guards_keep_the_range_export_assumed():
    torch.manual_seed(0)
    model = nn.Sequential(BatchBranch(64, 64))
    float_model = copy.deepcopy(model)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(torch.randn(5, 64),))
    for batch in (5, 2, 1, 7):
        x = torch.randn(batch, 64)
        db = sqnr(float_model(x), model(x))
        assert db > 35, f"batch {batch}: {db:.1f} dB (a graph captured for batch > 2 used outside its range?)"
    assert len(model[0]._aofx.captures) == 3  # batch > 2, batch 2 and batch 1 each got a graph
