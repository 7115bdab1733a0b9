"""Kernel configs that once returned wrong results, kept as regression tests instead of comments.

No default table selects these configs; each test forces one through its launcher's ``config=`` argument
on the shape where it failed. Each GPU test has an interpreter twin that runs the same forced config on
small CPU tensors, so the call itself is known to be well-formed and the logic right.
"""

import dataclasses

import pytest
import torch

from aofx import numerics
from aofx.kernels import int4_weight_only as int4
from aofx.kernels.common import KernelConfig

# A kernel's output against its aofx.numerics reference: right results are far above this, and a layout,
# scale or race bug far below (the check of benchmarks/bench_layers.py and benchmarks/sweep.py, CHECK_SQNR_DB).
SQNR_FLOOR_DB = 30.0

# ---------------------------------------------------------------- int4 mm, 128x128x64 swap_ab with split K

# The M <= 256 bucket's tile (128x128x64, 8 warps, 4 stages) with swap_ab, which the table does not use.
INT4_SWAP_AB_128 = KernelConfig("mm", block_m=128, block_n=128, block_k=64, swap_ab=True, num_warps=8, num_stages=4)
# Before the kernels were regrouped by algorithm (one epilogue, common.store_tile, for every tensor-core
# kernel), this config returned wrong results on the H100: SQNR -43 to -26 dB, varying from call to call,
# 14336x4096 with split K 2 in every call and 4096x14336 with split 8 in some; right with 4 warps and on
# smaller shapes. The regrouped kernel passes; the old kernel's fault was not isolated.


def _int4_case(M, N, K, group_size, dtype, device, seed=0):
    """Weights N(0, 0.02) and x N(0, 1), as the benchmarks draw them; int4-quantized per group."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, generator=g, device=device) * 0.02
    qdata, scale, zero = numerics.quantize_int4(w, group_size)
    x = torch.randn(M, K, generator=g, device=device).to(dtype)
    return x, qdata, scale, zero


def _int4_sqnr(x, qdata, scale, zero, group_size, split_k):
    """SQNR (dB) of the forced swap_ab config with ``split_k`` against ``numerics.int4_weight_only_linear``."""
    cfg = dataclasses.replace(INT4_SWAP_AB_128, split_k=split_k)
    out = int4.linear(x, qdata, scale, zero, config=cfg)
    ref = numerics.int4_weight_only_linear(x, qdata, scale, zero, group_size)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return numerics.sqnr(ref.float(), out.float())


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,split_k", [(14336, 4096, 2), (4096, 14336, 8)],
                         ids=["14336x4096-split2", "4096x14336-split8"])
def test_int4_mm_swap_ab_128x128x64_split_k(N, K, split_k):
    # M = 128 fills one row of 128-row tiles, group 128, bf16 (the packed bf16 PTX dequantization). The
    # results varied from call to call, so several calls are checked.
    x, qdata, scale, zero = _int4_case(128, N, K, 128, torch.bfloat16, "cuda")
    dbs = [_int4_sqnr(x, qdata, scale, zero, 128, split_k) for _ in range(5)]
    assert min(dbs) >= SQNR_FLOOR_DB, (
        f"SQNR {', '.join(f'{db:.1f}' for db in dbs)} dB over {len(dbs)} calls vs numerics (floor {SQNR_FLOOR_DB})")


@pytest.mark.interpret
@pytest.mark.parametrize("split_k", [2, 8])
def test_int4_mm_swap_ab_128x128x64_split_k_interpreter(split_k):
    # The same forced config on CPU tensors (fp16: the interpreter's tl.dot): two column tiles, the second
    # partial (N = 160), M = 128, 8 K steps of 64 over 2 or 8 splits.
    x, qdata, scale, zero = _int4_case(128, 160, 512, 128, torch.float16, "cpu")
    db = _int4_sqnr(x, qdata, scale, zero, 128, split_k)
    assert db >= SQNR_FLOOR_DB, f"SQNR {db:.1f} dB vs numerics (floor {SQNR_FLOOR_DB})"
