"""fp8 weight-only linear: ``y = x @ (q * s).T (+ bias)`` with e4m3 weights and a fp32 scale per row.

Layout read (``numerics.quantize_float8(w, per_row=True)``):

    qdata  float8_e4m3fn (N, K), row-major (K contiguous), q = clamp(w / s, -448, 448)
    scale  float32 (N,),  s = max(amax_row / 448, tiny)

Every e4m3 value is exact in bf16 and fp16, so the weight tile is converted to x's dtype without
error and the row scale is applied once, in fp32, in the epilogue (``acc * s[n] + bias[n]``).

Kernel paths, chosen per M bucket by ``select_config`` (plain Python ``if``: Inductor ignores
``triton.autotune`` keys for user kernels):

    M <= 1       ``gemv``: CUDA-core GEMV, one x row per program along grid axis 1, a
                 [BLOCK_N, BLOCK_K] fp32 partial-product tile reduced once after the K loop. No
                 split-K (it would need a zeroed fp32 output plus a cast kernel); small BLOCK_N
                 gives enough programs instead (N=4096 -> 256..512 programs).
    M <= 16      ``dot`` with BLOCK_M=16: memory-bound; BLOCK_N=64 keeps the re-read of the x
                 tile from L2 (2*M/BLOCK_N of the weight bytes) small.
    M <= 64 / <= 256 / larger
                 ``dot`` tensor-core tiles, the e4m3 weight tile converted to x.dtype in the main
                 loop, grouped program order for L2 reuse.

``swap_ab`` (all ``dot`` buckets by default): compute ``(w @ x^T)^T``. The converted weight tile is
then the A operand of Hopper's wgmma, which reads A from registers, so the dequantized tile makes
no round trip through shared memory, and small M becomes the wgmma N side (m64n16k16) instead of
an mma.sync fallback (both checked in the sm_90 PTX). Without it, the weight tile is loaded as
[BLOCK_K, BLOCK_N], the K-major view of the (N, K) weight, as the B operand.

Weights are loaded ``evict_first`` (streamed once), activations ``evict_last`` (re-read by every
column block).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from aofx.kernels import bucket_m, grid_order

__all__ = ["Fp8WeightOnlyConfig", "select_config", "linear"]


# ---------------------------------------------------------------- kernels

@triton.jit
def _fp8wo_gemv_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    # dimensions
    N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # Clamp out-of-range rows to row 0 instead of masking: the K loads stay unmasked along N.
    rows = tl.where(mask_n, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + m * stride_xm + offs_k * stride_xk  # (BLOCK_K,)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BLOCK_N, BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, eviction_policy="evict_last")
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k, other=0.0, eviction_policy="evict_last")
            w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: one reduction, row scale and bias in fp32, cast
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + rows)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n * stride_on, y.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _fp8wo_gemm_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    # dimensions
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grid_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap rows/columns past the edge onto valid ones (stores are masked): loads need no M/N mask.
    rows_x = offs_m % M
    rows_w = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        # acc^T (BLOCK_N, BLOCK_M) = w (BLOCK_N, BLOCK_K) @ x^T (BLOCK_K, BLOCK_M): the converted
        # weight tile is the A operand, which Hopper wgmma can read from registers (no shared-memory
        # round trip for the dequantized tile); x^T is the K-major view of x.
        w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :] * stride_wk
        x_ptrs = x_ptr + offs_k[:, None] * stride_xk + rows_x[None, :] * stride_xm
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, eviction_policy="evict_last")
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                mask_k = (k0 + offs_k) < K
                x = tl.load(x_ptrs, mask=mask_k[:, None], other=0.0, eviction_policy="evict_last")
                w = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0, eviction_policy="evict_first")
            acc = tl.dot(w.to(x.dtype), x, acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        y = acc * tl.load(scale_ptr + rows_w)[:, None]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_w).to(tl.float32)[:, None]
        out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_m[None, :] * stride_om
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
        # (BLOCK_K, BLOCK_N): the K-major (transposed) view of the (N, K) row-major weight
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rows_w[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, eviction_policy="evict_last")
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                mask_k = (k0 + offs_k) < K
                x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0, eviction_policy="evict_last")
                w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0, eviction_policy="evict_first")
            # e4m3 -> x.dtype is exact; the row scale waits for the epilogue
            acc = tl.dot(x, w.to(x.dtype), acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        # epilogue: row scale and bias in fp32, cast
        y = acc * tl.load(scale_ptr + rows_w)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_w).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Fp8WeightOnlyConfig:
    """One launch configuration. ``kind`` is ``"gemv"`` (CUDA cores, BLOCK_M unused) or ``"dot"``."""

    kind: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False  # "dot" only: compute (w @ x^T)^T, the weight tile as the A operand

    def __post_init__(self):
        if self.kind not in ("gemv", "dot"):
            raise ValueError(f"Fp8WeightOnlyConfig.kind must be 'gemv' or 'dot', got {self.kind!r}")
        if self.kind == "dot" and (self.BLOCK_M < 16 or self.BLOCK_N < 16 or self.BLOCK_K < 16):
            raise ValueError(f"tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16, got {self}")


# (max M of the bucket, config). Measured on H100 (CUDA-graph stacks, N x K = 14336 x 4096):
# M=16 36 us, M=128 58 us, M=1024 219 us.
CONFIGS: tuple[tuple[float, Fp8WeightOnlyConfig], ...] = (
    (1, Fp8WeightOnlyConfig("gemv", 1, 16, 512, num_warps=4, num_stages=4)),
    (16, Fp8WeightOnlyConfig("dot", 16, 64, 256, num_warps=4, num_stages=4, swap_ab=True)),
    (64, Fp8WeightOnlyConfig("dot", 64, 128, 128, num_warps=4, num_stages=4, swap_ab=True)),
    (256, Fp8WeightOnlyConfig("dot", 128, 128, 128, num_warps=8, num_stages=4, swap_ab=True)),
    (float("inf"), Fp8WeightOnlyConfig("dot", 256, 128, 64, num_warps=8, num_stages=3, swap_ab=True)),
)

# Narrow layers (N < NARROW_N): the tiles above leave most SMs idle (N=4096 with BLOCK_N=128 is 32
# column blocks), so these buckets use smaller column tiles. Measured on H100, N x K = 4096 x 14336:
# M=16 51 us (64-wide tiles: 65 us), M=128 70 us (128x128 tiles: 190 us).
NARROW_N = 8192
NARROW_CONFIGS: dict[float, Fp8WeightOnlyConfig] = {
    16: Fp8WeightOnlyConfig("dot", 16, 32, 256, num_warps=4, num_stages=4, swap_ab=True),
    64: Fp8WeightOnlyConfig("dot", 64, 64, 256, num_warps=4, num_stages=3, swap_ab=True),
    256: Fp8WeightOnlyConfig("dot", 64, 64, 256, num_warps=4, num_stages=3, swap_ab=True),
}


def _prune(cfg: Fp8WeightOnlyConfig, N: int, K: int) -> Fp8WeightOnlyConfig:
    """Shrink blocks that exceed the weight (tiny N or K) so no program is mostly padding.

    Only the static weight dims are used: M is dynamic under torch.compile / export, and the bucket
    comparisons in ``select_config`` are the only guards it may get.
    """
    bn = max(16, min(cfg.BLOCK_N, triton.next_power_of_2(N)))
    bk = max(16, min(cfg.BLOCK_K, triton.next_power_of_2(K)))
    return dataclasses.replace(cfg, BLOCK_N=bn, BLOCK_K=bk)


def select_config(M: int, N: int, K: int) -> Fp8WeightOnlyConfig:
    """The config of M's bucket, pruned for (N, K)."""
    for max_m, cfg in CONFIGS:
        if M <= max_m:
            if N < NARROW_N:
                cfg = NARROW_CONFIGS.get(max_m, cfg)
            return _prune(cfg, N, K)
    raise AssertionError("unreachable: the last bucket is unbounded")


# ---------------------------------------------------------------- launcher

def prepare(x, qdata, scale, bias, per_tensor_scale_ok: bool):
    """Check an fp8 launcher's arguments (clear errors), make the K axes contiguous, allocate the output.

    Shared with ``float8_dynamic_activation_float8_weight.py``. Returns ``(x, qdata, scale, bias, out)``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype}")
    if qdata.dtype != torch.float8_e4m3fn or qdata.dim() != 2:
        raise TypeError(f"qdata must be 2-D float8_e4m3fn (N, K), got {qdata.dtype} {tuple(qdata.shape)}")
    M, K = x.shape
    N = qdata.shape[0]
    if qdata.shape[1] != K:
        raise ValueError(f"x has K={K} but qdata is {tuple(qdata.shape)} (expected (N, {K}))")
    shapes = ((), (N,)) if per_tensor_scale_ok else ((N,),)
    if scale.dtype != torch.float32 or tuple(scale.shape) not in shapes:
        allowed = f"() or ({N},)" if per_tensor_scale_ok else f"({N},)"
        raise ValueError(f"scale must be float32 of shape {allowed}, got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if qdata.stride(1) != 1:
        qdata = qdata.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()  # the only copy: K must be the contiguous axis for vector loads
    bias = bias.contiguous() if bias is not None else None
    return x, qdata, scale.contiguous(), bias, torch.empty((M, N), dtype=x.dtype, device=x.device)


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: Fp8WeightOnlyConfig | None = None) -> torch.Tensor:
    """``x (M, K) @ (qdata * scale[:, None]).T (+ bias)`` -> (M, N) in x.dtype.

    ``config`` overrides the M-bucket choice (tests use it to force each kernel path).
    """
    x, qdata, scale, bias, out = prepare(x, qdata, scale, bias, per_tensor_scale_ok=False)
    (M, K), N = x.shape, qdata.shape[0]
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()

    cfg = config if config is not None else select_config(bucket_m(M), N, K)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale  # any valid pointer; never read when HAS_BIAS is False
    even_k = K % cfg.BLOCK_K == 0
    if cfg.kind == "gemv":
        grid = (triton.cdiv(N, cfg.BLOCK_N), M)
        torch.library.wrap_triton(_fp8wo_gemv_kernel)[grid](
            x, qdata, scale, bias_arg, out,
            N, K,
            x.stride(0), x.stride(1), qdata.stride(0), qdata.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=has_bias, EVEN_K=even_k,
            BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        grid = (triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N),)
        torch.library.wrap_triton(_fp8wo_gemm_kernel)[grid](
            x, qdata, scale, bias_arg, out,
            M, N, K,
            x.stride(0), x.stride(1), qdata.stride(0), qdata.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=has_bias, EVEN_K=even_k, SWAP_AB=cfg.swap_ab,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out
