"""Triton kernels for int8 dynamic-activation x int8-weight linear (``numerics.int8_dynamic_activation_int8_weight_linear``).

Layout read:
  qdata  int8 (N, K), row-major, contiguous along K (``numerics.quantize_int8`` per row)
  scale  float (N,) per output row (s_w)
  bias   optional (N,)
  x      (M, K) bf16 / fp16 with arbitrary row stride; y is (M, N) in x.dtype.

Math, per token (row) m:  s_x = max(amax_k |x[m, k]| / 127, TINY),  xq = clamp(round(x / s_x), -127, 127),
acc = xq @ qdata.T exactly in int32 (``tl.dot`` on int8 operands), ``y = acc * s_x * s_w (+ bias)`` in fp32 in
the epilogue, then cast. ``round`` is round-half-to-even like ``torch.round`` (the 1.5 * 2**23 trick), but x is
divided by s_x with an IEEE division (``tl.div_rn``), so the codes are bit-identical to the reference's.
(Multiplying by ``1 / s_x`` would be cheaper, but x = amax / 2 and similar exact ties are common with
bf16/fp16 inputs, and the reciprocal then flips codes by 1 in a few percent of rows.)

Kernel paths and M buckets (``select_config``):
  M <= 16  ``fused``: the activation quantization is fused into the GEMM prologue. Each program first
           loops over K to get the amax of its BLOCK_M (=16) rows (its own software pipeline: its latency
           comes before any weight read), then its main loop quantizes the x tiles on the fly and feeds
           int8 ``tl.dot`` (mma.sync) against its BLOCK_N weight rows. One launch: at these M the layer is
           bound by reading the weights, and an extra launch would cost ~10% of the M=1 time. The price is
           that every program reads its M x rows twice from L2 (rows past M are masked: no traffic); at
           M=16, BLOCK_N=64 that is as many bytes as its weight tile, served by L2.
  M > 16   ``quantized``: a tiny per-token kernel writes xq int8 (M, K) and s_x (M,), then an int8 x int8
           GEMM with tensor-core tiles (64x128 up to M=128, 128x128 up to 256, 128x256 above). Why not fused
           here: a fused prologue redoes the amax pass and the quantization of x for every one of the
           N / BLOCK_N column blocks, i.e. reads bf16 x twice per tile (for M=1024, N=14336: ~0.9 GB of L2
           reads and ~235 M quantizations, close to the whole time budget of the int8 GEMM), while the
           separate kernel quantizes x once and halves the GEMM's activation traffic (int8 instead of bf16).
Both paths are one ``_int8dq_mm_kernel`` (``QUANTIZE_X`` picks the prologue). Optional split-K adds fp32
partials with atomics into a zeroed fp32 output (only used by default when N is too small to fill the GPU).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from aofx.kernels import bucket_m
from aofx.kernels.int8_weight_only import KernelConfig, check_linear_args, grid_order, split_k_for

__all__ = ["KernelConfig", "linear", "quantize_per_token", "select_config"]


# ---------------------------------------------------------------- device helpers

@triton.jit
def _row_scale(amax, RECIP_SCALE: tl.constexpr):
    # s_x = max(amax / 127, float32 tiny) exactly as numerics.safe_scale computes it on x's device: torch
    # divides by a Python scalar with an IEEE division on the CPU, but on CUDA it multiplies by the fp32
    # reciprocal (1/127 rounded to fp32 = 0.007874015718698502). The two differ in the last bit for some amax.
    if RECIP_SCALE:
        s = amax * 0.007874015718698502
    else:
        s = tl.div_rn(amax, 127.0)
    return tl.maximum(s, 1.1754943508222875e-38)


@triton.jit
def _quantize(v):
    """fp32 ``x / s_x`` -> int8 codes: round half to even, then clamp to [-127, 127]."""
    # Adding 1.5 * 2**23 rounds to an integer (|v| < 2**22); its bit pattern minus that of 1.5 * 2**23
    # is the integer itself: no float -> int conversion instruction needed.
    q = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    return tl.minimum(tl.maximum(q, -127), 127).to(tl.int8)


# ---------------------------------------------------------------- kernels

@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, xq_ptr, sx_ptr,
    # dimensions
    K,
    # strides (x and xq are contiguous along K)
    stride_xm, stride_qm,
    # meta-parameters
    BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, RECIP_SCALE: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    rk = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        # The whole row (BLOCK_K >= K) stays in registers: x is read from memory once.
        xv = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        s = _row_scale(tl.max(tl.abs(xv), axis=0), RECIP_SCALE)
        tl.store(q_row + rk, _quantize(tl.div_rn(xv, s)), mask=rk < K)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
        s = _row_scale(tl.max(amax, axis=0), RECIP_SCALE)
        for k0 in range(0, K, BLOCK_K):
            xv = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0)
            tl.store(q_row + k0 + rk, _quantize(tl.div_rn(xv.to(tl.float32), s)), mask=k0 + rk < K)
    tl.store(sx_ptr + row, s)


@triton.jit
def _int8dq_mm_kernel(
    # pointers (x is bf16/fp16 when QUANTIZE_X, else int8 codes with scales at sx_ptr)
    x_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr,
    # dimensions
    M, N, K,
    # strides (x and qdata are contiguous along K)
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    HAS_BIAS: tl.constexpr, QUANTIZE_X: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    AMAX_BLOCK_K: tl.constexpr, AMAX_STAGES: tl.constexpr, RECIP_SCALE: tl.constexpr, SWAP_AB: tl.constexpr,
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
        s_x = tl.where(rm < M, _row_scale(amax, RECIP_SCALE), 1.0)  # (BLOCK_M,)
    else:
        s_x = tl.load(sx_ptr + rm, mask=rm < M, other=1.0)

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k = k0 + rk
        if EVEN_K:
            xt = tl.load(x_rows + k[None, :], mask=m_mask, other=0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_mask & (k[None, :] < K), other=0, eviction_policy="evict_last")
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0, eviction_policy="evict_first")
        if QUANTIZE_X:
            xt = _quantize(tl.div_rn(xt.to(tl.float32), s_x[:, None]))  # (BLOCK_M, BLOCK_K) int8
        if SWAP_AB:
            # y.T = W @ xq.T: the weight tile fills the 64-row tensor-core operand, x's few rows the narrow one.
            acc = tl.dot(w, tl.trans(xt), acc, out_dtype=tl.int32)  # (BLOCK_N, BLOCK_M)
        else:
            acc = tl.dot(xt, tl.trans(w), acc, out_dtype=tl.int32)  # (BLOCK_M, BLOCK_N)
    if SWAP_AB:
        acc = tl.trans(acc)

    # Same association as the reference: (acc * s_x) * s_w, then + bias.
    y = acc.to(tl.float32) * s_x[:, None] * tl.load(sw_ptr + rn_safe).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn_safe).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_mask & (rn[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, y, mask=mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- config tables

# (max M, config), first match wins; block_n / split_k are refined per shape in select_config.
_TABLE = (
    (16, KernelConfig("fused", block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)),
    (128, KernelConfig("quantized", block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)),
    (256, KernelConfig("quantized", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4)),
    (None, KernelConfig("quantized", block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3)),
)
# fused prologue: x tiles of BLOCK_M x _AMAX_BLOCK_K, _AMAX_STAGES deep (16 x 256 bf16: 8 KB a stage, 7 in
# flight; wider tiles pushed the kernel to 240+ registers on sm_90)
_AMAX_BLOCK_K = 256
_AMAX_STAGES = 8
_AMAX_SMEM_BYTES = 64 * 1024  # fewer stages for taller tiles (a forced fused config with BLOCK_M = 64)
_QUANT_BLOCK_K = 2048  # per-token kernel: one program per row, K in chunks of this (two passes over x)
_QUANT_ONE_PASS_MAX_K = 16384  # up to this K a row stays in registers (<= 64 fp32 per thread at 8 warps)
_QUANT_NUM_WARPS = 4


def select_config(M: int, N: int, K: int) -> KernelConfig:
    """The config for one call. M selects the bucket; N, K (static under compile) refine it."""
    cfg = next(c for max_m, c in _TABLE if max_m is None or M <= max_m)
    block_n, split_k = cfg.block_n, 1
    if cfg.path == "fused":
        # Memory bound: narrow the weight tile before splitting K (a split costs a zero-fill and a cast).
        while block_n > 32 and triton.cdiv(N, block_n) < 128:
            block_n //= 2
        split_k = split_k_for(triton.cdiv(N, block_n), triton.cdiv(K, cfg.block_k))
    return dataclasses.replace(cfg, block_n=block_n, split_k=split_k)


# ---------------------------------------------------------------- launchers

def _recip_scale(x: torch.Tensor) -> bool:
    """Whether ``numerics.safe_scale`` multiplies by the reciprocal on x's device (see ``_row_scale``)."""
    return x.device.type == "cuda"


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) bf16/fp16, contiguous along K -> (xq int8 (M, K), s_x fp32 (M,)), as numerics.quantize_int8_per_token."""
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    xq = torch.empty((M, K), device=x.device, dtype=torch.int8)
    sx = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M > 0:
        one_pass = K <= _QUANT_ONE_PASS_MAX_K
        block_k = triton.next_power_of_2(K) if one_pass else _QUANT_BLOCK_K
        torch.library.wrap_triton(_quantize_per_token_kernel)[(M,)](
            x, xq, sx,
            K,
            x.stride(0), xq.stride(0),
            BLOCK_K=block_k, ONE_PASS=one_pass, RECIP_SCALE=_recip_scale(x),
            num_warps=_QUANT_NUM_WARPS if one_pass and block_k <= 4096 else 2 * _QUANT_NUM_WARPS,
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
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config if config is not None else select_config(bucket_m(M), N, K)
    if cfg.path == "fused":
        x_arg, sx_arg = x, scale  # sx_arg is never read when QUANTIZE_X
    elif cfg.path == "quantized":
        x_arg, sx_arg = quantize_per_token(x)
    else:
        raise ValueError(f"{name}: unknown path {cfg.path!r} (expected 'fused' or 'quantized')")
    scale = scale.contiguous()
    has_bias = bias is not None
    b_arg = bias.contiguous() if has_bias else scale  # any tensor: never read without HAS_BIAS
    split = cfg.split_k
    if split > 1:
        out = torch.zeros((M, N), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    amax_block_k = min(_AMAX_BLOCK_K, triton.next_power_of_2(K))
    amax_stages = max(2, min(_AMAX_STAGES, _AMAX_SMEM_BYTES // (cfg.block_m * amax_block_k * x.element_size())))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    torch.library.wrap_triton(_int8dq_mm_kernel)[grid](
        x_arg, sx_arg, qdata, scale, b_arg, out,
        M, N, K,
        x_arg.stride(0), qdata.stride(0), out.stride(0),
        HAS_BIAS=has_bias, QUANTIZE_X=cfg.path == "fused", SPLIT_K=split, EVEN_K=K % cfg.block_k == 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        AMAX_BLOCK_K=amax_block_k, AMAX_STAGES=amax_stages, RECIP_SCALE=_recip_scale(x), SWAP_AB=cfg.swap_ab,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if split > 1 else out
