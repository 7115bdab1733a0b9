"""``aofx::int8_weight_only_linear``: x times int8 weights, symmetric per row or per group."""

from typing import Optional

import torch
from torch.library import triton_op

from aofx import numerics
from aofx.kernels import int8_weight_only as kernels
from aofx.ops import _dispatch


@triton_op("aofx::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dispatch.run(kernels.linear, numerics.int8_weight_only_linear, x, qdata, scale, bias)


_dispatch.register(int8_weight_only_linear, numerics.dequantize_int8)
