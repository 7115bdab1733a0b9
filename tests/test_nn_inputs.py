"""torch.nn inputs and modes a quantized layer meets in real models: nested (ragged) tensors, as
nn.TransformerEncoder's padding path makes them, and torch.inference_mode()."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aofx
from aofx.numerics import sqnr

CONFIGS = [aofx.Int8WeightOnlyConfig(), aofx.Int4WeightOnlyConfig(group_size=32),
           aofx.Int8DynamicActivationInt8WeightConfig()]


def _dequantized_copy(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with each quantized layer's weight replaced by its dequantized weight: the exact
    answer the quantized model should give."""
    ref = copy.deepcopy(float_model)
    q_modules = dict(quantized.named_modules())
    for name, m in ref.named_modules():
        if isinstance(q_modules.get(name), aofx.install.QuantizedModule):
            m.weight = nn.Parameter(q_modules[name].weight.detach().clone(), requires_grad=False)
    return ref


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@pytest.mark.parametrize("config", CONFIGS, ids=["int8wo", "int4wo", "int8dq"])
def test_a_nested_input_gives_each_sequence_its_quantized_linear(layout, config):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).to(torch.bfloat16)
    aofx.quantize_(layer, config)
    seqs = [torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)]
    calls = []
    hook = layer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = layer(torch.nested.nested_tensor(seqs, layout=layout))
        assert out.is_nested and out.layout == layout and len(calls) == 1  # the hook runs once per call
        hook.remove()
        for got, x in zip(out.unbind(), seqs):  # the scheme's own answer (int8dq quantizes x too)
            torch.testing.assert_close(got, layer(x), rtol=0, atol=0)
            assert sqnr(F.linear(x, layer.weight, layer.bias), got) > 25


@pytest.mark.parametrize("hooked", [False, True], ids=["fast_path", "nested_to_linears"])
def test_transformer_encoder_padding_path_matches_the_dequantized_float_encoder(hooked):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=True).eval()
    model = copy.deepcopy(enc)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    ref = _dequantized_copy(enc, model)
    if hooked:  # a hook turns the layer's fused path off: the encoder's nested tensor reaches linear1/linear2
        for m in (model, ref):
            m.layers[0].norm1.register_forward_hook(lambda *_: None)
    src = torch.randn(3, 7, 64)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():
        want, got = ref(src, src_key_padding_mask=pad), model(src, src_key_padding_mask=pad)
    assert sqnr(want, got) > 60


def test_a_nested_input_reaches_a_captured_unit_as_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    layer = Scaled(64, 32).to(torch.bfloat16)
    aofx.quantize_(layer, aofx.Int8WeightOnlyConfig())
    seqs = [torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)]
    with torch.no_grad():
        out = layer(torch.nested.nested_tensor(seqs, layout=torch.jagged))
        for got, x in zip(out.unbind(), seqs):
            torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias) * 2)


class ReadsWeightDtype(nn.Module):
    """As diffusers' Z-Image transformer: forward reads a layer's weight dtype."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        return self.proj(x.to(self.proj.weight.dtype))


def test_a_model_that_reads_a_weight_runs_under_inference_mode():
    torch.manual_seed(0)
    model = ReadsWeightDtype().to(torch.bfloat16)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = model(x)
        w = model.proj.weight
    with torch.inference_mode():
        got = model(x)
        read = model.proj.weight
        # not an inference tensor, whose writes could not be seen (it has no version counter)
        assert read.dtype == torch.bfloat16 and not read.is_inference()
        torch.testing.assert_close(read, w, rtol=0, atol=0)
        codes = model.proj.qdata
        model.proj.weight = read  # an unchanged read handed back restores its codes
        assert model.proj.qdata is codes
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert type(model.proj).__name__ == "QuantizedLinear"
