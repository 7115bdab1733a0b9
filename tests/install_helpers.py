"""Shared helpers and module-level models of tests/test_install.py and tests/test_capture.py
(module level, because pickling needs importable classes)."""


import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import aofx
from tests.common import normal_weights, seeded

MARGIN = 3.0  # dB under a scheme's single-layer floor that a single-layer check may lose
WEIGHT_ONLY = (aofx.Int4WeightOnlyConfig, aofx.Int8WeightOnlyConfig, aofx.Float8WeightOnlyConfig)
BF16 = torch.bfloat16


def quantize(model, config, **kwargs) -> list:
    """``aofx.quantize_``; returns the messages of aofx's "skipped" UserWarnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aofx.quantize_(model, config, **kwargs)
    return [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and str(w.message).startswith("aofx.quantize_")]


def names_in(message: str, fqn: str) -> bool:
    """Whether the skipped-warning ``message`` has a line for ``fqn`` (or a parameter of it)."""
    return re.search(rf"^\s+{re.escape(fqn)}(\.\w+)?:", message, re.M) is not None


def randn(*shape, dtype=BF16, seed=1, std=1.0):
    return (torch.randn(shape, generator=seeded(seed)) * std).to(dtype)


def one_layer(dtype=BF16, seed=0):
    return normal_weights(nn.Sequential(nn.Linear(256, 128, dtype=dtype)), seed=seed)


def packed(layer) -> dict:
    return {n: b for n, b in layer.named_buffers(recurse=False) if n in ("qdata", "scale", "zero")}


def bits(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact view for torch.equal (float8 tensors compare poorly on CPU)."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: the output times a buffer."""

    def __init__(self, *args, gain=3.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("gain", torch.tensor(gain, dtype=self.weight.dtype))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.gain


class AlphaLinear(nn.Linear):
    """A Linear subclass whose forward uses a Python float attribute."""

    def __init__(self, *args, alpha=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.alpha


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 128, dtype=BF16)
        self.scaled = ScaledLinear(128, 128, gain=3.0, dtype=BF16)
        self.down = nn.Linear(128, 64, bias=False, dtype=BF16)

    def forward(self, x):
        return self.down(torch.relu(self.scaled(torch.relu(self.up(x)))))
