"""Dequantize a whole weight to x's dtype, then one cuBLAS GEMM: the weight-only schemes at large M.

There the GEMM is compute bound and cuBLAS is faster than Triton GEMMs that dequantize inside their main
loop; the copy is one memory-bound pass (one read of the codes, one write of N x K elements), so its tile
shape matters little. Each kernel writes ``w`` exactly as the scheme's reference dequantizes it (fp32 math,
one rounding to x.dtype), so the GEMM sees the reference's weight. ``common.dequantize_first`` says when
a scheme may take this path (not while exporting, not for a copy over ``DEQUANTIZE_MAX_BYTES``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from aofx.kernels.common import KernelConfig, code_to_f32, launch_options

__all__ = ["codes_linear", "int4_linear"]


@triton.jit
def _codes_dequantize_kernel(
    # pointers
    w_ptr, s_ptr, out_ptr,
    # dimensions
    N, K,
    # strides (qdata and out are contiguous along K)
    stride_wn, stride_sn, stride_sg, stride_on,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
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
    w = code_to_f32(q) * s.to(tl.float32)  # (BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


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
    NUM_WARPS: tl.constexpr, NUM_STAGES: tl.constexpr,  # launch options, as constexprs: common.launch_options
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


def _linear(x, w, bias) -> torch.Tensor:
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def codes_linear(x, qdata, scale, bias, cfg: KernelConfig, group_size: int) -> torch.Tensor:
    """``F.linear(x, q * s, bias)`` for int8 or e4m3 codes (N, K), scale (N,) or (N, K // group_size)."""
    N, K = qdata.shape
    w = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K) in x.dtype
    torch.library.wrap_triton(_codes_dequantize_kernel)[(triton.cdiv(N, cfg.block_n), triton.cdiv(K, cfg.block_k))](
        qdata, scale, w,
        N, K,
        qdata.stride(0), scale.stride(0), scale.stride(1) if group_size else 0, w.stride(0),
        GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch_options(cfg),
    )
    return _linear(x, w, bias)


def int4_linear(x, qdata, scale, zero, bias, cfg: KernelConfig, group_size: int) -> torch.Tensor:
    """``F.linear(x, (q - 8) * s + z, bias)`` for packed int4 codes (N, K // 2); ``cfg.block_k`` is a multiple
    of group_size that divides K (whole groups a tile)."""
    N, K = qdata.shape[0], x.shape[1]
    w = torch.empty((N, K), dtype=x.dtype, device=x.device)  # (N, K) in x.dtype
    torch.library.wrap_triton(_int4_dequantize_kernel)[(triton.cdiv(N, cfg.block_n), K // cfg.block_k)](
        qdata, scale, zero, w,
        N,
        qdata.stride(0), scale.stride(0), scale.stride(1), w.stride(0),
        GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **launch_options(cfg),
    )
    return _linear(x, w, bias)
