"""int8 dynamic-activation x int8-weight linear: x quantized per token at run time, then an integer GEMM.

Layout read:
  qdata  int8 (N, K), row-major, contiguous along K (``numerics.quantize_int8`` per row)
  scale  float (N,) per output row (s_w)
  bias   optional (N,)
  x      (M, K) bf16 / fp16 with any row stride; y is (M, N) in x.dtype.

Math (``numerics.int8_dynamic_activation_int8_weight_linear``), per token m: ``s_x = max(amax |x[m]| / 127,
TINY)``, ``xq = clamp(round(x / s_x), -127, 127)`` (bit-identical to the reference: ``quantize``),
``acc = xq @ qdata.T`` exactly in int32, ``y = acc * s_x * s_w (+ bias)`` in fp32, then cast.

Paths (``KernelConfig.path``; the fp8 dynamic scheme runs this table with e4m3 codes, ``fp8=True``):
  ``fused_gemv``  M = 1 where 4-row programs number >= 128 (e4m3: rows of <= 4096 codes only): quantization
                  and GEMV in one launch (``gemv.quantize_gemv``).
  ``gemv``        M = 1 otherwise: ``quantize.quantize_per_token``, then the weight-only GEMV on the codes
                  (``gemv.codes_gemv`` with ``x_codes``; dp4a words when K % 4 == 0).
  ``quantized``   M > 1: ``quantize_per_token``, then ``mm.quantized_mm``. M <= 16: 16-row tiles, BLOCK_N
                  narrowed until >= 128 programs, 512-wide K tiles (5 stages) for long K, ``swap_ab`` where
                  BLOCK_N >= 64. M <= 128: 64 x 128, or 64 x 64 x 256 with 6 stages where 64 x 128 gives
                  fewer than 128 tiles; M <= 256: 128 x 128; larger: 256 x 128 x 128 ``swap_ab`` with e4m3,
                  128 x 128 x 128 with 4 warps with int8. Up to M = 256, fewer than 128 tiles split K.
  ``scaled_mm``   e4m3 codes, bf16 x, M > 128, N and K multiples of 16: ``quantize_per_token``, then
                  ``torch._scaled_mm`` (``mm.scaled_mm``), faster there than the Triton fp8 GEMM.
  ``fused``       forced configs only: the quantization in the GEMM prologue. Slower than ``quantized`` at
                  M = 16, because every program redoes the amax over all of K.
Tuning evidence: benchmarks/results/tuning/, written by `python -m benchmarks.sweep --families int8dq,fp8dq`.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from aofx.kernels import gemv, mm
from aofx.kernels import int8_weight_only as int8wo
from aofx.kernels.common import (
    KernelConfig,
    by_m,
    check_linear_args,
    check_one_row,
    check_scale,
    empty_result,
    split_k_for,
)
from aofx.kernels.quantize import amax_partials, quantize_per_token

__all__ = ["KernelConfig", "amax_partials", "launch", "linear", "quantize_per_token", "select_config"]

# (max M, config), first match wins; select_config refines block_n / block_k / split_k / swap_ab per shape.
# From M = 2 on, quantizing x once in its own kernel beats the fused prologue.
_TABLE = (
    (16, KernelConfig("quantized", block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)),
    (128, KernelConfig("quantized", block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)),
    (256, KernelConfig("quantized", block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4)),
    (None, KernelConfig("quantized", block_m=256, block_n=128, block_k=128, num_warps=8, num_stages=3, swap_ab=True)),
)
# M > 256 with int8 codes: Triton's pipeliner keeps only fp32-accumulator wgmma in flight across K steps (an
# int32 accumulator waits for its wgmma every step), so int8 tiles run best two to an SM, one's wgmma
# overlapping the other's wait. e4m3 accumulates in fp32 and keeps the table's entry.
_INT8_LARGE = KernelConfig("quantized", block_m=128, block_n=128, block_k=128, num_warps=4, num_stages=3)
# 17 <= M <= 128 when 64 x 128 tiles are too few: narrower, deeper-pipelined tiles fill the GPU unsplit.
_NARROW = KernelConfig("quantized", block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=6)
_LONG_K = 8192  # M <= 16: from this K on, 512-wide K tiles, 5 stages
_LONG_K_STAGES = 5
_MIN_PROGRAMS = 128  # about one program per SM
_MIN_SPLIT_PROGRAMS = 256  # a K split aims for ~2 programs per SM: idle SMs cost more than the reduction
_GEMV_WORDS_MAX_BLOCK_K = 8192  # M = 1 on dp4a words: codes a step, at most
# M = 1 in one launch: 4 weight rows a program; rows up to _FUSED_GEMV_ONE_CHUNK_MAX_K codes are one chunk
# (x stays in registers), longer int8 rows go in chunks of block_k codes; long e4m3 rows keep two kernels.
_FUSED_GEMV = KernelConfig("fused_gemv", block_m=1, block_n=4, block_k=512, num_warps=4, num_stages=1)
_FUSED_GEMV_ONE_CHUNK_MAX_K = 4096
ONE_ROW_PATHS = ("fused_gemv", "gemv")  # the M = 1 paths: the row's own amax is the tensor's
_SCALED_MM = KernelConfig("scaled_mm")
# e4m3 from this M on: torch._scaled_mm (where mm.scaled_mm_fits). It leads or ties the Triton table at M = 1024
# (benchmarks/results/tuning/fp8dq.json) and trailed it at M = 128 (row-wise, 4096x14336) in an earlier H100 run.
_SCALED_MM_MIN_M = 129


def select_config(M: int, N: int, K: int, fp8: bool = False, device: torch.device | None = None,
                  library: bool = False) -> KernelConfig:
    """The config for one call. M selects the bucket; N, K (static under compile) refine it. ``fp8``: e4m3
    codes (the fp8 dynamic scheme); ``library``: the call fits ``torch._scaled_mm`` (``mm.scaled_mm_fits``)."""
    if fp8 and library and M >= _SCALED_MM_MIN_M:
        return _SCALED_MM
    if M == 1:
        one_chunk = K <= _FUSED_GEMV_ONE_CHUNK_MAX_K
        if (one_chunk or not fp8) and triton.cdiv(N, _FUSED_GEMV.block_n) >= _MIN_PROGRAMS:
            block_k = triton.next_power_of_2(K) if one_chunk else _FUSED_GEMV.block_k
            return dataclasses.replace(_FUSED_GEMV, block_k=block_k)
        cfg = int8wo.select_config(M, N, K, 0, device)
        if not fp8 and K % 4 == 0 and cfg.block_k > _GEMV_WORDS_MAX_BLOCK_K:
            # dp4a words: steps of at most 2048 words, not the weight-only table's one long step
            cfg = dataclasses.replace(cfg, block_k=_GEMV_WORDS_MAX_BLOCK_K,
                                      split_k=split_k_for(N, triton.cdiv(K, _GEMV_WORDS_MAX_BLOCK_K), _MIN_PROGRAMS))
        return cfg
    if M > 256 and not fp8:
        return _INT8_LARGE
    cfg = next(c for max_m, c in _TABLE if max_m is None or M <= max_m)
    block_n, block_k, split_k, swap_ab, stages = cfg.block_n, cfg.block_k, 1, cfg.swap_ab, cfg.num_stages
    if M <= 16:
        # Memory bound: narrow the weight tile before splitting K (a split costs a reduction kernel).
        while block_n > 32 and triton.cdiv(N, block_n) < _MIN_PROGRAMS:
            block_n //= 2
        if K >= _LONG_K:
            block_k, stages = 512, _LONG_K_STAGES
        swap_ab = block_n >= 64  # the weight rows on wgmma's 64-row side (a little faster when N allows it)
        split_k = split_k_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k), _MIN_PROGRAMS)
    elif M <= 256 and triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n) < _MIN_PROGRAMS:
        if M <= 128 and triton.cdiv(M, 64) * triton.cdiv(N, _NARROW.block_n) >= _MIN_PROGRAMS:
            return _NARROW
        split_k = split_k_for(triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n), triton.cdiv(K, block_k),
                              _MIN_SPLIT_PROGRAMS)
    return dataclasses.replace(cfg, block_n=block_n, block_k=block_k, split_k=split_k, swap_ab=swap_ab,
                               num_stages=stages)


def linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
           *, config: KernelConfig | None = None) -> torch.Tensor:
    """``(q(x) @ qdata.T) * s_x * scale (+ bias)`` for x (M, K) bf16/fp16; returns (M, N) in x.dtype.

    ``config`` forces a path / tile shape (tests and tuning); by default ``select_config`` picks it.
    """
    name = "int8_dynamic_activation_int8_weight.linear"
    M, N, K = check_linear_args(name, x, qdata, bias, torch.int8)
    check_scale(name, "scale", scale, x, ((N,),))
    done = empty_result(x, M, N, K, bias)
    if done is not None:
        return done
    if config is not None:
        return launch(name, x, qdata, scale, bias, config)
    return by_m(M, lambda m: select_config(m, N, K, device=x.device),
                lambda cfg, rows, *args: launch(name, *args, cfg, rows=rows), x, qdata, scale, bias)


def launch(name: str, x, qdata, scale, bias, cfg: KernelConfig, x_amax=None, rows=None) -> torch.Tensor:
    """Run ``cfg``'s path on checked arguments: x (M >= 1, K) bf16/fp16, qdata int8 or e4m3 (N, K), scale
    (N,) (or () with e4m3), bias (N,) or None; with e4m3 codes x is quantized to e4m3. ``x_amax`` (partial
    maxima, ``amax_partials``): quantize every row with their max (fp8 per tensor); not with ``fused``.
    ``rows``: the largest M this config serves (``common.by_m``). Shared with the fp8 dynamic scheme."""
    if x.stride(1) != 1:
        x = x.contiguous()
    if cfg.path in ONE_ROW_PATHS:
        check_one_row(name, cfg.path, x, rows)
    if x_amax is not None and cfg.path == "fused":
        raise ValueError(f"{name}: a per-tensor activation scale needs the 'quantized', 'gemv' or 'fused_gemv' "
                         "path, got 'fused'")
    if cfg.path == "fused_gemv":
        return gemv.quantize_gemv(x, qdata, scale, bias, cfg)
    if cfg.path == "gemv":
        x_codes = quantize_per_token(x, qdata.dtype == torch.float8_e4m3fn, x_amax, rows=1)
        return gemv.codes_gemv(x, qdata, scale, bias, cfg, x_codes=x_codes)
    if cfg.path in ("quantized", "fused"):
        return mm.quantized_mm(x, qdata, scale, bias, cfg, x_amax, rows)
    if cfg.path == "scaled_mm":
        if not mm.scaled_mm_fits(x, qdata):
            raise ValueError(f"{name}: the scaled_mm path needs e4m3 codes, bf16 x and N, K multiples of 16; got "
                             f"{qdata.dtype} {tuple(qdata.shape)}, x {x.dtype}")
        return mm.scaled_mm(x, qdata, scale, bias, x_amax, rows)
    raise ValueError(f"{name}: path {cfg.path!r} is not one of this scheme's: 'fused_gemv', 'gemv', 'quantized', "
                     "'fused', 'scaled_mm'")
