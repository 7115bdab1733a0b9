"""Triton kernels for int8 weight-only linear: ``y = x @ (q * s).T (+ bias)`` in ``x.dtype``.

Layout read (the one ``aofx.numerics.quantize_int8`` writes):
  qdata  int8 (N, K), row-major, contiguous along K (16-byte loads of 16 codes)
  scale  float (N,) per output row, or (N, G) per (row, group) with group_size = K // G
         (a power of two >= 16; 32..256 in practice). A (N, 1) scale is treated as per row.
  bias   optional (N,), added in fp32 in the epilogue.
  x      (M, K) bf16 / fp16 with arbitrary row stride; y is (M, N) in x.dtype.

Kernel paths and M buckets (``select_config``):
  M == 1       ``gemv``, on the CUDA cores. Per-row scales (unsplit): ``_gemv_rows_kernel``, one weight row per
               program, K a compile-time constant so that the K loop is unrolled and all its loads are
               issued at once (steps of 2048 codes; a row of 8193-16384 codes is one masked step); the products
               accumulate in a (1, BLOCK_K) fp32 tile (int32 for dp4a words, below) reduced after the loop, and
               the scale is applied in the epilogue. Per-group scales (or a K split): ``_int8wo_gemv_kernel``,
               BLOCK_N (8; 4 when N < 2048) rows per program, a software-pipelined K loop (``tl.range`` stages,
               cp.async), each weight tile converted to fp32 (bit trick for int8, no I2F) and each
               (row, group) partial sum weighted by its scale every step.
               The dynamic schemes pass ``x_codes`` where their ``fused_gemv`` does not run: x quantized
               per row by their per-token kernel, int8 or e4m3 codes and s_x; int8 x int8 products are
               then summed exactly (int32 after the loop). With int8 codes on both sides and K % 4 == 0
               (``DOT4``) both are read as int32 words of 4 codes (``kernels.int32_words``): one ``dp4a``
               per word pair, exact int32 sums (inline PTX; shifts and multiplies under the interpreter).
  2 <= M <= 16 ``mm`` with BLOCK_M = 16 and a narrow BLOCK_N so that there are >= ~128 programs (512-wide
               K tiles for long K), or 128-row tiles where those make one wave of 104-132 programs (per-row
               scales, K < 8192); memory bound, tensor cores via mma.sync.
  M <= 128     ``mm`` 128 x 64 tiles (BLOCK_M x BLOCK_N), ``swap_ab``; M <= 256: 128 x 128, ``swap_ab``; up to
               M = 256 a shape with fewer than 128 tiles takes 128 x 128 tiles and splits K.
  M > 512, or M > 256 with fewer than 128 tiles of 256 x 128: ``dequant``: ``_dequantize_kernel`` writes
               the whole weight ``q * s`` in x.dtype (as the reference rounds it), then one cuBLAS GEMM
               (``F.linear``; ``kernels.dequantize_first``). Otherwise (also when exporting, or for a copy
               over DEQUANTIZE_MAX_BYTES): ``mm`` 256 x 128 x 64, 8 warps, ``swap_ab`` (compute bound).
  ``mm`` converts int8 -> x.dtype inside the K loop (e4m3 -> bf16 without swap_ab: ``_E4M3_TO_BF16_ASM``)
  and uses ``tl.dot`` (fp32 accumulate). With ``swap_ab``
  it computes y.T = W @ x.T, so the converted weight tile is wgmma's A operand, read from registers; as the B
  operand it would make a round trip through shared memory, which is slower from M = 128 on.
  Per-row scales go in the epilogue; per-group scales are applied to the weight tile inside the K loop
  (BLOCK_K divides group_size, so a tile lies in one group), which rounds ``q * s`` to x.dtype
  exactly as the reference's dequantization does.
  Either path may split K (``split_k > 1``): each split stores its fp32 partial (scales applied, bias
  in split 0) into a (split_k, M, N) workspace that the launcher sums and casts. The default tables
  only split when the tiles alone cannot fill the GPU, because the reduction is one more kernel.

The helpers ``KernelConfig`` and ``check_linear_args`` are shared with
``int8_dynamic_activation_int8_weight.py``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aofx.kernels import bucket_m, dequantize_first, grid_order, int32_words

_X_DTYPES = (torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration. ``path`` names the kernel (each file documents its paths)."""

    path: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # mm paths: compute y.T = W @ x.T (the weight is the dot's A operand)


# ---------------------------------------------------------------- shared device helpers

@triton.jit
def _code_to_f32(q):
    """int8 or e4m3 weight codes -> fp32, exactly."""
    if q.dtype.is_int8():
        # 0x4B400000 is 1.5 * 2**23: adding q (|q| < 2**22) to its bit pattern gives the float 1.5 * 2**23 + q
        # exactly, so one integer add and one float subtract replace the slow I2F conversion.
        return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return q.to(tl.float32)


# e4m3 -> bf16 for 4 codes packed in one register ($2), as two bf16x2 words ($0: codes 0, 1; $1: codes 2, 3).
# Each code's bits s eeee mmm become the bf16 bits s 0000eeee mmm0000 (PRMT puts the code in a half-word's
# high byte, then mask, shift, sign), i.e. the value times 2**-120; one mul.bf16x2 by 2**120 (0x7b80) rescales
# it exactly (e4m3 subnormals are bf16 subnormals, which bf16 arithmetic keeps). Ten PTX (eight SASS)
# integer/FMA-pipe instructions per 4 codes, in place of the hardware e4m3 -> f16 -> bf16 conversions.
# The NaN codes 0x7f / 0xff become +-480 (quantized weights never hold NaN). Used by ``mm`` without swap_ab
# (the M <= 16 tiles), where it beats the hardware conversions; with swap_ab (the M >= 17 tiles) it was not
# faster, so those keep the conversions.
# One line: Inductor's copy of the kernel source (torch 2.11) cannot hold a newline in a global string.
_E4M3_TO_BF16_ASM = tl.constexpr(" ".join((
    "{", ".reg .b32 p<2>, m<2>, k;",
    "prmt.b32 p0, $2, 0, 0x1404;", "prmt.b32 p1, $2, 0, 0x3424;",  # codes 0, 1 (2, 3) into half-word high bytes
    "and.b32 m0, p0, 0x7f007f00;", "and.b32 m1, p1, 0x7f007f00;",
    "shr.b32 m0, m0, 4;", "shr.b32 m1, m1, 4;",
    "lop3.b32 p0, m0, 0x80008000, p0, 0xf8;", "lop3.b32 p1, m1, 0x80008000, p1, 0xf8;",  # a | (b & c): the sign
    "mov.b32 k, 0x7b807b80;", "mul.rn.bf16x2 $0, p0, k;", "mul.rn.bf16x2 $1, p1, k;", "}")))


@triton.jit
def _dot4(w, x, acc, ASM: tl.constexpr):
    """``acc`` plus the dot products of the 4 int8 codes packed in each int32 word of w and x (byte i is
    code i): one ``dp4a`` per word on the GPU (inline PTX), shifts and multiplies elsewhere (interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            # shift byte i to the top, then arithmetic-shift it back down: the sign-extended code
            acc += ((w << (24 - 8 * i)) >> 24) * ((x << (24 - 8 * i)) >> 24)
        return acc


@triton.jit
def _store_tile(y, y_ptr, b_ptr, rm, rn, rn_safe, m_mask, M, N, stride_ym, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the tensor-core kernels: ``y`` (BLOCK_M, BLOCK_N) fp32 with scales applied; bias is
    added by split 0. A split stores its fp32 partial in slice pid_k of the (SPLIT_K, M, N) workspace."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn_safe).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_mask & (rn[None, :] < N)
    if SPLIT_K > 1:
        tl.store(y_ptrs + pid_k * M * stride_ym, y, mask=mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- kernels


@triton.jit
def _int8wo_gemv_kernel(
    # pointers
    x_ptr, sx_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    # dimensions
    N, K,
    # strides (x and qdata are contiguous along K; y is a contiguous (1, N) row)
    stride_wn, stride_sn, stride_sg,
    # meta-parameters
    HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
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
            acc_w = _dot4(w, tl.broadcast_to(xv[None, :], (BLOCK_N, BLOCK_K)), acc_w, DOT4_ASM)
        else:
            # with int8 x codes the products are exact integers, and so is each lane's sum (< 2**24 for K < 500k)
            prod = _code_to_f32(w) * _code_to_f32(xv)[None, :]  # (BLOCK_N, BLOCK_K)
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
def _gemv_rows_kernel(
    # pointers
    x_ptr, sx_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    # dimensions and strides (x and qdata are contiguous along K; y is a contiguous (1, N) row)
    N, stride_wn, stride_sn,
    # K is a compile-time constant: the K loop's trip count is known, so it is unrolled and every load is
    # issued up front (a run-time K makes the same tiles slower)
    K: tl.constexpr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, X_CODES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
            acc = _dot4(w, tl.broadcast_to(xv, (BLOCK_N, BLOCK_K)), acc, DOT4_ASM)  # masked words are 0
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
def _int8wo_mm_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    # dimensions
    M, N, K,
    # strides (x and qdata are contiguous along K)
    stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
    E4M3_PTX: tl.constexpr = False,  # e4m3 weights to bf16 with _E4M3_TO_BF16_ASM (per-row scales, bf16 x)
):
    pid_m, pid_n = grid_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows of x past M are masked (no memory traffic when M << BLOCK_M); columns past N re-read valid
    # weight rows (mask-free, vectorized) and are dropped at the store.
    m_mask = rm[:, None] < M  # (BLOCK_M, 1)
    rn_safe = rn % N
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None] * stride_xm  # (BLOCK_M, 1)
    w_rows = w_ptr + rn_safe[:, None] * stride_wn  # (BLOCK_N, 1)
    x_dtype = x_ptr.dtype.element_ty

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=m_mask, other=0.0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_mask & (k[None, :] < K), other=0.0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0, eviction_policy="evict_first")
        if GROUP_SIZE > 0:
            # BLOCK_K divides GROUP_SIZE: the whole tile lies in group k0 // GROUP_SIZE.
            s = tl.load(s_ptr + rn_safe * stride_sn + (k0 // GROUP_SIZE) * stride_sg).to(tl.float32)
            wt = (_code_to_f32(w) * s[:, None]).to(x_dtype)  # (BLOCK_N, BLOCK_K)
        elif E4M3_PTX:
            wt = tl.inline_asm_elementwise(_E4M3_TO_BF16_ASM, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            wt = w.to(x_dtype)
        if SWAP_AB:
            # The converted weight tile is the A operand, which wgmma reads from registers; x.T comes
            # from shared memory as B. (As B, the converted tile would make a round trip through shared memory.)
            acc = tl.dot(wt, tl.trans(xt), acc)  # (BLOCK_N, BLOCK_M)
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)  # (BLOCK_M, BLOCK_N)
    if SWAP_AB:
        acc = tl.trans(acc)

    if GROUP_SIZE == 0:
        acc = acc * tl.load(s_ptr + rn_safe * stride_sn).to(tl.float32)[None, :]
    _store_tile(acc, y_ptr, b_ptr, rm, rn, rn_safe, m_mask, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequantize_kernel(
    # pointers
    w_ptr, s_ptr, out_ptr,
    # dimensions
    N, K,
    # strides (qdata and out are contiguous along K)
    stride_wn, stride_sn, stride_sg, stride_on,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one (BLOCK_N, BLOCK_K) tile of q * s in out's dtype, rounded once from fp32 like the reference
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask, eviction_policy="evict_first")
    if GROUP_SIZE > 0:
        s = tl.load(s_ptr + rn[:, None] * stride_sn + (rk // GROUP_SIZE)[None, :] * stride_sg, mask=mask, other=0.0)
    else:
        s = tl.load(s_ptr + rn * stride_sn, mask=rn < N, other=0.0)[:, None]
    w = _code_to_f32(q) * s.to(tl.float32)  # (BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- config tables

# (max M, config) per bucket, first match wins. block_n / block_k / split_k are refined per shape in
# select_config. From M = 17 on, swap_ab: the converted weight tile is wgmma's A operand, read from registers
# (as B it would round-trip through shared memory). M <= 16 is memory bound: once select_config gives enough
# programs, the tile shape barely matters (no other 16-row tile was meaningfully faster).
# Evidence for this table and the gemv / dequant configs below: `python -m benchmarks.sweep --families
# int8wo,fp8wo` times each default config beside sweep.py's candidate grid (gemv tiles at M = 1, mm tiles at
# M >= 64, K splits from split_k_for); the data belongs in benchmarks/results/tuning/ once a sweep has been
# run there.
_MM_TABLE = (
    (16, KernelConfig("mm", block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)),
    (128, KernelConfig("mm", block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=3, swap_ab=True)),
    (256, KernelConfig("mm", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3, swap_ab=True)),
    (None, KernelConfig("mm", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3, swap_ab=True)),
)
# gemv with per-group scales (per-row scales take _GEMV_ROWS below): 2 warps own 8 rows x 512 codes (16-byte
# cp.async per thread per row), 4 stages of 4 KB: small programs, many per SM, so that the weight reads of many
# rows are in flight at once. Other tiles (8-64 rows x 256-1024 codes, 2-8 warps) and a persistent variant were
# not faster.
_GEMV = KernelConfig("gemv", block_m=1, block_n=8, block_k=512, num_warps=2, num_stages=4)
# gemv with per-row scales: one weight row x 2048 codes a step, 4 warps, no software pipeline, run by
# _gemv_rows_kernel (K a compile-time constant, so the loop is unrolled and all its loads are issued at once).
# As fast as or faster than _GEMV for int8 and e4m3 weights and for the dynamic schemes' codes (dp4a words
# included); of 1-4 rows x 1024-4096 codes and 2-8 warps, it was the best or close to it on every shape and
# scheme.
_GEMV_ROWS = KernelConfig("gemv", block_m=1, block_n=1, block_k=2048, num_warps=4, num_stages=1)
# Rows longer than _GEMV_ROWS.block_k * 4 and at most this long are one masked step of next_power_of_2(K)
# codes: at K = 14336 one step beats seven of 2048 (and steps of 4096 or 8192); at K = 4096 it does not, hence
# the lower bound.
_ROWS_ONE_STEP_MAX_K = 16384
# gemv where 8-row tiles are fewer than 2 * _MIN_PROGRAMS (N < 2048): 4 rows x 1024 codes, twice the programs
# for small layers (faster on 1024x4096; on 4096x4096 _GEMV wins, hence the bound)
_GEMV_NARROW = KernelConfig("gemv", block_m=1, block_n=4, block_k=1024, num_warps=2, num_stages=4)
# dequant (kernels.DEQUANTIZE_MAX_BYTES): beats the in-loop mm tiles at M > 512, and at M > 256 where the
# 256 x 128 tiles are fewer than _MIN_PROGRAMS (N = 4096) and leave SMs idle; at M = 256 mm stays ahead. The
# copy is a memory-bound stream, so its tile shape matters little.
_DEQUANT = KernelConfig("dequant", block_m=1, block_n=16, block_k=256, num_warps=2)
_LONG_K = 8192  # M <= 16: from this K on, 512-wide K tiles (fewer, longer programs need more bytes per stage)

# Enough programs to cover 132 SMs about once; below this small-M configs narrow BLOCK_N, then split K.
_MIN_PROGRAMS = 128
_SMS = 132  # H100 SXM
# M <= 16, K < _LONG_K, per-row scales: 128-row weight tiles where they make one wave of 104-132 programs, one
# per SM (a little faster than twice as many 64-row tiles). Other N keep the narrowing rule below, which is
# much faster there than wide tiles.
_WIDE_M16_BLOCK_N = 128
_WIDE_M16_PROGRAMS = 104
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (sm_90 allows 227 KB)


def split_k_for(programs: int, k_tiles: int, min_programs: int = _MIN_PROGRAMS) -> int:
    """Smallest power-of-two K split that gives >= ``min_programs`` programs (each split keeps >= 2 tiles)."""
    split = 1
    while programs * split < min_programs and 2 * split * 2 <= k_tiles:
        split *= 2
    return split


def select_config(M: int, N: int, K: int, group_size: int = 0) -> KernelConfig:
    """The config for one call. M selects the bucket; N, K, group_size (static under compile) refine it."""
    if M == 1 and not group_size:
        if _GEMV_ROWS.block_k * 4 < K <= _ROWS_ONE_STEP_MAX_K:
            block_k = triton.next_power_of_2(K)
        else:
            block_k = min(_GEMV_ROWS.block_k, triton.next_power_of_2(K))
        return dataclasses.replace(_GEMV_ROWS, block_k=block_k, split_k=split_k_for(N, triton.cdiv(K, block_k)))
    if M == 1:
        gemv = _GEMV if triton.cdiv(N, _GEMV.block_n) >= 2 * _MIN_PROGRAMS else _GEMV_NARROW
        block_k = max(min(gemv.block_k, triton.next_power_of_2(K)), group_size)
        n_tiles = triton.cdiv(N, gemv.block_n)
        return dataclasses.replace(gemv, block_k=block_k, split_k=split_k_for(n_tiles, triton.cdiv(K, block_k)))
    cfg = next(c for max_m, c in _MM_TABLE if max_m is None or M <= max_m)
    if M > 256 and dequantize_first(N, K) and (
            M > 512 or triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) < _MIN_PROGRAMS):
        return _DEQUANT
    block_k = min(cfg.block_k, group_size) if group_size else cfg.block_k
    block_n = cfg.block_n
    num_stages = cfg.num_stages
    if block_k < cfg.block_k:
        # A short K tile (small groups) moves fewer bytes per stage: pipeline deeper, within shared memory.
        stage_bytes = cfg.block_m * block_k * 2 + cfg.block_n * block_k
        num_stages = max(cfg.num_stages, min(8, cfg.num_stages * cfg.block_k // block_k, _SMEM_BUDGET // stage_bytes))
    if M <= 16:
        wide = K < _LONG_K and not group_size and _WIDE_M16_PROGRAMS <= triton.cdiv(N, _WIDE_M16_BLOCK_N) <= _SMS
        if wide:
            block_n = _WIDE_M16_BLOCK_N  # one wave of wide tiles, K unsplit (a K split is slower here)
        else:
            # Memory bound: narrow the weight tile before splitting K, so no reduction kernel is needed.
            while block_n > 32 and triton.cdiv(N, block_n) < _MIN_PROGRAMS:
                block_n //= 2
        if block_k < 128:  # small groups force a short K tile: widen N to keep bytes in flight per stage
            block_n = max(block_n, 64)
        if K >= _LONG_K and not group_size:
            block_k = 512
        split_k = 1 if wide else split_k_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    elif M <= 256 and triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n) < _MIN_PROGRAMS and not group_size:
        # Few tiles (N = 4096: 64 programs at M = 128) leave SMs idle for a whole long K loop: split K,
        # with the larger 128 x 128 tile (faster than splitting the 128 x 64 tiles).
        cfg, block_n = _MM_TABLE[2][1], _MM_TABLE[2][1].block_n
        split_k = split_k_for(triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    else:
        split_k = 1
    return dataclasses.replace(cfg, block_n=block_n, block_k=block_k, split_k=split_k, num_stages=num_stages)


# ---------------------------------------------------------------- launcher helpers (shared)

def check_linear_args(name: str, x, qdata, scale, bias, scale_dims=(1, 2), codes=torch.int8):
    """Shape / dtype / device checks shared by the int8 and fp8 launchers. Returns (M, N, K).

    ``codes``: qdata's dtype. ``scale_dims=()`` leaves the scale's dtype and shape to the caller."""
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{name}: x must be bfloat16 or float16, got {x.dtype}")
    if qdata.dtype != codes or qdata.dim() != 2:
        raise TypeError(f"{name}: qdata must be a 2-D {str(codes).removeprefix('torch.')} (N, K) tensor, "
                        f"got {qdata.dtype} {tuple(qdata.shape)}")
    M, K = x.shape
    N = qdata.shape[0]
    if qdata.shape[1] != K:
        raise ValueError(f"{name}: x has K={K} but qdata is {tuple(qdata.shape)} (expected (N, {K}))")
    if qdata.stride(1) != 1:
        raise ValueError(f"{name}: qdata must be contiguous along K (stride {qdata.stride()})")
    if scale_dims and (scale.dtype not in _FLOAT_DTYPES or scale.dim() not in scale_dims or scale.shape[0] != N):
        raise ValueError(
            f"{name}: scale must be a float tensor of shape (N,)" + (" or (N, K // group_size)" if 2 in scale_dims else "")
            + f" with N={N}, got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"{name}: bias must be a float tensor of shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
    for t in (qdata, scale, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: all tensors must be on {x.device}, got one on {t.device}")
    return M, N, K


def _group_size(K: int, scale) -> int:
    """0 for per-row scales, else K // G (validated: a power of two >= 16 that divides K)."""
    if scale.dim() == 1 or scale.shape[1] == 1:
        return 0
    G = scale.shape[1]
    gs = K // G
    if gs * G != K or gs < 16 or gs & (gs - 1):
        raise ValueError(
            f"int8_weight_only.linear: scale {tuple(scale.shape)} implies group_size K/G = {K}/{G}; "
            "group_size must be a power of two >= 16 that divides K")
    return gs


# ---------------------------------------------------------------- launcher

def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
           *, config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ (qdata * scale).T + bias`` for x (M, K) bf16/fp16; returns (M, N) in x.dtype.

    ``config`` forces a path / tile shape (tests and tuning); by default ``select_config`` picks it.
    """
    M, N, K = check_linear_args("int8_weight_only.linear", x, qdata, scale, bias)
    group_size = _group_size(K, scale)
    if M == 0:
        return x.new_empty((0, N))
    scale = scale.reshape(N) if group_size == 0 else scale.contiguous()
    cfg = config if config is not None else select_config(bucket_m(M), N, K, group_size)
    return launch("int8_weight_only.linear", x, qdata, scale, bias, cfg, group_size)


def launch(name: str, x, qdata, scale, bias, cfg: KernelConfig, group_size: int = 0,
           x_codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Launch ``cfg``'s kernel on checked arguments: x (M >= 1, K) bf16/fp16, qdata int8 or e4m3 (N, K)
    contiguous along K, scale (N,) (or (N, G) with ``group_size``; a 0-d per-tensor scale only with
    ``x_codes``), bias (N,) or None. ``x_codes`` (gemv only): x already quantized per row, (codes (1, K)
    int8 / e4m3, s_x fp32 (1,)), which the kernel reads instead of x; y is ``(acc * s_x) * s_w`` in
    x.dtype. The dynamic schemes at M = 1 use it. Shared with the fp8 launchers.
    """
    M, K = x.shape
    N = qdata.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    if cfg.path == "gemv" and M != 1:
        raise ValueError(f"{name}: the gemv path needs M == 1, got M={M}")
    if x_codes is not None and cfg.path != "gemv":
        raise ValueError(f"{name}: a pre-quantized x is read by the gemv path only, got {cfg.path!r}")
    if cfg.path == "dequant":
        return _dequantize_linear(x, qdata, scale, bias, cfg, group_size)
    if group_size and (cfg.block_k % group_size if cfg.path == "gemv" else group_size % cfg.block_k):
        raise ValueError(f"{name}: block_k={cfg.block_k} does not fit group_size={group_size} "
                         "(gemv: a multiple of it; mm: a divisor of it)")
    has_bias = bias is not None
    b_arg = bias.contiguous() if has_bias else scale  # any tensor: never read without HAS_BIAS
    stride_sn = scale.stride(0) if scale.dim() else 0  # a per-tensor scale is every row's scale
    stride_sg = scale.stride(1) if group_size else 0
    split = cfg.split_k
    out = split_k_output(x, M, N, split)
    even_k = K % cfg.block_k == 0

    if cfg.path == "gemv":
        x_arg, sx_arg = x_codes if x_codes is not None else (x, scale)  # sx_arg is read only with codes
        w_arg, k_arg, block_k = qdata, K, cfg.block_k
        # int8 x int8 codes: both sides as int32 words of 4 codes, one dp4a per word (K counted in words)
        dot4 = x_arg.dtype == qdata.dtype == torch.int8 and K % 4 == 0 and cfg.block_k % 4 == 0 and not group_size
        if dot4:
            w_arg, x_arg, k_arg, block_k = int32_words(qdata), x_arg.view(torch.int32), K // 4, cfg.block_k // 4
        if not group_size and split == 1:  # per-row scales, unsplit: the row kernel
            torch.library.wrap_triton(_gemv_rows_kernel)[(triton.cdiv(N, cfg.block_n),)](
                x_arg, sx_arg, w_arg, scale, b_arg, out,
                N, w_arg.stride(0), stride_sn,
                K=k_arg, HAS_BIAS=has_bias, X_CODES=x_codes is not None, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
                DOT4=dot4, DOT4_ASM=dot4 and x.is_cuda,
                num_warps=cfg.num_warps, num_stages=1,
            )
        else:
            torch.library.wrap_triton(_int8wo_gemv_kernel)[(triton.cdiv(N, cfg.block_n), split)](
                x_arg, sx_arg, w_arg, scale, b_arg, out,
                N, k_arg,
                w_arg.stride(0), stride_sn, stride_sg,
                HAS_BIAS=has_bias, GROUP_SIZE=group_size, SPLIT_K=split, EVEN_K=even_k,
                BLOCK_N=cfg.block_n, BLOCK_K=block_k, NUM_STAGES=cfg.num_stages, X_CODES=x_codes is not None,
                DOT4=dot4, DOT4_ASM=dot4 and x.is_cuda,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    elif cfg.path == "mm":
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        torch.library.wrap_triton(_int8wo_mm_kernel)[grid](
            x, qdata, scale, b_arg, out,
            M, N, K,
            x.stride(0), qdata.stride(0), stride_sn, stride_sg, out.stride(-2),
            HAS_BIAS=has_bias, GROUP_SIZE=group_size, SPLIT_K=split, EVEN_K=even_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            SWAP_AB=cfg.swap_ab, E4M3_PTX=(x.is_cuda and x.dtype == torch.bfloat16 and not group_size
                                            and qdata.dtype == torch.float8_e4m3fn and not cfg.swap_ab),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        raise ValueError(f"{name}: unknown path {cfg.path!r} (expected 'gemv', 'mm' or 'dequant')")
    return split_k_result(out, x.dtype)


def _dequantize_linear(x, qdata, scale, bias, cfg: KernelConfig, group_size: int) -> torch.Tensor:
    """The ``dequant`` path: ``F.linear(x, q * s, bias)`` with q * s written by one Triton kernel."""
    N, K = qdata.shape
    w = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K) in x.dtype
    torch.library.wrap_triton(_dequantize_kernel)[(triton.cdiv(N, cfg.block_n), triton.cdiv(K, cfg.block_k))](
        qdata, scale, w,
        N, K,
        qdata.stride(0), scale.stride(0), scale.stride(1) if group_size else 0, w.stride(0),
        GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def split_k_output(x, M: int, N: int, split: int) -> torch.Tensor:
    """The kernels' output: (M, N) in x.dtype, or a (split, M, N) fp32 workspace of per-split partials."""
    if split > 1:
        return torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    return torch.empty((M, N), device=x.device, dtype=x.dtype)


def split_k_result(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, N) in ``dtype``: a split-K workspace is summed in a fixed order (deterministic, unlike atomics,
    and cheaper: scattered fp32 atomics cost more than a plain store plus one reduction)."""
    return out.sum(0).to(dtype) if out.dim() == 3 else out
