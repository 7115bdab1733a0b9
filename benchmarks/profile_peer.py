"""The CUDA kernels a torchao-quantized layer runs, under torch.compile and eagerly: where the time of a
peer cell in the layer table goes.

    python -m benchmarks.profile_peer --configs int8wo,int4wo-128 --shape 14336x4096 --m 16

For each config it quantizes one bf16 ``nn.Linear`` with torchao's ``quantize_`` (the config of
``peers.py``), prints dynamo's graph and break counts, then the top kernels by CUDA time per call
(torch.profiler, 5 calls after warm-up) for each compile mode and for eager.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.peers import _torchao_config

MODES = {"default": None, "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs", "eager": "eager"}


def top_kernels(f, x, calls: int = 5, top: int = 3) -> list[tuple[str, float]]:
    """(kernel name, µs of CUDA time per call) of the ``top`` costliest kernels of ``f(x)``."""
    for _ in range(3):
        f(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            f(x)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    return [(e.key[:100], round(e.device_time_total / calls, 1)) for e in events]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="int8wo,int4wo-128")
    p.add_argument("--shape", default="14336x4096", help="NxK")
    p.add_argument("--m", type=int, default=16)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_peer.py needs a CUDA GPU")
    from torchao.quantization import quantize_

    n, k = map(int, args.shape.split("x"))
    x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
    for name in args.configs.split(","):
        layer = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        quantize_(layer, _torchao_config(name))
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x)
        print(f"{name} {n}x{k} M={args.m}: weight {type(layer.weight).__name__}, "
              f"{explained.graph_count} graph(s), {explained.graph_break_count} break(s)")
        for mode, how in MODES.items():
            torch._dynamo.reset()
            f = layer if how == "eager" else torch.compile(layer, mode=how, dynamic=False)
            print(f"  {mode}: " + "; ".join(f"{us} us {kernel}" for kernel, us in top_kernels(f, x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
