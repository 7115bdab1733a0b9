"""The scheme table: one short id, config and SQNR floor per row, shared by tests, benchmarks and examples.

``floor_db`` is the single-layer floor of docs/design.md ("Numerics"): the lowest SQNR (dB) that one
bf16 ``nn.Linear`` quantized with the row's config may reach against the exact linear, with weights
drawn from N(0, 0.02) and x from N(0, 1). Tests assert it; benchmarks print it next to what they measured.
The ids are what command-line flags (``--configs``, ``--config``) and test ids take.

    scheme("int8wo").config   # Int8WeightOnlyConfig(group_size=None)
"""

from __future__ import annotations

import dataclasses

from aofx.configs import (
    AOBaseConfig,
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    PerRow,
)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One row: ``id`` names ``config``; ``floor_db`` is the lowest SQNR (dB) of one bf16 linear quantized
    with ``config`` against the exact linear, weights N(0, 0.02), x N(0, 1)."""

    id: str
    config: AOBaseConfig
    floor_db: float


# floor_db: single-layer SQNR floor in dB (bf16 linear, weights N(0, 0.02), x N(0, 1)).
SCHEMES = (
    Scheme("int4wo-32", Int4WeightOnlyConfig(group_size=32), 19.5),
    Scheme("int4wo-128", Int4WeightOnlyConfig(group_size=128), 19.5),
    Scheme("int8wo", Int8WeightOnlyConfig(), 40.0),
    Scheme("int8wo-g64", Int8WeightOnlyConfig(group_size=64), 40.0),
    Scheme("int8dq", Int8DynamicActivationInt8WeightConfig(), 37.0),
    Scheme("fp8wo", Float8WeightOnlyConfig(), 31.0),
    Scheme("fp8dq-tensor", Float8DynamicActivationFloat8WeightConfig(), 28.0),
    Scheme("fp8dq-row", Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), 28.0),
)
_BY_ID = {s.id: s for s in SCHEMES}


def scheme(id: str) -> Scheme:
    """The row of ``SCHEMES`` with this id; a KeyError lists the known ids."""
    try:
        return _BY_ID[id]
    except KeyError:
        raise KeyError(f"unknown scheme id {id!r}; known ids: {', '.join(_BY_ID)}") from None
