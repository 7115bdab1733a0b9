"""Shared test fixtures: the configs every test is parametrized over, their SQNR floors, small models."""

import re

import pytest
import torch
from torch import nn

from aofx.schemes import SCHEMES

# (id, config, SQNR floor in dB): the rows of aofx.schemes.SCHEMES, as tuples
CASES = [(s.id, s.config, s.floor_db) for s in SCHEMES]
CONFIGS = [pytest.param(cfg, id=name) for name, cfg, _ in CASES]
CONFIGS_WITH_FLOOR = [pytest.param(cfg, floor, id=name) for name, cfg, floor in CASES]


def scheme_of(module) -> str:
    """The config class name a quantized module shows in its repr, or "" for a float one."""
    match = re.search(r"scheme=(\w+)", module.extra_repr())
    return match.group(1) if match else ""


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


class TwoLayer(nn.Module):
    """Two linears, one with and one without bias."""

    def __init__(self, dims=(256, 128, 64), dtype=torch.bfloat16):
        super().__init__()
        self.up = nn.Linear(dims[0], dims[1], dtype=dtype)
        self.down = nn.Linear(dims[1], dims[2], bias=False, dtype=dtype)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def two_layer(seed=0, **kwargs) -> TwoLayer:
    torch.manual_seed(seed)
    return TwoLayer(**kwargs)


def normal_weights(model: nn.Module, std=0.02, seed=0) -> nn.Module:
    g = seeded(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
