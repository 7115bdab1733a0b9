"""int4 weight-only linear: ``y = x @ w.T (+ bias)`` with ``w = (q - 8) * scale + zero`` per (row, group).

Layout read (``numerics.quantize_int4``):

    qdata  uint8 (N, K//2), row-major; byte j of row n = q[n, 2j] | q[n, 2j+1] << 4, q in [0, 15]
    scale  bf16 (N, K//group_size)
    zero   bf16 (N, K//group_size), the value of the group's midpoint code 8

group_size is one of 32/64/128/256 and divides K, so every group starts on a byte boundary and a
K tile that divides group_size never needs a K mask.

Dequantization without int->float conversion instructions (they run at 1/8 of the FP32 rate on
H100 and would bound the kernel): a nibble q shifted to bit 19 and or-ed with the bits of 1.0
is the fp32 number ``f = 1 + q/16`` exactly, so

    (q - 8) * s + z  =  f * (16 s) + (z - 24 s)          one FMA per weight

(the ``mm`` kernel's fp32 path; the gemv masks nibbles at two mantissa positions to save shifts).

Kernel paths, chosen per M bucket by ``select_config`` (plain Python ``if``: Inductor ignores
``triton.autotune`` keys for user kernels):

    M <= 2     ``gemv``: CUDA-core GEMV, one program per (8 weight rows, x row) over all of K, no
               split, atomics or workspace. qdata is read as int32 words (8 nibbles, k = 8 * word
               + i): a step is a (8 rows, G groups, GROUP_SIZE/8 words) tile of 512 codes a row
               (4 rows x 1024 codes where there are fewer than 1024 row tiles), software-pipelined
               (``tl.range`` stages, cp.async) with its x and, for bf16 scales and zeros, those
               too, read as int32 words of two groups (2-byte loads would stay in the loop and
               wait on memory every step). Nibble i of every word is masked in place after a byte
               shift (4 shifts a word: the fp32 ``1 + q/128`` or ``1 + q/2048`` in ``_int4_gemv_kernel``)
               and multiplied by x[8 * word + i], read by the same thread, so no layout conversion
               or cross-thread reduction runs inside the K loop; each word's partial is scaled in the
               loop.
    M <= 16    ``mm`` with BLOCK_M=16, SWAP_AB (the dequantized weight tile is the MMA's A
               operand, x.T the B operand), split-K to fill the GPU. Memory-bound.
    M <= 64    ``mm`` with BLOCK_M=64, SWAP_AB, BLOCK_N=128, 4 warps, split-K.
    M <= 256   ``mm`` 128x128 tiles, split-K to fill the GPU.
    larger     ``dequant``: ``_int4_dequantize_kernel`` writes the whole weight in x.dtype, computed
               as the reference computes it (``(q - 8) * s + z`` in fp32, then cast), and one cuBLAS
               GEMM (``F.linear``) follows (``kernels.dequantize_first``). Where that is not used
               (exporting, or a copy over DEQUANTIZE_MAX_BYTES): ``mm`` 256x128 tiles, grouped
               program order for L2 reuse, no split.

The ``mm`` main loop loads a [BLOCK_N, BLOCK_K//8] tile of int32 words and the group's scale and
zero (BLOCK_K divides group_size, so one scale column per step; loaded a step ahead, since Triton's
cp.async pipeline does not take these 2-byte loads), dequantizes the 8 nibbles of each
word into 8 tensors, puts them in K order with nested tl.join + reshape to [BLOCK_N, BLOCK_K], and
feeds tl.dot (fp32 accumulate). With bf16 x, scale and zero (``DEQUANT_PTX``) the dequantization is
inline PTX on packed bf16 pairs: per two nibbles (i, i + 4) of a word one LOP3 makes ``128 + q``
(0x4300 | q), ``sub.bf16x2`` of 136 leaves ``q - 8`` exactly and ``fma.rn.bf16x2`` gives
``(q - 8) * s + z`` rounded once to bf16 (the reference rounds to fp32, then to bf16: equal but for
a double-rounding tie). Otherwise (fp16 x, and under the interpreter, which cannot run PTX) it is
the fp32 ``f * 16 s + (z - 24 s)`` above, cast to x.dtype.
Bias and the output cast are in the epilogue. Split-K programs add fp32 partials atomically into
a zeroed fp32 output that the launcher casts afterwards; bias is added by the pid_k == 0 program.

Weights are loaded ``evict_first`` (streamed once), activations ``evict_last`` (re-read by every
column block).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aofx.kernels import bucket_m, dequantize_first, int32_words

__all__ = ["Int4Config", "select_config", "linear"]

GROUP_SIZES = (32, 64, 128, 256)
_ONE_BITS = 0x3F800000  # fp32 1.0


# ---------------------------------------------------------------- kernels

@triton.jit
def _nibble_f32(q, i: tl.constexpr, one_bits):
    """fp32 ``1 + n/16`` for nibble ``i`` (bits 4i..4i+3) of each int32 word: one shift, one LOP3."""
    if 4 * i <= 19:  # move the nibble to bits 19..22, the top of the fp32 mantissa of 1.0
        bits = ((q << (19 - 4 * i)) & 0x780000) | one_bits
    else:
        bits = ((q >> (4 * i - 19)) & 0x780000) | one_bits
    return bits.to(tl.float32, bitcast=True)


def _dequant_bf16_asm() -> str:
    """PTX for one int32 word (8 nibbles), its bf16 scale and zero -> the 8 bf16 weights.

    Per pair of nibbles (i, i + 4): one LOP3 puts both into bf16 mantissas of 128 (0x4300 | n is
    128 + n), ``sub.bf16x2`` of 136 leaves q - 8 exactly, and ``fma.rn.bf16x2`` gives
    (q - 8) * s + z rounded once to bf16."""
    lines = ["{", ".reg .b32 t, s2, z2, o2;", "mov.b32 o2, 0x43084308;", "mov.b32 s2, {$9, $9};",
             "mov.b32 z2, {$10, $10};"]
    for i in range(4):
        if i:
            lines.append(f"shr.b32 t, $8, {4 * i};")
        lines += [f"lop3.b32 t, {'t' if i else '$8'}, 0x000F000F, 0x43004300, 0xea;",  # (a & b) | c
                  "sub.bf16x2 t, t, o2;", "fma.rn.bf16x2 t, t, s2, z2;", f"mov.b32 {{${i}, ${i + 4}}}, t;"]
    # one line: Inductor's copy of the kernel source (torch 2.11) cannot hold a newline in a global string
    return " ".join(lines + ["}"])


_DEQUANT_BF16_ASM = tl.constexpr(_dequant_bf16_asm())


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
    EVEN_G: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr, SZ_WORDS: tl.constexpr,
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
def _int4_mm_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    # dimensions
    M, N, K,
    # strides (stride_qw: qdata row stride in int32 words)
    stride_xm, stride_xk, stride_qw, stride_sn, stride_sg, stride_om, one_bits,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr,
    DEQUANT_PTX: tl.constexpr,  # the packed bf16 dequantization (inline PTX; bf16 x, scale and zero)
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)

    # grouped (swizzled) tile order: GROUP_M row blocks share each weight column block in L2
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * grid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows/columns read row 0 instead of being masked (never stored).
    xrows = tl.where(mask_m, offs_m, 0)
    wrows = tl.where(mask_n, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)

    # split-K in whole BLOCK_K steps; BLOCK_K divides GROUP_SIZE divides K: no K mask
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    x_ptrs = x_ptr + xrows[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk  # (BM, BK)
    q_ptrs = q_ptr + wrows[:, None] * stride_qw + (k_start // 8 + offs_w)[None, :]  # (BN, BK//8) words
    s_rows = scale_ptr + wrows * stride_sn  # (BN,)
    z_rows = zero_ptr + wrows * stride_sn

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The group's scale and zero (2-byte loads, too narrow for cp.async, so not in Triton's pipeline) are
    # loaded one step ahead into registers, not in the step that uses them, so the step does not wait on
    # them. Clamped into K: the last step re-reads, and an empty split reads, a valid group. (Read as int32
    # words and pipelined with the tiles, as the gemv does, they were slower here at every M from 16 to 256.)
    g_next = tl.minimum(k_start, K - BLOCK_K) // GROUP_SIZE
    s_next = tl.load(s_rows + g_next * stride_sg)  # (BN,)
    z_next = tl.load(z_rows + g_next * stride_sg)
    for k in range(k_start, k_end, BLOCK_K):
        xt = tl.load(x_ptrs, eviction_policy="evict_last")  # (BM, BK)
        q = tl.load(q_ptrs, eviction_policy="evict_first")  # (BN, BK//8) int32 words
        s = s_next[:, None]  # (BN, 1): this step's group
        z = z_next[:, None]
        g_next = tl.minimum(k + BLOCK_K, K - BLOCK_K) // GROUP_SIZE
        s_next = tl.load(s_rows + g_next * stride_sg)
        z_next = tl.load(z_rows + g_next * stride_sg)
        if DEQUANT_PTX:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _DEQUANT_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                [q, tl.broadcast_to(s, q.shape), tl.broadcast_to(z, q.shape)],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            a = 16.0 * s.to(tl.float32)
            c = z.to(tl.float32) - 24.0 * s.to(tl.float32)
            w0 = (_nibble_f32(q, 0, one_bits) * a + c).to(xt.dtype)
            w1 = (_nibble_f32(q, 1, one_bits) * a + c).to(xt.dtype)
            w2 = (_nibble_f32(q, 2, one_bits) * a + c).to(xt.dtype)
            w3 = (_nibble_f32(q, 3, one_bits) * a + c).to(xt.dtype)
            w4 = (_nibble_f32(q, 4, one_bits) * a + c).to(xt.dtype)
            w5 = (_nibble_f32(q, 5, one_bits) * a + c).to(xt.dtype)
            w6 = (_nibble_f32(q, 6, one_bits) * a + c).to(xt.dtype)
            w7 = (_nibble_f32(q, 7, one_bits) * a + c).to(xt.dtype)
        # nested joins put nibble i of word j at k = 8 j + i: (BN, BK//8, 2, 2, 2) -> (BN, BK)
        w = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(xt), acc)  # (BN, BM)
        else:
            acc = tl.dot(xt, tl.trans(w), acc)  # (BM, BN)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K // 8

    # epilogue: bias in fp32, cast (or fp32 atomic partials for split-K)
    if SWAP_AB:
        acc = tl.trans(acc)  # (BM, BN)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + wrows).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int4_dequantize_kernel(
    # pointers
    q_ptr, scale_ptr, zero_ptr, w_ptr,
    # dimensions
    N,
    # strides
    stride_qn, stride_sn, stride_sg, stride_wn,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one (BLOCK_N, BLOCK_K) tile of w = (q - 8) * s + z in w's dtype: G whole groups of a row (BLOCK_K is
    # a multiple of GROUP_SIZE that divides K), each group's scale and zero loaded once
    G: tl.constexpr = BLOCK_K // GROUP_SIZE
    HALF: tl.constexpr = GROUP_SIZE // 2  # bytes per group row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = pid_k * G + tl.arange(0, G)
    offs_b = tl.arange(0, HALF)
    rows = offs_n[:, None, None]  # (BN, 1, 1)
    mask_n = rows < N
    b = tl.load(q_ptr + rows * stride_qn + (offs_g[None, :, None] * HALF + offs_b[None, None, :]), mask=mask_n,
                other=0, eviction_policy="evict_first").to(tl.int32)  # (BN, G, HALF), byte b: k = 2b, 2b + 1
    sz = rows * stride_sn + offs_g[None, :, None] * stride_sg  # (BN, G, 1)
    s = tl.load(scale_ptr + sz, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + sz, mask=mask_n, other=0.0).to(tl.float32)
    lo = ((b & 15) - 8).to(tl.float32) * s + z
    hi = ((b >> 4) - 8).to(tl.float32) * s + z
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # (BN, BK)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=offs_n[:, None] < N)


# ---------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Int4Config:
    """One launch configuration.

    kernel: "gemv", "mm" or "dequant". block_k: the K step of ``mm`` (clamped to group_size); for
    ``gemv`` the step is max(1, block_k // group_size) whole groups; for ``dequant`` (block_n, block_k)
    is its tile, block_k clamped to [group_size, the largest power of two that divides K].
    split_k (``mm`` only): None picks it from the problem size
    (``_auto_split_k``), an int forces it. block_m, group_m, swap_ab: ``mm`` only.
    """

    kernel: str
    block_n: int
    block_k: int
    block_m: int = 16
    split_k: int | None = None
    group_m: int = 8
    swap_ab: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if self.kernel not in ("gemv", "mm", "dequant"):
            raise ValueError(f"Int4Config.kernel must be 'gemv', 'mm' or 'dequant', got {self.kernel!r}")
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Int4Config.{name} must be a power of two, got {v}")
        if self.kernel == "mm" and (self.block_m < 16 or self.block_n < 16 or self.block_k < 32):
            raise ValueError(f"Int4Config for 'mm' needs block_m, block_n >= 16 and block_k >= 32: {self}")
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"Int4Config.split_k must be >= 1 or None, got {self.split_k}")
        if self.kernel != "mm" and self.split_k not in (None, 1):
            raise ValueError(f"Int4Config: split_k is for 'mm', got {self.split_k} for {self.kernel!r}")


# (largest M of the bucket, config); the first bucket with M <= bound wins, the last covers the rest.
#   M <= 2: the CUDA-core gemv, 8 rows x 512 codes (GEMV_WIDE below for narrow layers). One program walks
#       all of K: stream-K (atomics into a workspace) and K splits were slower, and no other row or warp count
#       was clearly faster.
#   M <= 64: 16- or 64-row tiles with swap_ab, so the dequantized weight tile is the MMA's A operand and
#       x's few rows the narrow side; select_config splits K to fill the GPU. (Permuting K so that a packed
#       pair needs no repacking was slower.)
#   M <= 256: 128x128x64 without swap_ab, 8 warps: larger K or N tiles, and 64x128 swap_ab tiles, were slower.
#       With swap_ab and split K it returned wrong results: test_known_bugs.py::test_int4_mm_swap_ab_128x128x64_split_k.
#   larger: dequant, then cuBLAS (kernels.DEQUANTIZE_MAX_BYTES); at M = 256 the mm bucket is still ahead. The
#       copy is a memory-bound stream, so its tile shape matters little.
# Evidence: `python -m benchmarks.sweep --families int4` times each bucket's config ("default") beside
# sweep.py's candidates (gemv tiles at M = 1, mm tiles per bucket); the data belongs in
# benchmarks/results/tuning/ once a sweep has been run there.
CONFIGS = (
    (2, Int4Config("gemv", block_n=8, block_k=512, num_warps=2, num_stages=3)),
    (16, Int4Config("mm", block_m=16, block_n=128, block_k=128, swap_ab=True, num_warps=8, num_stages=3)),
    (64, Int4Config("mm", block_m=64, block_n=128, block_k=64, swap_ab=True, num_warps=4, num_stages=4)),
    (256, Int4Config("mm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)),
    (None, Int4Config("dequant", block_n=16, block_k=256, num_warps=4)),
)
# the gemv for layers with fewer than _GEMV_WIDE_BELOW row tiles of 8 (N < 8192): fewer rows, longer steps
GEMV_WIDE = Int4Config("gemv", block_n=4, block_k=1024, num_warps=2, num_stages=4)
_GEMV_WIDE_BELOW = 1024
# the largest bucket where ``dequant`` is not used (kernels.dequantize_first)
MM_LARGE = Int4Config("mm", block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=3)

# Split-K (``mm``) aims for at least this many programs per SM. Splitting costs a zero-fill and a
# cast kernel, so it is used only to fill the GPU, never to balance waves.
_CTAS_PER_SM = 1
_MIN_STEPS_PER_SPLIT = 4  # K steps each split keeps, so a program amortizes its prologue/epilogue
_MAX_SPLIT_K = 16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 132  # H100 SXM; the interpreter has no device to ask
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_split_k(tiles: int, k_steps: int, min_programs: int) -> int:
    """Smallest power-of-two split giving >= min_programs programs, keeping >= _MIN_STEPS_PER_SPLIT steps."""
    split = 1
    while (tiles * split < min_programs and split * 2 <= _MAX_SPLIT_K
           and k_steps // (split * 2) >= _MIN_STEPS_PER_SPLIT):
        split *= 2
    return split


def select_config(M: int, N: int, K: int, group_size: int, device: torch.device | None = None) -> Int4Config:
    """The bucket's config with split_k resolved for this (M, N, K)."""
    for bound, cfg in CONFIGS:
        if bound is None or M <= bound:
            break
    if cfg.kernel == "dequant" and not dequantize_first(N, K):
        cfg = MM_LARGE
    if cfg.kernel == "gemv" and triton.cdiv(N, cfg.block_n) < _GEMV_WIDE_BELOW:
        cfg = GEMV_WIDE
    return _resolve(cfg, M, N, K, group_size, device)


def _device_sms(device) -> int:
    index = device.index if device is not None and device.type == "cuda" else None
    if device is not None and device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _num_sms(index)


def _resolve(cfg: Int4Config, M: int, N: int, K: int, group_size: int, device) -> Int4Config:
    if cfg.kernel == "gemv":  # one program per row tile; nothing to resolve
        return cfg
    if cfg.kernel == "dequant":
        return dataclasses.replace(cfg, block_k=max(min(cfg.block_k, K & -K), group_size))
    cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, group_size))
    if cfg.split_k is None:
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        split = _auto_split_k(tiles, K // cfg.block_k, _device_sms(device) * _CTAS_PER_SM)
        cfg = dataclasses.replace(cfg, split_k=split)
    return cfg


# ---------------------------------------------------------------- launcher

def linear(x, qdata, scale, zero, group_size: int, bias=None, *, config=None) -> torch.Tensor:
    """``x @ dequantize_int4(qdata, scale, zero, group_size).T (+ bias)`` in x.dtype.

    x (M, K) bf16/fp16, any strides; qdata uint8 (N, K//2); scale, zero (N, K//group_size);
    bias (N,) or None. ``config`` (an Int4Config) overrides the M-bucket choice (tests, tuning).
    """
    # 1. checks
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"int4 linear: x must be bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"int4 linear: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 linear: group_size must be one of {GROUP_SIZES}, got {group_size}")
    M, K = x.shape
    if qdata.dtype != torch.uint8 or qdata.dim() != 2:
        raise TypeError(f"int4 linear: qdata must be 2-D uint8 (N, K//2), got {qdata.dtype} {tuple(qdata.shape)}")
    N = qdata.shape[0]
    if K % group_size != 0 or qdata.shape[1] * 2 != K:
        raise ValueError(f"int4 linear: x has K={K}, qdata {tuple(qdata.shape)} needs K//2 columns and "
                         f"K must be a multiple of group_size={group_size}")
    groups = K // group_size
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (N, groups):
            raise ValueError(f"int4 linear: {name} must be (N, K//group_size) = {(N, groups)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"int4 linear: {name} must be a floating tensor, got {t.dtype}")
    if scale.stride() != zero.stride():
        zero = zero.contiguous()
        scale = scale.contiguous()
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"int4 linear: bias must be (N,) = ({N},), got {tuple(bias.shape)}")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if qdata.stride(1) != 1:
        qdata = qdata.contiguous()

    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=x.dtype, device=x.device)
    if config is None:
        cfg = select_config(bucket_m(M), N, K, group_size, x.device)
    else:
        cfg = _resolve(config, M, N, K, group_size, x.device)

    if cfg.kernel == "gemv":
        return _launch_gemv(x, qdata, scale, zero, group_size, bias, cfg)
    if cfg.kernel == "dequant":
        w = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K) in x.dtype
        torch.library.wrap_triton(_int4_dequantize_kernel)[(triton.cdiv(N, cfg.block_n), K // cfg.block_k)](
            qdata, scale, zero, w,
            N,
            qdata.stride(0), scale.stride(0), scale.stride(1), w.stride(0),
            GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        )
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    # 2. output: fp32 zeros for split-K atomics (cast after), else x.dtype directly
    split = cfg.split_k
    if split > 1:
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False

    # 3. launch
    qwords = int32_words(qdata)  # (N, K//8): 8 nibbles per word
    # the PTX dequantization is exact for bf16 scale and zero into bf16 weights; the interpreter
    # (CPU tensors) cannot run inline PTX and takes the fp32 path
    ptx = x.is_cuda and x.dtype == scale.dtype == zero.dtype == torch.bfloat16
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    torch.library.wrap_triton(_int4_mm_kernel)[grid](
        x, qwords, scale, zero, bias_arg, out,
        M, N, K,
        x.stride(0), x.stride(1), qwords.stride(0), scale.stride(0), scale.stride(1), out.stride(0), _ONE_BITS,
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, SPLIT_K=split, SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None, DEQUANT_PTX=ptx,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if split > 1 else out


def _launch_gemv(x, qdata, scale, zero, group_size: int, bias, cfg: Int4Config) -> torch.Tensor:
    M, K = x.shape
    N = qdata.shape[0]
    qwords = int32_words(qdata)  # (N, K//8): 8 nibbles per word
    group_step = max(1, cfg.block_k // group_size)
    groups = K // group_size
    # bf16 scale and zero as int32 words of two groups: an even number of groups a row and a step,
    # rows starting on 4-byte bounds (zero has scale's strides)
    sz_words = (scale.dtype == zero.dtype == torch.bfloat16 and group_step % 2 == 0 and groups % 2 == 0
                and scale.stride(1) == 1 and scale.stride(0) % 2 == 0
                and scale.storage_offset() % 2 == 0 and zero.storage_offset() % 2 == 0)
    if sz_words:
        scale, zero = scale.view(torch.int32), zero.view(torch.int32)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    torch.library.wrap_triton(_int4_gemv_kernel)[(triton.cdiv(N, cfg.block_n), M)](
        x, qwords, scale, zero, bias if bias is not None else out, out,
        N, K,
        x.stride(0), x.stride(1), qwords.stride(0), scale.stride(0), scale.stride(1), out.stride(0), _ONE_BITS,
        GROUP_SIZE=group_size, GROUPS_PER_ITER=group_step, BLOCK_N=cfg.block_n,
        EVEN_G=groups % group_step == 0, HAS_BIAS=bias is not None, NUM_STAGES=cfg.num_stages,
        SZ_WORDS=sz_words, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
