"""Deployment speed: per-layer latency of a quantized stack as an AOTInductor package vs ``torch.compile``.

For every (config, NxK, M): a stack of L distinct bf16 ``nn.Linear(K, N, bias=False)`` (L as bench_layers
picks it: int4 weights > 100 MB, beyond the 50 MB L2) runs on one x (M, K) and returns all L outputs.
- ``aoti_us``: the stack quantized by ``aofx.quantize_``, exported once per (config, shape) with a dynamic
  batch ``Dim("batch", min=1, max=1024)``, packaged by ``aoti_compile_and_package`` (in worker processes,
  all before any timing) and loaded by ``aoti_load_package``; one package serves every M;
- ``compile_us``: the same quantized model under ``torch.compile(dynamic=False)`` (one graph per M, the
  default users get); ``bf16_us``: the float model under ``torch.compile(dynamic=False)``;
- each callable is timed as ``bench_layers.time_stack`` times a stack (CUDA graph replays, median of
  ``triton.testing.do_bench``) and divided by L; one that cannot be captured is timed eagerly, and the row
  gets ``"graph": false`` and ``<name>_graph_error``;
- ``aoti_vs_compile`` = compile_us / aoti_us (> 1: the package is faster); ``compile_speedup`` = bf16_us /
  compile_us; ``ok``: the package matches the eager quantized model at that M (SQNR >= 30 dB over all L
  outputs) and both aofx timings ran; ``export_s``, ``package_s``, ``load_s``: seconds of each step.

Run on a CUDA GPU from the repository root, with aofx importable (the default run takes about 6.5 minutes
on an H100, 2 of them building the 16 packages):

    python -m benchmarks.bench_deploy
    python -m benchmarks.bench_deploy --configs int8wo --shapes 14336x4096 --m 1,1024

It prints a line per row and a table, and writes the rows as a JSON list to ``--out`` (default
``benchmarks/results/<gpu>_deploy.json``, e.g. h100_deploy.json). A failing cell records its error and the
run goes on; the exit status is 1 when any row is not ok.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from torch import nn

import aofx
from aofx import numerics
from aofx.schemes import SCHEMES, scheme
from benchmarks import bench_layers as bl

BATCH_MAX = 1024  # the exported dynamic batch dimension covers 1..BATCH_MAX
EXPORT_M = 8  # sample batch for torch.export: a size-1 sample would specialize the dimension to 1
RESULTS = Path(__file__).resolve().parent / "results"
TIMED = ("aoti", "compile", "bf16")
HEAD = ("config", "NxK", "M", "aoti_us", "compile_us", "bf16_us", "compile/aoti", "compile_vs_bf16", "sqnr",
        "graph", "ok")


class LinearStack(nn.Module):
    """L distinct Linear(K, N) layers, each applied to the same x; returns the tuple of outputs."""

    def __init__(self, n: int, k: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(k, n, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.layers)


# ---------------------------------------------------------------- pure helpers (no GPU)

def gpu_short_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the first letters-then-digits word, else the words joined."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w not in ("nvidia", "geforce")]
    for w in words:
        if re.fullmatch(r"[a-z]+\d+[a-z]*", w) and not w.endswith("gb"):
            return w
    return "".join(words[:2]) or "gpu"


def new_row(config: str, n: int, k: int, m: int, layers: int) -> dict:
    return {"config": config, "N": n, "K": k, "M": m, "layers": layers, "aoti_us": None, "compile_us": None,
            "bf16_us": None, "aoti_vs_compile": None, "compile_speedup": None, "aoti_speedup": None,
            "sqnr": None, "ok": False, "graph": None, "error": None}


def finish_row(row: dict) -> dict:
    """Fills the ratios, ``graph``, ``error`` and ``ok`` from the measured fields (a bf16 error alone keeps ok)."""
    row["aoti_vs_compile"] = bl._ratio(row["compile_us"], row["aoti_us"])
    row["compile_speedup"] = bl._ratio(row["bf16_us"], row["compile_us"])
    row["aoti_speedup"] = bl._ratio(row["bf16_us"], row["aoti_us"])
    timed = [t for t in TIMED if row.get(f"{t}_us") is not None]
    row["graph"] = all(not row.get(f"{t}_graph_error") for t in timed) if timed else None
    errors = [f"{t}: {row[f'{t}_error']}" for t in ("build", *TIMED) if row.get(f"{t}_error")]
    row["error"] = "; ".join(errors) or None
    row["ok"] = (row["aoti_us"] is not None and row["compile_us"] is not None and row["sqnr"] is not None
                 and row["sqnr"] >= bl.CHECK_SQNR_DB)
    return row


def _cells(r: dict) -> tuple[str, ...]:
    f = bl._fmt
    return (r["config"], f"{r['N']}x{r['K']}", str(r["M"]), f(r["aoti_us"], ".1f"), f(r["compile_us"], ".1f"),
            f(r["bf16_us"], ".1f"), f(r["aoti_vs_compile"], ".2f"), f(r["compile_speedup"], ".2f"),
            f(r["sqnr"], ".1f"), {True: "yes", False: "no", None: "-"}[r["graph"]], "yes" if r["ok"] else "NO")


def format_table(rows: Sequence[dict]) -> str:
    cells = [_cells(r) for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(HEAD)]
    out = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (HEAD, *cells)]
    errors = [f"  {r['config']} {r['N']}x{r['K']} M={r['M']}: {r['error']}" for r in rows if r["error"]]
    return "\n".join(out + (["errors:", *errors] if errors else []))


def _error(e: BaseException) -> str:
    """The whole message on one line: export errors name their cause after the first line."""
    return " | ".join(line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip())[:600]


def _parse_batch_ms(text: str) -> list[int]:
    ms = bl._parse_ms(text)
    if max(ms) > BATCH_MAX:
        raise argparse.ArgumentTypeError(f"--m {text!r}: the package's batch dimension ends at {BATCH_MAX}")
    return ms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Per-layer latency: AOTInductor package vs torch.compile vs bf16.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", type=bl._parse_configs, default=",".join(s.id for s in SCHEMES),
                   help="comma-separated ids of aofx.schemes.SCHEMES")
    p.add_argument("--shapes", type=bl._parse_shapes, default=",".join(f"{n}x{k}" for n, k in bl.SCORED_SHAPES),
                   help="comma-separated NxK (N out, K in)")
    p.add_argument("--m", type=_parse_batch_ms, default=",".join(map(str, bl.DEFAULT_MS)),
                   help=f"comma-separated tokens M, each <= {BATCH_MAX}")
    p.add_argument("--layers", type=bl._positive_int, default=None,
                   help="layers per stack (default: as bench_layers, int4 weights > 100 MB, at least 4)")
    p.add_argument("--jobs", type=bl._positive_int, default=min(8, os.cpu_count() or 1),
                   help="packages built at once, each in its own process")
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench timed duration per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: results/<gpu>_deploy.json)")
    return p


# ---------------------------------------------------------------- the benchmark (GPU)

def _preload_system_libstdcxx(argv: Sequence[str]) -> None:
    """Re-runs this benchmark once with the system C++ runtime (``g++ -print-file-name``) preloaded.

    On the H100 image, loading an AOTInductor package in this process segfaults (std::regex, as
    examples/export_aoti.py meets in its fresh process) unless the system libstdc++ is preloaded.
    """
    try:
        found = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], check=False, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return
    lib, preload = os.path.realpath(found) if os.path.isabs(found) else "", os.environ.get("LD_PRELOAD", "")
    if lib and lib not in preload:
        print(f"re-running with LD_PRELOAD={lib}", flush=True)
        env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, (lib, preload)))}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_deploy", *argv], env)


def stack_from(weights: Sequence[torch.Tensor]) -> LinearStack:
    """A LinearStack holding ``weights`` (each (N, K)) as they are, with no initialization of its own."""
    n, k = weights[0].shape
    with torch.device("meta"):
        model = LinearStack(n, k, len(weights))
    model.load_state_dict({f"layers.{i}.weight": w for i, w in enumerate(weights)}, assign=True)
    return model.requires_grad_(False)


def build_package(name: str, weights_path: str, package_path: str) -> dict:
    """Quantizes, exports and packages one stack, in a worker process: each step's seconds, or the error
    as text (an export error can hold objects that cannot be pickled back)."""
    try:
        model = stack_from(torch.load(weights_path, map_location="cuda"))
        aofx.quantize_(model, scheme(name).config)
        t0 = time.perf_counter()
        sample = torch.randn(EXPORT_M, model.layers[0].in_features, device="cuda", dtype=torch.bfloat16)
        batch = torch.export.Dim("batch", min=1, max=BATCH_MAX)
        ep = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
        t1 = time.perf_counter()
        torch._inductor.aoti_compile_and_package(ep, package_path=package_path)
        return {"export_s": t1 - t0, "package_s": time.perf_counter() - t1}
    except Exception as e:  # noqa: BLE001  (the rows of this package record it)
        return {"build_error": _error(e), "traceback": traceback.format_exc()[-4000:]}


def _one_compile_thread() -> None:
    # The workers already use the cores side by side; a kernel-compile pool in each would oversubscribe them.
    torch._inductor.config.compile_threads = 1


def build_all(jobs: dict, workers: int) -> dict:
    """``{key: (name, weights_path, package_path)}`` -> ``{key: build_package's dict}``.

    A package takes over a minute to build, mostly in one Python process, so they are built side by side,
    and all of them before anything is timed, so that no build takes CPU from a timing.
    """
    done = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_compile_thread) as pool:
        futures = {pool.submit(build_package, *job): key for key, job in jobs.items()}
        for future in as_completed(futures):
            key = futures[future]
            try:
                done[key] = future.result()
            except Exception as e:  # noqa: BLE001  (a broken pool)
                done[key] = {"build_error": _error(e), "traceback": traceback.format_exc()[-4000:]}
            if "build_error" in done[key]:
                print(f"  packaging {key} failed:\n{done[key].pop('traceback')}", flush=True)
            else:
                print(f"  packaged {key}: " + ", ".join(f"{p} {v:.0f}" for p, v in done[key].items()), flush=True)
    return done


def _timed(row: dict, name: str, fn, layers: int, rep_ms: float) -> None:
    try:
        us, graph_error = bl.time_stack(fn, rep_ms)
        row[f"{name}_us"] = us / layers
        if graph_error:
            row[f"{name}_graph_error"] = graph_error
    except Exception as e:  # noqa: BLE001  (one broken cell must not end the run)
        row[f"{name}_error"] = _error(e)
        bl._sync_quietly()


def bench_shape(n: int, k: int, weights: list, built: dict, workdir: str, args, progress) -> None:
    """Times every (config, M) row of one (N, K): bf16 once per M, then each config's package and compile."""
    layers, base = len(weights), stack_from(weights)
    xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in args.m}  # (M, K)
    # Reset before each compiled model, so that forward's code object stays under dynamo's recompile limit.
    torch.compiler.reset()
    bf16 = torch.compile(base, dynamic=False)
    bf16_rows = {m: new_row("bf16", n, k, m, layers) for m in args.m}
    for m, x in xs.items():
        _timed(bf16_rows[m], "bf16", lambda x=x: bf16(x), layers, args.rep_ms)
    bf16 = None

    for name in args.configs:
        phases = built[f"{name} {n}x{k}"]
        rows = {m: {**new_row(name, n, k, m, layers), **{key: v for key, v in bf16_rows[m].items()
                                                         if key.startswith("bf16_")}} for m in args.m}
        model = package = compiled = None
        try:
            if "build_error" in phases:
                raise RuntimeError(phases["build_error"])
            model = copy.deepcopy(base)
            aofx.quantize_(model, scheme(name).config)  # the eager reference, and what torch.compile compiles
            t0 = time.perf_counter()
            # run_single_threaded: otherwise each run waits on the previous run's event, which a CUDA
            # graph capture forbids.
            package = torch._inductor.aoti_load_package(f"{workdir}/{name}_{n}x{k}.pt2", run_single_threaded=True)
            phases = {**phases, "load_s": time.perf_counter() - t0}
            torch.compiler.reset()
            compiled = torch.compile(model, dynamic=False)
        except Exception as e:  # noqa: BLE001
            error, phases = phases.get("build_error") or _error(e), {}
            for row in rows.values():
                row["build_error"] = error
            bl._sync_quietly()
        for m, x in xs.items():
            row = rows[m]
            row.update(phases)
            if package is not None:
                try:
                    got, want = package(x), model(x)
                    row["sqnr"] = numerics.sqnr(torch.cat([w.flatten() for w in want]),
                                                torch.cat([g.flatten() for g in got]))
                    del got, want
                    _timed(row, "aoti", lambda x=x, f=package: f(x), layers, args.rep_ms)
                except Exception as e:  # noqa: BLE001
                    row["aoti_error"] = _error(e)
                    bl._sync_quietly()
                _timed(row, "compile", lambda x=x, f=compiled: f(x), layers, args.rep_ms)
            progress(finish_row(row))
        model = package = compiled = None  # frees this config's weights before the next one's
        bl._free_cuda()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_deploy needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}). Run it on the H100.")
    _preload_system_libstdcxx(argv)
    gpu = torch.cuda.get_device_name()
    out = args.out or RESULTS / f"{gpu_short_name(gpu)}_deploy.json"
    print(f"{gpu}  torch {torch.__version__}", flush=True)
    total = len(args.configs) * len(args.shapes) * len(args.m)
    rows: list[dict] = []
    start = time.perf_counter()

    def progress(row: dict) -> None:
        rows.append(row)
        line = " ".join(f"{h}={c}" for h, c in zip(HEAD, _cells(row)))
        error = f" [{row['error']}]" if row["error"] else ""
        print(f"[{len(rows)}/{total}, {time.perf_counter() - start:.0f} s] {line}{error}", flush=True)
        bl.write_rows(rows, out)  # after every row: a run stopped by a time limit keeps what it measured

    try:
        with torch.no_grad(), tempfile.TemporaryDirectory() as workdir:
            gen = torch.Generator(device="cuda").manual_seed(args.seed)
            stacks, jobs = {}, {}
            for n, k in args.shapes:
                layers = args.layers or bl.stack_layers(n, k, 4, 100.0)
                # Distinct weights, N(0, 0.02) in bf16 as bench_layers draws them, (N, K) each; the workers
                # build their packages from this file.
                stacks[n, k] = [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
                                for _ in range(layers)]
                torch.save(stacks[n, k], f"{workdir}/{n}x{k}.pt")
                jobs.update({f"{c} {n}x{k}": (c, f"{workdir}/{n}x{k}.pt", f"{workdir}/{c}_{n}x{k}.pt2")
                             for c in args.configs})
            print(f"building {len(jobs)} packages, {args.jobs} at a time", flush=True)
            built = build_all(jobs, args.jobs)
            print(f"packages built in {time.perf_counter() - start:.0f} s", flush=True)
            for n, k in args.shapes:
                bench_shape(n, k, stacks.pop((n, k)), built, workdir, args, progress)
    finally:
        bl.write_rows(rows, out)
        print("\n" + format_table(rows))
        print(f"\n{len(rows)}/{total} rows in {time.perf_counter() - start:.0f} s -> {out}", flush=True)
    return 0 if len(rows) == total and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
