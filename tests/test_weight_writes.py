"""In-place writes to a quantized layer's weight reach the layer, as they reach a float layer's.

``layer.weight`` returns a dequantized temporary; when it is dropped after an in-place write (``copy_``,
``nn.init``, a loader's ``.data.narrow(...).copy_``), the layer quantizes what was written. Replacing
the temporary's storage (``.data = t``) cannot be followed and warns."""

import copy
import warnings

import pytest
import torch
from torch import nn

import aofx
from aofx.numerics import sqnr

NEW = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 0.05

WRITES = {
    "copy_": lambda m: m[0].weight.copy_(NEW),
    "data.copy_": lambda m: m[0].weight.data.copy_(NEW),
    "nn.init.normal_": lambda m: nn.init.normal_(m[0].weight, std=0.05, generator=torch.Generator().manual_seed(2)),
    "narrow_copy_": lambda m: m[0].weight.data.narrow(0, 0, 32).copy_(NEW[:32]),
    "iadd": lambda m: m[0].weight.data.__iadd__(NEW),
    "view_mul_": lambda m: m[0].weight.t().mul_(2),
}
CONFIGS = {"int8wo": (aofx.Int8WeightOnlyConfig(), 35), "int4wo": (aofx.Int4WeightOnlyConfig(group_size=32), 17),
           "int8dq": (aofx.Int8DynamicActivationInt8WeightConfig(), 28)}


def _pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).to(torch.bfloat16)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("write", WRITES, ids=list(WRITES))
def test_an_in_place_write_reaches_the_quantized_layer(write, config):
    cfg, floor = CONFIGS[config]
    float_model, model = _pair()
    aofx.quantize_(model, cfg)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    before = model(x)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        WRITES[write](float_model)
        WRITES[write](model)
        want, got = float_model(x), model(x)
    assert sqnr(want, got) > floor
    assert sqnr(want, before) < floor - 5  # the write mattered
    assert type(model[0]).__name__ == "QuantizedLinear"


def test_a_write_through_a_kept_data_alias_lands_at_the_next_call_and_in_state_dict():
    float_model, model = _pair()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    data = model[0].weight.data  # the read itself is dropped here; its storage lives on in `data`
    data.zero_()
    del data
    before = float_model(x)
    with torch.no_grad():
        nn.init.zeros_(float_model[0].weight)
    want = float_model(x)
    assert sqnr(want, model(x)) > 35 and sqnr(want, before) < 20
    other = copy.deepcopy(model)
    data = other[0].weight.data
    data.zero_()
    assert not other.state_dict()["0.qdata"].any()


def test_reads_without_writes_change_nothing():
    _, model = _pair()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    packed = dict(model[0]._buffers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            w = model[0].weight
            assert w.dtype == torch.bfloat16
            d = model[0].weight.data
            del w, d
    assert all(model[0]._buffers[k] is v for k, v in packed.items())


def test_replacing_data_of_a_read_warns_and_keeps_the_weight():
    _, model = _pair()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    qdata = model[0].qdata
    with pytest.warns(UserWarning, match=r"had its \.data replaced; the layer keeps its weight"):
        model[0].weight.data = NEW.clone()
    assert model[0].qdata is qdata


def test_compiled_model_sees_a_write_made_between_calls():
    float_model, model = _pair()
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    compiled(x)
    with torch.no_grad():
        model[0].weight.copy_(NEW)
        float_model[0].weight.copy_(NEW)
    assert sqnr(float_model(x), compiled(x)) > 35
