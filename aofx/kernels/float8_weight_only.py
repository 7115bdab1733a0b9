"""fp8 weight-only linear: ``y = x @ (q * s).T (+ bias)`` with e4m3 weights and a fp32 scale per row.

Layout read (``numerics.quantize_float8(w, per_row=True)``):

    qdata  float8_e4m3fn (N, K), row-major (K contiguous), q = clamp(w / s, -448, 448)
    scale  float32 (N,),  s = max(amax_row / 448, tiny)

Every e4m3 value is exact in bf16 and fp16, so a weight tile converted to x's dtype is exact and the
row scale is applied once, in fp32, in the epilogue (``acc * s[n] + bias[n]``). That is the int8
weight-only scheme with other codes, so this scheme runs that scheme's paths and config table
(``int8_weight_only.select_config``): the CUDA-core GEMV at M = 1, tensor-core tiles above, and at large M
the weight dequantized once, then cuBLAS. With bf16 x the M <= 16 tiles convert e4m3 -> bf16 with
``ptx.E4M3_TO_BF16``. Tuning evidence: benchmarks/results/tuning/fp8wo.json
(`python -m benchmarks.sweep --families fp8wo`).
"""

from __future__ import annotations

import torch

from aofx.kernels import int8_weight_only as int8wo
from aofx.kernels.common import (
    KernelConfig,
    by_m,
    check_linear_args,
    check_scale,
    empty_result,
)

__all__ = ["linear", "select_config"]


def select_config(M: int, N: int, K: int, device: torch.device | None = None) -> KernelConfig:
    """The int8 weight-only table's config for (M, N, K), per-row scales."""
    return int8wo.select_config(M, N, K, 0, device)


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: KernelConfig | None = None) -> torch.Tensor:
    """``x (M, K) @ (qdata * scale[:, None]).T (+ bias)`` -> (M, N) in x.dtype.

    ``config`` overrides the M-bucket choice (tests, tuning).
    """
    name = "float8_weight_only.linear"
    M, N, K = check_linear_args(name, x, qdata, bias, torch.float8_e4m3fn)
    check_scale(name, "scale", scale, x, ((N,),), (torch.float32,))
    done = empty_result(x, M, N, K, bias)
    if done is not None:
        return done
    if config is not None:
        return int8wo.launch(name, x, qdata, scale, bias, config)
    return by_m(M, lambda m: select_config(m, N, K, x.device),
                lambda cfg, rows, *args: int8wo.launch(name, *args, cfg, rows=rows), x, qdata, scale, bias)
