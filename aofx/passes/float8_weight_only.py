"""fp8 weight-only: ``aten.linear(x, W, b)`` -> ``aofx.float8_weight_only_linear(x, qdata, scale, b)``.

Buffers on the layer: ``qdata`` float8_e4m3fn (N, K), ``scale`` fp32 (N,).
"""

import torch

from aofx import numerics, ops  # noqa: F401
from aofx.configs import Float8WeightOnlyConfig
from aofx.passes._graph import LinearRewrite
from aofx.registry import register_pass


def float8_skip_reason(weight):
    """fp8 tensor-core tiles need both dims to be multiples of 16."""
    n, k = weight.shape
    if n % 16 or k % 16:
        return f"float8 needs in_features and out_features to be multiples of 16, got {k} and {n}"
    return None


@register_pass(Float8WeightOnlyConfig)
class Float8WeightOnly(LinearRewrite):
    name = "float8_weight_only"
    op = torch.ops.aofx.float8_weight_only_linear.default

    def skip_reason(self, weight, config):
        return float8_skip_reason(weight)

    def quantize(self, weight, config):
        qdata, scale = numerics.quantize_float8(weight, per_row=True)
        return {"qdata": qdata, "scale": scale}

    def op_args(self, x, packed, bias, config):
        return (x, *packed, bias)

    def dequantize(self, packed, config):
        return numerics.dequantize_float8(packed["qdata"], packed["scale"])
