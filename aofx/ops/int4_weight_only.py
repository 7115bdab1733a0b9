"""``aofx::int4_weight_only_linear``: bf16/fp16 x times int4 weights, asymmetric per group."""

from typing import Optional

import torch
from torch.library import triton_op

from aofx import numerics
from aofx.kernels import int4_weight_only as kernels
from aofx.ops import _dispatch


def _kernel(x, qdata, scale, zero, group_size: int, bias):
    return kernels.linear(x, qdata, scale, zero, bias)  # the kernels read group_size from scale's shape


@triton_op("aofx::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                            group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # The schema keeps group_size (saved programs and packages hold it); it must agree with the shapes.
    if scale.dim() != 2 or scale.shape[1] * group_size != x.shape[-1]:
        raise ValueError(f"aofx::int4_weight_only_linear: group_size={group_size} does not match K={x.shape[-1]} "
                         f"and scale {tuple(scale.shape)}")
    return _dispatch.run(_kernel, numerics.int4_weight_only_linear, x, qdata, scale, zero, group_size, bias)


_dispatch.register(int4_weight_only_linear, numerics.dequantize_int4)
