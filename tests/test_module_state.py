"""A quantized module still behaves like its float class: graphs are guarded on the plain values
(bool, int, float, str, dtypes, and containers of them), children and hooks its forward may read, and read
its tensor attributes at each call; a forward that writes attributes stays float, calls the
float layer rejects raise its error, copies keep their graphs, and ``forward`` keeps its signature
(which ``torch.export`` binds ``dynamic_shapes`` to). CPU."""

import copy
import functools
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aofx
from aofx.numerics import sqnr
from tests.common import CASES as SCHEMES, CONFIGS


class ScaledLinear(nn.Linear):
    """LoRA-style: a scale the user changes after quantizing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = 1.0

    def forward(self, x):
        return super().forward(x) * self.alpha


class Gated(nn.Module):
    """A unit found through example_inputs, with an on/off flag."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.enabled = True

    def forward(self, x):
        y = F.linear(x, self.w)
        return y if self.enabled else torch.zeros_like(y)


DQ = [c for c in CONFIGS if c.id in ("int8dq", "fp8dq-row")]
CASES = [pytest.param(cfg, floor, id=name) for name, cfg, floor in SCHEMES
         if name in ("int8wo", "int4wo-32", "fp8dq-row")]


@pytest.mark.parametrize("cfg,floor", CASES)
def test_attribute_changes_after_quantize_take_effect(cfg, floor, fresh_dynamo):
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    float_model = nn.Sequential(ScaledLinear(64, 32), Gated())
    model = copy.deepcopy(float_model)
    aofx.quantize_(model, cfg, example_inputs=(x,))
    assert all(type(m).__name__.startswith("Quantized") for m in model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for alpha, enabled in [(1.0, True), (3.0, True), (3.0, False), (1.0, True)]:
        for m in (float_model, model):
            m[0].alpha, m[1].enabled = alpha, enabled
        want, got = float_model[0](x), model[0](x)
        assert sqnr(want, got) > floor - 6
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
        assert bool(model(x).any()) == enabled


class Counting(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.last = x
        return super().forward(x)


def test_a_forward_that_writes_attributes_stays_float_and_is_named():
    model = nn.Sequential(Counting(64, 32), nn.Linear(32, 32))
    with pytest.warns(UserWarning, match=r"0: torch.export could not capture it: .*sets calls, last"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert type(model[0]) is Counting and type(model[1]).__name__ == "QuantizedLinear"
    assert model[0].calls == 0 and not hasattr(model[0], "last")  # the trace left no trace
    model(torch.randn(2, 64))
    assert model[0].calls == 1 and model[0].last.shape == (2, 64)


class PrivateCounting(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls = 0
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self._calls += 1  # a private attribute: the quantized layer could not keep counting
        return super().forward(x)


class BufferCounting(PrivateCounting):
    def forward(self, x):
        self.seen += 1  # in place on the buffer, then set to the same object: the graph repeats it
        return nn.Linear.forward(self, x)


def test_a_forward_that_writes_a_private_attribute_stays_float_and_is_named():
    model = nn.Sequential(PrivateCounting(64, 32), nn.Linear(32, 32))
    with pytest.warns(UserWarning, match=r"0: torch.export could not capture it: .*sets _calls"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert type(model[0]) is PrivateCounting and model[0]._calls == 0
    model(torch.randn(2, 64))
    model(torch.randn(2, 64))
    assert model[0]._calls == 2


def test_a_buffer_updated_in_place_with_plus_equals_is_quantized_and_kept_counting():
    model = nn.Sequential(BufferCounting(64, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(torch.randn(2, 64),))
    assert type(model[0]).__name__ == "QuantizedBufferCounting"
    count = float(model[0].seen)  # the example run counted once
    model(torch.randn(2, 64))
    model(torch.randn(3, 64))
    assert float(model[0].seen) == count + 2


def test_shared_linear_graphs_ignore_attributes_their_forward_never_reads():
    layers = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    layers[0].note, layers[1].note = "a", "b"  # nn.Linear.forward reads neither
    aofx.quantize_(layers, aofx.Int8WeightOnlyConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers(torch.randn(2, 64))
    assert layers[0]._aofx.captures[0] is layers[1]._aofx.captures[0]


@pytest.mark.parametrize("cfg,floor", CASES)
def test_writing_back_a_read_weight_keeps_the_codes(cfg, floor):
    # torch.func.functional_call swaps a tensor in and writes the original `weight` back; quantizing
    # the dequantized weight again would drift (int8 per-channel: scales move by a few percent).
    layer = nn.Linear(256, 64)
    aofx.quantize_(layer, cfg)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 256)
    with torch.no_grad():
        swapped = torch.func.functional_call(layer, {"weight": torch.zeros(64, 256)}, (x,))
    torch.testing.assert_close(swapped, layer.bias.expand(2, -1), rtol=0, atol=0)
    for _ in range(20):
        layer.weight = layer.weight
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    doubled = layer.weight.mul_(2)  # changed in place, then written: quantized again
    layer.weight = doubled
    assert sqnr(before["scale"].float() * 2, layer.scale.float()) > 30



class RescaledStack(nn.Module):
    """RWKV-style: the first eval forward divides some weights in place and scales the input to match."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(256, 256) for _ in range(3))
        self.rescaled = False

    def forward(self, x):
        if not self.rescaled:
            with torch.no_grad():
                for i, layer in enumerate(self.layers):
                    layer.weight.div_(2 ** i)  # a read, written in place, dropped at once
            self.rescaled = True
        for i, layer in enumerate(self.layers):
            x = layer(x * 2 ** i)
        return x


@pytest.mark.parametrize("cfg,floor", CASES)
def test_an_in_place_write_into_a_read_weight_reaches_the_layer(cfg, floor):
    torch.manual_seed(0)
    model = RescaledStack().bfloat16()
    quantized = copy.deepcopy(model)
    aofx.quantize_(quantized, cfg)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert sqnr(model(x).float(), quantized(x).float()) > floor - 6  # three layers deep
    layer, ref = quantized.layers[0], model.layers[0]
    with torch.no_grad():
        w = layer.weight  # kept alive across the call: the write is seen at the next forward
        w.mul_(-1)
        ref.weight.mul_(-1)
        assert sqnr(ref(x).float(), layer(x).float()) > floor
        w.mul_(-1)  # written again after that forward
        ref.weight.mul_(-1)
        del w
        assert sqnr(ref(x).float(), layer(x).float()) > floor


def test_a_read_written_in_place_after_the_layer_was_set_again_does_not_win():
    layer = nn.Linear(256, 64)
    aofx.quantize_(layer, aofx.Int8WeightOnlyConfig())
    stale = layer.weight
    new = torch.randn(64, 256)
    layer.weight = new  # a later assignment
    stale.zero_()
    x = torch.randn(2, 256)
    assert sqnr(F.linear(x, new, layer.bias), layer(x)) > 30

# ---------------------------------------------------------------- calls no graph accepts

class FLinear(nn.Module):
    """A unit found through example_inputs: its own weight through F.linear."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter((torch.randn(128, 256) * 0.05).bfloat16())

    def forward(self, x):
        return F.linear(x, self.w)


@pytest.mark.parametrize("cfg", DQ)
def test_a_call_the_float_layer_rejects_raises_and_changes_nothing(cfg):
    x, x3 = torch.randn(4, 256).bfloat16(), torch.randn(2, 3, 256).bfloat16()
    unit, linear = nn.Sequential(FLinear()), nn.Sequential(nn.Linear(256, 128, dtype=torch.bfloat16))
    for model in (unit, linear):
        aofx.quantize_(model, cfg, example_inputs=(x,))
    want = unit(x3)  # a new rank: captured again, eagerly
    for model in (unit, linear):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            model(torch.randn(4, 255).bfloat16())
        assert not model[0]._aofx.uncapturable
    assert torch.equal(unit(x3), want)


@pytest.mark.parametrize("cfg", DQ)
def test_deepcopy_keeps_graphs_so_export_finds_the_aofx_op(cfg):
    x = torch.randn(4, 256).bfloat16()
    model = nn.Sequential(FLinear())
    aofx.quantize_(model, cfg, example_inputs=(x,))
    clone = copy.deepcopy(model)
    ep = torch.export.export(clone, (x,))
    assert any(str(n.target).startswith("aofx.") for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x), model(x))


@pytest.mark.parametrize("cfg", DQ)
def test_a_quantized_root_exports_with_the_float_layers_dynamic_shapes(cfg):
    layer = nn.Linear(256, 128, dtype=torch.bfloat16)
    aofx.quantize_(layer, cfg)
    x, batch = torch.randn(4, 256).bfloat16(), torch.export.Dim("batch", min=1, max=64)
    for dynamic_shapes in [({0: batch},), {"input": {0: batch}}]:  # as for the float nn.Linear
        ep = torch.export.export(layer, (x,), dynamic_shapes=dynamic_shapes)
        assert any(str(n.target).startswith("aofx.") for n in ep.graph.nodes)
        for m in (1, 7, 64):
            xm = torch.randn(m, 256).bfloat16()
            torch.testing.assert_close(ep.module()(xm), layer(xm), rtol=0, atol=0)
    assert str(inspect.signature(layer.forward)) == str(inspect.signature(nn.Linear(2, 2).forward))


class Masked(nn.Linear):
    """A linear whose forward reads a tensor attribute, a dict, a dtype and a child: all changeable."""

    def __init__(self):
        super().__init__(64, 64)
        self.act = nn.Tanh()
        self.mask = torch.ones(64)
        self.opts = {"mul": 1.0}
        self.out_dtype = torch.float32

    def forward(self, x):
        return (self.act(super().forward(x)) * self.mask * self.opts["mul"]).to(self.out_dtype)


def _sigmoid_hook(module, args, out):
    return torch.sigmoid(out)


CHANGES = {
    "tensor attribute": lambda m: setattr(m, "mask", torch.linspace(0, 2, 64)),
    "dict entry": lambda m: m.opts.update(mul=5.0),
    "dtype attribute": lambda m: setattr(m, "out_dtype", torch.float64),
    "child swapped": lambda m: setattr(m, "act", nn.Sigmoid()),
    "hook on a child": lambda m: m.act.register_forward_hook(_sigmoid_hook),
}


@pytest.mark.parametrize("change", CHANGES)
def test_state_a_graph_baked_in_is_read_again(change):
    # a captured graph holds what its forward read at capture time; changing it must not go unnoticed
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    float_model = nn.Sequential(Masked())
    model = copy.deepcopy(float_model)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert type(model[0]).__name__ == "QuantizedMasked"
    model(x)
    for m in (float_model[0], model[0]):
        CHANGES[change](m)
    want, got = float_model(x), model(x)
    assert got.dtype == want.dtype
    assert sqnr(want, got) > 35


def test_a_deep_copy_has_its_own_tensor_attributes():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = nn.Sequential(Masked())
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    twin = copy.deepcopy(model)
    before = twin(x)
    model[0].mask.zero_()
    assert not model(x).any()
    torch.testing.assert_close(twin(x), before, rtol=0, atol=0)


def _wrap_forward(module):
    """What accelerate's add_hook_to_module does (device maps, offload): the instance's forward wraps the
    bound original, kept as ``_old_forward``."""
    module._old_forward = module.forward

    def new_forward(module, *args, **kwargs):
        return module._old_forward(*args, **kwargs)

    module.forward = functools.partial(new_forward, module)


@pytest.mark.parametrize("cfg", DQ)
def test_a_wrapped_forward_runs_the_quantized_op(cfg):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 64))
    hooked = copy.deepcopy(plain)
    _wrap_forward(hooked[0])
    aofx.quantize_(plain, cfg)
    aofx.quantize_(hooked, cfg)
    x = torch.randn(4, 64)
    torch.testing.assert_close(hooked(x), plain(x), rtol=0, atol=0)  # activations quantized too
    ops = [str(n.target) for n in torch.export.export(hooked, (x,)).graph.nodes]
    assert any(op.startswith("aofx.") for op in ops) and "aten.linear.default" not in ops


def test_a_forward_replaced_on_the_instance_stays_float_and_is_named():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model[0].forward = lambda x: 2 * x
    with pytest.warns(UserWarning, match=r"0: its forward was replaced on the instance"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert type(model[0]) is nn.Linear and type(model[1]).__name__ == "QuantizedLinear"


def test_weights_made_in_inference_mode_are_named_not_a_crash():
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(64, 32))
    with pytest.warns(UserWarning, match=r"0.weight: the weight was made under torch.inference_mode"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert type(model[0]) is nn.Linear
    x = torch.randn(2, 64)
    with torch.inference_mode():
        want = model(x)
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())  # as the warning says
        assert type(model[0]).__name__ == "QuantizedLinear" and sqnr(want, model(x)) > 35


@pytest.mark.parametrize("cfg,floor", CASES)
def test_a_bias_given_after_quantize_is_added(cfg, floor, fresh_dynamo):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    aofx.quantize_(layer, cfg)
    x = torch.randn(4, 64)
    layer.bias = nn.Parameter(torch.full((32,), 3.0))
    want = F.linear(x, layer.weight, layer.bias)
    assert sqnr(want, layer(x)) > floor and sqnr(want, torch.compile(layer, fullgraph=True)(x)) > floor
    assert (layer(x) - F.linear(x, layer.weight)).mean() > 2.5  # the bias of 3 is there
    layer.bias = None
    assert sqnr(F.linear(x, layer.weight), layer(x)) > floor


def test_a_nan_attribute_does_not_force_a_capture_on_every_call():
    class Clipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 16))
            self.clip = float("nan")  # "no clipping": never equal to itself

        def forward(self, x):
            return F.linear(x, self.weight)

    model, x = Clipped(), torch.randn(2, 16)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            model(x)
    assert len(model._aofx.captures) == 1 and not model._aofx.uncapturable


@pytest.mark.parametrize("cfg,floor", CASES)
def test_fx_symbolic_trace_shows_each_layer_as_its_op(cfg, floor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    aofx.quantize_(model, cfg)
    gm = torch.fx.symbolic_trace(model)
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert len(ops) == 2 and all(op.startswith("aofx.") for op in ops)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_a_tensor_inside_a_list_attribute_is_read_again_when_changed():
    class Scaled(nn.Linear):
        def __init__(self):
            super().__init__(64, 64)
            self.scales = [torch.ones(64)]

        def forward(self, x):
            return super().forward(x) * self.scales[0]

    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(4, 64)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    before = model(x)
    model.scales[0].mul_(2)  # in place
    torch.testing.assert_close(model(x), 2 * before)
    model.scales[0] = torch.zeros(64)  # replaced
    assert not model(x).any()


def test_export_of_an_assignment_to_a_quantized_weight_raises_and_leaves_the_layer_real():
    # Under export the requantized buffers would be fake tensors, left in the real model.
    layer = nn.Linear(256, 64)
    aofx.quantize_(layer, aofx.Int8WeightOnlyConfig())
    before = {k: v.clone() for k, v in layer.state_dict().items()}

    class Swap(nn.Module):
        def forward(self, x):
            return torch.func.functional_call(layer, {"weight": torch.zeros(64, 256)}, (x,))

    with pytest.raises(Exception, match="torch.export cannot trace an assignment"):
        torch.export.export(Swap(), (torch.randn(2, 256),))
    after = layer.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(before[k], after[k]) for k in before)
    layer(torch.randn(2, 256))
