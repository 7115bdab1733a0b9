"""``aofx::float8_weight_only_linear``: x times e4m3 weights with a per-row scale."""

from typing import Optional

import torch
from torch.library import triton_op

from aofx import numerics
from aofx.kernels import float8_weight_only as kernels
from aofx.ops import _dispatch


@triton_op("aofx::float8_weight_only_linear", mutates_args=())
def float8_weight_only_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                              bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dispatch.run(kernels.linear, numerics.float8_weight_only_linear, x, qdata, scale, bias)


_dispatch.register(float8_weight_only_linear, numerics.dequantize_float8)
