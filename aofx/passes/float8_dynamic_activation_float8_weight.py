"""fp8 dynamic: ``aten.linear(x, W, b)`` ->
``aofx.float8_dynamic_activation_float8_weight_linear(x, qdata, scale, activation_per_row, b)``.

Buffers on the layer: ``qdata`` float8_e4m3fn (N, K), ``scale`` fp32: () for a PerTensor weight,
(N,) for PerRow. The activation granularity is an argument of the op.
"""

import torch

from aofx import numerics, ops  # noqa: F401
from aofx.configs import Float8DynamicActivationFloat8WeightConfig, PerRow
from aofx.passes._graph import LinearRewrite
from aofx.passes.float8_weight_only import float8_skip_reason
from aofx.registry import register_pass


@register_pass(Float8DynamicActivationFloat8WeightConfig)
class Float8DynamicActivationFloat8Weight(LinearRewrite):
    name = "float8_dynamic_activation_float8_weight"
    op = torch.ops.aofx.float8_dynamic_activation_float8_weight_linear.default

    def skip_reason(self, weight, config):
        return float8_skip_reason(weight)

    def quantize(self, weight, config):
        qdata, scale = numerics.quantize_float8(weight, per_row=isinstance(config.granularities[1], PerRow))
        return {"qdata": qdata, "scale": scale}

    def op_args(self, x, packed, bias, config):
        return (x, *packed, isinstance(config.granularities[0], PerRow), bias)

    def dequantize(self, packed, config):
        return numerics.dequantize_float8(packed["qdata"], packed["scale"])
