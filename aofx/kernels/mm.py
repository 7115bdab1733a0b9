"""M > 1: tensor-core GEMMs (``tl.dot``, wgmma on Hopper) over weight codes, for every scheme.

- ``_codes_mm_kernel`` (int8 and fp8 weight-only): int8 / e4m3 weight tiles converted to x.dtype inside the
  K loop (e4m3 -> bf16 with ``ptx.E4M3_TO_BF16`` where that is faster), fp32 accumulate. Per-row scales go
  in the epilogue; per-group scales multiply the weight tile in the loop (BLOCK_K divides group_size, so a
  tile lies in one group), rounding ``q * s`` to x.dtype as the reference's dequantization does.
- ``_int4_mm_kernel``: a (BLOCK_N, BLOCK_K // 8) tile of int32 words and the group's scale and zero
  (loaded a step ahead: Triton's cp.async pipeline does not take 2-byte loads) become 8 nibble tensors,
  put in K order with nested ``tl.join`` + reshape. With bf16 x, scale and zero the dequantization is
  ``ptx.INT4_TO_BF16`` (``(q - 8) * s + z`` rounded once to bf16; the reference rounds to fp32, then bf16:
  equal but for a double-rounding tie); otherwise fp32 ``f * 16 s + (z - 24 s)`` with ``f = 1 + q / 16``
  made from the nibble's bits (no int -> float conversions).
- ``_quantized_mm_kernel`` (int8 and fp8 dynamic): int8 x int8 (exact int32 accumulate) or e4m3 x e4m3
  (fp32 accumulate; Hopper's fp8 wgmma accumulates in reduced precision over K, like
  ``torch._scaled_mm``'s fast accumulation) on codes that ``quantize.quantize_per_token`` wrote, or, with
  ``QUANTIZE_X`` (the ``fused`` path), quantized in the prologue. ``y = (acc * s_x) * s_w (+ bias)``.

``scaled_mm`` is the library alternative for e4m3 at large M: the Triton per-token quantization, then
``torch._scaled_mm`` (cuBLASLt / CUTLASS fp8 with the scales in its epilogue; AOTInductor has a C shim).

With ``swap_ab`` a kernel computes ``y.T = W @ x.T``: the weight tile is wgmma's A operand, read from
registers after its conversion (as B it would round-trip through shared memory), and x's few rows are the
narrow side. Every kernel uses the grouped tile order (``common.grid_order``), masks x rows past M (no
traffic when M << BLOCK_M; ``_codes_mm_kernel`` re-reads valid rows instead, see there), re-reads valid
weight rows past N (mask-free loads, dropped at the store), and ends in
``common.store_tile``: scales applied, bias added by split 0, a K split's fp32 partial written to the
workspace that ``common.split_k_result`` sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aofx.kernels.common import (
    KernelConfig,
    code_to_f32,
    grid_order,
    int32_words,
    launch_options,
    split_k_output,
    split_k_result,
    store_tile,
)
from aofx.kernels.ptx import E4M3_TO_BF16, INT4_TO_BF16
from aofx.kernels.quantize import divide, quantize_codes, quantize_per_token, row_scale

__all__ = ["codes_mm", "int4_mm", "quantized_mm", "scaled_mm"]

_ONE_BITS = 0x3F800000  # fp32 1.0
# fused prologue: x tiles of BLOCK_M x _AMAX_BLOCK_K, _AMAX_STAGES deep (16 x 256 bf16: 8 KB a stage, 7 in
# flight; wider tiles pushed the kernel to 240+ registers on sm_90)
_AMAX_BLOCK_K = 256
_AMAX_STAGES = 8
_AMAX_SMEM_BYTES = 64 * 1024  # fewer stages for taller tiles (a forced fused config with BLOCK_M = 64)


@triton.jit
def _codes_mm_kernel(
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
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
    E4M3_PTX: tl.constexpr = False,  # e4m3 weights to bf16 with E4M3_TO_BF16 (per-row scales, bf16 x)
):
    pid_m, pid_n = grid_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N re-read valid weight rows and rows past M re-read valid x rows (rm % M): mask-free,
    # vectorized loads, dropped at the store. A row mask on x compiled to more predicated code when M was not
    # known to be divisible by 16, as a symbolic M (an AOTInductor package, a dynamic compile) never is; the
    # package then ran up to 7% slower than compile (benchmarks/README.md, "Deploy").
    m_mask = rm[:, None] < M  # (BLOCK_M, 1), for the store
    rn_safe = rn % N
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + (rm % M)[:, None] * stride_xm  # (BLOCK_M, 1)
    w_rows = w_ptr + rn_safe[:, None] * stride_wn  # (BLOCK_N, 1)
    x_dtype = x_ptr.dtype.element_ty

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
        else:
            k_mask = k[None, :] < K
            xt = tl.load(x_rows + k[None, :], mask=k_mask, other=0.0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], mask=k_mask, other=0.0, eviction_policy="evict_first")
        if GROUP_SIZE > 0:
            # BLOCK_K divides GROUP_SIZE: the whole tile lies in group k0 // GROUP_SIZE.
            s = tl.load(s_ptr + rn_safe * stride_sn + (k0 // GROUP_SIZE) * stride_sg).to(tl.float32)
            wt = (code_to_f32(w) * s[:, None]).to(x_dtype)  # (BLOCK_N, BLOCK_K)
        elif E4M3_PTX:
            wt = tl.inline_asm_elementwise(E4M3_TO_BF16, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
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
    store_tile(acc, y_ptr, b_ptr, rm, rn, rn_safe, m_mask, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _nibble_f32(q, i: tl.constexpr, one_bits):
    """fp32 ``1 + n/16`` for nibble ``i`` (bits 4i..4i+3) of each int32 word: one shift, one LOP3."""
    if 4 * i <= 19:  # move the nibble to bits 19..22, the top of the fp32 mantissa of 1.0
        bits = ((q << (19 - 4 * i)) & 0x780000) | one_bits
    else:
        bits = ((q >> (4 * i - 19)) & 0x780000) | one_bits
    return bits.to(tl.float32, bitcast=True)


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
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)

    pid_m, pid_n = grid_order(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

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
                INT4_TO_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
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

    if SWAP_AB:
        acc = tl.trans(acc)  # (BM, BN)
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, wrows, mask_m[:, None], M, N, stride_om, pid_k, HAS_BIAS,
               SPLIT_K)


@triton.jit
def _quantized_mm_kernel(
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
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
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
        s_x = tl.where(rm < M, row_scale(amax, FP8), 1.0)  # (BLOCK_M,)
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
            xt = quantize_codes(divide(xt.to(tl.float32), s_x[:, None], r_x, FMA), FP8)  # (BLOCK_M, BLOCK_K) codes
        if SWAP_AB:
            # y.T = W @ xq.T: the weight tile fills the 64-row tensor-core operand, x's few rows the narrow one.
            acc = tl.dot(w, tl.trans(xt), acc, out_dtype=acc_dtype)  # (BLOCK_N, BLOCK_M)
        else:
            acc = tl.dot(xt, tl.trans(w), acc, out_dtype=acc_dtype)  # (BLOCK_M, BLOCK_N)
    if SWAP_AB:
        acc = tl.trans(acc)

    # Same association as the reference: (acc * s_x) * s_w, then + bias.
    y = acc.to(tl.float32) * s_x[:, None] * tl.load(sw_ptr + rn_safe * stride_sw).to(tl.float32)[None, :]
    store_tile(y, y_ptr, b_ptr, rm, rn, rn_safe, m_mask, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)


def codes_mm(x, qdata, scale, bias, cfg: KernelConfig, group_size: int = 0) -> torch.Tensor:
    """x (M, K) times int8 / e4m3 codes (N, K) scaled per row or per group. Returns (M, N) in x.dtype."""
    M, K = x.shape
    N = qdata.shape[0]
    has_bias = bias is not None
    split = cfg.split_k
    out = split_k_output(x, M, N, split)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    torch.library.wrap_triton(_codes_mm_kernel)[grid](
        x, qdata, scale, bias.contiguous() if has_bias else scale, out,
        M, N, K,
        x.stride(0), qdata.stride(0), scale.stride(0), scale.stride(1) if group_size else 0, out.stride(-2),
        HAS_BIAS=has_bias, GROUP_SIZE=group_size, SPLIT_K=split, EVEN_K=K % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SWAP_AB=cfg.swap_ab, E4M3_PTX=(x.is_cuda and x.dtype == torch.bfloat16 and not group_size
                                        and qdata.dtype == torch.float8_e4m3fn and not cfg.swap_ab),
        **launch_options(cfg),
    )
    return split_k_result(out, x.dtype)


def int4_mm(x, qdata, scale, zero, bias, cfg: KernelConfig, group_size: int) -> torch.Tensor:
    """x (M, K) times packed int4 codes (N, K // 2); ``cfg.block_k`` divides group_size. Each K split takes
    a contiguous run of whole K steps. Returns (M, N) in x.dtype."""
    M, K = x.shape
    N = qdata.shape[0]
    split = cfg.split_k
    out = split_k_output(x, M, N, split)
    qwords = int32_words(qdata)  # (N, K//8): 8 nibbles per word
    # the PTX dequantization is exact for bf16 scale and zero into bf16 weights; the interpreter
    # (CPU tensors) cannot run inline PTX and takes the fp32 path
    ptx = x.is_cuda and x.dtype == scale.dtype == zero.dtype == torch.bfloat16
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    torch.library.wrap_triton(_int4_mm_kernel)[grid](
        x, qwords, scale, zero, bias if bias is not None else scale, out,
        M, N, K,
        x.stride(0), x.stride(1), qwords.stride(0), scale.stride(0), scale.stride(1), out.stride(-2), _ONE_BITS,
        GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, SPLIT_K=split, SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None, DEQUANT_PTX=ptx,
        **launch_options(cfg),
    )
    return split_k_result(out, x.dtype)


def quantized_mm(x, qdata, scale, bias, cfg: KernelConfig, x_amax=None, rows=None) -> torch.Tensor:
    """x (M, K) bf16/fp16 quantized per row (or with one amax: ``x_amax``, partial maxima from
    ``quantize.amax_partials``) to the weight's code type, times codes (N, K) int8 / e4m3 with scale (N,) or
    (). ``cfg.path``: "quantized" (``quantize_per_token`` first) or "fused" (in the prologue; per row only).
    ``rows``: as ``quantize_per_token``'s. Returns (M, N) in x.dtype."""
    M, K = x.shape
    N = qdata.shape[0]
    fp8 = qdata.dtype == torch.float8_e4m3fn
    if cfg.path == "fused":
        x_arg, sx_arg = x, scale  # sx_arg is never read when QUANTIZE_X
    else:
        x_arg, sx_arg = quantize_per_token(x, fp8, x_amax, rows)
    scale = scale.contiguous()
    has_bias = bias is not None
    split = cfg.split_k
    out = split_k_output(x, M, N, split)
    amax_block_k = min(_AMAX_BLOCK_K, triton.next_power_of_2(K))
    amax_stages = max(2, min(_AMAX_STAGES, _AMAX_SMEM_BYTES // (cfg.block_m * amax_block_k * x.element_size())))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    torch.library.wrap_triton(_quantized_mm_kernel)[grid](
        x_arg, sx_arg, qdata, scale, bias.contiguous() if has_bias else scale, out,
        M, N, K,
        x_arg.stride(0), qdata.stride(0), out.stride(-2),
        scale.stride(0) if scale.dim() else 0,
        HAS_BIAS=has_bias, QUANTIZE_X=cfg.path == "fused", SPLIT_K=split, EVEN_K=K % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        AMAX_BLOCK_K=amax_block_k, AMAX_STAGES=amax_stages, SWAP_AB=cfg.swap_ab, FP8=fp8, FMA=x.is_cuda,
        **launch_options(cfg),
    )
    return split_k_result(out, x.dtype)


def scaled_mm_fits(x, qdata) -> bool:
    """Whether ``scaled_mm`` takes this call: e4m3 codes, bf16 x (the row-wise scaled GEMM writes bf16), and
    N and K multiples of 16 (the library GEMMs' alignment)."""
    N, K = qdata.shape
    return qdata.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16 and N % 16 == 0 and K % 16 == 0


def scaled_mm(x, qdata, scale, bias, x_amax=None, rows=None) -> torch.Tensor:
    """x (M, K) bf16 quantized to e4m3 per row (or with one amax: ``x_amax``), then ``torch._scaled_mm`` with
    fp32 scales: one each when x and the weight are both per tensor, else s_x (M, 1) and s_w (1, N). Fast
    accumulation, like the Triton fp8 GEMM's on Hopper. Returns (M, N) bf16."""
    N = qdata.shape[0]
    xq, sx = quantize_per_token(x, True, x_amax, rows)
    if x_amax is not None and scale.dim() == 0:
        scale_a, scale_b = sx[:1], scale.reshape(1)
    else:
        scale_a = sx[:, None]
        scale_b = (scale if scale.dim() else scale.reshape(1).expand(N)).reshape(1, N).contiguous()
    return torch._scaled_mm(xq, qdata.t(), scale_a=scale_a, scale_b=scale_b,
                            bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype, use_fast_accum=True)
