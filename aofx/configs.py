"""Quantization configs: what to quantize and how, in torchao's vocabulary.

Each config is a dataclass validated in ``__post_init__``; a bad value raises ``ValueError`` (or
``TypeError`` for a wrong type) saying what was given and what is allowed. The snake_case names
(``int4_weight_only`` ...) *are* the config classes, permanently and without warnings.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from aofx.numerics import INT4_GROUP_SIZES


class AOBaseConfig(abc.ABC):
    """Base of every quantization config. Subclass it (as a dataclass) for your own scheme and
    register a module handler for it with ``register_quantize_module_handler``."""


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerRow:
    """One scale per row: per output channel for weights, per token for activations."""


Granularity = Union[PerTensor, PerRow]


def _check_group_size(config, group_size, allow_none: bool) -> None:
    if group_size is None and allow_none:
        return
    if group_size not in INT4_GROUP_SIZES:
        allowed = ", ".join(map(str, INT4_GROUP_SIZES)) + (" or None (per channel)" if allow_none else "")
        raise ValueError(f"{type(config).__name__}: group_size={group_size!r} is not supported; use {allowed}")


@dataclass
class Int4WeightOnlyConfig(AOBaseConfig):
    """int4 weights, asymmetric per group of ``group_size`` input features; bf16 activations."""

    group_size: int = 128

    def __post_init__(self):
        _check_group_size(self, self.group_size, allow_none=False)


@dataclass
class Int8WeightOnlyConfig(AOBaseConfig):
    """int8 weights, symmetric per output channel (``group_size=None``) or per group."""

    group_size: Optional[int] = None

    def __post_init__(self):
        _check_group_size(self, self.group_size, allow_none=True)


@dataclass
class Int8DynamicActivationInt8WeightConfig(AOBaseConfig):
    """int8 activations quantized per token at run time x int8 weights per output channel."""


@dataclass
class Float8WeightOnlyConfig(AOBaseConfig):
    """float8 weights with one scale per output channel; activations stay in their dtype."""

    weight_dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self):
        if self.weight_dtype != torch.float8_e4m3fn:
            raise ValueError(f"Float8WeightOnlyConfig: weight_dtype={self.weight_dtype} is not supported; "
                             "use torch.float8_e4m3fn")


@dataclass
class Float8DynamicActivationFloat8WeightConfig(AOBaseConfig):
    """float8 activations (scaled at run time) x float8 weights.

    ``granularity`` is ``PerTensor()``, ``PerRow()``, or an ``(activation, weight)`` pair of them.
    """

    activation_dtype: torch.dtype = torch.float8_e4m3fn
    weight_dtype: torch.dtype = torch.float8_e4m3fn
    granularity: Any = field(default_factory=PerTensor)

    def __post_init__(self):
        for name in ("activation_dtype", "weight_dtype"):
            if getattr(self, name) != torch.float8_e4m3fn:
                raise ValueError(f"Float8DynamicActivationFloat8WeightConfig: {name}={getattr(self, name)} "
                                 "is not supported; use torch.float8_e4m3fn")
        pair = self.granularity if isinstance(self.granularity, (tuple, list)) else (self.granularity,) * 2
        if len(pair) != 2 or not all(isinstance(g, (PerTensor, PerRow)) for g in pair):
            raise TypeError("Float8DynamicActivationFloat8WeightConfig: granularity must be PerTensor(), PerRow() "
                            f"or an (activation, weight) pair of them; got {self.granularity!r}")

    @property
    def granularities(self) -> tuple[Granularity, Granularity]:
        """``(activation, weight)`` granularity."""
        g = self.granularity
        return tuple(g) if isinstance(g, (tuple, list)) else (g, g)


@dataclass
class FqnToConfig(AOBaseConfig):
    """Per-module configs: ``{fqn or "re:<regex>" or "_default": config or None}``.

    Precedence: the exact fqn, then the first regex (in dict order) that fullmatches the fqn, then
    ``"_default"``. A value of ``None`` means "leave this module alone".
    """

    fqn_to_config: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, cfg in self.fqn_to_config.items():
            if not isinstance(key, str):
                raise TypeError(f"FqnToConfig: keys must be strings (fqn, 're:<regex>' or '_default'); got {key!r}")
            if key.startswith("re:"):
                re.compile(key[3:])
            if cfg is not None and (not isinstance(cfg, AOBaseConfig) or isinstance(cfg, FqnToConfig)):
                raise TypeError(f"FqnToConfig: value for {key!r} must be a config object or None; got {cfg!r}")

    def config_for(self, fqn: str):
        """The config for ``fqn``, or None when the module is not covered or is skipped."""
        table = self.fqn_to_config
        if fqn in table:
            return table[fqn]
        for key, cfg in table.items():
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return cfg
        return table.get("_default")


ModuleFqnToConfig = FqnToConfig

# torchao's snake_case names: the classes themselves, so calling one builds the config.
int4_weight_only = Int4WeightOnlyConfig
int8_weight_only = Int8WeightOnlyConfig
int8_dynamic_activation_int8_weight = Int8DynamicActivationInt8WeightConfig
float8_weight_only = Float8WeightOnlyConfig
float8_dynamic_activation_float8_weight = Float8DynamicActivationFloat8WeightConfig


def describe(config: AOBaseConfig) -> str:
    """Short text for ``repr``: the scheme name and its non-default fields."""
    fields = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)) \
        if dataclasses.is_dataclass(config) else ""
    return f"{type(config).__name__}({fields})"
