"""``aofx::int8_dynamic_activation_int8_weight_linear``: per-token int8 x, per-row int8 weights."""

from typing import Optional

import torch
from torch.library import triton_op

from aofx import numerics
from aofx.kernels import int8_dynamic_activation_int8_weight as kernels
from aofx.ops import _dispatch


@triton_op("aofx::int8_dynamic_activation_int8_weight_linear", mutates_args=())
def int8_dynamic_activation_int8_weight_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                                               bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dispatch.run(kernels.linear, numerics.int8_dynamic_activation_int8_weight_linear, x, qdata, scale, bias)


_dispatch.register(int8_dynamic_activation_int8_weight_linear, numerics.dequantize_int8)
