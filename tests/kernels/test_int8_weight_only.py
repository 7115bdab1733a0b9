"""int8 weight-only kernels (aofx/kernels/int8_weight_only.py) against ``aofx.numerics``.

The reference is the exact product with the fp32-dequantized weights, cast to x.dtype once:
``F.linear(x, dequantize_int8(q, s), bias)`` in float64, then ``.to(x.dtype)``.
Tolerances: the kernel differs from it by (a) the final rounding to x.dtype (1 ulp: rtol 2**-10 for fp16,
2**-7 for bf16; we allow 2x), (b) fp32 summation order (~1e-6 relative, negligible), and (c) on the ``mm``
path with per-group scales, the rounding of ``q * s`` to x.dtype before the tensor-core dot (as
``numerics.int8_weight_only_linear`` does too, unlike this exact reference); its effect on y is ~ sqrt(K) * |x w| * ulp / sqrt(3), a small fraction of y's
scale, covered by ``atol = rtol * std(ref)``. A wrong scale, group index, mask or bias shifts y by O(std).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from aofx import numerics
from aofx.kernels import int8_weight_only as kernels
from aofx.kernels.common import KernelConfig

RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# Small tiles that force every path under the interpreter (N=40, K=200/256 are not multiples of them).
GEMV = KernelConfig("gemv", block_m=1, block_n=16, block_k=64)
GEMV_SPLIT = dataclasses.replace(GEMV, split_k=2)
MM = KernelConfig("mm", block_m=16, block_n=32, block_k=32)
MM_SPLIT = dataclasses.replace(MM, split_k=3)
DEQUANT = KernelConfig("dequant", block_m=1, block_n=16, block_k=64)


def _inputs(M, N, K, dtype, device, group_size=None, bias=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if bias else None
    qdata, scale = numerics.quantize_int8(w.to(device), group_size)
    return x, qdata, scale, b


def _reference(x, qdata, scale, bias):
    # float64 rather than fp32 so that a TF32 matmul setting cannot loosen the reference on GPU.
    w = numerics.dequantize_int8(qdata, scale).double()  # (N, K)
    return F.linear(x.double(), w, None if bias is None else bias.double()).to(x.dtype)


def _assert_matches(y, x, qdata, scale, bias):
    ref = _reference(x, qdata, scale, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    rtol = RTOL[x.dtype]
    atol = rtol * max(ref.float().std().item(), 1e-3) if ref.numel() > 1 else rtol
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- interpreter (CPU tensors)

INTERP_CASES = [
    # (M, K, group_size, config)
    pytest.param(1, 200, None, GEMV, id="gemv-row-oddK"),
    pytest.param(1, 256, None, GEMV_SPLIT, id="gemv-row-splitk"),
    pytest.param(1, 256, 32, GEMV, id="gemv-g32"),
    pytest.param(1, 256, 64, dataclasses.replace(GEMV, block_k=128, split_k=2), id="gemv-g64-splitk"),
    pytest.param(5, 200, None, MM, id="mm-row-oddK"),
    pytest.param(17, 256, None, MM_SPLIT, id="mm-row-splitk"),
    pytest.param(16, 256, 32, MM, id="mm-g32"),
    pytest.param(3, 256, 64, MM_SPLIT, id="mm-g64-splitk"),
    pytest.param(17, 256, 128, dataclasses.replace(MM, block_m=32, block_k=64, group_m=1), id="mm-g128-gm1"),
    pytest.param(5, 200, None, dataclasses.replace(MM, swap_ab=True), id="mm-swap-row-oddK"),
    pytest.param(17, 256, 64, dataclasses.replace(MM_SPLIT, swap_ab=True), id="mm-swap-g64-splitk"),
    pytest.param(5, 200, None, DEQUANT, id="dequant-row-oddK"),
    pytest.param(3, 256, 32, DEQUANT, id="dequant-g32"),
    pytest.param(17, 256, 128, DEQUANT, id="dequant-g128"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M, K, group_size, config", INTERP_CASES)
def test_paths_interpret(M, K, group_size, config, bias):
    x, qdata, scale, b = _inputs(M, 40, K, torch.float16, "cpu", group_size, bias)
    _assert_matches(kernels.linear(x, qdata, scale, b, config=config), x, qdata, scale, b)


@pytest.mark.interpret
@pytest.mark.parametrize("M", [1, 3, 16, 17, 200, 300])
@pytest.mark.parametrize("group_size", [None, 64])
def test_default_config_per_bucket_interpret(M, group_size):
    """Each bucket's table config (tiles much larger than N=24, K=128: everything masked) runs and matches."""
    x, qdata, scale, b = _inputs(min(M, 17), 24, 128, torch.float16, "cpu", group_size)
    cfg = kernels.select_config(M, 24, 128, group_size or 0)
    _assert_matches(kernels.linear(x, qdata, scale, b, config=cfg), x, qdata, scale, b)


@pytest.mark.interpret
@pytest.mark.parametrize("config", [GEMV, MM], ids=["gemv", "mm"])
def test_non_contiguous_x_interpret(config):
    _, qdata, scale, b = _inputs(1, 40, 200, torch.float16, "cpu")
    g = torch.Generator().manual_seed(1)
    M = 1 if config.path == "gemv" else 5
    wide = torch.randn(M, 300, generator=g).half()
    x_sliced = wide[:, 50:250]  # row stride 300, unit column stride: read in place
    x_strided = torch.randn(M, 400, generator=g).half()[:, ::2]  # column stride 2: copied
    x_transposed = torch.randn(200, M, generator=g).half().t()  # column stride M (contiguous when M=1)
    for x in (x_sliced, x_strided, x_transposed):
        if x is x_transposed and M == 1:
            continue
        assert x.stride() != (x.shape[1], 1)  # not the plain row-major strides
        _assert_matches(kernels.linear(x, qdata, scale, b, config=config), x, qdata, scale, b)


@pytest.mark.interpret
def test_scale_n_by_1_is_per_row_interpret():
    x, qdata, scale, b = _inputs(3, 40, 200, torch.float16, "cpu")
    y = kernels.linear(x, qdata, scale[:, None], b)
    _assert_matches(y, x, qdata, scale, b)


@pytest.mark.interpret
def test_m0_returns_empty():
    x, qdata, scale, b = _inputs(0, 40, 64, torch.float16, "cpu")
    y = kernels.linear(x, qdata, scale, b)
    assert y.shape == (0, 40) and y.dtype == torch.float16


def test_select_config_buckets():
    for gs in (0, 32, 64, 128, 256):
        for M in (1, 2, 16, 17, 128, 129, 256):
            for N, K in ((14336, 4096), (4096, 14336), (1000, 768)):
                if gs and K % gs:
                    continue
                cfg = kernels.select_config(M, N, K, gs)
                assert cfg.path == ("gemv" if M == 1 else "mm")
                if gs:  # the launcher's group constraints hold for every table entry
                    assert (cfg.block_k % gs == 0) if M == 1 else (gs % cfg.block_k == 0)
                if M > 1:
                    assert cfg.block_m >= min(M, 64)
        # above M = 256: dequantize then cuBLAS, unless the 256 x 128 tiles fill the GPU up to M = 512
        assert kernels.select_config(513, 14336, 4096, gs).path == "dequant"
        assert kernels.select_config(512, 14336, 4096, gs).path == "mm"  # 224 tiles
        assert kernels.select_config(257, 4096, 14336, gs).path == "dequant"  # 64 tiles
    # no bf16 copy over the byte cap (a 128256 x 4096 vocabulary head)
    assert kernels.select_config(4096, 128256, 4096).path == "mm"
    # M = 1: per-row scales take one weight row per program, per-group scales 8 (or 4) rows; large N needs no
    # K split, a narrow layer gets one.
    assert kernels.select_config(1, 14336, 4096).block_n == 1 and kernels.select_config(1, 14336, 4096).split_k == 1
    assert kernels.select_config(1, 4096, 4096, 128).block_n == 8
    assert kernels.select_config(1, 1024, 4096, 128).block_n == 4
    assert kernels.select_config(1, 256, 4096, 128).split_k > 1 and kernels.select_config(1, 64, 32768).split_k > 1
    # per-row scales: steps of 2048 codes, but a row of 8193-16384 codes is one masked step
    assert [kernels.select_config(1, 4096, k).block_k for k in (1000, 4096, 8192, 14336, 32768)] == [
        1024, 2048, 2048, 16384, 2048]
    # M <= 16: 128-row tiles where they make one wave (112 programs at N = 14336), else narrowed to >= 128 programs
    assert [kernels.select_config(16, n, 4096).block_n for n in (14336, 4096, 1024)] == [128, 32, 32]
    assert [kernels.select_config(16, n, 4096).split_k for n in (14336, 4096, 1024)] == [1, 1, 4]
    assert kernels.select_config(16, 14336, 14336).block_n == 64 and kernels.select_config(16, 14336, 4096, 128).block_n == 64


@pytest.mark.parametrize("bad, err", [
    (dict(x=torch.zeros(2, 64, dtype=torch.float32)), TypeError),
    (dict(x=torch.zeros(2, 3, 64, dtype=torch.float16)), ValueError),
    (dict(qdata=torch.zeros(8, 32, dtype=torch.int8)), ValueError),
    (dict(qdata=torch.zeros(8, 64, dtype=torch.uint8)), TypeError),
    (dict(scale=torch.ones(7)), ValueError),
    (dict(scale=torch.ones(8, 3)), ValueError),  # 64 / 3 is not a group size
    (dict(scale=torch.ones(8, 8)), ValueError),  # group size 8 < 16
    (dict(bias=torch.ones(9)), ValueError),
])
def test_bad_arguments_raise(bad, err):
    args = dict(x=torch.zeros(2, 64, dtype=torch.float16), qdata=torch.zeros(8, 64, dtype=torch.int8),
                scale=torch.ones(8), bias=None)
    args.update(bad)
    with pytest.raises(err):
        kernels.linear(args["x"], args["qdata"], args["scale"], args["bias"])


# ---------------------------------------------------------------- GPU

CUDA_SHAPES = [(4096, 4096), (1000, 768)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("group_size", [None, 128], ids=["row", "g128"])
@pytest.mark.parametrize("N, K", CUDA_SHAPES, ids=[f"{n}x{k}" for n, k in CUDA_SHAPES])
@pytest.mark.parametrize("M", [0, 1, 3, 16, 17, 64, 129, 1024])
def test_cuda(M, N, K, group_size, dtype):
    x, qdata, scale, b = _inputs(M, N, K, dtype, "cuda", group_size)
    y = kernels.linear(x, qdata, scale, b)
    if M == 0:
        assert y.shape == (0, N)
    else:
        _assert_matches(y, x, qdata, scale, b)


@pytest.mark.cuda
@pytest.mark.parametrize("group_size", [None, 32, 256], ids=["row", "g32", "g256"])
@pytest.mark.parametrize("M, config", [
    (1, KernelConfig("gemv", 1, 16, 1024, split_k=4, num_warps=8, num_stages=1)),
    (7, KernelConfig("mm", 16, 32, 32, split_k=4, num_stages=4)),
    (300, KernelConfig("mm", 128, 256, 32, num_warps=8, num_stages=3)),
    (300, KernelConfig("dequant", 1, 16, 256, num_warps=2)),
], ids=["gemv-splitk", "mm16-splitk", "mm128x256", "dequant"])
def test_cuda_forced_configs(M, config, group_size):
    """Split-K, the smallest group size and the largest tile, which the default tables reach rarely."""
    x, qdata, scale, b = _inputs(M, 1000, 2048, torch.bfloat16, "cuda", group_size)
    if group_size and config.path == "gemv":
        config = dataclasses.replace(config, block_k=max(config.block_k, group_size))
    _assert_matches(kernels.linear(x, qdata, scale, b, config=config), x, qdata, scale, b)


@pytest.mark.cuda
@pytest.mark.parametrize("M, config", [
    (1, KernelConfig("gemv", 1, 8, 256, split_k=16, num_warps=2)),
    (16, KernelConfig("mm", 16, 64, 64, split_k=16, num_stages=3)),
], ids=["gemv", "mm"])
def test_cuda_split_k_is_deterministic(M, config):
    # the splits store their partials and the launcher sums them in split order (no atomics), so repeated
    # calls agree bit for bit
    x, qdata, scale, b = _inputs(M, 4096, 4096, torch.bfloat16, "cuda")
    outs = [kernels.linear(x, qdata, scale, b, config=config) for _ in range(20)]
    _assert_matches(outs[0], x, qdata, scale, b)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.cuda
def test_cuda_auto_split_k_and_strided_x():
    _, qdata, scale, b = _inputs(1, 64, 32768, torch.bfloat16, "cuda")
    assert kernels.select_config(1, 64, 32768).split_k > 1
    for M in (1, 16):
        x = torch.randn(M, 32768 + 64, device="cuda", dtype=torch.bfloat16)[:, 32:32768 + 32]
        _assert_matches(kernels.linear(x, qdata, scale, b), x, qdata, scale, b)
