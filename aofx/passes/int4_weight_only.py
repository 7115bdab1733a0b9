"""int4 weight-only: ``aten.linear(x, W, b)`` -> ``aofx.int4_weight_only_linear(x, qdata, scale, zero, gs, b)``.

Buffers on the layer: ``qdata`` uint8 (N, K//2), ``scale`` and ``zero`` bf16 (N, K//group_size).
"""

import torch

from aofx import numerics, ops  # noqa: F401  (ops registers torch.ops.aofx)
from aofx.configs import Int4WeightOnlyConfig
from aofx.passes._graph import LinearRewrite
from aofx.registry import register_pass


@register_pass(Int4WeightOnlyConfig)
class Int4WeightOnly(LinearRewrite):
    name = "int4_weight_only"
    op = torch.ops.aofx.int4_weight_only_linear.default
    packed_names = ("qdata", "scale", "zero")

    def skip_reason(self, weight, config):
        if weight.shape[1] % config.group_size:
            return f"in_features={weight.shape[1]} is not a multiple of group_size={config.group_size}"
        return None

    def quantize(self, weight, config):
        qdata, scale, zero = numerics.quantize_int4(weight, config.group_size)
        return {"qdata": qdata, "scale": scale, "zero": zero}

    def op_args(self, x, packed, bias, config):
        qdata, scale, zero = packed
        return (x, qdata, scale, zero, config.group_size, bias)

    def dequantize(self, packed, config):
        return numerics.dequantize_int4(packed["qdata"], packed["scale"], packed["zero"], config.group_size)
