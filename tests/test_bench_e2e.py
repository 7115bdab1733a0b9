"""The end-to-end benchmark's decoder (``benchmarks/bench_e2e.py``) at a tiny size, on CPU: quantized,
it decodes the same tokens eagerly and under ``torch.compile(fullgraph=True)``, and its KV cache works."""

import torch

import aofx
from aofx.schemes import scheme
from benchmarks import bench_e2e


def _decode(step, steps):
    token, out = torch.zeros(1, 1, dtype=torch.int64), []
    for i in range(steps):
        token = step(token, torch.tensor([i]))
        out.append(token.item())
    return out


def test_quantized_decoder_compiles_and_decodes():
    torch.manual_seed(0)
    model = bench_e2e.Decoder(dim=128, layers=2, heads=4, kv_heads=2, hidden=256, vocab=512, max_seq=16)
    model = model.to(torch.bfloat16)
    aofx.quantize_(model, scheme("int8wo").config)
    assert "Int8WeightOnlyConfig" in repr(model.blocks[0].wq) and "Int8WeightOnlyConfig" in repr(model.output)
    eager = _decode(model, 4)
    assert model.blocks[0].k_cache[:, :, :4].abs().sum(-1).gt(0).all()  # one cache row written per step
    assert not model.blocks[0].k_cache[:, :, 4:].any()
    for block in model.blocks:
        block.k_cache.zero_()
        block.v_cache.zero_()
    assert _decode(torch.compile(model, fullgraph=True), 4) == eager
