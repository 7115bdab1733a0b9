"""fp8 dynamic-activation x fp8-weight linear: x is quantized to e4m3 at run time, then an fp8 GEMM.

Layout read (``numerics.quantize_float8``):

    qdata  float8_e4m3fn (N, K), row-major (K contiguous)
    scale  float32 () per tensor, or (N,) per row;  s_w = max(amax / 448, tiny)

Math (``numerics.float8_dynamic_activation_float8_weight_linear``): the activation scale is
``s_x = max(amax / 448, tiny)`` with amax per row (per token) or over all of x,
``xq = e4m3(clamp(x / s_x, -448, 448))``, ``acc = xq @ qdata.T`` (fp8 tensor cores, fp32
accumulate) and ``y = acc * s_x * s_w (+ bias)`` in fp32 in the epilogue, cast to x.dtype.

Hopper fp8 wgmma needs K-major operands. The GEMM loads the weight tile as [BLOCK_K, BLOCK_N], the
transposed (K-major) view of the (N, K) row-major weight, as the B operand; with ``swap_ab`` it is
the [BLOCK_N, BLOCK_K] A operand, K-major as stored.

Kernels and M buckets (``select_config``; plain Python ``if`` on M, Inductor ignores autotune keys):

    ``_fp8dq_gemm_kernel`` with QUANTIZE_X=True ("fused"): x is read in x.dtype and quantized tile
        by tile inside the main loop. Per row, a first loop over K computes the row amax inside the
        GEMM kernel; per tensor, ``_fp8_tensor_amax_kernel`` (atomic_max into a zeroed fp32
        scalar) runs first. Used for M <= 16: x is tiny and stays in L2, so one launch is best.
        The on-the-fly quantization multiplies by 1/s_x (one reciprocal per row): it can differ
        from the reference's ``x / s_x`` by one e4m3 step only when x/s_x lies within one fp32 ulp
        of a rounding midpoint.
    ``_fp8_quantize_kernel`` + ``_fp8dq_gemm_kernel`` with QUANTIZE_X=False ("prequant"): for
        M > 16 a separate, memory-bound kernel writes xq (M, K) e4m3 and s_x once (exact
        ``x / s_x``). Fusing would redo the row-amax pass and the convert of every x tile in each
        of the N / BLOCK_N column programs (cdiv(N, BLOCK_N) x M x K x 2 bytes through L2 and the
        ALUs, e.g. 112 x 8 MB at M=1024) and would keep the A operand off the pure
        shared-memory fp8 wgmma path; the extra kernel costs M x K x 3 bytes of traffic and a launch.

MMA shape: Hopper's fp8 wgmma needs 64 rows on the A side; a tl.dot with BLOCK_M < 64 falls back
to mma.sync, which Triton 3.8 upcasts to fp16 (a convert of every weight). ``swap_ab`` computes
``(w @ xq^T)^T`` instead, so the weight tile is the 64-row side (m64nBLOCK_Mk32, checked in the
sm_90 PTX); the M <= 16 and M <= 64 buckets use it.

Accumulation: Hopper fp8 wgmma accumulates in reduced precision. ``fast_accum=False`` (default)
promotes the partial sums into the fp32 accumulator once per BLOCK_K (``max_num_imprecise_acc``),
like DeepSeek-V3's promotion interval of 128; ``fast_accum=True`` lets the hardware accumulate
over all of K (torch._scaled_mm's use_fast_accum); the largest-M bucket uses it, for 128x256 tiles.

Weights are loaded ``evict_first``, activations ``evict_last``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from aofx.kernels import bucket_m, grid_order
from aofx.kernels.float8_weight_only import prepare

__all__ = ["Fp8DynamicConfig", "select_config", "linear"]

FP8_MAX = tl.constexpr(448.0)
TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # 2**-126, exact in fp32


# ---------------------------------------------------------------- kernels

@triton.jit
def _fp8_tensor_amax_kernel(
    # pointers
    x_ptr, amax_ptr,
    # dimensions
    M, K,
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """amax_ptr[0] = max(amax_ptr[0], max |x[rows of this program, :]|); amax_ptr starts at 0."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = (offs_m[:, None] < M) & ((k0 + offs_k)[None, :] < K)
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        x_ptrs += BLOCK_K * stride_xk
    # |x| >= 0, so the fp32 atomic max is exact and order-independent
    tl.atomic_max(amax_ptr, tl.max(tl.max(amax, axis=1), axis=0))


@triton.jit
def _fp8_quantize_kernel(
    # pointers
    x_ptr, xq_ptr, x_scale_ptr, amax_ptr,
    # dimensions
    M, K,
    # strides
    stride_xm, stride_xk, stride_qm,
    # meta-parameters
    ACT_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xq = e4m3(clamp(x / s_x)); per row also writes s_x (M,), per tensor reads amax_ptr[0]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if ACT_PER_ROW:
        amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = mask_m[:, None] & ((k0 + offs_k)[None, :] < K)
            x = tl.load(x_ptrs + k0 * stride_xk, mask=mask, other=0.0, eviction_policy="evict_last")
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), FP8_MAX), TINY)  # (BLOCK_M,)
        tl.store(x_scale_ptr + offs_m, s, mask=mask_m)
        s = s[:, None]
    else:
        s = tl.maximum(tl.math.div_rn(tl.load(amax_ptr), FP8_MAX), TINY)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & ((k0 + offs_k)[None, :] < K)
        x = tl.load(x_ptrs + k0 * stride_xk, mask=mask, other=0.0, eviction_policy="evict_first")
        xq = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), s), -FP8_MAX), FP8_MAX)
        q_ptrs = xq_ptr + offs_m[:, None] * stride_qm + (k0 + offs_k)[None, :]
        tl.store(q_ptrs, xq.to(xq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8dq_gemm_kernel(
    # pointers
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    # dimensions
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    QUANTIZE_X: tl.constexpr,  # True: x_ptr is bf16/fp16 x, quantized here; False: e4m3 xq
    ACT_PER_ROW: tl.constexpr,  # per row: x_scale_ptr is s_x (M,) when not QUANTIZE_X; per tensor: amax (1,)
    W_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FAST_ACCUM: tl.constexpr,
    SWAP_AB: tl.constexpr,  # compute (w @ xq^T)^T: the weight tile is the MMA's M side
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grid_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap rows/columns past the edge onto valid ones (stores are masked): loads need no M/N mask.
    rows_x = offs_m % M
    rows_w = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    # (BLOCK_K, BLOCK_N): the K-major (transposed) view of the (N, K) weight, as fp8 wgmma wants
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rows_w[None, :] * stride_wn

    # activation scale s_x: (BLOCK_M, 1) per row or a scalar per tensor
    if ACT_PER_ROW:
        if QUANTIZE_X:
            # prologue: row amax over all of K (this program's x rows stay in L2 for the main loop)
            amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_K:
                    x = tl.load(x_ptrs + k0 * stride_xk, eviction_policy="evict_last")
                else:
                    mask_k = (k0 + offs_k) < K
                    x = tl.load(x_ptrs + k0 * stride_xk, mask=mask_k[None, :], other=0.0,
                                eviction_policy="evict_last")
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            s_x = tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), FP8_MAX), TINY)[:, None]
        else:
            s_x = tl.load(x_scale_ptr + rows_x)[:, None]
    else:
        s_x = tl.maximum(tl.math.div_rn(tl.load(x_scale_ptr), FP8_MAX), TINY)
    if QUANTIZE_X:
        inv_s_x = tl.math.div_rn(tl.full(s_x.shape, 1.0, tl.float32), s_x)

    if SWAP_AB:
        # acc^T (BLOCK_N, BLOCK_M) = w (BLOCK_N, BLOCK_K) @ xq^T (BLOCK_K, BLOCK_M): for small M the
        # weight fills the 64-row side of a native fp8 wgmma (m64nBLOCK_Mk32) instead of an
        # mma.sync that Triton would upcast to fp16.
        w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, eviction_policy="evict_last")
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0, eviction_policy="evict_last")
            if SWAP_AB:
                w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0, eviction_policy="evict_first")
        if QUANTIZE_X:
            x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_s_x, -FP8_MAX), FP8_MAX).to(w.dtype)
        if SWAP_AB:
            if FAST_ACCUM:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
        else:
            if FAST_ACCUM:
                acc = tl.dot(x, w, acc)
            else:
                acc = tl.dot(x, w, acc, max_num_imprecise_acc=BLOCK_K)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if SWAP_AB:
        acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N)

    # epilogue: acc * s_x * s_w (+ bias) in fp32, cast
    if W_PER_ROW:
        s_w = tl.load(w_scale_ptr + rows_w)[None, :]
    else:
        s_w = tl.load(w_scale_ptr)
    y = acc * s_x * s_w
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_w).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Fp8DynamicConfig:
    """One launch configuration.

    ``fused_quant``: quantize x inside the GEMM (True) or in ``_fp8_quantize_kernel`` first.
    ``swap_ab``: compute ``(w @ xq^T)^T`` so the weight tile is the MMA's 64-row side (small M).
    ``fast_accum``: let fp8 wgmma accumulate all of K in its reduced-precision accumulator.
    ``QUANT_BLOCK_M/K``: tiles of the amax / quantize kernels.
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    fused_quant: bool = False
    fast_accum: bool = False
    swap_ab: bool = False
    QUANT_BLOCK_M: int = 4
    QUANT_BLOCK_K: int = 1024

    def __post_init__(self):
        # fp8 tl.dot: K of one MMA is 32; M and N need at least 16
        if self.BLOCK_M < 16 or self.BLOCK_N < 16 or self.BLOCK_K < 32:
            raise ValueError(f"fp8 tl.dot needs BLOCK_M, BLOCK_N >= 16 and BLOCK_K >= 32, got {self}")


# (max M of the bucket, config). Measured on H100 (CUDA-graph stacks, per-row x and w):
#   M<=16: fused quantization (a separate quantize kernel costs 14 us more at M=1: one program per
#       4 rows walks all of K);
#   M=1024: 128x256x128 with fast_accum 112 us (14336x4096) / 119 us (4096x14336), against 153 / 198
#       for 128x128x128 with the per-BLOCK_K promotion, whose second accumulator rules out 128x256.
#       fast_accum keeps SQNR >= 40 dB against the fp32-accumulated reference
#       (test_cuda_fast_accum_sqnr; 48 dB measured at K=14336), far above the fp8dq floor.
CONFIGS: tuple[tuple[float, Fp8DynamicConfig], ...] = (
    (16, Fp8DynamicConfig(16, 64, 256, num_warps=4, num_stages=4, fused_quant=True, swap_ab=True)),
    (64, Fp8DynamicConfig(64, 128, 128, num_warps=4, num_stages=4, swap_ab=True)),
    (256, Fp8DynamicConfig(128, 128, 128, num_warps=8, num_stages=4)),
    (float("inf"), Fp8DynamicConfig(128, 256, 128, num_warps=8, num_stages=3, fast_accum=True, QUANT_BLOCK_M=8)),
)

# Narrow layers (N < NARROW_N): smaller column tiles so that N=4096 still fills the GPU. Measured on
# H100, 4096 x 14336: M=128 62 us (128x128 tiles: 84 us).
NARROW_N = 8192
NARROW_CONFIGS: dict[float, Fp8DynamicConfig] = {
    64: Fp8DynamicConfig(64, 64, 256, num_warps=4, num_stages=3, swap_ab=True),
    256: Fp8DynamicConfig(64, 64, 256, num_warps=4, num_stages=3, swap_ab=True),
}


def _prune(cfg: Fp8DynamicConfig, N: int, K: int) -> Fp8DynamicConfig:
    """Shrink blocks that exceed the weight (tiny N or K) so no program is mostly padding.

    Only the static weight dims are used: M is dynamic under torch.compile / export, and the bucket
    comparisons in ``select_config`` are the only guards it may get.
    """
    bn = max(16, min(cfg.BLOCK_N, triton.next_power_of_2(N)))
    bk = max(32, min(cfg.BLOCK_K, triton.next_power_of_2(K)))
    qbk = max(16, min(cfg.QUANT_BLOCK_K, triton.next_power_of_2(K)))
    return dataclasses.replace(cfg, BLOCK_N=bn, BLOCK_K=bk, QUANT_BLOCK_K=qbk)


def select_config(M: int, N: int, K: int, activation_per_row: bool = True) -> Fp8DynamicConfig:
    """The config of M's bucket, pruned for (N, K). Per row and per tensor share the table."""
    for max_m, cfg in CONFIGS:
        if M <= max_m:
            if N < NARROW_N:
                cfg = NARROW_CONFIGS.get(max_m, cfg)
            return _prune(cfg, N, K)
    raise AssertionError("unreachable: the last bucket is unbounded")


# ---------------------------------------------------------------- launcher

def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, activation_per_row: bool,
           bias: torch.Tensor | None = None, *, config: Fp8DynamicConfig | None = None) -> torch.Tensor:
    """Dynamic fp8 quantization of x (M, K) per row or per tensor, then ``xq @ qdata.T`` scaled.

    Returns (M, N) in x.dtype. ``config`` overrides the M-bucket choice (tests force each path).
    """
    x, qdata, scale, bias, out = prepare(x, qdata, scale, bias, per_tensor_scale_ok=True)
    (M, K), N = x.shape, qdata.shape[0]
    activation_per_row = bool(activation_per_row)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()

    cfg = config if config is not None else select_config(bucket_m(M), N, K, activation_per_row)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale  # any valid pointer; never read when HAS_BIAS is False

    amax = None
    if not activation_per_row:
        amax = torch.zeros((1,), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(M, cfg.QUANT_BLOCK_M),)
        torch.library.wrap_triton(_fp8_tensor_amax_kernel)[grid](
            x, amax,
            M, K,
            x.stride(0), x.stride(1),
            BLOCK_M=cfg.QUANT_BLOCK_M, BLOCK_K=cfg.QUANT_BLOCK_K,
        )

    if cfg.fused_quant:
        a, a_scale = x, (scale if amax is None else amax)  # per row: a_scale unused (computed in-kernel)
    else:
        a = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
        x_scale = torch.empty((M,), dtype=torch.float32, device=x.device) if activation_per_row else amax
        grid = (triton.cdiv(M, cfg.QUANT_BLOCK_M),)
        torch.library.wrap_triton(_fp8_quantize_kernel)[grid](
            x, a, x_scale, x_scale,
            M, K,
            x.stride(0), x.stride(1), a.stride(0),
            ACT_PER_ROW=activation_per_row, BLOCK_M=cfg.QUANT_BLOCK_M, BLOCK_K=cfg.QUANT_BLOCK_K,
        )
        a_scale = x_scale

    grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
    torch.library.wrap_triton(_fp8dq_gemm_kernel)[grid](
        a, qdata, a_scale, scale, bias_arg, out,
        M, N, K,
        a.stride(0), a.stride(1), qdata.stride(0), qdata.stride(1), out.stride(0), out.stride(1),
        QUANTIZE_X=cfg.fused_quant, ACT_PER_ROW=activation_per_row, W_PER_ROW=scale.dim() == 1,
        HAS_BIAS=has_bias, EVEN_K=K % cfg.BLOCK_K == 0, FAST_ACCUM=cfg.fast_accum,
        SWAP_AB=cfg.swap_ab, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
