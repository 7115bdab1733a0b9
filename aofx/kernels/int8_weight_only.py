"""int8 weight-only linear: ``y = x @ (q * s).T (+ bias)`` in x.dtype. This module picks the kernel.

Layout read (the one ``aofx.numerics.quantize_int8`` writes):
  qdata  int8 (N, K), row-major, contiguous along K (16-byte loads of 16 codes)
  scale  float (N,) per output row, or (N, K // group_size) per (row, group), group_size one of
         ``numerics.GROUP_SIZES`` (read from the scale's shape). A (N, 1) scale is treated as per row.
  bias   optional (N,), added in fp32 in the epilogue.
  x      (M, K) bf16 / fp16 with any row stride; y is (M, N) in x.dtype.

Paths and M buckets (``select_config``; the fp8 weight-only scheme runs the same table on e4m3 codes):
  M == 1       ``gemv`` (``gemv.codes_gemv``): CUDA cores; per-row scales take the row kernel (one row x 2048
               codes a step, or one masked step of next_power_of_2(K) codes for 8192 < K <= 16384), per-group
               scales the pipelined kernel (8 rows x 512 codes, 4 rows x 1024 when N < 2048).
  2 <= M <= 16 ``mm`` (``mm.codes_mm``) 16-row tiles, BLOCK_N narrowed until there are >= 128 programs (512-wide
               K tiles for long K), or 128-row weight tiles where those make one wave of 104 to SM-count
               programs (per-row scales, K < 8192); memory bound, mma.sync.
  M <= 128     ``mm`` 128 x 64, ``swap_ab``; M <= 256: 128 x 128, ``swap_ab``; up to M = 256 a shape with
               fewer than 128 tiles takes 128 x 128 tiles and splits K.
  larger       ``dequant`` (``dequant.codes_linear``) where M > 512, or M > 256 with fewer than 128 tiles of
               256 x 128; otherwise (and when exporting, or for a copy over DEQUANTIZE_MAX_BYTES) ``mm``
               256 x 128 x 64, 8 warps, ``swap_ab`` (compute bound).
Tuning evidence for every table below: benchmarks/results/tuning/, written by
`python -m benchmarks.sweep --families int8wo,fp8wo`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from aofx.kernels import dequant, gemv, mm
from aofx.kernels.common import (
    KernelConfig,
    by_m,
    check_one_row,
    check_linear_args,
    check_scale,
    dequantize_first,
    empty_result,
    group_size_of,
    num_sms,
    split_k_for,
)

__all__ = ["KernelConfig", "launch", "linear", "select_config"]

# (max M, config) per bucket, first match wins; select_config refines block_n / block_k / split_k per shape.
# From M = 17 on, swap_ab (the converted weight tile as wgmma's register A operand). M <= 16 is memory bound:
# once there are enough programs, the tile shape barely matters.
_MM_TABLE = (
    (16, KernelConfig("mm", block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)),
    (128, KernelConfig("mm", block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=3, swap_ab=True)),
    (256, KernelConfig("mm", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3, swap_ab=True)),
    (None, KernelConfig("mm", block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3, swap_ab=True)),
)
# gemv, per-group scales: 2 warps own 8 rows x 512 codes (16-byte cp.async per thread per row), 4 stages:
# small programs, many per SM, so that the reads of many rows are in flight at once.
_GEMV = KernelConfig("gemv", block_m=1, block_n=8, block_k=512, num_warps=2, num_stages=4)
# gemv, per-row scales: one row x 2048 codes a step, 4 warps, the loop unrolled (K a compile-time constant).
_GEMV_ROWS = KernelConfig("gemv", block_m=1, block_n=1, block_k=2048, num_warps=4, num_stages=1)
# Rows longer than 4 steps and at most this long are one masked step of next_power_of_2(K) codes.
_ROWS_ONE_STEP_MAX_K = 16384
# gemv where 8-row tiles are fewer than 2 * _MIN_PROGRAMS (N < 2048): 4 rows x 1024 codes, twice the programs.
_GEMV_NARROW = KernelConfig("gemv", block_m=1, block_n=4, block_k=1024, num_warps=2, num_stages=4)
_DEQUANT = KernelConfig("dequant", block_m=1, block_n=16, block_k=256, num_warps=2)
_LONG_K = 8192  # M <= 16: from this K on, 512-wide K tiles (fewer, longer programs need more bytes per stage)
_MIN_PROGRAMS = 128  # about one program per SM: below this, small-M configs narrow BLOCK_N, then split K
# M <= 16, K < _LONG_K, per-row scales: 128-row weight tiles where they make one wave of 104..SM-count programs
_WIDE_M16_BLOCK_N = 128
_WIDE_M16_PROGRAMS = 104
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (sm_90 allows 227 KB)


def select_config(M: int, N: int, K: int, group_size: int = 0, device: torch.device | None = None) -> KernelConfig:
    """The config for one call. M selects the bucket; N, K, group_size (static under compile) refine it."""
    if M == 1 and not group_size:
        if _GEMV_ROWS.block_k * 4 < K <= _ROWS_ONE_STEP_MAX_K:
            block_k = triton.next_power_of_2(K)
        else:
            block_k = min(_GEMV_ROWS.block_k, triton.next_power_of_2(K))
        split = split_k_for(N, triton.cdiv(K, block_k), _MIN_PROGRAMS)
        return dataclasses.replace(_GEMV_ROWS, block_k=block_k, split_k=split)
    if M == 1:
        cfg = _GEMV if triton.cdiv(N, _GEMV.block_n) >= 2 * _MIN_PROGRAMS else _GEMV_NARROW
        block_k = max(min(cfg.block_k, triton.next_power_of_2(K)), group_size)
        split = split_k_for(triton.cdiv(N, cfg.block_n), triton.cdiv(K, block_k), _MIN_PROGRAMS)
        return dataclasses.replace(cfg, block_k=block_k, split_k=split)
    cfg = next(c for max_m, c in _MM_TABLE if max_m is None or M <= max_m)
    if M > 256 and dequantize_first(N, K) and (
            M > 512 or triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) < _MIN_PROGRAMS):
        return _DEQUANT
    block_k = min(cfg.block_k, group_size) if group_size else cfg.block_k
    block_n = cfg.block_n
    num_stages = cfg.num_stages
    if block_k < cfg.block_k:
        # A short K tile (small groups) moves fewer bytes per stage: pipeline deeper, within shared memory.
        stage_bytes = cfg.block_m * block_k * 2 + cfg.block_n * block_k
        num_stages = max(cfg.num_stages, min(8, cfg.num_stages * cfg.block_k // block_k, _SMEM_BUDGET // stage_bytes))
    if M <= 16:
        wide = (K < _LONG_K and not group_size
                and _WIDE_M16_PROGRAMS <= triton.cdiv(N, _WIDE_M16_BLOCK_N) <= num_sms(device))
        if wide:
            block_n = _WIDE_M16_BLOCK_N  # one wave of wide tiles, K unsplit (a K split is slower here)
        else:
            # Memory bound: narrow the weight tile before splitting K, so no reduction kernel is needed.
            while block_n > 32 and triton.cdiv(N, block_n) < _MIN_PROGRAMS:
                block_n //= 2
        if block_k < 128:  # small groups force a short K tile: widen N to keep bytes in flight per stage
            block_n = max(block_n, 64)
        if K >= _LONG_K and not group_size:
            block_k = 512
        split_k = 1 if wide else split_k_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k), _MIN_PROGRAMS)
    elif M <= 256 and triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n) < _MIN_PROGRAMS and not group_size:
        # Few tiles (N = 4096: 64 programs at M = 128) leave SMs idle for a whole long K loop: split K,
        # with the larger 128 x 128 tile (faster than splitting the 128 x 64 tiles).
        cfg, block_n = _MM_TABLE[2][1], _MM_TABLE[2][1].block_n
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n)
        split_k = split_k_for(tiles, triton.cdiv(K, block_k), _MIN_PROGRAMS)
    else:
        split_k = 1
    return dataclasses.replace(cfg, block_n=block_n, block_k=block_k, split_k=split_k, num_stages=num_stages)


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
           *, config: KernelConfig | None = None) -> torch.Tensor:
    """``x @ (qdata * scale).T + bias`` for x (M, K) bf16/fp16; returns (M, N) in x.dtype.

    ``config`` forces a path / tile shape (tests and tuning); by default ``select_config`` picks it.
    """
    name = "int8_weight_only.linear"
    M, N, K = check_linear_args(name, x, qdata, bias, torch.int8)
    check_scale(name, "scale", scale, x, ((N,), (N, None)))
    per_row = scale.dim() == 1 or scale.shape[1] == 1  # a (N, 1) scale is one group per row: per row
    group_size = 0 if per_row else group_size_of(name, K, scale)
    done = empty_result(x, M, N, K, bias)
    if done is not None:
        return done
    scale = scale.reshape(N) if group_size == 0 else scale.contiguous()
    if config is not None:
        return launch(name, x, qdata, scale, bias, config, group_size)
    return by_m(M, lambda m: select_config(m, N, K, group_size, x.device),
                lambda cfg, rows, *args: launch(name, *args, cfg, group_size, rows), x, qdata, scale, bias)


def launch(name: str, x, qdata, scale, bias, cfg: KernelConfig, group_size: int = 0, rows=None) -> torch.Tensor:
    """Run ``cfg``'s path on checked arguments: x (M >= 1, K), qdata int8 or e4m3 (N, K), scale (N,) or
    (N, K // group_size), bias (N,) or None; ``rows`` as ``common.check_one_row``'s. Shared with the fp8
    weight-only scheme."""
    if x.stride(1) != 1:
        x = x.contiguous()
    if cfg.path == "gemv":
        check_one_row(name, cfg.path, x, rows)
    if group_size and cfg.path != "dequant" and (
            cfg.block_k % group_size if cfg.path == "gemv" else group_size % cfg.block_k):
        raise ValueError(f"{name}: block_k={cfg.block_k} does not fit group_size={group_size} "
                         "(gemv: a multiple of it; mm: a divisor of it)")
    if cfg.path == "gemv":
        return gemv.codes_gemv(x, qdata, scale, bias, cfg, group_size)
    if cfg.path == "mm":
        return mm.codes_mm(x, qdata, scale, bias, cfg, group_size)
    if cfg.path == "dequant":
        return dequant.codes_linear(x, qdata, scale, bias, cfg, group_size)
    raise ValueError(f"{name}: path {cfg.path!r} is not one of this scheme's: 'gemv', 'mm', 'dequant'")
