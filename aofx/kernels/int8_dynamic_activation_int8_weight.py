"""Triton kernels for int8 dynamic-activation x int8-weight linear (``numerics.int8_dynamic_activation_int8_weight_linear``).

Layout read:
  qdata  int8 (N, K), row-major, contiguous along K (``numerics.quantize_int8`` per row)
  scale  float (N,) per output row (s_w)
  bias   optional (N,)
  x      (M, K) bf16 / fp16 with arbitrary row stride; y is (M, N) in x.dtype.

Math, per token (row) m:  s_x = max(amax_k |x[m, k]| / 127, TINY),  xq = clamp(round(x / s_x), -127, 127),
acc = xq @ qdata.T exactly in int32 (``tl.dot`` on int8 operands), ``y = acc * s_x * s_w (+ bias)`` in fp32 in
the epilogue, then cast. ``round`` is round-half-to-even like ``torch.round`` (the 1.5 * 2**23 trick), but x is
divided by s_x exactly as an IEEE division (``tl.div_rn``) does, so the codes are bit-identical to the
reference's. (Multiplying by ``1 / s_x`` alone would flip codes by 1 in a few percent of rows: x = amax / 2
and similar exact ties are common with bf16/fp16 inputs.) The per-token kernel gets the IEEE quotient from
that product plus one fma correction (``_divide``), cheaper than the division. s_x = amax / 127 is an IEEE
division, as in ``numerics.safe_scale``.

Kernel paths (``KernelConfig.path``):
  ``fused_gemv`` (M = 1 where 4-row programs number >= 128; with e4m3 codes, rows of <= 4096 codes only):
           one launch of ``_quantize_gemv_kernel``. Each program requests its BLOCK_N weight rows first,
           then reads x, takes the row's amax and quantizes x itself with the per-token kernel's arithmetic
           (so the same codes), and multiplies on the CUDA cores: int8 codes as int32 words with one
           ``dp4a`` per word pair when K % 4 == 0 (exact int32 sums), e4m3 codes in fp32. A row of up to
           BLOCK_K codes stays in registers; longer rows go in chunks (x re-read from L2, weights a chunk
           ahead). It saves the per-token kernel's launch.
  ``gemv`` (M = 1 otherwise): the per-token kernel below writes xq and s_x, then ``int8_weight_only``'s
           CUDA-core GEMV (its config and its row kernel) reads the codes (``x_codes``): exact int8 x int8
           products, summed exactly, scaled in the epilogue. With K % 4 == 0 it reads x and the weight rows
           as int32 words of 4 codes and sums each word pair with one ``dp4a``.
  ``quantized`` (every other default bucket) and ``fused`` (forced configs only), both one
  ``_int8dq_mm_kernel`` (``QUANTIZE_X`` picks the prologue):
  ``quantized``: a per-token kernel writes xq int8 (M, K) and s_x (M,), then an int8 x int8
           GEMM with tensor-core tiles. With few rows (M <= 16) of K > 4096 each row is quantized by
           K / 2048 programs (each recomputes the row's amax from L2), else one program per row keeps the
           row in registers (up to K = 16384).
           M <= 16: 16-row tiles, BLOCK_N narrowed until there are >= 128 programs, 512-wide K tiles
           (5 stages) for long K, and ``swap_ab`` (y.T = W @ xq.T: the weight rows on wgmma's 64-row side)
           where BLOCK_N >= 64.
           M <= 128: 64 x 128, or 64 x 64 x 256 with 6 stages where 64 x 128 gives fewer than 128 tiles;
           M <= 256: 128 x 128; larger: 256 x 128 x 128, swap_ab, 3 stages with e4m3, 128 x 128 x 128 with 4 warps
           with int8 (``_INT8_LARGE``). Up to M = 256, a shape that still has fewer than 128 tiles splits K (up to
           ~256 programs).
  ``fused``: the activation quantization is fused into the GEMM prologue. Each program loops over K for
           the amax of its BLOCK_M rows, then quantizes x tiles on the fly (``_divide``: an IEEE division
           per element would be far slower). Slower than ``quantized`` at M = 16, int8 and e4m3 alike,
           because every program redoes the amax over all of K and the quantization of its x tiles.
Split K stores fp32 partials into a (split_k, M, N) workspace that the launcher sums and casts.

The fp8 dynamic scheme (``float8_dynamic_activation_float8_weight.py``) runs these kernels with e4m3 weights:
``FP8`` selects e4m3 codes (x / s_x clamped to +-448 and rounded by the RTNE convert, s_x = amax / 448) and
fp32 accumulation; ``GIVEN_AMAX`` quantizes every row with one amax, the max of ``amax_partials``'s partial
maxima (a per-tensor activation scale).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from aofx.kernels import bucket_m, grid_order, int32_words
from aofx.kernels import int8_weight_only as int8wo
from aofx.kernels.int8_weight_only import (_MIN_PROGRAMS, KernelConfig, _dot4, _store_tile, check_linear_args,
                                           split_k_for, split_k_output, split_k_result)

__all__ = ["KernelConfig", "linear", "quantize_per_token", "select_config"]


# ---------------------------------------------------------------- device helpers

@triton.jit
def _row_scale(amax, FP8: tl.constexpr):
    # s_x = max(amax / qmax, float32 tiny), with an IEEE division as in numerics.safe_scale.
    return tl.maximum(tl.div_rn(amax, 448.0 if FP8 else 127.0), 1.1754943508222875e-38)


@triton.jit
def _divide(v, s, r, FMA: tl.constexpr):
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
def _quantize(v, FP8: tl.constexpr):
    """fp32 ``x / s_x`` -> int8 codes (round half to even, clamp to [-127, 127]) or e4m3 (clamp to 448)."""
    if FP8:
        return tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
    else:
        # Adding 1.5 * 2**23 rounds to an integer (|v| < 2**22); its bit pattern minus that of 1.5 * 2**23
        # is the integer itself: no float -> int conversion instruction needed.
        q = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
        return tl.minimum(tl.maximum(q, -127), 127).to(tl.int8)


# ---------------------------------------------------------------- kernels

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
    FMA: tl.constexpr = False,  # divide with _divide's fma correction (hardware fma: not the interpreter)
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    rk = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        # The whole row (BLOCK_K >= K) stays in registers: x is read from memory once.
        xv = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        if GIVEN_AMAX:
            s = _row_scale(_given_amax(amax_ptr, n_amax, AMAX_P), FP8)
        else:
            s = _row_scale(tl.max(tl.abs(xv), axis=0), FP8)
        tl.store(q_row + rk, _quantize(_divide(xv, s, tl.div_rn(1.0, s), FMA), FP8), mask=rk < K)
    else:
        # Every program of a row gets the row's amax (a read of the row, from L2 after the first), then
        # quantizes its own CHUNK_K columns: with few rows, several programs share the divisions.
        chunk = tl.program_id(1)
        if GIVEN_AMAX:
            s = _row_scale(_given_amax(amax_ptr, n_amax, AMAX_P), FP8)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
            s = _row_scale(tl.max(amax, axis=0), FP8)
        r = tl.div_rn(1.0, s)
        for k0 in range(chunk * CHUNK_K, tl.minimum(chunk * CHUNK_K + CHUNK_K, K), BLOCK_K):
            xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0)
            tl.store(q_row + k0 + rk, _quantize(_divide(xv.to(tl.float32), s, r, FMA), FP8), mask=k0 + rk < K)
    if tl.program_id(1) == 0:
        tl.store(sx_ptr + row, s)


@triton.jit
def _int8dq_mm_kernel(
    # pointers (x is bf16/fp16 when QUANTIZE_X, else int8 codes with scales at sx_ptr)
    x_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
    # dimensions
    M, N, K,
    # strides (x and qdata are contiguous along K)
    stride_xm, stride_wn, stride_ym,
    stride_sw,  # 0 for a per-tensor weight scale (fp8 dynamic)
    # meta-parameters
    HAS_BIAS: tl.constexpr, QUANTIZE_X: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    AMAX_BLOCK_K: tl.constexpr, AMAX_STAGES: tl.constexpr, SWAP_AB: tl.constexpr,
    FP8: tl.constexpr,  # e4m3 codes (fp8 dynamic, per row): fp32 accumulation instead of exact int32
    FMA: tl.constexpr = False,  # QUANTIZE_X: divide with _divide's fma correction (not the interpreter)
):
    pid_m, pid_n = grid_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows of x past M are masked (no memory traffic when M << BLOCK_M; they quantize to 0); columns past N
    # re-read valid weight rows (mask-free, vectorized) and are dropped at the store.
    m_mask = rm[:, None] < M  # (BLOCK_M, 1)
    rn_safe = rn % N
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None] * stride_xm  # (BLOCK_M, 1)
    w_rows = w_ptr + rn_safe[:, None] * stride_wn  # (BLOCK_N, 1)

    if QUANTIZE_X:
        # Prologue: per-row amax over the whole K (every K split needs the same s_x). Its latency is paid
        # before any weight is read, so it uses wide tiles and its own software pipeline (tl.range stages:
        # a plain loop without tl.dot would wait out one L2 round trip per tile).
        ra = tl.arange(0, AMAX_BLOCK_K)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in tl.range(0, K, AMAX_BLOCK_K, num_stages=AMAX_STAGES):
            k = k0 + ra
            xt = tl.load(x_rows + k[None, :], mask=m_mask & (k[None, :] < K), other=0.0, eviction_policy="evict_last")
            amax = tl.maximum(amax, tl.max(tl.abs(xt.to(tl.float32)), axis=1))
        # Rows past M get s_x = 1: dividing their zeros by TINY would send every element down the slow
        # path of the IEEE division.
        s_x = tl.where(rm < M, _row_scale(amax, FP8), 1.0)  # (BLOCK_M,)
        r_x = tl.div_rn(1.0, s_x)[:, None]
    else:
        s_x = tl.load(sx_ptr + rm, mask=rm < M, other=1.0)

    acc_dtype: tl.constexpr = tl.float32 if FP8 else tl.int32
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc_dtype)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=m_mask, other=0.0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_mask & (k[None, :] < K), other=0.0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0, eviction_policy="evict_first")
        if QUANTIZE_X:
            xt = _quantize(_divide(xt.to(tl.float32), s_x[:, None], r_x, FMA), FP8)  # (BLOCK_M, BLOCK_K) codes
        if SWAP_AB:
            # y.T = W @ xq.T: the weight tile fills the 64-row tensor-core operand, x's few rows the narrow one.
            acc = tl.dot(w, tl.trans(xt), acc, out_dtype=acc_dtype)  # (BLOCK_N, BLOCK_M)
        else:
            acc = tl.dot(xt, tl.trans(w), acc, out_dtype=acc_dtype)  # (BLOCK_M, BLOCK_N)
    if SWAP_AB:
        acc = tl.trans(acc)

    # Same association as the reference: (acc * s_x) * s_w, then + bias.
    y = acc.to(tl.float32) * s_x[:, None] * tl.load(sw_ptr + rn_safe * stride_sw).to(tl.float32)[None, :]
    _store_tile(y, y_ptr, b_ptr, rm, rn, rn_safe, m_mask, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _load_x_chunk(x_ptr, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
    """x[k0 : k0 + BLOCK_K] of a contiguous row as fp32 (0 past K): (BLOCK_K // 4, 4) with code 4 j + i at
    [j, i] when WORDS (each word's 4 values in one thread), else (BLOCK_K,). Read twice when in chunks, so
    kept in L2 then."""
    if WORDS:
        k = k0 + tl.arange(0, BLOCK_K // 4)[:, None] * 4 + tl.arange(0, 4)[None, :]
    else:
        k = k0 + tl.arange(0, BLOCK_K)
    if BLOCK_K < K:
        return tl.load(x_ptr + k, mask=k < K, other=0.0, eviction_policy="evict_last").to(tl.float32)
    else:
        return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _load_w_chunk(w_ptr, rows, stride_wn, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
    """Codes [k0, k0 + BLOCK_K) of weight rows ``rows`` (0 past K), as int32 words of 4 codes when WORDS."""
    W: tl.constexpr = BLOCK_K // 4 if WORDS else BLOCK_K
    c = (k0 // 4 if WORDS else k0) + tl.arange(0, W)
    return tl.load(w_ptr + rows[:, None] * stride_wn + c[None, :], mask=c[None, :] < (K // 4 if WORDS else K),
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _row_products(w, xv, s, r, FP8: tl.constexpr, FMA: tl.constexpr, WORDS: tl.constexpr, DOT4_ASM: tl.constexpr):
    """x's chunk quantized with scale s (r = 1 / s) times each weight row's chunk, (BLOCK_N, lanes) to be
    summed over lanes: exact int32 products of int8 codes (one dp4a per word pair when WORDS), or fp32
    products of e4m3 codes (exact)."""
    q = _quantize(_divide(xv, s, r, FMA), FP8)
    if WORDS:
        bytes_ = q.to(tl.int32) & 0xFF
        words = tl.sum(bytes_ << (tl.arange(0, 4) * 8)[None, :], axis=1)  # byte i = code 4 j + i (disjoint bits)
        return _dot4(w, tl.broadcast_to(words[None, :], w.shape), tl.zeros(w.shape, dtype=tl.int32), DOT4_ASM)
    elif FP8:
        return w.to(tl.float32) * q.to(tl.float32)[None, :]
    else:
        return w.to(tl.int32) * q.to(tl.int32)[None, :]


@triton.jit
def _quantize_gemv_kernel(
    # pointers (x is one contiguous row of bf16/fp16; y one row of N)
    x_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
    # dimensions and strides (stride_wn counts int32 words when WORDS; stride_sw is 0 for a per-tensor scale)
    N, stride_wn, stride_sw,
    K: tl.constexpr,  # codes per row, a compile-time constant: the chunk loops unroll
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # codes a chunk (a power of two); one chunk (>= K) keeps x in registers
    FP8: tl.constexpr, FMA: tl.constexpr,
    WORDS: tl.constexpr,  # int8 codes read and multiplied as int32 words of 4 (dp4a); DOT4_ASM: inline PTX
    DOT4_ASM: tl.constexpr,
):
    # M = 1, the whole scheme in one launch: every program quantizes x itself (amax, s_x, codes: the
    # per-token kernel's arithmetic, so the same codes) for its BLOCK_N weight rows.
    rows = tl.minimum(tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)  # past N: re-read row N - 1
    NCHUNK: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    # The first weight chunk is requested before x is read: its DRAM latency covers x's amax.
    w = _load_w_chunk(w_ptr, rows, stride_wn, 0, K, BLOCK_K, WORDS)
    xv = _load_x_chunk(x_ptr, 0, K, BLOCK_K, WORDS)
    amax = tl.abs(xv)
    for c in tl.static_range(1, NCHUNK):
        amax = tl.maximum(amax, tl.abs(_load_x_chunk(x_ptr, c * BLOCK_K, K, BLOCK_K, WORDS)))
    s = _row_scale(tl.max(amax), FP8)
    r = tl.div_rn(1.0, s)
    if NCHUNK > 1:
        w_next = _load_w_chunk(w_ptr, rows, stride_wn, BLOCK_K, K, BLOCK_K, WORDS)
    acc = _row_products(w, xv, s, r, FP8, FMA, WORDS, DOT4_ASM)  # (BLOCK_N, lanes), summed after the loop
    for c in tl.static_range(1, NCHUNK):
        w = w_next
        if c + 1 < NCHUNK:
            w_next = _load_w_chunk(w_ptr, rows, stride_wn, (c + 1) * BLOCK_K, K, BLOCK_K, WORDS)  # a chunk ahead
        xv = _load_x_chunk(x_ptr, c * BLOCK_K, K, BLOCK_K, WORDS)  # again, from L2
        acc += _row_products(w, xv, s, r, FP8, FMA, WORDS, DOT4_ASM)
    # the reference's association: (acc * s_x) * s_w, then + bias
    y = tl.sum(acc, axis=1).to(tl.float32) * s * tl.load(sw_ptr + rows * stride_sw).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


# ---------------------------------------------------------------- config tables

# (max M, config), first match wins; block_n / block_k / split_k / swap_ab are refined per shape in
# select_config. From M = 2 on, quantizing x once in its own kernel beats the fused prologue (see the module
# docstring). M > 256 (e4m3 codes; int8 codes take _INT8_LARGE below): 256 x 128 x 128 with swap_ab, 3 stages,
# at least as fast as 128 x 256 x 128.
# Evidence for these tables: `python -m benchmarks.sweep --families int8dq,fp8dq` times each default config
# beside sweep.py's candidate grid (the per-token kernel and gemv at M = 1, "quantized" tiles at M >= 64); the
# data belongs in benchmarks/results/tuning/ once a sweep has been run there.
_TABLE = (
    (16, KernelConfig("quantized", block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)),
    (128, KernelConfig("quantized", block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)),
    (256, KernelConfig("quantized", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4)),
    (None, KernelConfig("quantized", block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3, swap_ab=True)),
)
# M > 256 with int8 codes: Triton's pipeliner keeps only fp32-accumulator wgmma in flight across K steps (an
# int32 accumulator gets a wait for its wgmma in every step, seen in the TTGIR), so int8 tiles run best two to
# an SM, one's wgmma overlapping the other's wait: 128 x 128 x 128, 4 warps, 3 stages (96 KB), faster than
# the table's 256 x 128 entry at M = 512 and 1024 on every shape. e4m3 accumulates in fp32, whose wgmma stays
# asynchronous, so it keeps the table's entry, which is faster for it.
_INT8_LARGE = KernelConfig("quantized", block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=3)
# 17 <= M <= 128 when 64 x 128 tiles are too few: 64 x 64 x 256, 6 stages of 32 KB: narrower, deeper-pipelined
# tiles fill the GPU without a K split (shorter or longer K tiles, 8 warps or 5 stages were slower)
_NARROW = KernelConfig("quantized", block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=6)
# M <= 16: from this K on, 512-wide K tiles (as int8_weight_only._LONG_K), 5 stages (a little faster than 4)
_LONG_K = 8192
_LONG_K_STAGES = 5
_MIN_SPLIT_PROGRAMS = 256
_GEMV_WORDS_MAX_BLOCK_K = 8192  # M = 1, dp4a words: codes a step, at most (see select_config)
# M = 1 in one launch (_quantize_gemv_kernel): 4 weight rows a program, 4 warps; rows up to
# _FUSED_GEMV_ONE_CHUNK_MAX_K codes are one chunk (x stays in registers), longer int8 rows go in chunks of
# block_k codes (x re-read from L2). One launch beats the per-token kernel + row kernel on every shape tried
# (1, 2 or 8 rows, 8 warps, or chunks of 1024-2048 codes were slower); long e4m3 rows keep the two kernels,
# which no fused tile clearly beat there.
_FUSED_GEMV = KernelConfig("fused_gemv", block_m=1, block_n=4, block_k=512, num_warps=4, num_stages=1)
_FUSED_GEMV_ONE_CHUNK_MAX_K = 4096
ONE_ROW_PATHS = ("fused_gemv", "gemv")  # the M = 1 paths: the row's own amax is the tensor's
# fused prologue: x tiles of BLOCK_M x _AMAX_BLOCK_K, _AMAX_STAGES deep (16 x 256 bf16: 8 KB a stage, 7 in
# flight; wider tiles pushed the kernel to 240+ registers on sm_90)
_AMAX_BLOCK_K = 256
_AMAX_STAGES = 8
_AMAX_SMEM_BYTES = 64 * 1024  # fewer stages for taller tiles (a forced fused config with BLOCK_M = 64)
_QUANT_BLOCK_K = 2048  # per-token kernel: one program per row, K in chunks of this (two passes over x)
_QUANT_ONE_PASS_MAX_K = 16384  # up to this K a row stays in registers (<= 64 fp32 per thread at 8 warps)
_QUANT_NUM_WARPS = 8  # doubled for one-pass rows longer than 4096 (half the registers a thread; faster)
_QUANT_FEW_ROWS = 16  # up to this M, each row is quantized by K / _QUANT_BLOCK_K programs (one tile each),
_QUANT_FEW_ROWS_ONE_PASS_MAX_K = 4096  # unless the row is this short: then one program holds it (one pass)
_QUANT_STAGES = 4  # software pipeline of the amax pass (when the row does not fit one tile)
# per-tensor amax: this many programs each reduce a share of x's (row, K tile) pairs to one partial max
_AMAX_PARTIALS = 256


def select_config(M: int, N: int, K: int, fp8: bool = False) -> KernelConfig:
    """The config for one call. M selects the bucket; N, K (static under compile) refine it. ``fp8``: e4m3
    codes (the fp8 dynamic scheme). M = 1 takes ``fused_gemv`` where it gives >= _MIN_PROGRAMS programs
    (e4m3: rows of one chunk only), else int8 weight-only's gemv config on the per-token kernel's codes
    (dp4a words in steps of at most _GEMV_WORDS_MAX_BLOCK_K codes)."""
    if M == 1:
        one_chunk = K <= _FUSED_GEMV_ONE_CHUNK_MAX_K
        if (one_chunk or not fp8) and triton.cdiv(N, _FUSED_GEMV.block_n) >= _MIN_PROGRAMS:
            block_k = triton.next_power_of_2(K) if one_chunk else _FUSED_GEMV.block_k
            return dataclasses.replace(_FUSED_GEMV, block_k=block_k)
        cfg = int8wo.select_config(M, N, K)
        if not fp8 and K % 4 == 0 and cfg.block_k > _GEMV_WORDS_MAX_BLOCK_K:
            # dp4a words: steps of at most 2048 words, not int8 weight-only's one long step (slower with words
            # on 4096x14336)
            cfg = dataclasses.replace(cfg, block_k=_GEMV_WORDS_MAX_BLOCK_K,
                                      split_k=split_k_for(N, triton.cdiv(K, _GEMV_WORDS_MAX_BLOCK_K)))
        return cfg
    if M > 256 and not fp8:
        return _INT8_LARGE
    cfg = next(c for max_m, c in _TABLE if max_m is None or M <= max_m)
    block_n, block_k, split_k, swap_ab, stages = cfg.block_n, cfg.block_k, 1, cfg.swap_ab, cfg.num_stages
    if M <= 16:
        # Memory bound: narrow the weight tile before splitting K (a split costs a reduction kernel).
        while block_n > 32 and triton.cdiv(N, block_n) < 128:
            block_n //= 2
        if K >= _LONG_K:
            block_k, stages = 512, _LONG_K_STAGES
        # y.T = W @ xq.T puts the weight rows on wgmma's 64-row side (a little faster when N allows it).
        swap_ab = block_n >= 64
        split_k = split_k_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    elif M <= 256 and triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n) < _MIN_PROGRAMS:
        if M <= 128 and triton.cdiv(M, 64) * triton.cdiv(N, _NARROW.block_n) >= _MIN_PROGRAMS:
            # Few tiles (N = 4096: 64 at M = 128): narrower, deeper-pipelined tiles fill the GPU unsplit
            # (faster than 64 x 128 tiles split 4 ways on 4096x14336).
            return _NARROW
        # Otherwise split K, up to ~2 programs per SM (_MIN_SPLIT_PROGRAMS): idle SMs cost more than the
        # reduction kernel.
        split_k = split_k_for(triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n), triton.cdiv(K, block_k),
                              min_programs=_MIN_SPLIT_PROGRAMS)
    return dataclasses.replace(cfg, block_n=block_n, block_k=block_k, split_k=split_k, swap_ab=swap_ab,
                               num_stages=stages)


# ---------------------------------------------------------------- launchers

def amax_partials(x: torch.Tensor) -> torch.Tensor:
    """(_AMAX_PARTIALS,) fp32 partial maxima of |x| over x (M, K) bf16/fp16, M >= 1: their max is max |x|,
    the per-tensor activation amax, which ``quantize_per_token`` reduces in each of its programs."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    out = torch.empty((_AMAX_PARTIALS,), device=x.device, dtype=torch.float32)
    block_k = min(_QUANT_BLOCK_K, triton.next_power_of_2(K))
    chunks = triton.cdiv(K, block_k)
    torch.library.wrap_triton(_amax_partials_kernel)[(_AMAX_PARTIALS,)](
        x, out, K, M * chunks, chunks, x.stride(0),
        BLOCK_K=block_k, STAGES=_QUANT_STAGES, num_warps=_QUANT_NUM_WARPS,
    )
    return out


def quantize_per_token(x: torch.Tensor, fp8: bool = False, amax: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) bf16/fp16 -> (xq int8 (M, K), s_x fp32 (M,)), as numerics.quantize_int8_per_token;
    with ``fp8``, xq is e4m3 and s_x = amax / 448, as the fp8 dynamic reference quantizes x per row.
    ``amax`` (1-D, e.g. ``amax_partials(x)``): partial maxima whose max every row uses as its amax, i.e.
    a per-tensor scale, repeated in s_x."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    xq = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    sx = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M > 0:
        split = bucket_m(M) <= _QUANT_FEW_ROWS and K > _QUANT_FEW_ROWS_ONE_PASS_MAX_K
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


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
           *, config: KernelConfig | None = None) -> torch.Tensor:
    """``(q(x) @ qdata.T) * s_x * scale (+ bias)`` for x (M, K) bf16/fp16; returns (M, N) in x.dtype.

    ``config`` forces a path / tile shape (tests and tuning); by default ``select_config`` picks it.
    """
    name = "int8_dynamic_activation_int8_weight.linear"
    M, N, K = check_linear_args(name, x, qdata, scale, bias, scale_dims=(1,))
    if M == 0:
        return x.new_empty((0, N))
    cfg = config if config is not None else select_config(bucket_m(M), N, K)
    return launch(name, x, qdata, scale, bias, cfg)


def launch(name: str, x, qdata, scale, bias, cfg: KernelConfig, x_amax=None) -> torch.Tensor:
    """Launch ``cfg``'s kernels on checked arguments: x (M >= 1, K) bf16/fp16, qdata int8 or e4m3 (N, K)
    contiguous along K, scale fp32 (N,) (or () with e4m3), bias (N,) or None. With e4m3 codes x is
    quantized per row to e4m3: the fp8 dynamic scheme shares these kernels. ``x_amax`` (1-D partial
    maxima, ``amax_partials``): quantize every row with their max instead of its own amax (fp8 per tensor);
    it needs the "quantized" path."""
    M, K = x.shape
    N = qdata.shape[0]
    fp8 = qdata.dtype == torch.float8_e4m3fn
    if x.stride(1) != 1:
        x = x.contiguous()
    if x_amax is not None and cfg.path not in ("quantized",) + ONE_ROW_PATHS:
        raise ValueError(f"{name}: a per-tensor activation scale needs the 'quantized', 'gemv' or 'fused_gemv' "
                         f"path, got {cfg.path!r}")
    if cfg.path == "gemv":
        return int8wo.launch(name, x, qdata, scale, bias, cfg, x_codes=quantize_per_token(x, fp8, x_amax))
    if cfg.path == "fused_gemv":
        return _quantize_gemv(name, x, qdata, scale, bias, cfg)
    if cfg.path == "fused":
        x_arg, sx_arg = x, scale  # sx_arg is never read when QUANTIZE_X
    elif cfg.path == "quantized":
        x_arg, sx_arg = quantize_per_token(x, fp8, x_amax)
    else:
        raise ValueError(f"{name}: unknown path {cfg.path!r} (expected 'fused_gemv', 'gemv', 'quantized' or "
                         "'fused')")
    scale = scale.contiguous()
    has_bias = bias is not None
    b_arg = bias.contiguous() if has_bias else scale  # any tensor: never read without HAS_BIAS
    split = cfg.split_k
    out = split_k_output(x, M, N, split)
    amax_block_k = min(_AMAX_BLOCK_K, triton.next_power_of_2(K))
    amax_stages = max(2, min(_AMAX_STAGES, _AMAX_SMEM_BYTES // (cfg.block_m * amax_block_k * x.element_size())))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    torch.library.wrap_triton(_int8dq_mm_kernel)[grid](
        x_arg, sx_arg, qdata, scale, b_arg, out,
        M, N, K,
        x_arg.stride(0), qdata.stride(0), out.stride(-2),
        scale.stride(0) if scale.dim() else 0,
        HAS_BIAS=has_bias, QUANTIZE_X=cfg.path == "fused", SPLIT_K=split, EVEN_K=K % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        AMAX_BLOCK_K=amax_block_k, AMAX_STAGES=amax_stages, SWAP_AB=cfg.swap_ab, FP8=fp8, FMA=x.is_cuda,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return split_k_result(out, x.dtype)


def _quantize_gemv(name: str, x, qdata, scale, bias, cfg: KernelConfig) -> torch.Tensor:
    """The ``fused_gemv`` path: M = 1 in one launch (``_quantize_gemv_kernel``). A per-tensor activation
    scale needs nothing more: one row's amax is the tensor's."""
    M, K = x.shape
    N = qdata.shape[0]
    if M != 1:
        raise ValueError(f"{name}: the fused_gemv path needs M == 1, got M={M}")
    words = qdata.dtype == torch.int8 and K % 4 == 0 and cfg.block_k % 4 == 0
    w = int32_words(qdata) if words else qdata
    y = torch.empty((1, N), device=x.device, dtype=x.dtype)
    torch.library.wrap_triton(_quantize_gemv_kernel)[(triton.cdiv(N, cfg.block_n),)](
        x, w, scale, bias.contiguous() if bias is not None else scale, y,
        N, w.stride(0), scale.stride(0) if scale.dim() else 0,
        K=K, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        FP8=qdata.dtype == torch.float8_e4m3fn, FMA=x.is_cuda, WORDS=words, DOT4_ASM=words and x.is_cuda,
        num_warps=cfg.num_warps,
    )
    return y
