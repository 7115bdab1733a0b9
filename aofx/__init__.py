"""aofx: quantize the linear layers of a PyTorch model by export-and-rewrite.

``quantize_(model, config)`` captures each selected layer (or the whole model) with
``torch.export``, rewrites ``aten.linear`` into ``torch.ops.aofx.*`` ops backed by fused Triton
kernels, and installs the rewritten graph as the module's forward. The configs and names are
torchao's.
"""

from aofx.api import quantize_
from aofx.configs import (
    AOBaseConfig,
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    ModuleFqnToConfig,
    PerRow,
    PerTensor,
    float8_dynamic_activation_float8_weight,
    float8_weight_only,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)
from aofx.registry import register_quantize_module_handler

__all__ = [
    "quantize_",
    "AOBaseConfig",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Float8WeightOnlyConfig",
    "Float8DynamicActivationFloat8WeightConfig",
    "PerTensor",
    "PerRow",
    "FqnToConfig",
    "ModuleFqnToConfig",
    "register_quantize_module_handler",
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "float8_weight_only",
    "float8_dynamic_activation_float8_weight",
]
