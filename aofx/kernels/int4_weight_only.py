"""int4 weight-only linear: ``y = x @ w.T (+ bias)`` with ``w = (q - 8) * scale + zero`` per (row, group).

Layout read (``numerics.quantize_int4``):

    qdata  uint8 (N, K//2), row-major; byte j of row n = q[n, 2j] | q[n, 2j+1] << 4, q in [0, 15]
    scale  bf16 (N, K//group_size)
    zero   bf16 (N, K//group_size), the value of the group's midpoint code 8

group_size (read from the scale's shape) is one of ``numerics.GROUP_SIZES`` and divides K, so every group
starts on a byte boundary and a K tile that divides group_size never needs a K mask.

Paths, chosen per M bucket by ``select_config`` (plain Python ``if``: Inductor ignores ``triton.autotune``
keys for user kernels):

    M <= 2     ``gemv`` (``gemv.int4_gemv``): one program per (8 weight rows, x row) over all of K, a step
               of 512 codes a row (4 rows x 1024 codes where there are fewer than 1024 row tiles).
    M <= 16    ``mm`` (``mm.int4_mm``) 16-row tiles, ``swap_ab`` (the dequantized weight tile is the MMA's
               A operand), K split to fill the GPU. Memory bound.
    M <= 64    ``mm`` 64 x 128 tiles, ``swap_ab``, 4 warps, K split.
    M <= 256   ``mm`` 128 x 128 tiles, K split to fill the GPU.
    larger     ``dequant`` (``dequant.int4_linear``): the weight in x.dtype, then cuBLAS. Where that is not
               used (exporting, or a copy over DEQUANTIZE_MAX_BYTES): ``mm`` 256 x 128 tiles, no split.
Tuning evidence: benchmarks/results/tuning/, written by `python -m benchmarks.sweep --families int4`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from aofx.kernels import dequant, gemv, mm
from aofx.kernels.common import (
    KernelConfig,
    by_m,
    check_linear_args,
    check_scale,
    dequantize_first,
    empty_result,
    group_size_of,
    num_sms,
    split_k_for,
)

__all__ = ["CONFIGS", "linear", "select_config"]

# (largest M of the bucket, config); the first bucket with M <= bound wins, the last covers the rest.
#   M <= 2: one program walks all of K (stream-K and K splits were slower).
#   M <= 64: swap_ab tiles, x's few rows the narrow side; select_config splits K to fill the GPU.
#   M <= 256: 128 x 128 x 64 without swap_ab, 8 warps (swap_ab with a K split was once wrong here:
#       tests/kernels/test_regressions.py keeps that config under test).
CONFIGS = (
    (2, KernelConfig("gemv", block_n=8, block_k=512, num_warps=2, num_stages=3)),
    (16, KernelConfig("mm", block_m=16, block_n=128, block_k=128, swap_ab=True, num_warps=8, num_stages=3)),
    (64, KernelConfig("mm", block_m=64, block_n=128, block_k=64, swap_ab=True, num_warps=4, num_stages=4)),
    (256, KernelConfig("mm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)),
    (None, KernelConfig("dequant", block_n=16, block_k=256, num_warps=4)),
)
# the gemv for layers with fewer than _GEMV_WIDE_BELOW row tiles of 8 (N < 8192): fewer rows, longer steps
GEMV_WIDE = KernelConfig("gemv", block_n=4, block_k=1024, num_warps=2, num_stages=4)
_GEMV_WIDE_BELOW = 1024
# the largest bucket where ``dequant`` is not used (common.dequantize_first)
MM_LARGE = KernelConfig("mm", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3)
_MIN_STEPS_PER_SPLIT = 4  # K steps each split keeps, so a program amortizes its prologue and epilogue


def _fit(cfg: KernelConfig, K: int, group_size: int) -> KernelConfig:
    """``cfg`` with block_k fitted to the groups: ``mm`` steps within one group; ``dequant`` tiles of whole
    groups that divide K."""
    if cfg.path == "mm":
        return dataclasses.replace(cfg, block_k=min(cfg.block_k, group_size))
    if cfg.path == "dequant":
        return dataclasses.replace(cfg, block_k=max(min(cfg.block_k, K & -K), group_size))
    return cfg


def select_config(M: int, N: int, K: int, group_size: int, device: torch.device | None = None) -> KernelConfig:
    """The bucket's config, fitted to the groups, with the K split for this (M, N, K)."""
    cfg = next(c for bound, c in CONFIGS if bound is None or M <= bound)
    large = cfg.path == "dequant" and not dequantize_first(N, K)
    if large:
        cfg = MM_LARGE  # compute bound: no K split
    if cfg.path == "gemv" and triton.cdiv(N, cfg.block_n) < _GEMV_WIDE_BELOW:
        cfg = GEMV_WIDE
    cfg = _fit(cfg, K, group_size)
    if cfg.path == "mm" and not large:
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        split = split_k_for(tiles, K // cfg.block_k, num_sms(device), _MIN_STEPS_PER_SPLIT)
        cfg = dataclasses.replace(cfg, split_k=split)
    return cfg


def linear(x, qdata, scale, zero, bias=None, *, config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ dequantize_int4(qdata, scale, zero, group_size).T (+ bias)`` in x.dtype.

    x (M, K) bf16/fp16, any strides; qdata uint8 (N, K//2); scale, zero (N, K // group_size); bias (N,) or
    None. ``config`` overrides the M-bucket choice (tests, tuning); its block_k is fitted to the groups.
    """
    name = "int4_weight_only.linear"
    M, N, K = check_linear_args(name, x, qdata, bias, torch.uint8, codes_per_byte=2)
    check_scale(name, "scale", scale, x, ((N, None),))
    check_scale(name, "zero", zero, x, ((N, scale.shape[1]),))
    group_size = group_size_of(name, K, scale)
    done = empty_result(x, M, N, K, bias)
    if done is not None:
        return done
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()

    def launch(cfg, rows, x, qdata, scale, zero, bias):
        if cfg.split_k > 1 and cfg.path != "mm":
            raise ValueError(f"{name}: split_k is for 'mm', got split_k={cfg.split_k} for {cfg.path!r}")
        if cfg.path == "gemv":
            return gemv.int4_gemv(x, qdata, scale, zero, bias, cfg, group_size)
        if cfg.path == "mm":
            return mm.int4_mm(x, qdata, scale, zero, bias, cfg, group_size)
        if cfg.path == "dequant":
            return dequant.int4_linear(x, qdata, scale, zero, bias, cfg, group_size)
        raise ValueError(f"{name}: path {cfg.path!r} is not one of this scheme's: 'gemv', 'mm', 'dequant'")

    if config is not None:
        return launch(_fit(config, K, group_size), None, x, qdata, scale, zero, bias)
    return by_m(M, lambda m: select_config(m, N, K, group_size, x.device), launch, x, qdata, scale, zero, bias)
