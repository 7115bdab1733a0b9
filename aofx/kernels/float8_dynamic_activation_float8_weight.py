"""fp8 dynamic-activation x fp8-weight linear: x is quantized to e4m3 at run time, then an fp8 GEMM.

Layout read (``numerics.quantize_float8``):

    qdata  float8_e4m3fn (N, K), row-major (K contiguous)
    scale  float32 () per tensor, or (N,) per row;  s_w = max(amax / 448, tiny)

Math (``numerics.float8_dynamic_activation_float8_weight_linear``): the activation scale is
``s_x = max(amax / 448, tiny)`` with amax per row (per token) or over all of x,
``xq = e4m3(clamp(x / s_x, -448, 448))``, ``acc = xq @ qdata.T`` (fp32 accumulate) and
``y = acc * s_x * s_w (+ bias)`` in fp32 in the epilogue, cast to x.dtype.

This is the int8 dynamic scheme with e4m3 codes and 448 for 127, so it runs those kernels (both
files' kernels take either code type; e4m3 products accumulate in fp32 on the fp8 tensor cores):
at M = 1 with K <= 4096, that file's ``fused_gemv`` kernel quantizes x and runs the CUDA-core GEMV in
one launch; otherwise its per-token kernel writes xq (an exact IEEE ``x / s_x``) and s_x, then at M = 1
``int8_weight_only``'s CUDA-core GEMV reads the codes, and at M > 1 the tensor-core GEMM runs with
that file's M buckets, ``swap_ab`` and K splits. Per tensor (M > 1):
``amax_partials`` writes 256 partial maxima of |x| (exact; no memset or atomics), every program of the
per-token kernel reduces them to max |x| and quantizes its rows with it; at M = 1 the tensor's amax is
the row's. (The partials kernel replaces torch's ``vector_norm``, which was slower at M = 16 and 128.)

Hopper fp8 wgmma accumulates in reduced precision over all of K (Triton's default on sm_90, like
torch._scaled_mm's use_fast_accum); ``test_cuda_fast_accum_sqnr`` holds it above 40 dB against the
fp32-accumulated reference. The configs are the int8 dynamic file's, tuned for both code types there; their
evidence: ``python -m benchmarks.sweep --families fp8dq`` (with a ``scaled_mm`` row from M = 128 on).
"""

from __future__ import annotations

import torch

from aofx.kernels import bucket_m
from aofx.kernels import int8_dynamic_activation_int8_weight as int8dq
from aofx.kernels import int8_weight_only as int8wo
from aofx.kernels.float8_weight_only import prepare

__all__ = ["select_config", "linear"]


def select_config(M: int, N: int, K: int) -> int8wo.KernelConfig:
    """The int8 dynamic scheme's config for (M, N, K): the GEMV at M = 1, else its tensor-core table."""
    return int8dq.select_config(M, N, K, fp8=True)


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, activation_per_row: bool,
           bias: torch.Tensor | None = None, *, config: int8wo.KernelConfig | None = None) -> torch.Tensor:
    """Dynamic fp8 quantization of x (M, K) per row or per tensor, then ``xq @ qdata.T`` scaled.

    Returns (M, N) in x.dtype. ``config`` (a ``KernelConfig`` with path "gemv", "quantized" or
    "fused") overrides the M-bucket choice; per tensor, M > 1 needs "quantized".
    """
    name = "float8_dynamic_activation_float8_weight.linear"
    done = prepare(name, x, qdata, scale, bias, per_tensor_scale_ok=True)
    if done is not None:
        return done
    cfg = config if config is not None else select_config(bucket_m(x.shape[0]), qdata.shape[0], x.shape[1])
    # per tensor: partial maxima of |x| (one kernel), whose max every row is then quantized with (the gemv
    # path has one row, whose own amax that is)
    per_row = activation_per_row or cfg.path in int8dq.ONE_ROW_PATHS
    x_amax = None if per_row else int8dq.amax_partials(x)
    return int8dq.launch(name, x, qdata, scale, bias, cfg, x_amax=x_amax)
