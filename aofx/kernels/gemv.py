"""M = 1 (and int4's M <= 2): CUDA-core GEMVs that stream the weight once, for every scheme.

At M = 1 a linear is a pure weight stream, so these kernels skip the tensor cores: each program owns a few
weight rows, keeps many loads in flight and converts codes in registers, and the only cross-thread
reduction is the last one.

- ``_rows_gemv_kernel`` (per-row scales, unsplit K): one weight row a program, K a compile-time constant
  so the K loop unrolls and every load is issued at once; products accumulate in a (1, BLOCK_K) fp32 tile
  (int32 for dp4a words) reduced after the loop; the scale in the epilogue.
- ``_codes_gemv_kernel`` (per-group scales, or a K split): BLOCK_N rows a program, a software-pipelined
  K loop (``tl.range`` stages, cp.async); each (row, group) partial is weighted by its scale every step.
- Both read int8 or e4m3 weight codes, and either x or x's codes (``x_codes``: the dynamic schemes' x
  quantized per row, with s_x). int8 x int8 products are exact integers, summed exactly; with K % 4 == 0
  both sides are read as int32 words of 4 codes, one ``dp4a`` per word pair (``ptx.dot4``).
- ``_int4_gemv_kernel``: packed nibbles as int32 words; a step is (BLOCK_N rows, G groups, GROUP_SIZE/8
  words), pipelined with its x and, for bf16 scales and zeros, those too read as int32 words of two groups
  (2-byte loads would stay in the loop and wait on memory every step). Nibbles are masked in place into
  fp32 mantissas (no int -> float conversions, which run at 1/8 of the FP32 rate on H100) and multiplied by
  x[8 * word + i], read by the same thread.
- ``_quantize_gemv_kernel``: the dynamic schemes in one launch. Each program requests its weight rows
  first, then reads x, takes the row's amax and quantizes x itself with ``quantize``'s arithmetic (the
  same codes), and multiplies on the CUDA cores. A row of up to BLOCK_K codes stays in registers; longer
  rows go in chunks (x re-read from L2, weights a chunk ahead).

The file holds four kernels of one algorithm and their launchers; that is why it is longer than 400 lines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aofx.kernels.common import (
    KernelConfig,
    code_to_f32,
    int32_words,
    launch_options,
    offset_aligned,
    split_k_output,
    split_k_result,
)
from aofx.kernels.ptx import dot4
from aofx.kernels.quantize import divide, quantize_codes, row_scale

__all__ = ["codes_gemv", "int4_gemv", "quantize_gemv"]

_ONE_BITS = 0x3F800000  # fp32 1.0


@triton.jit
def _rows_gemv_kernel(
    # pointers
    x_ptr, sx_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    # dimensions and strides (x and qdata are contiguous along K; y is a contiguous (1, N) row)
    N, stride_wn, stride_sn,
    # K is a compile-time constant: the K loop's trip count is known, so it is unrolled and every load is
    # issued up front (a run-time K makes the same tiles slower)
    K: tl.constexpr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, X_CODES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
    # int8 codes on both sides, read as int32 words of 4 codes (x_ptr and w_ptr point to words; K, BLOCK_K
    # and stride_wn count words); DOT4_ASM: dp4a in inline PTX (not under the interpreter)
    DOT4: tl.constexpr = False, DOT4_ASM: tl.constexpr = False,
):
    # M = 1 with per-row scales: BLOCK_N rows (x BLOCK_K codes or words a step) per program, no shared memory.
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]  # (BLOCK_N, 1)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)[None, :]  # (1, BLOCK_K): x is loaded in the weight tile's layout
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32 if DOT4 else tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        k = k0 + rk
        mask = (k < K) & n_mask
        xv = tl.load(x_ptr + k, mask=k < K, other=0.0, eviction_policy="evict_last")
        w = tl.load(w_ptr + rn * stride_wn + k, mask=mask, other=0.0, eviction_policy="evict_first")
        if DOT4:
            acc = dot4(w, tl.broadcast_to(xv, (BLOCK_N, BLOCK_K)), acc, DOT4_ASM)  # masked words are 0
        else:
            acc = tl.where(mask, acc + xv.to(tl.float32) * w.to(tl.float32), acc)
    if DOT4:
        y = tl.sum(acc, axis=1).to(tl.float32) * tl.load(sx_ptr)  # exact int32 sums, as the reference's
    elif X_CODES and x_ptr.dtype.element_ty == tl.int8:
        y = tl.sum(acc.to(tl.int32), axis=1).to(tl.float32)  # exact: each lane's sum is an integer < 2**24
        y = y * tl.load(sx_ptr)  # the reference's association: (acc * s_x) * s_w
    elif X_CODES:
        y = tl.sum(acc, axis=1) * tl.load(sx_ptr)
    else:
        y = tl.sum(acc, axis=1)
    rows = tl.reshape(rn, (BLOCK_N,))
    y = y * tl.load(s_ptr + rows * stride_sn, mask=rows < N, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _codes_gemv_kernel(
    # pointers
    x_ptr, sx_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    # dimensions
    N, K,
    # strides (x and qdata are contiguous along K; y is a contiguous (1, N) row)
    stride_wn, stride_sn, stride_sg,
    # meta-parameters
    HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # launch options, as constexprs (common.launch_options); NUM_STAGES also pipelines the K loop
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,
    X_CODES: tl.constexpr,  # x is int8 / e4m3 codes with the fp32 row scale at sx_ptr (dynamic schemes, M = 1)
    # int8 codes on both sides, read as int32 words of 4 codes (x_ptr and w_ptr point to words; K, BLOCK_K
    # and stride_wn count words); DOT4_ASM: dp4a in inline PTX (not under the interpreter)
    DOT4: tl.constexpr = False, DOT4_ASM: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_safe = rn % N  # out-of-range rows re-read valid rows; their results are masked at the store
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn_safe[:, None] * stride_wn  # (BLOCK_N, 1)

    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # per-group scales: reduced every step
    acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # per-row scale: one reduction after the loop
    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)  # DOT4: exact int32 sums, one per word lane
    # A loop without tl.dot is only software-pipelined when asked to (tl.range stages).
    for k0 in tl.range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + rk
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
            xv = tl.load(x_ptr + k, eviction_policy="evict_last")
        else:
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0, eviction_policy="evict_first")
            xv = tl.load(x_ptr + k, mask=k < K, other=0.0, eviction_policy="evict_last")
        if DOT4:
            acc_w = dot4(w, tl.broadcast_to(xv[None, :], (BLOCK_N, BLOCK_K)), acc_w, DOT4_ASM)
        else:
            # with int8 x codes the products are exact integers, and so is each lane's sum (< 2**24 for K < 500k)
            prod = code_to_f32(w) * code_to_f32(xv)[None, :]  # (BLOCK_N, BLOCK_K)
            if GROUP_SIZE > 0:
                # BLOCK_K is a multiple of GROUP_SIZE: reduce each group, then weight it by its scale.
                g = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
                s = tl.load(s_ptr + rn_safe[:, None] * stride_sn + g[None, :] * stride_sg,
                            mask=g[None, :] < K // GROUP_SIZE, other=0.0)
                part = tl.sum(tl.reshape(prod, (BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE)), axis=2)
                acc += tl.sum(part * s.to(tl.float32), axis=1)
            else:
                acc_k += prod

    if DOT4:
        acc = tl.sum(acc_w, axis=1).to(tl.float32)
    elif GROUP_SIZE == 0:
        if X_CODES and x_ptr.dtype.element_ty == tl.int8:
            acc = tl.sum(acc_k.to(tl.int32), axis=1).to(tl.float32)  # the exact int32 sum of the reference
        else:
            acc = tl.sum(acc_k, axis=1)
    if X_CODES:
        acc = acc * tl.load(sx_ptr)  # the reference's association: (acc * s_x) * s_w
    if GROUP_SIZE == 0:
        acc = acc * tl.load(s_ptr + rn_safe * stride_sn).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn_safe).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)
    n_mask = rn < N
    if SPLIT_K > 1:
        tl.store(y_ptr + pid_k * N + rn, acc, mask=n_mask)  # fp32 partial, slice pid_k of (SPLIT_K, 1, N)
    else:
        tl.store(y_ptr + rn, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _group_params(ptr, rows, g0, num_groups, stride_sn, stride_sg, G: tl.constexpr, BLOCK_N: tl.constexpr,
                  EVEN_G: tl.constexpr, SZ_WORDS: tl.constexpr):
    """The (BLOCK_N, G, 1) fp32 scales (or zeros) of groups g0 .. g0 + G - 1 of ``rows``.

    SZ_WORDS: ``ptr`` is the bf16 tensor viewed as int32 (stride_sn in words), a word holding groups
    2j (low half) and 2j + 1: 4-byte loads, which Triton's pipeline issues as cp.async a few steps
    ahead like the weights (2-byte loads it leaves in the loop, waiting on memory every step). A bf16
    is the top half of its fp32, so the unpacking is a shift and a mask."""
    if SZ_WORDS:
        offs = g0 // 2 + tl.arange(0, G // 2)
        ptrs = ptr + rows[:, None] * stride_sn + offs[None, :]
        if EVEN_G:
            w = tl.load(ptrs)
        else:
            w = tl.load(ptrs, mask=(offs < num_groups // 2)[None, :], other=0)
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
        v = tl.reshape(tl.join(lo, hi), (BLOCK_N, G))
    else:
        offs = g0 + tl.arange(0, G)
        ptrs = ptr + rows[:, None] * stride_sn + offs[None, :] * stride_sg
        if EVEN_G:
            v = tl.load(ptrs).to(tl.float32)
        else:
            v = tl.load(ptrs, mask=(offs < num_groups)[None, :], other=0.0).to(tl.float32)
    return tl.expand_dims(v, 2)


@triton.jit
def _mantissa(v, mask: tl.constexpr, one_bits):
    return ((v & mask) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _int4_gemv_kernel(
    # pointers (scale_ptr, zero_ptr: int32 words when SZ_WORDS)
    x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    # dimensions
    N, K,
    # strides (stride_qw: qdata row stride in int32 words; stride_sn in words when SZ_WORDS)
    stride_xm, stride_xk, stride_qw, stride_sn, stride_sg, stride_om,
    # the bits of 1.0f as a run-time value: a LOP3 encodes one immediate, so with the nibble mask
    # also an immediate the mask-and-or would take two LOP3s
    one_bits,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, GROUPS_PER_ITER: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_G: tl.constexpr, HAS_BIAS: tl.constexpr, SZ_WORDS: tl.constexpr,
    # launch options, as constexprs (common.launch_options); NUM_STAGES also pipelines the group loop
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # One program per (BLOCK_N weight rows, x row m) walks all of K, G whole groups a step. A step is
    # a (BLOCK_N rows, G groups, GW int32 words) tile of the weight, software-pipelined NUM_STAGES
    # deep (tl.range: cp.async) with the step's x and (SZ_WORDS) scales and zeros. Nibble i of every
    # word (k = 8 * word + i) is unpacked in registers and multiplied by x[k], read by the same
    # thread, so the only cross-thread reduction is the final one.
    G: tl.constexpr = GROUPS_PER_ITER
    GW: tl.constexpr = GROUP_SIZE // 8  # int32 words per group row
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0)  # out-of-range rows read row 0 (never stored)
    offs_g = tl.arange(0, G)
    offs_v = tl.arange(0, GW * 8)
    words = offs_g[:, None] * GW + tl.arange(0, GW)[None, :]  # (G, GW) word index in the step
    q_ptrs = q_ptr + rows[:, None, None] * stride_qw + words[None, :, :]  # (BN, G, GW)
    xv_ptrs = x_ptr + m * stride_xm + (offs_g[None, :, None] * GROUP_SIZE + offs_v[None, None, :]) * stride_xk
    num_groups = K // GROUP_SIZE

    acc = tl.zeros((BLOCK_N, G, GW), dtype=tl.float32)
    for g0 in tl.range(0, num_groups, G, num_stages=NUM_STAGES):
        if EVEN_G:
            q = tl.load(q_ptrs + g0 * GW, eviction_policy="evict_first")
            xv = tl.load(xv_ptrs + g0 * GROUP_SIZE * stride_xk, eviction_policy="evict_last").to(tl.float32)
        else:  # the last step hangs over K: its groups past the end are masked off
            gmask = ((g0 + offs_g) < num_groups)[None, :, None]
            q = tl.load(q_ptrs + g0 * GW, mask=gmask, other=0, eviction_policy="evict_first")
            xv = tl.load(xv_ptrs + g0 * GROUP_SIZE * stride_xk, mask=gmask, other=0.0,
                         eviction_policy="evict_last").to(tl.float32)  # (1, G, GW * 8)
        s = _group_params(scale_ptr, rows, g0, num_groups, stride_sn, stride_sg, G, BLOCK_N, EVEN_G, SZ_WORDS)
        z = _group_params(zero_ptr, rows, g0, num_groups, stride_sn, stride_sg, G, BLOCK_N, EVEN_G, SZ_WORDS)
        # x of the step, split into x_i[word] = x[8 * word + i] by the thread that uses it
        xv = tl.reshape(xv, (1, G, GW, 2, 2, 2))  # k = 8 * word + 4 * a + 2 * b + c
        xa, xb = tl.split(xv)
        xa0, xa1 = tl.split(xa)
        xb0, xb1 = tl.split(xb)
        x0, x4 = tl.split(xa0)
        x2, x6 = tl.split(xa1)
        x1, x5 = tl.split(xb0)
        x3, x7 = tl.split(xb1)
        # Even nibbles are masked in place at mantissa bits 16..19 (f = 1 + q/128), odd ones at bits
        # 12..15 (f = 1 + q/2048, against 16 x): byte shifts of the word reach all eight, 4 per word.
        # Then sum_i f_i x'_i = xs2 + sum_i(q_i x_i)/128 with xs2 = sum(x even) + 16 sum(x odd), and
        #     sum_i ((q_i - 8) s + z) x_i = 128 s (sum_i f_i x'_i - xs2) + (z - 8 s) sum_i x_i.
        xe = x0 + x2 + x4 + x6
        xo = x1 + x3 + x5 + x7
        x1 *= 16.0
        x3 *= 16.0
        x5 *= 16.0
        x7 *= 16.0
        left = q << 8
        right = q >> 8
        fx = _mantissa(q << 16, 0xF0000, one_bits) * x0
        fx += _mantissa(left, 0xF000, one_bits) * x1
        fx += _mantissa(left, 0xF0000, one_bits) * x2
        fx += _mantissa(q, 0xF000, one_bits) * x3
        fx += _mantissa(q, 0xF0000, one_bits) * x4
        fx += _mantissa(right, 0xF000, one_bits) * x5
        fx += _mantissa(right, 0xF0000, one_bits) * x6
        fx += _mantissa(q >> 16, 0xF000, one_bits) * x7
        acc += (128.0 * s) * (fx - (xe + 16.0 * xo)) + (z - 8.0 * s) * (xe + xo)

    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


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
    q = quantize_codes(divide(xv, s, r, FMA), FP8)
    if WORDS:
        bytes_ = q.to(tl.int32) & 0xFF
        words = tl.sum(bytes_ << (tl.arange(0, 4) * 8)[None, :], axis=1)  # byte i = code 4 j + i (disjoint bits)
        return dot4(w, tl.broadcast_to(words[None, :], w.shape), tl.zeros(w.shape, dtype=tl.int32), DOT4_ASM)
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
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
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
    s = row_scale(tl.max(amax), FP8)
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


def codes_gemv(x, qdata, scale, bias, cfg: KernelConfig, group_size: int = 0, x_codes=None) -> torch.Tensor:
    """x (1, K) times int8 / e4m3 codes (N, K) scaled per row (or per group, or one 0-d scale with
    ``x_codes``). ``x_codes``: (codes (1, K) int8 / e4m3, s_x fp32 (1,)), read instead of x; then y is
    ``(acc * s_x) * s_w``. Returns (1, N) in x.dtype."""
    K = x.shape[1]
    N = qdata.shape[0]
    has_bias = bias is not None
    b_arg = bias.contiguous() if has_bias else scale  # any tensor: never read without HAS_BIAS
    stride_sn = scale.stride(0) if scale.dim() else 0  # a per-tensor scale is every row's scale
    split = cfg.split_k
    out = split_k_output(x, x.shape[0], N, split)  # x.shape[0] (1 when run): an exported M keeps its symbol
    x_arg, sx_arg = x_codes if x_codes is not None else (x, scale)  # sx_arg is read only with codes
    w_arg, k_arg, block_k = qdata, K, cfg.block_k
    # int8 x int8 codes: both sides as int32 words of 4 codes, one dp4a per word (K counted in words)
    dot = x_arg.dtype == qdata.dtype == torch.int8 and K % 4 == 0 and cfg.block_k % 4 == 0 and not group_size
    if dot:
        w_arg, x_arg, k_arg, block_k = int32_words(qdata), x_arg.view(torch.int32), K // 4, cfg.block_k // 4
    if not group_size and split == 1:  # per-row scales, unsplit: the row kernel
        torch.library.wrap_triton(_rows_gemv_kernel)[(triton.cdiv(N, cfg.block_n),)](
            x_arg, sx_arg, w_arg, scale, b_arg, out,
            N, w_arg.stride(0), stride_sn,
            K=k_arg, HAS_BIAS=has_bias, X_CODES=x_codes is not None, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
            DOT4=dot, DOT4_ASM=dot and x.is_cuda,
            **launch_options(cfg, num_stages=1),
        )
    else:
        torch.library.wrap_triton(_codes_gemv_kernel)[(triton.cdiv(N, cfg.block_n), split)](
            x_arg, sx_arg, w_arg, scale, b_arg, out,
            N, k_arg,
            w_arg.stride(0), stride_sn, scale.stride(1) if group_size else 0,
            HAS_BIAS=has_bias, GROUP_SIZE=group_size, SPLIT_K=split, EVEN_K=K % cfg.block_k == 0,
            BLOCK_N=cfg.block_n, BLOCK_K=block_k, X_CODES=x_codes is not None,
            DOT4=dot, DOT4_ASM=dot and x.is_cuda,
            **launch_options(cfg),
        )
    return split_k_result(out, x.dtype)


def int4_gemv(x, qdata, scale, zero, bias, cfg: KernelConfig, group_size: int) -> torch.Tensor:
    """x (M, K) times packed int4 codes (N, K // 2), one program per (block_n rows, x row); a step is
    max(1, block_k // group_size) whole groups. Returns (M, N) in x.dtype."""
    M, K = x.shape
    N = qdata.shape[0]
    qwords = int32_words(qdata)  # (N, K//8): 8 nibbles per word
    group_step = max(1, cfg.block_k // group_size)
    groups = K // group_size
    # bf16 scale and zero as int32 words of two groups: an even number of groups a row and a step,
    # rows starting on 4-byte bounds (zero has scale's strides)
    sz_words = (scale.dtype == zero.dtype == torch.bfloat16 and group_step % 2 == 0 and groups % 2 == 0
                and scale.stride(1) == 1 and scale.stride(0) % 2 == 0
                and offset_aligned(scale, 2) and offset_aligned(zero, 2))
    if sz_words:
        scale, zero = scale.view(torch.int32), zero.view(torch.int32)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    torch.library.wrap_triton(_int4_gemv_kernel)[(triton.cdiv(N, cfg.block_n), M)](
        x, qwords, scale, zero, bias if bias is not None else out, out,
        N, K,
        x.stride(0), x.stride(1), qwords.stride(0), scale.stride(0), scale.stride(1), out.stride(0), _ONE_BITS,
        GROUP_SIZE=group_size, GROUPS_PER_ITER=group_step, BLOCK_N=cfg.block_n,
        EVEN_G=groups % group_step == 0, HAS_BIAS=bias is not None, SZ_WORDS=sz_words,
        **launch_options(cfg),
    )
    return out


def quantize_gemv(x, qdata, scale, bias, cfg: KernelConfig) -> torch.Tensor:
    """x (1, K) bf16/fp16 quantized per row and multiplied by int8 / e4m3 codes (N, K) in one launch.
    A per-tensor activation scale needs nothing more: one row's amax is the tensor's."""
    K = x.shape[1]
    N = qdata.shape[0]
    words = qdata.dtype == torch.int8 and K % 4 == 0 and cfg.block_k % 4 == 0
    w = int32_words(qdata) if words else qdata
    y = torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)  # (1, N) when run
    torch.library.wrap_triton(_quantize_gemv_kernel)[(triton.cdiv(N, cfg.block_n),)](
        x, w, scale, bias.contiguous() if bias is not None else scale, y,
        N, w.stride(0), scale.stride(0) if scale.dim() else 0,
        K=K, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        FP8=qdata.dtype == torch.float8_e4m3fn, FMA=x.is_cuda, WORDS=words, DOT4_ASM=words and x.is_cuda,
        **launch_options(cfg),
    )
    return y
