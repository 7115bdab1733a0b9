"""The README's benchmark tables, generated from the results JSON.

    python -m benchmarks.tables                  # every table, from benchmarks/results/
    python -m benchmarks.tables --check README.md  # exit 1 unless README.md holds every table as printed

Layer table (``bench_layers.py`` rows): one row per (config, N x K) on the scored shapes, one column per
M. Each cell is aofx's speedup over bf16 cuBLAS measured in the same run, aofx's time per layer in
brackets, then the peers' speedups (``ao`` torchao, ``gl`` gemlite) where the run measured them, or
"fails" (the notes give the error); "n/m" where the rows hold no measurement. A ``bf16`` row per shape
gives the baseline's time per layer.

Deploy table (``bench_deploy.py`` rows): one row per config, one column per M; each cell is
``torch.compile``'s time over the AOTInductor package's (1.00: as fast; under 1: the package is slower),
one number per shape, in the order of the header ("fail": the cell failed; "n/m": not measured).

End-to-end table (``bench_e2e.py`` rows): a results file may hold the rows of several calls; each call
starts with its ``bf16`` row, and every ratio is against the bf16 row of its own call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS_JSON = RESULTS / "h100.json"
E2E_JSON = RESULTS / "h100_e2e.json"
DEPLOY_JSON = RESULTS / "h100_deploy.json"
PEERS = (("torchao", "ao"), ("gemlite", "gl"))


def _shape(row: dict) -> str:
    return f"{row['N']}×{row['K']}"


def layer_table(rows: list[dict], scored_only: bool = True) -> str:
    """Markdown: speedup (µs) and peers per (config, shape) and M, plus a bf16 row per shape."""
    rows = [r for r in rows if r.get("scored") or not scored_only]
    ms = sorted({r["M"] for r in rows})
    shapes = list(dict.fromkeys(_shape(r) for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["config"], _shape(r), r["M"]): r for r in rows}
    lines = ["| config | N×K | " + " | ".join(f"M={m}" for m in ms) + " |",
             "|---|---|" + "---|" * len(ms)]
    for shape in shapes:
        bf16 = [next((r["bf16_us"] for r in rows if _shape(r) == shape and r["M"] == m), None) for m in ms]
        lines.append(f"| bf16 | {shape} | " + " | ".join(_us(us) for us in bf16) + " |")
    for config in configs:
        for shape in shapes:
            if any((config, shape, m) in cell for m in ms):
                lines.append(f"| {config} | {shape} | "
                             + " | ".join(_layer_cell(cell.get((config, shape, m))) for m in ms) + " |")
    return "\n".join(lines)


def _us(us) -> str:
    return "" if us is None else f"{us:.1f} µs"


def _speedup(x: float) -> str:
    """Two decimals, or two significant digits below 0.1 (a peer 100× slower than bf16 is not "0.00")."""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _layer_cell(row: dict | None) -> str:
    if row is None:
        return "n/m"
    if row.get("error") or not row.get("ok"):
        return "failed"
    text = f"{row['speedup']:.2f}× ({row['us']:.1f} µs)"
    peers = [f"{short} fails" if row.get(f"{peer}_error") else f"{short} {_speedup(row[f'{peer}_speedup'])}"
             for peer, short in PEERS if row.get(f"{peer}_error") or row.get(f"{peer}_speedup") is not None]
    return text + ("<br>" + " · ".join(peers) if peers else "")


def layer_notes(rows: list[dict], scored_only: bool = True) -> list[str]:
    """Facts of the run the table alone does not show: targets reached, checks, peers timed without a graph."""
    rows = [r for r in rows if r.get("scored") or not scored_only]
    targeted = [r for r in rows if r.get("target") and r.get("ok")]
    order = {c: i for i, c in enumerate(dict.fromkeys(r["config"] for r in rows))}
    met = sorted((r for r in targeted if r["speedup"] >= r["target"]),
                 key=lambda r: (order[r["config"]], r["M"], -r["N"]))
    notes = [f"{len(met)} of {len(targeted)} cells with a target reach it: "
             + ", ".join(f"{r['config']} {_shape(r)} M={r['M']} ({r['speedup']:.2f}× ≥ {r['target']})"
                         for r in met) + "."]
    failed = [r for r in rows if r.get("error") or not r.get("ok")]
    notes.append(f"All {len(rows)} aofx cells matched their `aofx.numerics` reference." if not failed else
                 "Failed their check: " + ", ".join(f"{r['config']} {_shape(r)} M={r['M']}" for r in failed) + ".")
    for peer, _ in PEERS:
        eager = sorted({r["config"] for r in rows if r.get(f"{peer}_graph_error")})
        if eager:
            notes.append(f"{peer} {', '.join(eager)} failed CUDA-graph capture and was timed without a graph.")
        failures: dict[tuple, list] = {}  # (config, shape, first line of the error) -> Ms
        for r in rows:
            if r.get(f"{peer}_error"):
                failures.setdefault((r["config"], _shape(r), r[f"{peer}_error"].splitlines()[0]), []).append(r["M"])
        for (config, shape, error), ms in failures.items():
            notes.append(f"{peer} {config} {shape} fails at M={', '.join(map(str, ms))}: `{error}`.")
    return notes


def deploy_table(rows: list[dict]) -> str:
    """Markdown: compile_us / aoti_us per config and M, one number per shape ("fail" where a cell failed,
    "n/m" where the rows hold no measurement)."""
    ms = sorted({r["M"] for r in rows})
    shapes = list(dict.fromkeys(_shape(r) for r in rows))
    cell = {(r["config"], _shape(r), r["M"]): r for r in rows}
    lines = [f"| config ({' · '.join(shapes)}) | " + " | ".join(f"M={m}" for m in ms) + " |",
             "|---|" + "---|" * len(ms)]
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for m in ms:
            rs = [cell.get((config, shape, m)) for shape in shapes]
            cells.append(" · ".join("n/m" if r is None else f"{r['compile_us'] / r['aoti_us']:.2f}" if r.get("ok")
                                    else "fail" for r in rs))
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def e2e_table(rows: list[dict]) -> str:
    """Markdown: tok/s, the ratio to its own call's bf16, and weight size, one line per row; with
    ``--aoti`` rows, also the package's tok/s and its ratio to the compiled step of the same row."""
    aoti = any("aoti_tok_s" in r for r in rows)
    lines = ["| `bench_e2e.py` call | config | tok/s | × bf16 | weights |" + (" AOTI tok/s | AOTI / compile |" if aoti else ""),
             "|---|---|---|---|---|" + ("---|---|" if aoti else "")]
    for call in _calls(rows):
        base = call[0]["tok_s"]
        packaged = any("aoti_tok_s" in r for r in call)
        command = "`--configs " + ",".join(r["config"] for r in call) + (" --aoti`" if packaged else "`")
        for i, r in enumerate(call):
            line = (f"| {command if i == 0 else ''} | {r['config']} | {r['tok_s']:.1f} | "
                    f"{r['tok_s'] / base:.2f} | {r['weight_gb']:.2f} GB |")
            if aoti:
                line += (f" {r['aoti_tok_s']:.1f} | {r['aoti_tok_s'] / r['tok_s']:.2f} |" if "aoti_tok_s" in r
                         else " - | - |")
            lines.append(line)
    return "\n".join(lines)


def _calls(rows: list[dict]) -> list[list[dict]]:
    """The rows split into calls, each starting at a bf16 row."""
    calls = []
    for r in rows:
        if r["config"] == "bf16" or not calls:
            calls.append([])
        calls[-1].append(r)
    if calls and calls[0][0]["config"] != "bf16":
        raise ValueError("end-to-end results must start each call with its bf16 row")
    return calls


def tables(layers: Path = LAYERS_JSON, e2e: Path = E2E_JSON, deploy: Path = DEPLOY_JSON) -> list[str]:
    """The generated blocks: layer table, its notes, end-to-end table, deploy table."""
    layer_rows = json.loads(layers.read_text())
    return [layer_table(layer_rows), "\n".join(f"- {n}" for n in layer_notes(layer_rows)),
            e2e_table(json.loads(e2e.read_text())), deploy_table(json.loads(deploy.read_text()))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=Path, default=LAYERS_JSON, help="bench_layers.py results (JSON)")
    p.add_argument("--e2e", type=Path, default=E2E_JSON, help="bench_e2e.py results (JSON)")
    p.add_argument("--deploy", type=Path, default=DEPLOY_JSON, help="bench_deploy.py results (JSON)")
    p.add_argument("--check", type=Path, metavar="MARKDOWN",
                   help="exit 1 unless this file contains every generated block verbatim")
    args = p.parse_args(argv)
    blocks = tables(args.layers, args.e2e, args.deploy)
    if args.check:
        text = args.check.read_text()
        stale = [b.splitlines()[0] for b in blocks if b not in text]
        if stale:
            print(f"{args.check} does not hold the current tables (regenerate with python -m benchmarks.tables); "
                  f"missing blocks starting: {stale}", file=sys.stderr)
            return 1
        print(f"{args.check}: tables up to date")
        return 0
    print("\n\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
