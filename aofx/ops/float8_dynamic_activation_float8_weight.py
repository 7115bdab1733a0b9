"""``aofx::float8_dynamic_activation_float8_weight_linear``: e4m3 x (per tensor or row) times e4m3 weights.

The weight granularity follows ``scale``'s shape: ``()`` per tensor, ``(N,)`` per row.
"""

from typing import Optional

import torch
from torch.library import triton_op

from aofx import numerics
from aofx.kernels import float8_dynamic_activation_float8_weight as kernels
from aofx.ops import _dispatch


@triton_op("aofx::float8_dynamic_activation_float8_weight_linear", mutates_args=())
def float8_dynamic_activation_float8_weight_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                                                   activation_per_row: bool,
                                                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dispatch.run(kernels.linear, numerics.float8_dynamic_activation_float8_weight_linear,
                         x, qdata, scale, activation_per_row, bias)


_dispatch.register(float8_dynamic_activation_float8_weight_linear, lambda qdata, scale, per_row: numerics.dequantize_float8(qdata, scale))
