"""The end-to-end benchmark's decoder (``benchmarks/bench_e2e.py``) at a tiny size, on CPU: quantized,
it decodes the same tokens eagerly, under ``torch.compile(fullgraph=True)`` and as an AOTInductor package
(``--aoti``), and its KV cache works."""

import torch

import aofx
from aofx.schemes import scheme
from benchmarks import bench_e2e

START = torch.zeros(1, 1, dtype=torch.int64)


def _tiny(config_id):
    torch.manual_seed(0)
    model = bench_e2e.Decoder(dim=128, layers=2, heads=4, kv_heads=2, hidden=256, vocab=512, max_seq=16)
    model = model.to(torch.bfloat16)
    aofx.quantize_(model, scheme(config_id).config)
    return model


def _reset_caches(model):
    for block in model.blocks:
        block.k_cache.zero_()
        block.v_cache.zero_()


def test_quantized_decoder_compiles_and_decodes():
    model = _tiny("int8wo")
    assert "Int8WeightOnlyConfig" in repr(model.blocks[0].wq) and "Int8WeightOnlyConfig" in repr(model.output)
    eager = bench_e2e.decode(model, START, 4)
    assert model.blocks[0].k_cache[:, :, :4].abs().sum(-1).gt(0).all()  # one cache row written per step
    assert not model.blocks[0].k_cache[:, :, 4:].any()
    _reset_caches(model)
    assert bench_e2e.decode(torch.compile(model, fullgraph=True), START, 4) == eager


def test_packaged_decode_step_updates_its_own_cache(tmp_path):
    # --aoti: the step exported with its caches as buffers that the package writes in place, so a
    # loaded package decodes the same tokens as eager, step after step, and leaves the model alone
    model = _tiny("int4wo-128")
    package = bench_e2e.package_step(model, str(tmp_path / "step.pt2"), "cpu")
    packaged = bench_e2e.decode(package, START, 5)
    assert not any(block.k_cache.any() or block.v_cache.any() for block in model.blocks)
    eager = bench_e2e.decode(model, START, 5)
    assert packaged == eager
    # continuing from the package's own state: positions 5 and 6 see the rows it wrote at 0..4
    assert bench_e2e.decode(package, torch.tensor([[eager[-1]]]), 2, start=5) == bench_e2e.decode(
        model, torch.tensor([[eager[-1]]]), 2, start=5)
