"""Compare bench_layers runs of two code versions made in one GPU session (a before/after check).

    python -m benchmarks.compare --before b1.json,b2.json --after a1.json,a2.json [--markdown]

Each side may hold several runs of the same code, alternated with the other side's on one machine; a
cell's time is the median over its runs, and its spread is (max - min) / median within one side. A cell
regresses when after / before exceeds 1 + the larger of the two spreads (and 2 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _load(paths: str) -> dict[tuple, list[float]]:
    cells: dict[tuple, list[float]] = {}
    for path in paths.split(","):
        for row in json.loads(Path(path).read_text()):
            if row.get("us") is not None:
                cells.setdefault((row["config"], row["N"], row["K"], row["M"]), []).append(row["us"])
    return cells


def _spread(times: list[float]) -> float:
    return (max(times) - min(times)) / statistics.median(times)


def compare(before: dict, after: dict) -> list[dict]:
    rows = []
    for key in sorted(before.keys() & after.keys(), key=lambda k: (k[0], -k[1], k[2], k[3])):
        b, a = statistics.median(before[key]), statistics.median(after[key])
        spread = max(_spread(before[key]), _spread(after[key]), 0.02)
        config, N, K, M = key
        rows.append({"config": config, "N": N, "K": K, "M": M, "before_us": b, "after_us": a, "ratio": a / b,
                     "spread": spread, "regressed": a / b > 1 + spread})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="comma-separated bench_layers JSON files")
    p.add_argument("--after", required=True, help="comma-separated bench_layers JSON files")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    rows = compare(_load(args.before), _load(args.after))
    sep = " | " if args.markdown else "  "
    head = ["config", "N x K", "M", "before us", "after us", "after/before", "spread", ""]
    print(("| " if args.markdown else "") + sep.join(head) + (" |" if args.markdown else ""))
    if args.markdown:
        print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["config"], f"{r['N']}x{r['K']}", str(r["M"]), f"{r['before_us']:.1f}", f"{r['after_us']:.1f}",
                 f"{r['ratio']:.3f}", f"{r['spread']:.1%}", "REGRESSED" if r["regressed"] else ""]
        print(("| " if args.markdown else "") + sep.join(cells) + (" |" if args.markdown else ""))
    worse = [r for r in rows if r["regressed"]]
    print(f"{len(rows)} cells, {len(worse)} outside the run-to-run spread")
    return 1 if worse else 0


if __name__ == "__main__":
    raise SystemExit(main())
