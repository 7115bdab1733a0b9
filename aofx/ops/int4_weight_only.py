"""``aofx::int4_weight_only_linear``: bf16/fp16 x times int4 weights, asymmetric per group."""

from typing import Optional

import torch
from torch.library import triton_op

from aofx import numerics
from aofx.kernels import int4_weight_only as kernels
from aofx.ops import _dispatch


@triton_op("aofx::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                            group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _dispatch.run(kernels.linear, numerics.int4_weight_only_linear, x, qdata, scale, zero, group_size, bias)


_dispatch.register(int4_weight_only_linear, numerics.dequantize_int4)
