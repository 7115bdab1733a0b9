"""Quantize a small model with each aofx config, compile it, export it; print accuracy and size.

    python examples/quickstart.py

Runs on CPU (the ops' aten reference) or CUDA (the Triton kernels), whichever is available.
"""

import copy

import torch
from torch import nn

import aofx
from aofx.numerics import sqnr
from aofx.schemes import scheme

# One row per config class, named by its id in aofx.schemes.SCHEMES (the README shows this table).
CONFIGS = {name: scheme(name).config for name in ("int4wo-128", "int8wo", "int8dq", "fp8wo", "fp8dq-row")}


class MLP(nn.Module):
    def __init__(self, dim=512, hidden=1536):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = nn.Sequential(MLP(), MLP()).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(8, 512, device=device, dtype=torch.bfloat16)
    ref = base(x)
    print(f"device={device}  bf16 weights: {state_bytes(base) / 1e6:.2f} MB\n")
    print(f"{'config':<12} {'SQNR dB':>8} {'compiled dB':>12} {'exported dB':>12} {'MB':>6} {'smaller':>8}")
    for name, config in CONFIGS.items():
        model = copy.deepcopy(base)
        aofx.quantize_(model, config)
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        batch = torch.export.Dim("batch", min=1, max=4096)
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        exported = ep.module()(x)
        size = state_bytes(model)
        print(f"{name:<12} {sqnr(ref, eager):>8.1f} {sqnr(ref, compiled):>12.1f} {sqnr(ref, exported):>12.1f} "
              f"{size / 1e6:>6.2f} {state_bytes(base) / size:>7.1f}x")


if __name__ == "__main__":
    main()
