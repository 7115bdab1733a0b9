"""Activation quantization for the dynamic schemes: x (M, K) bf16/fp16 -> codes and a fp32 scale per row.

Math, per token (row) m, as ``numerics.quantize_int8_per_token`` (and its e4m3 twin in
``numerics.float8_dynamic_activation_float8_weight_linear``): ``s_x = max(amax_k |x[m, k]| / qmax, TINY)``
with qmax 127 (int8) or 448 (e4m3), then ``xq = clamp(round(x / s_x))`` to int8 (round half to even, +-127)
or to e4m3 (the RTNE convert, +-448). x is divided by s_x exactly as an IEEE division (``tl.div_rn``) does,
so the codes are bit-identical to the reference's: multiplying by ``1 / s_x`` alone would flip codes by 1
in a few percent of rows (x = amax / 2 and similar exact ties are common with bf16/fp16 inputs). ``divide``
gets the IEEE quotient from that product plus one fma correction, cheaper than the division.

``quantize_per_token`` writes xq and s_x for the tensor-core GEMMs (``mm.quantized_mm``) and the M = 1 GEMV
on codes; ``amax_partials`` reduces |x| to 256 partial maxima for a per-tensor scale (fp8 dynamic per
tensor), which every program of the per-token kernel then reduces to max |x| (exact; no memset or atomics).
The M = 1 fused kernel (``gemv.quantize_gemv``) and the fused GEMM prologue reuse ``row_scale``, ``divide``
and ``quantize_codes``, so every path produces the same codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aofx.kernels.common import bucket_m

__all__ = ["amax_partials", "quantize_per_token"]

# Tuning (evidence: `python -m benchmarks.sweep --families int8dq,fp8dq`, benchmarks/results/tuning/):
_QUANT_BLOCK_K = 2048  # one program per row, K in chunks of this (two passes over x)
_QUANT_ONE_PASS_MAX_K = 16384  # up to this K a row stays in registers (<= 64 fp32 per thread at 8 warps)
_QUANT_NUM_WARPS = 8  # doubled for one-pass rows longer than 4096 (half the registers a thread; faster)
_QUANT_FEW_ROWS = 16  # up to this M, each row is quantized by K / _QUANT_BLOCK_K programs (one tile each),
_QUANT_FEW_ROWS_ONE_PASS_MAX_K = 4096  # unless the row is this short: then one program holds it (one pass)
_QUANT_STAGES = 4  # software pipeline of the amax pass (when the row does not fit one tile)
# per-tensor amax: this many programs each reduce a share of x's (row, K tile) pairs to one partial max;
# the partials kernel replaces torch's ``vector_norm``, which was slower at M = 16 and 128
AMAX_PARTIALS = 256


@triton.jit
def row_scale(amax, FP8: tl.constexpr):
    # s_x = max(amax / qmax, float32 tiny), with an IEEE division as in numerics.safe_scale.
    return tl.maximum(tl.div_rn(amax, 448.0 if FP8 else 127.0), 1.1754943508222875e-38)


@triton.jit
def divide(v, s, r, FMA: tl.constexpr):
    """``tl.div_rn(v, s)`` for fp32 v and s > 0, given r = ``tl.div_rn(1.0, s)``. With FMA: the product
    q = v * r is within an ulp of v / s, the residual v - q * s is exact in one fma, and q + residual * r
    rounded once is the correctly rounded quotient (Markstein's correction step): three instructions
    instead of the division's reciprocal, refinement and range check. Quotients that underflow
    (|v / s| < 2**-126, which quantize to 0) may differ. v = -0 gives +0 (-0 + 0), so v's sign bit is
    OR-ed back in, as the division keeps it (e4m3 has a -0 code). Not under the interpreter, whose fma
    rounds the product."""
    if FMA:
        q = v * r
        y = tl.fma(tl.fma(-q, s, v), r, q)
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        return (y.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    else:
        return tl.div_rn(v, s)


@triton.jit
def quantize_codes(v, FP8: tl.constexpr):
    """fp32 ``x / s_x`` -> int8 codes (round half to even, clamp to [-127, 127]) or e4m3 (clamp to 448)."""
    if FP8:
        return tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
    else:
        # Adding 1.5 * 2**23 rounds to an integer (|v| < 2**22); its bit pattern minus that of 1.5 * 2**23
        # is the integer itself: no float -> int conversion instruction needed.
        q = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
        return tl.minimum(tl.maximum(q, -127), 127).to(tl.int8)


@triton.jit
def _amax_partials_kernel(
    x_ptr, out_ptr,
    # dimensions: TILES = M * CHUNKS (row, K tile) pairs of BLOCK_K columns
    K, TILES, CHUNKS,
    stride_xm,
    BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    # Program p writes max |x| over the tiles p, p + P, ... (P programs): P partial maxima, whose max is
    # max |x| over all of x (a per-tensor activation scale) without a memset or atomics.
    p = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t in tl.range(p, TILES, tl.num_programs(0), num_stages=STAGES):
        k = (t % CHUNKS) * BLOCK_K + rk
        xv = tl.load(x_ptr + (t // CHUNKS) * stride_xm + k, mask=k < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
    tl.store(out_ptr + p, tl.max(amax, axis=0))


@triton.jit
def _given_amax(amax_ptr, n_amax, AMAX_P: tl.constexpr):
    """The max of the n_amax partial maxima at amax_ptr (AMAX_P: a power of two >= n_amax)."""
    r = tl.arange(0, AMAX_P)
    return tl.max(tl.load(amax_ptr + r, mask=r < n_amax, other=0.0).to(tl.float32), axis=0)


@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, xq_ptr, sx_ptr, amax_ptr,
    # dimensions
    K,
    # strides (x and xq are contiguous along K)
    stride_xm, stride_qm,
    # columns quantized per program (a multiple of BLOCK_K; K when one program does the whole row)
    CHUNK_K,
    n_amax,  # GIVEN_AMAX: the number of partial maxima at amax_ptr
    # meta-parameters
    BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, STAGES: tl.constexpr, FP8: tl.constexpr,
    GIVEN_AMAX: tl.constexpr,  # every row uses the max of the partial maxima at amax_ptr (a per-tensor scale)
    AMAX_P: tl.constexpr,
    FMA: tl.constexpr = False,  # divide with divide's fma correction (hardware fma: not the interpreter)
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    rk = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        # The whole row (BLOCK_K >= K) stays in registers: x is read from memory once.
        xv = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        if GIVEN_AMAX:
            s = row_scale(_given_amax(amax_ptr, n_amax, AMAX_P), FP8)
        else:
            s = row_scale(tl.max(tl.abs(xv), axis=0), FP8)
        tl.store(q_row + rk, quantize_codes(divide(xv, s, tl.div_rn(1.0, s), FMA), FP8), mask=rk < K)
    else:
        # Every program of a row gets the row's amax (a read of the row, from L2 after the first), then
        # quantizes its own CHUNK_K columns: with few rows, several programs share the divisions.
        chunk = tl.program_id(1)
        if GIVEN_AMAX:
            s = row_scale(_given_amax(amax_ptr, n_amax, AMAX_P), FP8)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
            s = row_scale(tl.max(amax, axis=0), FP8)
        r = tl.div_rn(1.0, s)
        for k0 in range(chunk * CHUNK_K, tl.minimum(chunk * CHUNK_K + CHUNK_K, K), BLOCK_K):
            xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0)
            tl.store(q_row + k0 + rk, quantize_codes(divide(xv.to(tl.float32), s, r, FMA), FP8), mask=k0 + rk < K)
    if tl.program_id(1) == 0:
        tl.store(sx_ptr + row, s)


def amax_partials(x: torch.Tensor) -> torch.Tensor:
    """(AMAX_PARTIALS,) fp32 partial maxima of |x| over x (M, K) bf16/fp16, M >= 1: their max is max |x|,
    the per-tensor activation amax, which ``quantize_per_token`` reduces in each of its programs."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    out = torch.empty((AMAX_PARTIALS,), device=x.device, dtype=torch.float32)
    block_k = min(_QUANT_BLOCK_K, triton.next_power_of_2(K))
    chunks = triton.cdiv(K, block_k)
    torch.library.wrap_triton(_amax_partials_kernel)[(AMAX_PARTIALS,)](
        x, out, K, M * chunks, chunks, x.stride(0),
        BLOCK_K=block_k, STAGES=_QUANT_STAGES, num_warps=_QUANT_NUM_WARPS,
    )
    return out


def quantize_per_token(x: torch.Tensor, fp8: bool = False, amax: torch.Tensor | None = None,
                       rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) bf16/fp16 -> (xq int8 (M, K), s_x fp32 (M,)), as numerics.quantize_int8_per_token;
    with ``fp8``, xq is e4m3 and s_x = amax / 448, as the fp8 dynamic reference quantizes x per row.
    ``amax`` (1-D, e.g. ``amax_partials(x)``): partial maxima whose max every row uses as its amax, i.e.
    a per-tensor scale, repeated in s_x. ``rows``: the largest M this call serves (``common.by_m``), which
    picks the launch shape; by default ``bucket_m(M)``."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    xq = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    sx = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M > 0:
        split = (bucket_m(M) if rows is None else rows) <= _QUANT_FEW_ROWS and K > _QUANT_FEW_ROWS_ONE_PASS_MAX_K
        one_pass = K <= _QUANT_ONE_PASS_MAX_K and not split
        block_k = triton.next_power_of_2(K) if one_pass else min(_QUANT_BLOCK_K, triton.next_power_of_2(K))
        chunks = triton.cdiv(K, block_k) if split else 1
        n_amax = amax.numel() if amax is not None else 1
        torch.library.wrap_triton(_quantize_per_token_kernel)[(M, chunks)](
            x, xq, sx, amax if amax is not None else sx,
            K,
            x.stride(0), xq.stride(0),
            block_k if split else K,
            n_amax,
            BLOCK_K=block_k, ONE_PASS=one_pass, STAGES=_QUANT_STAGES, FP8=fp8, GIVEN_AMAX=amax is not None,
            AMAX_P=triton.next_power_of_2(n_amax), FMA=x.is_cuda,
            num_warps=_QUANT_NUM_WARPS if block_k <= 4096 else 2 * _QUANT_NUM_WARPS,
        )
    return xq, sx
