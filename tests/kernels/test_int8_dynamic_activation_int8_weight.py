"""int8 dynamic-activation x int8-weight kernels (aofx/kernels/int8_dynamic_activation_int8_weight.py).

int8 ``tl.dot`` (int32 accumulate) works under the Triton interpreter (triton 3.8), so the interpreter tests run
the whole kernel. The kernel quantizes x with an IEEE division and round-half-to-even, like the reference, so
the int8 codes, s_x and the int32 accumulator are exact; only the fp32 epilogue may differ (split-K partial
sums, FMA contraction on GPU): a fraction of one ulp of x.dtype before the final rounding. Hence
``rtol`` = one ulp of x.dtype (2**-10 fp16, 2**-7 bf16) and a tiny ``atol`` for outputs near zero.
The per-token quantization is also checked bit-exactly on its own.
"""

import dataclasses

import pytest
import torch

from aofx import numerics
from aofx.kernels import int8_dynamic_activation_int8_weight as kernels
from aofx.kernels import int8_weight_only as int8wo
from aofx.kernels import mm, quantize
from aofx.kernels.common import KernelConfig

RTOL = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}

# Small tiles that force every path under the interpreter (N=40, K=200 are not multiples of them).
FUSED = KernelConfig("fused", block_m=16, block_n=32, block_k=64)
QUANTIZED = KernelConfig("quantized", block_m=16, block_n=32, block_k=64)
GEMV = KernelConfig("gemv", block_m=1, block_n=16, block_k=64)
FUSED_GEMV = KernelConfig("fused_gemv", block_m=1, block_n=16, block_k=256, num_stages=1)


def _inputs(M, N, K, dtype, device, bias=True, seed=0, x_scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    x = (torch.randn(M, K, generator=g) * x_scale).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype) if bias else None
    qdata, scale = numerics.quantize_int8(w.to(device))
    return x, qdata, scale, b


def _reference(x, qdata, scale, bias):
    if x.device.type == "cpu":
        return numerics.int8_dynamic_activation_int8_weight_linear(x, qdata, scale, bias)
    # CUDA has no int32 matmul: the same formula with a float64 GEMM, exact here (|acc| <= 127**2 * K < 2**53).
    xq, sx = numerics.quantize_int8_per_token(x)
    acc = xq.double() @ qdata.double().t()
    y = acc.float() * sx[:, None] * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _assert_matches(y, x, qdata, scale, bias):
    ref = _reference(x, qdata, scale, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    torch.testing.assert_close(y, ref, rtol=RTOL[x.dtype], atol=1e-5)


# ---------------------------------------------------------------- interpreter (CPU tensors)

INTERP_CASES = [
    # (M, K, config)
    pytest.param(1, 200, FUSED, id="fused-M1-oddK"),
    pytest.param(5, 256, dataclasses.replace(FUSED, split_k=2), id="fused-splitk"),
    pytest.param(16, 200, FUSED, id="fused-M16"),
    pytest.param(17, 200, dataclasses.replace(FUSED, block_k=32), id="fused-M17-2blocks"),
    pytest.param(1, 200, QUANTIZED, id="quantized-M1"),
    pytest.param(17, 256, dataclasses.replace(QUANTIZED, split_k=3), id="quantized-splitk"),
    pytest.param(17, 200, dataclasses.replace(QUANTIZED, block_m=32, block_k=128, group_m=1), id="quantized-gm1"),
    pytest.param(3, 200, dataclasses.replace(QUANTIZED, swap_ab=True), id="quantized-swap-oddK"),
    pytest.param(17, 256, dataclasses.replace(QUANTIZED, split_k=2, swap_ab=True), id="quantized-swap-splitk"),
    pytest.param(5, 200, dataclasses.replace(FUSED, swap_ab=True), id="fused-swap"),
    pytest.param(1, 200, GEMV, id="gemv-oddK"),
    pytest.param(1, 256, dataclasses.replace(GEMV, split_k=2), id="gemv-splitk"),
    pytest.param(1, 202, GEMV, id="gemv-K-not-words"),  # K % 4 != 0: codes, not int32 words of 4 codes
    pytest.param(1, 200, FUSED_GEMV, id="fused-gemv"),  # one chunk of 256 codes: x stays in registers
    pytest.param(1, 200, dataclasses.replace(FUSED_GEMV, block_n=4, block_k=64), id="fused-gemv-chunks"),
    pytest.param(1, 202, dataclasses.replace(FUSED_GEMV, block_k=64), id="fused-gemv-chunks-K-not-words"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("M, K, config", INTERP_CASES)
def test_paths_interpret(M, K, config, bias):
    x, qdata, scale, b = _inputs(M, 40, K, torch.float16, "cpu", bias)
    _assert_matches(kernels.linear(x, qdata, scale, b, config=config), x, qdata, scale, b)


@pytest.mark.interpret
@pytest.mark.parametrize("M", [1, 3, 16, 17, 200, 300])
def test_default_config_per_bucket_interpret(M):
    """Each bucket's table config (tiles much larger than N=24, K=128: everything masked) runs and matches."""
    x, qdata, scale, b = _inputs(min(M, 17), 24, 128, torch.float16, "cpu")
    cfg = kernels.select_config(M, 24, 128)
    _assert_matches(kernels.linear(x, qdata, scale, b, config=cfg), x, qdata, scale, b)


@pytest.mark.interpret
def test_rows_with_very_different_ranges_interpret():
    """Per-token scales: rows 1e-3..1e3 apart, an all-zero row (s_x = TINY gives zeros, not NaN) and ties."""
    x, qdata, scale, b = _inputs(6, 40, 200, torch.float16, "cpu", bias=False)
    x = x * torch.tensor([1e-3, 1.0, 0.0, 30.0, 1.0, 1.0], dtype=torch.float16)[:, None]
    x[4, :] = torch.arange(200) % 9 - 4  # amax 4: x = +-2 gives x / s_x ~ +-63.5, a tie
    x[5, :] = 0.5  # x[5] / s_x = 127 everywhere
    for config in (FUSED, QUANTIZED):
        y = kernels.linear(x, qdata, scale, None, config=config)
        assert torch.isfinite(y).all() and (y[2] == 0).all()
        _assert_matches(y, x, qdata, scale, None)


@pytest.mark.interpret
def test_fused_prologue_spans_several_tiles_interpret(monkeypatch):
    """The amax prologue walks K in its own tiles (256 wide on GPU): shrink them so K=200 needs 4, and put
    each row's largest value in a different tile, the last one partial."""
    monkeypatch.setattr(mm, "_AMAX_BLOCK_K", 64)
    x, qdata, scale, b = _inputs(4, 40, 200, torch.float16, "cpu")
    for row, col in enumerate((5, 70, 150, 199)):
        x[row, col] = 8.0
    _assert_matches(kernels.linear(x, qdata, scale, b, config=FUSED), x, qdata, scale, b)


@pytest.mark.interpret
@pytest.mark.parametrize("block_k, rows", [(None, 9), (64, 9), (64, 20)], ids=["one-tile", "5-chunks", "two-pass"])
def test_quantize_per_token_bit_exact_interpret(block_k, rows, monkeypatch):
    """One program per row, in one pass over x when the row fits one tile, else two; few rows of a long
    K: each row split over K / BLOCK_K programs."""
    if block_k:
        monkeypatch.setattr(quantize, "_QUANT_BLOCK_K", block_k)
        monkeypatch.setattr(quantize, "_QUANT_ONE_PASS_MAX_K", block_k)
        monkeypatch.setattr(quantize, "_QUANT_FEW_ROWS_ONE_PASS_MAX_K", block_k)
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16):  # no tl.dot here, so bf16 is fine under the interpreter
        x = (torch.randn(rows, 300, generator=g) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
        x[4] = 0
        xq, sx = kernels.quantize_per_token(x)
        ref_q, ref_s = numerics.quantize_int8_per_token(x)
        assert torch.equal(xq, ref_q) and torch.equal(sx, ref_s)


@pytest.mark.interpret
@pytest.mark.parametrize("config", [FUSED, QUANTIZED], ids=["fused", "quantized"])
def test_non_contiguous_x_interpret(config):
    _, qdata, scale, b = _inputs(1, 40, 200, torch.float16, "cpu")
    g = torch.Generator().manual_seed(1)
    x_sliced = torch.randn(5, 300, generator=g).half()[:, 50:250]  # row stride 300: read in place
    x_transposed = torch.randn(200, 5, generator=g).half().t()  # column stride 5: copied
    for x in (x_sliced, x_transposed):
        assert not x.is_contiguous()
        _assert_matches(kernels.linear(x, qdata, scale, b, config=config), x, qdata, scale, b)


@pytest.mark.interpret
def test_gemv_words_of_unaligned_rows_interpret():
    """The M = 1 gemv reads int8 codes as int32 words; weight rows that do not start on 4-byte bounds
    (a slice at an odd column) are copied first, and the sums stay exact."""
    x, qdata, scale, b = _inputs(1, 40, 201, torch.float16, "cpu")
    sliced = qdata[:, 1:]  # K = 200, row stride 201, offset 1
    assert sliced.stride(0) % 4 and sliced.storage_offset() % 4
    y = kernels.linear(x[:, 1:], sliced, scale, b, config=GEMV)
    _assert_matches(y, x[:, 1:], sliced, scale, b)


@pytest.mark.interpret
def test_fused_gemv_needs_one_row_interpret():
    x, qdata, scale, b = _inputs(2, 40, 64, torch.float16, "cpu")
    with pytest.raises(ValueError, match="fused_gemv path needs M == 1"):
        kernels.linear(x, qdata, scale, b, config=FUSED_GEMV)


@pytest.mark.interpret
def test_m0_returns_empty():
    x, qdata, scale, b = _inputs(0, 40, 64, torch.float16, "cpu")
    y = kernels.linear(x, qdata, scale, b)
    assert y.shape == (0, 40) and y.dtype == torch.float16


def test_select_config_buckets():
    for M in (1, 2, 16):
        for N, K in ((14336, 4096), (4096, 14336), (1000, 768)):
            cfg = kernels.select_config(M, N, K)
            assert (cfg.path, cfg.block_m) == (("fused_gemv", 1) if M == 1 else ("quantized", 16))
    for M in (17, 128, 129, 256, 257, 4096):
        cfg = kernels.select_config(M, 4096, 4096)
        assert cfg.path == "quantized" and cfg.block_m >= 64
    assert kernels.select_config(4096, 4096, 14336).split_k == 1
    assert kernels.select_config(1, 14336, 4096).split_k == 1
    # M = 1 in one launch: rows of up to 4096 codes in one chunk, longer int8 rows in chunks of 512; long
    # e4m3 rows and N < 512 (fewer than 128 programs of 4 rows) keep the per-token kernel + row kernel
    assert [kernels.select_config(1, n, k, fp8).block_k for n, k, fp8 in (
        (14336, 4096, False), (4096, 14336, False), (1000, 768, True))] == [4096, 512, 1024]
    assert kernels.select_config(1, 4096, 14336, fp8=True) == int8wo.select_config(1, 4096, 14336)
    # K = 14336: int8 weight-only's one step of 16384 codes, but steps of 8192 for dp4a words
    assert [kernels.select_config(1, 256, 14336, fp8).block_k for fp8 in (False, True)] == [8192, 16384]
    assert kernels.select_config(1, 64, 32768).split_k > 1  # one weight row per program: 64 programs
    # 64 tiles of 64 x 128 at M = 128: 128 narrower tiles fill the GPU; at M = 64, still too few: split K
    narrow = kernels.select_config(128, 4096, 14336)
    assert (narrow.block_n, narrow.block_k, narrow.split_k, narrow.num_stages) == (64, 256, 1, 6)
    # M <= 16, long K: 512-wide K tiles, 5 stages deep
    assert [(c.block_k, c.num_stages) for c in (kernels.select_config(16, n, k) for n, k in (
        (14336, 4096), (4096, 14336)))] == [(256, 4), (512, 5)]
    assert kernels.select_config(64, 4096, 14336).split_k > 1


@pytest.mark.parametrize("bad, err", [
    (dict(x=torch.zeros(2, 64, dtype=torch.float32)), TypeError),
    (dict(x=torch.zeros(2, 3, 64, dtype=torch.float16)), ValueError),
    (dict(qdata=torch.zeros(8, 32, dtype=torch.int8)), ValueError),
    (dict(qdata=torch.zeros(8, 64, dtype=torch.float16)), TypeError),
    (dict(scale=torch.ones(7)), ValueError),
    (dict(scale=torch.ones(8, 2)), ValueError),  # per-row scales only
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
@pytest.mark.parametrize("N, K", CUDA_SHAPES, ids=[f"{n}x{k}" for n, k in CUDA_SHAPES])
@pytest.mark.parametrize("M", [0, 1, 3, 16, 17, 64, 129, 1024])
def test_cuda(M, N, K, dtype):
    x, qdata, scale, b = _inputs(M, N, K, dtype, "cuda")
    y = kernels.linear(x, qdata, scale, b)
    if M == 0:
        assert y.shape == (0, N)
    else:
        _assert_matches(y, x, qdata, scale, b)


@pytest.mark.cuda
@pytest.mark.parametrize("M, config", [
    (1, KernelConfig("fused", 16, 32, 256, split_k=4, num_stages=4)),
    (16, KernelConfig("fused", 16, 64, 128, num_stages=4)),
    (16, KernelConfig("quantized", 64, 128, 128, num_stages=4)),
    (300, KernelConfig("quantized", 128, 256, 128, num_warps=8, num_stages=3)),
    (300, KernelConfig("fused", 64, 128, 128, num_warps=4, num_stages=3)),
    (33, KernelConfig("quantized", 64, 128, 128, split_k=2, num_stages=4)),
    (100, kernels._NARROW),
], ids=["fused-splitk", "fused", "quantized-smallM", "quantized-128x256", "fused-largeM", "quantized-splitk",
        "quantized-narrow"])
def test_cuda_forced_configs(M, config):
    x, qdata, scale, b = _inputs(M, 1000, 2048, torch.bfloat16, "cuda", x_scale=3.0)
    _assert_matches(kernels.linear(x, qdata, scale, b, config=config), x, qdata, scale, b)


@pytest.mark.cuda
def test_cuda_quantize_per_token_and_strided_x():
    x = torch.randn(1024, 4096 + 64, device="cuda", dtype=torch.bfloat16)[:, 32:4096 + 32]
    xq, sx = kernels.quantize_per_token(x)
    ref_q, ref_s = numerics.quantize_int8_per_token(x)
    assert torch.equal(xq, ref_q) and torch.equal(sx, ref_s)
    _, qdata, scale, b = _inputs(1, 64, 4096, torch.bfloat16, "cuda")
    for M in (1, 16, 1024):
        _assert_matches(kernels.linear(x[:M], qdata, scale, b), x[:M], qdata, scale, b)
    # the M = 1 gemv splits K over 64 weight rows (dp4a words, the pipelined gemv)
    x, qdata, scale, b = _inputs(1, 64, 32768, torch.bfloat16, "cuda")
    assert kernels.select_config(1, 64, 32768).split_k > 1
    _assert_matches(kernels.linear(x, qdata, scale, b), x, qdata, scale, b)


def _every_value_rows(dtype, K):
    """Rows (R, K) that hold every finite value of ``dtype`` (ascending, so each row spans a range of
    magnitudes: big and subnormal quotients), then rows of j / 254 * amax for j in [-254, 254] (x / s_x
    on and next to the .5 midpoints) at several amax, and -0 / +0."""
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = bits[torch.isfinite(bits)].float().sort().values
    amax = torch.tensor([1.0, 3.0, 0.0375, 448.0, 1e-3, 6e4 if dtype == torch.float16 else 1e30])
    ties = (torch.arange(-254, 255) / 254.0 * amax[:, None]).flatten()
    flat = torch.cat([values, ties, torch.tensor([-0.0, 0.0])]).to(dtype)
    rows = -(-flat.numel() // K)
    return torch.cat([flat, flat.new_zeros(rows * K - flat.numel())]).view(rows, K)


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("K", [4096, 14336])
def test_cuda_quantize_per_token_every_value(fp8, dtype, K):
    """The per-token kernel divides with an fma-corrected product (``_divide``): over every finite input
    value and at the code midpoints its codes and s_x equal the reference's, bit for bit (CPU numerics:
    IEEE division, RTNE casts). All rows at once (M >= 17: a program per row, the row in registers), then
    M = 1 and M = 16 (K = 4096: the same; K = 14336: each row split over K)."""
    x = _every_value_rows(dtype, K).cuda()
    x = x.repeat(-(-17 // x.shape[0]), 1)  # at least 17 rows
    if fp8:
        ref_q, ref_s = numerics.quantize_float8(x.cpu().float(), per_row=True)
    else:
        ref_q, ref_s = numerics.quantize_int8_per_token(x.cpu())
    ref_q = ref_q.view(torch.uint8)
    xq, sx = kernels.quantize_per_token(x, fp8=fp8)
    assert torch.equal(xq.view(torch.uint8).cpu(), ref_q) and torch.equal(sx.cpu(), ref_s)
    for rows in (1, 16):
        for i in range(0, x.shape[0] - rows + 1, rows):
            xq, sx = kernels.quantize_per_token(x[i:i + rows], fp8=fp8)
            assert torch.equal(xq.view(torch.uint8).cpu(), ref_q[i:i + rows]), (rows, i)
            assert torch.equal(sx.cpu(), ref_s[i:i + rows])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("K", [4096, 14336])
def test_cuda_fused_gemv_equals_two_kernels(dtype, K):
    """``fused_gemv`` quantizes x in every program with the per-token kernel's arithmetic: over every finite
    input value and at the code midpoints (one row at a time) its outputs equal the per-token kernel +
    row kernel's bit for bit (exact int32 sums, the same epilogue; no bias, so no fma contraction)."""
    rows = _every_value_rows(dtype, K).cuda()
    _, qdata, scale, _ = _inputs(1, 1000, K, dtype, "cuda", bias=False)
    fused = kernels.select_config(1, 1000, K)
    assert fused.path == "fused_gemv" and (fused.block_k >= K) == (K == 4096)  # one chunk / chunks
    two_kernels = KernelConfig("gemv", block_m=1, block_n=1, block_k=2048, num_stages=1)
    for i in range(rows.shape[0]):
        x = rows[i:i + 1]
        y = kernels.linear(x, qdata, scale, config=fused)
        assert torch.equal(y, kernels.linear(x, qdata, scale, config=two_kernels)), i
    _assert_matches(y, x, qdata, scale, None)


@pytest.mark.cuda
@pytest.mark.parametrize("K", [770, 4096, 14336])
def test_cuda_gemv_words(K):
    """M = 1 on weight rows at an odd offset: with K % 4 == 0 they are copied and read as int32 words of
    codes (dp4a), otherwise read as codes in place (``fused_gemv``: one chunk, or chunks at K = 14336)."""
    x, qdata, scale, b = _inputs(1, 1000, K + 1, torch.bfloat16, "cuda")
    x, qdata = x[:, 1:], qdata[:, 1:]
    _assert_matches(kernels.linear(x, qdata, scale, b), x, qdata, scale, b)
