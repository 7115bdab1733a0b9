"""fp8 dynamic-activation x fp8-weight linear: x is quantized to e4m3 at run time, then an fp8 GEMM.

Layout read (``numerics.quantize_float8``):

    qdata  float8_e4m3fn (N, K), row-major (K contiguous)
    scale  float32 () per tensor, or (N,) per row;  s_w = max(amax / 448, tiny)

Math (``numerics.float8_dynamic_activation_float8_weight_linear``): ``s_x = max(amax / 448, tiny)`` with
amax per row (per token) or over all of x, ``xq = e4m3(clamp(x / s_x, -448, 448))``, ``acc = xq @ qdata.T``
(fp32 accumulate) and ``y = acc * s_x * s_w (+ bias)`` in fp32 in the epilogue, cast to x.dtype.

This is the int8 dynamic scheme with e4m3 codes and 448 for 127, so it runs that scheme's paths and table
(``int8_dynamic_activation_int8_weight.select_config(..., fp8=True)``); from M = 129 on, with bf16 x and
N, K multiples of 16, that table's ``scaled_mm`` path runs ``torch._scaled_mm``. Per tensor (M > 1),
``quantize.amax_partials`` writes 256 partial maxima of |x| and every program of the per-token kernel
reduces them to max |x|; at M = 1 the tensor's amax is the row's. Hopper fp8 wgmma accumulates in reduced
precision over K (Triton's default on sm_90, like ``torch._scaled_mm``'s fast accumulation);
``test_cuda_fast_accum_sqnr`` holds it above 40 dB against the fp32-accumulated reference.
Tuning evidence: benchmarks/results/tuning/fp8dq.json (`python -m benchmarks.sweep --families fp8dq`).
"""

from __future__ import annotations

import torch

from aofx.kernels import int8_dynamic_activation_int8_weight as int8dq
from aofx.kernels import mm
from aofx.kernels.common import (
    KernelConfig,
    by_m,
    check_linear_args,
    check_scale,
    empty_result,
)
from aofx.kernels.quantize import amax_partials

__all__ = ["linear", "select_config"]


def select_config(M: int, N: int, K: int, device: torch.device | None = None, library: bool = True) -> KernelConfig:
    """The int8 dynamic scheme's config for (M, N, K) on e4m3 codes; ``library``: the call fits
    ``torch._scaled_mm`` (``mm.scaled_mm_fits``)."""
    return int8dq.select_config(M, N, K, fp8=True, device=device, library=library)


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, activation_per_row: bool,
           bias: torch.Tensor | None = None, *, config: KernelConfig | None = None) -> torch.Tensor:
    """Dynamic fp8 quantization of x (M, K) per row or per tensor, then ``xq @ qdata.T`` scaled.

    Returns (M, N) in x.dtype. ``config`` (path "gemv", "fused_gemv", "quantized" or, per row, "fused")
    overrides the M-bucket choice.
    """
    name = "float8_dynamic_activation_float8_weight.linear"
    M, N, K = check_linear_args(name, x, qdata, bias, torch.float8_e4m3fn)
    check_scale(name, "scale", scale, x, ((), (N,)), (torch.float32,))
    done = empty_result(x, M, N, K, bias)
    if done is not None:
        return done

    def run(cfg, rows, x, qdata, scale, bias):
        # per tensor: partial maxima of |x| (one kernel), whose max every row is then quantized with (an
        # M = 1 path has one row, whose own amax that is)
        per_row = activation_per_row or cfg.path in int8dq.ONE_ROW_PATHS
        return int8dq.launch(name, x, qdata, scale, bias, cfg, None if per_row else amax_partials(x), rows)

    if config is not None:
        return run(config, None, x, qdata, scale, bias)
    library = mm.scaled_mm_fits(x, qdata)
    return by_m(M, lambda m: select_config(m, N, K, x.device, library), run, x, qdata, scale, bias)
