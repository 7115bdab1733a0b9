"""Per-layer latency of the aofx quantized-linear ops against bf16 cuBLAS (and torchao / gemlite).

What it measures, for every (config, shape, M):
- a stack of distinct layers (distinct weight tensors, more than the H100's 50 MB L2 in total) is
  applied back to back to the same activation ``x`` (M, K); outputs are dropped, not chained;
- the stack is captured once as a CUDA graph (warmed up on a side stream first) and its replays are
  timed with ``triton.testing.do_bench(..., return_mode="median")``, which clears L2 before each
  replay; ``us`` is the median replay time divided by the number of layers;
- the bf16 baseline is the same stack of ``F.linear(x, w_bf16)``, timed in the same run the same way;
- ``roofline_frac`` = the layer's minimal time / measured time, where the minimal time is
  ``max(bytes / 3.0 TB/s, 2*M*N*K / peak)``, bytes = stored weight (qdata + scale + zero) + x + out,
  peak = 700 TFLOP/s for bf16-math configs and 1400 TFLOP/s for the int8 / fp8 tensor-core ones;
- ``sqnr`` (dB) of one layer's op output against the exact linear (``F.linear`` in fp64), with
  w ~ N(0, 0.02) and x ~ N(0, 1) in bf16, next to the scheme's SQNR floor;
- ``ok``: the op output matches its ``aofx.numerics`` reference (SQNR >= 30 dB between the two),
  checked once per row; a failure or an exception marks the row and the run goes on;
- peers when importable: torchao (``quantize_`` + ``torch.compile``) and gemlite, in the same
  CUDA-graph stack; any peer failure is recorded as a string in the row.

The scored shapes are 14336x4096 and 4096x14336 (the ones with speedup targets, ``TARGETS``);
4096x4096 and 1024x4096 are informative. Small shapes get more layers (``--min-stack-mb``) so that
even the int4 stack outgrows L2.

The configs are rows of ``aofx.schemes.SCHEMES``, named by id; each is quantized and called through its
own graph pass (``aofx.registry.find_pass``), as ``quantize_`` does. Run on a CUDA GPU (H100), from the
repository root, with aofx installed (``pip install -e .``):

    python -m benchmarks.bench_layers
    python -m benchmarks.bench_layers --configs int4wo-128,int8wo --shapes 14336x4096 --m 1,16

It prints one progress line per row, a table at the end, and writes the rows as a JSON list to
``--out`` (default ``benchmarks/results/h100.json``); non-finite numbers (an exact match's infinite
SQNR) are written as null. It exits 1 when any aofx row failed its check or raised.
``--peers none`` is the quickest run; otherwise torchao's torch.compile per (config, shape, M) dominates.
The peers are built in ``peers.py``. This file is over 400 lines because ``sweep.py`` and ``bench_deploy.py``
reuse its timing, checks and argument parsing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from aofx import numerics
from aofx.configs import Float8DynamicActivationFloat8WeightConfig, Int8DynamicActivationInt8WeightConfig
from aofx.registry import find_pass
from aofx.schemes import SCHEMES, Scheme, scheme
from benchmarks.peers import gemlite_stack, torchao_stack

HBM_BYTES_PER_S = 3.0e12  # H100 SXM device copy, measured 3.02 TB/s
BF16_FLOPS = 700e12  # bf16 dense tensor-core matmul, measured 702 TFLOP/s
INT8_FP8_FLOPS = 1400e12  # int8 / fp8 dense tensor cores: twice bf16
CHECK_SQNR_DB = 30.0  # op vs its numerics reference; a layout or scale bug lands far below
CHECK_COLUMNS = 64  # output columns checked when the reference must run on the CPU
SCORED_SHAPES = ((14336, 4096), (4096, 14336))  # (N, K)
DEFAULT_SHAPES = SCORED_SHAPES + ((4096, 4096), (1024, 4096))
DEFAULT_MS = (1, 16, 128, 1024)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "h100.json"
PEER_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "none")


# The default --configs, in table order (every id of aofx.schemes.SCHEMES is accepted).
DEFAULT_CONFIGS = ("int4wo-128", "int8wo", "int8dq", "fp8dq-row", "fp8dq-tensor", "fp8wo")
# int8 / fp8 tensor-core math (1400 TFLOP/s) instead of bf16 math: the activation is quantized too.
LOW_PRECISION_MATH = (Int8DynamicActivationInt8WeightConfig, Float8DynamicActivationFloat8WeightConfig)

# Speedup targets over bf16 cuBLAS on the scored shapes, per M (docs/design.md, "Kernel dispatch").
TARGETS = {
    "int4wo-128": {1: 3.4, 16: 2.8, 128: 1.3, 1024: 0.9},
    "int8wo": {1: 1.9, 16: 1.8, 128: 1.1, 1024: 0.9},
    "int8dq": {1: 1.8, 16: 1.8, 128: 1.5, 1024: 1.6},
    "fp8dq-row": {1: 1.9, 16: 1.9, 128: 1.8, 1024: 1.8},
    "fp8wo": {1: 1.9, 16: 1.7, 128: 1.1, 1024: 0.9},
}


# ---------------------------------------------------------------- command line

def _parse_configs(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = [s.id for s in SCHEMES]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown config(s) {unknown or text!r}; choose from {', '.join(known)}")
    return names


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for t in (t.strip() for t in text.split(",")):
        if not t:
            continue
        try:
            n, k = (int(v) for v in t.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shape {t!r} is not NxK, e.g. 14336x4096") from None
        if n <= 0 or k <= 0 or k % 128:
            raise argparse.ArgumentTypeError(f"shape {t!r}: N, K must be positive and K a multiple of 128")
        shapes.append((n, k))
    if not shapes:
        raise argparse.ArgumentTypeError("no shape given")
    return shapes


def _parse_ms(text: str) -> list[int]:
    try:
        ms = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--m {text!r} is not a comma-separated list of ints") from None
    if not ms or any(m <= 0 for m in ms):
        raise argparse.ArgumentTypeError(f"--m {text!r}: give positive ints, e.g. 1,16,128")
    return ms


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive int")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Per-layer latency of aofx quantized linears vs bf16 cuBLAS (CUDA-graph stacks).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", type=_parse_configs, default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated scheme ids, of: {', '.join(s.id for s in SCHEMES)}")
    p.add_argument("--shapes", type=_parse_shapes, default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES),
                   help="comma-separated NxK (N out, K in), e.g. 14336x4096,4096x14336")
    p.add_argument("--m", type=_parse_ms, default=",".join(map(str, DEFAULT_MS)), help="comma-separated tokens M")
    p.add_argument("--layers", type=_positive_int, default=4,
                   help="minimum number of distinct layers in a stack")
    p.add_argument("--min-stack-mb", type=float, default=100.0,
                   help="add layers until the int4 weights of the stack exceed this (0: just --layers)")
    p.add_argument("--peers", choices=("scored", "all", "none"), default="scored",
                   help="shapes on which torchao / gemlite are measured too")
    p.add_argument("--peer-compile-mode", choices=PEER_COMPILE_MODES, default="max-autotune-no-cudagraphs",
                   help="torch.compile mode for the torchao stack: by default torchao's recommended max-autotune, "
                        "without its CUDA graphs since the timing replays one ('none': eager, still CUDA-graphed)")
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench timed duration per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    return p


# ---------------------------------------------------------------- pure helpers (no GPU)

def stack_layers(n: int, k: int, min_layers: int, min_stack_mb: float) -> int:
    """Layers per stack: at least ``min_layers``, and enough that int4 weights exceed the target."""
    int4_bytes = n * k / 2
    return max(min_layers, math.ceil(min_stack_mb * 1e6 / int4_bytes)) if min_stack_mb > 0 else min_layers


def packed_weight(rewrite, weight: torch.Tensor, config) -> list[torch.Tensor]:
    """The pass's packed tensors for ``weight`` (N, K), in its op-argument order."""
    packed = rewrite.quantize(weight, config)
    return [packed[name] for name in rewrite.packed_names]


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def roofline_us(weight_bytes: int, m: int, n: int, k: int, peak_flops: float) -> float:
    """Minimal time of one layer: HBM traffic (weights + bf16 x + bf16 out) or tensor-core math."""
    moved = weight_bytes + 2 * m * k + 2 * m * n  # x: (M, K) bf16, out: (M, N) bf16
    return max(moved / HBM_BYTES_PER_S, 2 * m * n * k / peak_flops) * 1e6


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den > 0:
        return None
    return num / den


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def new_row(scheme: Scheme, n: int, k: int, m: int, layers: int) -> dict:
    """A row with every required key present (None until measured)."""
    scored = (n, k) in SCORED_SHAPES
    return {
        "config": scheme.id, "N": n, "K": k, "M": m, "layers": layers,
        "us": None, "bf16_us": None, "speedup": None, "roofline_frac": None, "sqnr": None,
        "bf16_roofline_frac": None, "sqnr_floor": scheme.floor_db, "check_sqnr": None, "ok": False,
        "target": TARGETS.get(scheme.id, {}).get(m) if scored else None, "scored": scored,
        "graph": None, "error": None,
    }


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _peer_cell(row: dict, peer: str) -> str:
    if row.get(f"{peer}_error"):
        return "err"
    return _fmt(row.get(f"{peer}_speedup"), ".2f") + ("x" if row.get(f"{peer}_speedup") is not None else "")


def format_table(rows: Sequence[dict]) -> str:
    """Compact fixed-width table: ``speedup`` is bf16_us / us; ``!`` marks a missed speedup target
    and a sqnr below its floor; the peer columns are their speedups over the same bf16."""
    head = ("config", "NxK", "M", "us", "bf16_us", "speedup", "target", "roof", "sqnr", "ok",
            "torchao", "gemlite")
    lines = []
    for r in rows:
        missed = r["target"] is not None and (r["speedup"] is None or r["speedup"] < r["target"])
        lines.append((
            r["config"], f"{r['N']}x{r['K']}", str(r["M"]), _fmt(r["us"], ".1f"), _fmt(r["bf16_us"], ".1f"),
            _fmt(r["speedup"], ".2f") + ("!" if missed else ""), _fmt(r["target"], ".1f"),
            _fmt(r["roofline_frac"], ".2f"),
            _fmt(r["sqnr"], ".1f") + ("!" if r["sqnr"] is not None and r["sqnr"] < r["sqnr_floor"] else ""),
            "err" if r["error"] else ("yes" if r["ok"] else "NO"),
            _peer_cell(r, "torchao"), _peer_cell(r, "gemlite"),
        ))
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in lines]
    errors = [f"  {r['config']} {r['N']}x{r['K']} M={r['M']}: {r['error']}" for r in rows if r["error"]]
    if errors:
        out += ["errors:", *errors]
    return "\n".join(out)


def write_rows(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    path.write_text(json.dumps(clean, indent=1) + "\n")


# ---------------------------------------------------------------- timing (GPU)

def time_stack(run: Callable[[], object], rep_ms: float) -> tuple[float, str | None]:
    """Median microseconds of one ``run()``, replayed from a CUDA graph.

    Returns ``(us, graph_error)``; if capture fails, ``run`` is timed eagerly and the capture error
    is returned so the row says so.
    """
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, compiling) outside the capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except Exception as e:  # noqa: BLE001  (capture is best effort; time eagerly instead)
        del graph
        torch.cuda.synchronize()
        return do_bench(run, warmup=10, rep=rep_ms, return_mode="median") * 1e3, _error_text(e)
    try:
        return do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median") * 1e3, None
    finally:
        del graph


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _sync_quietly() -> None:
    """Surface a pending asynchronous error inside the row that caused it, not the next one."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (a sticky CUDA error will fail the following rows too)
        pass


def check_against_reference(reference: Callable, x: torch.Tensor, call_args: tuple, out: torch.Tensor) -> float:
    """SQNR (dB) of the op output ``out`` (M, N) against its ``aofx.numerics`` reference.

    The reference runs on the GPU; where it cannot (CUDA has no int32 matmul for the int8 dq
    reference), it runs on the CPU for the first CHECK_COLUMNS output columns.
    """
    try:
        expected = reference(x, *call_args)
    except (NotImplementedError, RuntimeError):
        cols = CHECK_COLUMNS
        # Stored tensors are indexed by output row first; a 0-dim (per-tensor) scale is shared.
        cpu_args = tuple(a[:cols].cpu() if isinstance(a, torch.Tensor) and a.dim() > 0
                         else a.cpu() if isinstance(a, torch.Tensor) else a for a in call_args)
        expected, out = reference(x.cpu(), *cpu_args), out[..., :cols].cpu()
    return numerics.sqnr(expected.float(), out.float())


# ---------------------------------------------------------------- peers

def measure_peer(peer: str, row: dict, stack: Callable, x: torch.Tensor, ref: torch.Tensor, numerics,
                 rep_ms: float) -> None:
    """Time a peer's stack on ``x`` and fill ``<peer>_us / _speedup / _sqnr`` (or ``_error``)."""
    try:
        outs = stack(x)  # one (M, N) per layer
        row[f"{peer}_sqnr"] = numerics.sqnr(ref, outs[0])
        us, graph_error = time_stack(lambda: stack(x), rep_ms)
        row[f"{peer}_us"] = us / len(outs)
        row[f"{peer}_speedup"] = _ratio(row["bf16_us"], row[f"{peer}_us"])
        if graph_error:
            row[f"{peer}_graph_error"] = graph_error
    except Exception as e:  # noqa: BLE001  (a peer failure is data, e.g. torchao int8dq at M <= 16)
        row[f"{peer}_error"] = _error_text(e)
        _sync_quietly()


# ---------------------------------------------------------------- the benchmark

def bench_shape(n: int, k: int, args, numerics, peers: dict[str, bool], progress: Callable[[dict], None],
                device: str = "cuda") -> None:
    """Measures every row of one (N, K), bf16 once per M, and hands each row to ``progress``."""
    layers = stack_layers(n, k, args.layers, args.min_stack_mb)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    # Distinct weights, N(0, 0.02) in bf16: (N, K) each.
    weights = [torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
               for _ in range(layers)]
    xs = {m: torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16) for m in args.m}  # (M, K)
    # fp64 (M, N) for layer 0: immune to TF32 settings (torchao's quantize_ turns TF32 on).
    refs = {m: F.linear(x.double(), weights[0].double()) for m, x in xs.items()}

    bf16_us, bf16_frac = {}, {}
    for m, x in xs.items():
        us, _ = time_stack(lambda x=x: [F.linear(x, w) for w in weights], args.rep_ms)
        bf16_us[m] = us / layers
        bf16_frac[m] = roofline_us(tensor_bytes(weights[:1]), m, n, k, BF16_FLOPS) / bf16_us[m]
        print(f"  bf16 {n}x{k} M={m}: {bf16_us[m]:.1f} us/layer ({layers} layers, roof {bf16_frac[m]:.2f})",
              flush=True)

    for name in args.configs:
        row_scheme = scheme(name)
        config = row_scheme.config
        rewrite = find_pass(config)  # the graph pass quantize_ uses: its packing and its op's arguments
        op = rewrite.op
        reference = getattr(numerics, op.overloadpacket.__name__)  # aofx.numerics.<op> takes the op's arguments
        packed = [packed_weight(rewrite, w, config) for w in weights]
        peak = INT8_FP8_FLOPS if isinstance(config, LOW_PRECISION_MATH) else BF16_FLOPS

        peer_stacks: dict[str, Callable | str | None] = {}
        for peer, on in peers.items():
            if not on:
                continue
            try:
                peer_stacks[peer] = (torchao_stack(name, weights, args.peer_compile_mode) if peer == "torchao"
                                     else gemlite_stack(name, weights, numerics))
            except Exception as e:  # noqa: BLE001
                peer_stacks[peer] = _error_text(e)
                _sync_quietly()

        for m, x in xs.items():
            row = new_row(row_scheme, n, k, m, layers)
            row["bf16_us"], row["bf16_roofline_frac"] = bf16_us[m], bf16_frac[m]
            try:
                call_args = [rewrite.op_args(x, p, None, config) for p in packed]  # per layer: (x, ..., bias)
                out = op(*call_args[0])  # (M, N)
                row["check_sqnr"] = check_against_reference(reference, x, call_args[0][1:], out)
                row["sqnr"] = numerics.sqnr(refs[m], out)
                row["ok"] = (out.shape == (m, n) and out.dtype == torch.bfloat16
                             and bool(torch.isfinite(out).all()) and row["check_sqnr"] >= CHECK_SQNR_DB)
                del out
                us, graph_error = time_stack(lambda: [op(*a) for a in call_args], args.rep_ms)
                row["us"] = us / layers
                row["graph"] = graph_error is None
                if graph_error:
                    row["graph_error"] = graph_error
                row["speedup"] = _ratio(row["bf16_us"], row["us"])
                row["roofline_frac"] = roofline_us(tensor_bytes(packed[0]), m, n, k, peak) / row["us"]
            except Exception as e:  # noqa: BLE001  (one broken row must not end the run)
                row["error"] = _error_text(e)
                _sync_quietly()
            for peer, stack_or_error in peer_stacks.items():
                if isinstance(stack_or_error, str):
                    row[f"{peer}_error"] = stack_or_error
                elif stack_or_error is not None:
                    measure_peer(peer, row, stack_or_error, x, refs[m], numerics, args.rep_ms)
            progress(row)
        del packed, peer_stacks
        _free_cuda()
    del weights, xs, refs
    _free_cuda()


def _progress_line(row: dict, index: int, total: int) -> str:
    peers = "".join(
        f"  {p} " + (f"{row[p + '_us']:.1f} us" if row.get(p + "_us") is not None else "err")
        for p in ("torchao", "gemlite") if (p + "_us") in row or (p + "_error") in row)
    if row["error"]:
        body = f"ERROR {row['error']}"
    else:
        body = (f"{row['us']:.1f} us (bf16 {row['bf16_us']:.1f}, {row['speedup']:.2f}x, "
                f"roof {row['roofline_frac']:.2f}, {row['sqnr']:.1f} dB{'' if row['ok'] else ', CHECK FAILED'})")
    return f"[{index:>3}/{total}] {row['config']} {row['N']}x{row['K']} M={row['M']}: {body}{peers}"


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001  (a broken install is as good as none here)
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_layers.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}). Run it on the H100.")
    have = {p: _available(p) for p in ("torchao", "gemlite")}
    if not any(have.values()):
        print("peers: neither torchao nor gemlite is importable; measuring aofx and bf16 only", flush=True)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"peers: {', '.join(p for p, ok in have.items() if ok) or 'none'}", flush=True)

    total = len(args.configs) * len(args.shapes) * len(args.m)
    rows: list[dict] = []

    def progress(row: dict) -> None:
        rows.append(row)
        print(_progress_line(row, len(rows), total), flush=True)
        write_rows(rows, args.out)  # after every row: a run stopped by a time limit keeps what it measured

    start = time.perf_counter()
    try:
        for n, k in args.shapes:
            on = args.peers == "all" or (args.peers == "scored" and (n, k) in SCORED_SHAPES)
            bench_shape(n, k, args, numerics, {p: on and ok for p, ok in have.items()}, progress)
    finally:  # even after a fatal (sticky) CUDA error, show and keep what was measured
        write_rows(rows, args.out)
        print()
        print(format_table(rows))
        print(f"\n{len(rows)}/{total} rows in {time.perf_counter() - start:.0f} s -> {args.out}", flush=True)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
