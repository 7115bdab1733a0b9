"""Why a package of the 4096x14336 weight-only stack trailed ``torch.compile`` at M = 16 (bench_deploy's 0.94).

One process, one quantized stack of 4 distinct 4096x14336 layers, x of 16 rows, five ways, each timed as
``bench_layers.time_stack`` times a stack (CUDA-graph replays), per layer:
- ``compile_static``: ``torch.compile(dynamic=False)``, as bench_deploy's ``compile_us``;
- ``compile_dynamic``: ``torch.compile(dynamic=True)``, M symbolic;
- ``aoti_1_1024``: a package exported for M = 1..1024, as bench_deploy's ``aoti_us``;
- ``aoti_2_16``: exported for M = 2..16, a range that one config serves (no ``torch.cond`` on M's bucket);
- ``aoti_static16``: exported with M = 16 static.
With ``TORCH_LOGS=output_code`` each variant's generated code (the kernels' ``triton_meta``) goes to stderr,
after a ``######## VARIANT <name>`` line.

    TORCH_LOGS=output_code python -m benchmarks.deploy_m16 int8wo 2> /tmp/output_code.txt

Findings (``results/h100_deploy_m16.log``): the two dynamic-M variants of each path are slower by the same
2 us, and the static ones agree, so the cost is the symbolic M, not the package or its branches. Their
``_codes_mm_kernel`` launches differ in one specialization: a static M of 16 is marked divisible by 16
(Triton's ``tt.divisibility``), a symbolic M is not. Since then the 16-row tiles load rows past M without
a mask, and the package matches compile there (``results/h200_rows.json``).
"""

from __future__ import annotations

import sys
import tempfile

import torch

import aofx
from aofx.schemes import scheme
from benchmarks import bench_layers as bl
from benchmarks.bench_deploy import stack_from

N, K, LAYERS, M = 4096, 14336, 4, 16


def _mark(label: str) -> None:
    print(f"\n######## VARIANT {label}\n", file=sys.stderr, flush=True)


def main(name: str = "int8wo") -> dict:
    torch.manual_seed(0)
    weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    model = stack_from(weights)
    aofx.quantize_(model, scheme(name).config)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    res = {}

    def timed(label, fn):
        us, err = bl.time_stack(fn, 200)
        res[label] = us / LAYERS
        print(f"{name} {label}: {us / LAYERS:.1f} us/layer {err or ''}", flush=True)

    for label, dynamic in (("compile_static", False), ("compile_dynamic", True)):
        _mark(label)
        torch.compiler.reset()
        compiled = torch.compile(model, dynamic=dynamic)
        timed(label, lambda compiled=compiled: compiled(x))
    torch.compiler.reset()
    tmp = tempfile.mkdtemp()
    for label, lo, hi in (("aoti_1_1024", 1, 1024), ("aoti_2_16", 2, 16), ("aoti_static16", None, None)):
        _mark(label)
        if lo is None:
            ep = torch.export.export(model, (x,))
        else:  # a sample of 8 rows for 1..1024 (a sample at a bound could specialize), else 16
            sample = torch.randn(8 if lo == 1 else 16, K, device="cuda", dtype=torch.bfloat16)
            ep = torch.export.export(model, (sample,), dynamic_shapes=({0: torch.export.Dim("b", min=lo, max=hi)},))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/{label}.pt2")
        package = torch._inductor.aoti_load_package(path, run_single_threaded=True)
        timed(label, lambda package=package: package(x))
    print("RESULT", name, {k: round(v, 1) for k, v in res.items()}, flush=True)
    return res


if __name__ == "__main__":
    main(*sys.argv[1:2])
