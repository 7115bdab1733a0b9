"""fp8 weight-only linear: ``y = x @ (q * s).T (+ bias)`` with e4m3 weights and a fp32 scale per row.

Layout read (``numerics.quantize_float8(w, per_row=True)``):

    qdata  float8_e4m3fn (N, K), row-major (K contiguous), q = clamp(w / s, -448, 448)
    scale  float32 (N,),  s = max(amax_row / 448, tiny)

Every e4m3 value is exact in bf16 and fp16, so a weight tile converted to x's dtype is exact and the
row scale is applied once, in fp32, in the epilogue (``acc * s[n] + bias[n]``). That is the int8
weight-only scheme with other codes, so this scheme runs the kernels, M buckets and config table of
``int8_weight_only.py`` (its ``_code_to_f32`` converts either code type): a CUDA-core GEMV at M = 1,
tensor-core tiles with the converted weight as wgmma's register A operand (``swap_ab``) above, K
splits where the tiles alone cannot fill the GPU, and at large M the weight dequantized to x.dtype
once, then cuBLAS (the ``dequant`` path). With bf16 x the M <= 16 tiles convert e4m3 -> bf16 with a
bit trick in inline PTX (``int8_weight_only._E4M3_TO_BF16_ASM``) instead of the hardware conversions.
The config table and its reasons are in ``int8_weight_only.py``; the timings for these codes come from
``python -m benchmarks.sweep --families fp8wo``.
"""

from __future__ import annotations

import torch

from aofx.kernels import bucket_m
from aofx.kernels import int8_weight_only as int8

__all__ = ["select_config", "linear"]


def select_config(M: int, N: int, K: int) -> int8.KernelConfig:
    """The int8 weight-only table's config for (M, N, K), per-row scales."""
    return int8.select_config(M, N, K)


def prepare(name: str, x, qdata, scale, bias, per_tensor_scale_ok: bool) -> torch.Tensor | None:
    """Check an fp8 launcher's arguments (clear errors; shared with the dynamic launcher).

    Returns the finished (M, N) output when there is nothing to compute (M, N or K is 0), else None.
    """
    M, N, K = int8.check_linear_args(name, x, qdata, scale, bias, scale_dims=(), codes=torch.float8_e4m3fn)
    shapes = ((), (N,)) if per_tensor_scale_ok else ((N,),)
    if scale.dtype != torch.float32 or tuple(scale.shape) not in shapes:
        allowed = f"() or ({N},)" if per_tensor_scale_ok else f"({N},)"
        raise ValueError(f"{name}: scale must be float32 of shape {allowed}, got {scale.dtype} {tuple(scale.shape)}")
    if M and N and K:
        return None
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    return out.copy_(bias.expand(M, N)) if bias is not None and K == 0 else out.zero_()


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: int8.KernelConfig | None = None) -> torch.Tensor:
    """``x (M, K) @ (qdata * scale[:, None]).T (+ bias)`` -> (M, N) in x.dtype.

    ``config`` (an ``int8_weight_only.KernelConfig``) overrides the M-bucket choice (tests, tuning).
    """
    name = "float8_weight_only.linear"
    done = prepare(name, x, qdata, scale, bias, per_tensor_scale_ok=False)
    if done is not None:
        return done
    cfg = config if config is not None else select_config(bucket_m(x.shape[0]), qdata.shape[0], x.shape[1])
    return int8.launch(name, x, qdata, scale, bias, cfg)
