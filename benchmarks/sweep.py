"""Time candidate launch configs of the aofx kernels on the GPU: the data behind the config tables.

Each candidate is a kernel launcher with a forced config, timed exactly as ``bench_layers.py`` times the
ops (a CUDA-graph stack of distinct layers, median replay) next to bf16 ``F.linear`` in the same run, and
checked against its ``aofx.numerics`` reference first (SQNR >= 30 dB, or it is reported as wrong).

    python -m benchmarks.sweep                          # every family: benchmarks/results/tuning/<family>.json
    python -m benchmarks.sweep --families int4:1+16 --shapes 4096x14336 --out-dir /tmp/tuning

Prints one line per candidate and the best per (family, shape, M); writes every row of a family as a JSON list
to ``<out-dir>/<family>.json`` (rows carry the GPU's name). The config tables in ``aofx/kernels/<scheme>.py``
point to these files: a table's entry is the "default" row, the other rows are what it was chosen over.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from aofx import numerics
from aofx.kernels import float8_dynamic_activation_float8_weight as fp8dq
from aofx.kernels import float8_weight_only as fp8wo
from aofx.kernels import int4_weight_only as int4
from aofx.kernels import int8_dynamic_activation_int8_weight as int8dq
from aofx.kernels import int8_weight_only as int8wo
from aofx.kernels.common import KernelConfig, split_k_for
from benchmarks import bench_layers as bl

KC = KernelConfig


def _int4(M, N, K):
    c = KernelConfig
    cands = {"default": int4.select_config(M, N, K, 128)}
    if M == 1:
        for bn, bk, w, st in ((4, 512, 2, 4), (4, 1024, 4, 3), (4, 1024, 2, 4), (4, 512, 1, 4), (8, 512, 2, 3),
                              (8, 512, 2, 4), (8, 1024, 2, 3), (8, 1024, 4, 3), (16, 512, 2, 3), (16, 512, 4, 3),
                              (16, 1024, 4, 3)):
            cands[f"gemv bn{bn} bk{bk} w{w} s{st}"] = c("gemv", block_n=bn, block_k=bk, num_warps=w, num_stages=st)
    else:
        for bm, bn, bk, w, st, swap in ((16, 128, 128, 8, 4, True), (16, 64, 128, 4, 4, True),
                                        (16, 128, 128, 4, 3, True), (16, 256, 64, 8, 4, True)) if M <= 16 else (
                                       (128, 128, 64, 8, 3, False), (64, 128, 128, 4, 3, True),
                                       (128, 128, 128, 8, 3, True)) if M <= 128 else (
                                       (128, 256, 64, 8, 3, False), (256, 128, 64, 8, 4, False),
                                       (128, 128, 128, 8, 3, False)):
            cands[f"mm {bm}x{bn}x{bk} w{w} s{st} swap{int(swap)}"] = c(
                "mm", block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, swap_ab=swap)
    stored = lambda w: numerics.quantize_int4(w, 128)
    call = lambda cfg: lambda x, q, s, z: int4.linear(x, q, s, z, config=cfg)
    ref = lambda x, q, s, z: numerics.int4_weight_only_linear(x, q, s, z, 128)
    return stored, ref, {k: call(v) for k, v in cands.items()}


def _gemv_grid():
    for bn, bk, w, st in ((8, 512, 2, 4), (16, 1024, 4, 3), (8, 1024, 4, 4), (16, 512, 4, 4)):
        yield f"gemv bn{bn} bk{bk} w{w} s{st}", KC("gemv", 1, bn, bk, num_warps=w, num_stages=st)


def _mm_grid(M, path):
    """Tensor-core tile candidates for the large-M buckets (swap_ab: the weight tile is wgmma's A)."""
    if M >= 512:
        tiles = ((256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                 (128, 128, 128, 8, 4), (128, 128, 64, 4, 4))
    elif M >= 64:
        tiles = ((128, 64, 128, 4, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3), (64, 64, 256, 4, 3))
    else:
        return
    for bm, bn, bk, w, st in tiles:
        for swap in (True, False) if path == "mm" else (True,):
            yield (f"{path} {bm}x{bn}x{bk} w{w} s{st} swap{int(swap)}",
                   KC(path, bm, bn, bk, num_warps=w, num_stages=st, swap_ab=swap))


def _split_auto(cfg, N, K, M):
    import dataclasses

    import triton
    tiles = triton.cdiv(N, cfg.block_n) * triton.cdiv(M, cfg.block_m)
    min_programs = 128 if cfg.path == "gemv" else 256
    if cfg.path != "gemv" and M > 256:
        return cfg
    return dataclasses.replace(cfg, split_k=split_k_for(tiles, triton.cdiv(K, cfg.block_k), min_programs))


def _weight_only(per_row_fp8):
    def family(M, N, K):
        cands = {"default": (lambda x, q, s: fp8wo.linear(x, q, s)) if per_row_fp8
                 else (lambda x, q, s: int8wo.linear(x, q, s))}
        for label, cfg in (_gemv_grid() if M == 1 else _mm_grid(M, "mm")):
            cfg = _split_auto(cfg, N, K, M)
            cands[label] = lambda x, q, s, cfg=cfg: int8wo.launch("sweep", x, q, s, None, cfg)
        if per_row_fp8:
            return (lambda w: numerics.quantize_float8(w, per_row=True)), numerics.float8_weight_only_linear, cands
        return numerics.quantize_int8, numerics.int8_weight_only_linear, cands
    return family


def _dynamic(fp8):
    def family(M, N, K):
        cands = {"default": (lambda x, q, s: fp8dq.linear(x, q, s, True)) if fp8
                 else (lambda x, q, s: int8dq.linear(x, q, s))}
        # M = 1: the per-token kernel, then the weight-only gemv on the codes (int8dq.launch's gemv path)
        for label, cfg in (_gemv_grid() if M == 1 else _mm_grid(M, "quantized")):
            cfg = _split_auto(cfg, N, K, M)
            cands[label] = lambda x, q, s, cfg=cfg: int8dq.launch("sweep", x, q, s, None, cfg)
        if fp8 and M > 1:  # the Triton table's entry, where the default may be torch._scaled_mm
            tri = fp8dq.select_config(M, N, K, library=False)
            cands["triton table"] = lambda x, q, s, cfg=tri: fp8dq.linear(x, q, s, True, config=cfg)
        if not fp8 and M >= 64:
            cands["int_mm"] = _int_mm
        if fp8:
            ref = lambda x, q, s: numerics.float8_dynamic_activation_float8_weight_linear(x, q, s, True)
            return (lambda w: numerics.quantize_float8(w, per_row=True)), ref, cands
        return numerics.quantize_int8, numerics.int8_dynamic_activation_int8_weight_linear, cands
    return family


def _int_mm(x, q, s):
    """int8 dynamic through the library GEMM: the Triton per-token quantization, ``torch._int_mm``, then the
    scales in one elementwise pass (what an int8dq ``_int_mm`` path would cost)."""
    xq, sx = int8dq.quantize_per_token(x)
    return (torch._int_mm(xq, q.t()).float() * sx[:, None] * s[None, :]).to(x.dtype)


FAMILIES = {"int4": _int4, "fp8wo": _weight_only(True), "int8wo": _weight_only(False),
            "fp8dq": _dynamic(True), "int8dq": _dynamic(False)}


def sweep_shape(family, N, K, ms, args, rows):
    layers = bl.stack_layers(N, K, args.layers, args.min_stack_mb)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(N, K, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    for M in ms:
        x = torch.randn(M, K, generator=gen, device="cuda", dtype=torch.bfloat16)
        bf16_us = bl.time_stack(lambda: [F.linear(x, w) for w in weights], args.rep_ms)[0] / layers
        quantize, reference, cands = FAMILIES[family](M, N, K)
        stored = [quantize(w) for w in weights]
        best = None
        for label, fn in cands.items():
            row = {"family": family, "N": N, "K": K, "M": M, "candidate": label, "bf16_us": bf16_us}
            try:
                out = fn(x, *stored[0])
                row["check_sqnr"] = bl.check_against_reference(reference, x, stored[0], out)
                us = bl.time_stack(lambda: [fn(x, *s) for s in stored], args.rep_ms)[0] / layers
                row.update(us=us, speedup=bf16_us / us, ok=row["check_sqnr"] >= bl.CHECK_SQNR_DB)
            except Exception as e:  # noqa: BLE001
                row["error"] = bl._error_text(e)
                bl._sync_quietly()
            rows.append(row)
            print(f"{family} {N}x{K} M={M} {label:32s} " + (
                f"{row['us']:7.1f} us {row['speedup']:5.2f}x sqnr {row['check_sqnr']:.0f}" + ("" if row["ok"] else " WRONG")
                if "us" in row else row["error"]), flush=True)
            if row.get("ok") and (best is None or row["us"] < best["us"]):
                best = row
        if best:
            print(f"BEST {family} {N}x{K} M={M}: {best['candidate']} {best['us']:.1f} us {best['speedup']:.2f}x "
                  f"(bf16 {bf16_us:.1f} us)", flush=True)
        del stored
    del weights
    bl._free_cuda()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--shapes", type=bl._parse_shapes, default="14336x4096,4096x14336")
    p.add_argument("--m", type=bl._parse_ms, default="1,16,128,1024")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--min-stack-mb", type=float, default=100.0)
    p.add_argument("--rep-ms", type=float, default=30.0)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/tuning"))
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    for spec in args.families.split(","):
        family, _, ms = spec.partition(":")  # "int4:1+16" limits the Ms of one family
        ms = [int(m) for m in ms.split("+")] if ms else args.m
        rows = []
        for N, K in args.shapes:
            sweep_shape(family, N, K, ms, args, rows)
            for row in rows:
                row["gpu"] = gpu
            (args.out_dir / f"{family}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
