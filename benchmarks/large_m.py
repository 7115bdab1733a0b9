"""Where the time goes at large M in the dynamic schemes (fp8dq-row, int8dq), and what bounds them.

Per layer, on the scored shapes at M = 128 and 1024: a stack of 4 distinct layers (past L2) timed as
``bench_layers.time_stack`` times one (CUDA-graph replays). Columns (``*_us``):
- ``bf16``: ``F.linear`` (cuBLAS), the reference;
- ``fp8dq_row`` / ``int8dq``: aofx's kernels as ``select_config`` picks them (``fp8_config``, ``int8_config``);
- ``quant_fp8`` / ``quant_int8``: ``quantize_per_token`` alone, the activation quantization those paths run;
- ``scaled_mm``: ``torch._scaled_mm`` alone on x already quantized (fast accumulation, row-wise scales);
- ``fp8dq_row_triton``: aofx's fp8 row-wise path with the Triton GEMM forced (``library=False``);
- ``int_mm``: ``torch._int_mm`` alone (int32 out, without the scaling a layer would still need);
- ``torch_fp8_compiled``: row-wise e4m3 quantization in torch ops, then ``torch._scaled_mm``, under
  ``torch.compile(dynamic=False)``: the library path as Inductor fuses it.
``*_tflops`` = 2·M·N·K / time; ``quant_*_tbps``: the bytes the quantization moves (x read, codes and
scales written) / time, in TB/s.

    python -m benchmarks.large_m --out benchmarks/results/<gpu>_large_m.json
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
from aofx.kernels import int8_dynamic_activation_int8_weight as int8dq
from aofx.kernels.quantize import quantize_per_token
from benchmarks import bench_layers as bl

LAYERS = 4


def _torch_fp8_row(x, w_t, s_w):
    s_x = torch.clamp(x.abs().amax(-1, keepdim=True).float() / 448.0, min=1e-12)
    xq = (x.float() / s_x).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w_t, scale_a=s_x, scale_b=s_w, out_dtype=torch.bfloat16, use_fast_accum=True)


def shape_rows(n: int, k: int, ms=(128, 1024)) -> list[dict]:
    torch.manual_seed(0)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    e4m3 = [numerics.quantize_float8(w, per_row=True) for w in weights]
    int8 = [numerics.quantize_int8(w) for w in weights]
    compiled = torch.compile(_torch_fp8_row, dynamic=False)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, sx = quantize_per_token(x, True)
        xi, _ = quantize_per_token(x, False)
        triton_cfg = fp8dq.select_config(m, n, k, x.device, library=False)
        runs = {
            "bf16": lambda: [F.linear(x, w) for w in weights],
            "fp8dq_row": lambda: [fp8dq.linear(x, q, s, True) for q, s in e4m3],
            "quant_fp8": lambda: [quantize_per_token(x, True) for _ in range(LAYERS)],
            "scaled_mm": lambda: [torch._scaled_mm(xq, q.t(), scale_a=sx[:, None], scale_b=s[None, :].contiguous(),
                                                   out_dtype=torch.bfloat16, use_fast_accum=True) for q, s in e4m3],
            "fp8dq_row_triton": lambda: [fp8dq.linear(x, q, s, True, config=triton_cfg) for q, s in e4m3],
            "int8dq": lambda: [int8dq.linear(x, q, s) for q, s in int8],
            "quant_int8": lambda: [quantize_per_token(x, False) for _ in range(LAYERS)],
            "int_mm": lambda: [torch._int_mm(xi, q.t()) for q, _ in int8],
            "torch_fp8_compiled": lambda: [compiled(x, q.t(), s[None, :].contiguous()) for q, s in e4m3],
        }
        row = {"N": n, "K": k, "M": m, "fp8_config": str(fp8dq.select_config(m, n, k, x.device)),
               "fp8_triton_config": str(triton_cfg), "int8_config": str(int8dq.select_config(m, n, k))}
        for name, run in runs.items():
            us, err = bl.time_stack(run, 200)
            row[f"{name}_us"] = round(us / LAYERS, 2)
            if name.startswith("quant"):  # x read, codes and scales written
                row[f"{name}_tbps"] = round((3 * m * k + 4 * m) / (us / LAYERS) / 1e6, 2)
            else:
                row[f"{name}_tflops"] = round(2 * m * n * k / (us / LAYERS) / 1e6)
            if err:
                row[f"{name}_graph_error"] = err
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON output (rows)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("large_m.py needs a CUDA GPU (fp8 and int8 tensor cores).")
    rows = [r for n, k in bl.SCORED_SHAPES for r in shape_rows(n, k)]
    cols = ("bf16", "fp8dq_row", "quant_fp8", "scaled_mm", "fp8dq_row_triton", "torch_fp8_compiled",
            "int8dq", "quant_int8", "int_mm")
    print("N×K M " + " ".join(cols))
    for r in rows:
        print(f"{r['N']}×{r['K']} {r['M']} " + " ".join(f"{r[c + '_us']:.1f}" for c in cols))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
