"""int8 dynamic: ``aten.linear(x, W, b)`` -> ``aofx.int8_dynamic_activation_int8_weight_linear(x, qdata, scale, b)``.

Buffers on the layer: ``qdata`` int8 (N, K), ``scale`` fp32 (N,). x is quantized per token at run time.
"""

import torch

from aofx import numerics, ops  # noqa: F401
from aofx.configs import Int8DynamicActivationInt8WeightConfig
from aofx.passes._graph import LinearRewrite
from aofx.registry import register_pass


@register_pass(Int8DynamicActivationInt8WeightConfig)
class Int8DynamicActivationInt8Weight(LinearRewrite):
    name = "int8_dynamic_activation_int8_weight"
    op = torch.ops.aofx.int8_dynamic_activation_int8_weight_linear.default

    def quantize(self, weight, config):
        qdata, scale = numerics.quantize_int8(weight)
        return {"qdata": qdata, "scale": scale}

    def op_args(self, x, packed, bias, config):
        return (x, *packed, bias)

    def dequantize(self, packed, config):
        return numerics.dequantize_int8(packed["qdata"], packed["scale"])
