"""torchao's granularity classes and ``MappingType``, by the same names and fields.

aofx's schemes use ``PerTensor``, ``PerRow`` (reducing over the last dim: one scale per output
channel of a weight, per token of an activation) and, for int8 weight-only, ``PerGroup``; the
configs say which they accept. ``PerAxis`` and ``PerToken`` exist so that code written for torchao
imports; a config given one raises a ``ValueError``. torchao's own objects are accepted too,
matched by class name.
"""

import enum
from dataclasses import dataclass, fields


class Granularity:
    """Base of the granularities: which elements share one scale."""


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerRow(Granularity):
    """One scale per row: per output channel for weights, per token for activations.
    ``dim`` is the dimension reduced over; aofx supports the last one, -1 (torchao's default)."""

    dim: int = -1


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements of a row."""

    group_size: int


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One scale per index along ``axis``."""

    axis: int


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per token (a row of the flattened activation)."""


class MappingType(enum.Enum):
    """How floats map onto the integer range: aofx's int schemes are symmetric."""

    SYMMETRIC = enum.auto()
    SYMMETRIC_NO_CLIPPING_ERR = enum.auto()
    ASYMMETRIC = enum.auto()


_CLASSES = {cls.__name__: cls for cls in (PerTensor, PerRow, PerGroup, PerAxis, PerToken)}


def as_granularity(g):
    """aofx's granularity for one of ours or torchao's (matched by class name, fields copied), else ``g``."""
    cls = _CLASSES.get(type(g).__name__)
    if cls is None or isinstance(g, cls):
        return g
    return cls(**{f.name: getattr(g, f.name) for f in fields(cls) if hasattr(g, f.name)})


def is_last_dim_row(g) -> bool:
    """``g`` is ``PerRow`` over the last dim, the only row layout aofx has."""
    return isinstance(g, PerRow) and g.dim == -1
