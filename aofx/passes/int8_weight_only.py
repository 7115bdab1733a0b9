"""int8 weight-only: ``aten.linear(x, W, b)`` -> ``aofx.int8_weight_only_linear(x, qdata, scale, b)``.

Buffers on the layer: ``qdata`` int8 (N, K), ``scale`` fp32 (N,) per channel or (N, K//group_size).
"""

import torch

from aofx import numerics, ops  # noqa: F401
from aofx.configs import Int8WeightOnlyConfig
from aofx.passes._graph import LinearRewrite
from aofx.registry import register_pass


@register_pass(Int8WeightOnlyConfig)
class Int8WeightOnly(LinearRewrite):
    name = "int8_weight_only"
    op = torch.ops.aofx.int8_weight_only_linear.default

    def skip_reason(self, weight, config):
        if config.group_size and weight.shape[1] % config.group_size:
            return f"in_features={weight.shape[1]} is not a multiple of group_size={config.group_size}"
        return None

    def quantize(self, weight, config):
        qdata, scale = numerics.quantize_int8(weight, config.group_size)
        return {"qdata": qdata, "scale": scale}

    def op_args(self, x, packed, bias, config):
        return (x, *packed, bias)

    def dequantize(self, packed, config):
        return numerics.dequantize_int8(packed["qdata"], packed["scale"])
