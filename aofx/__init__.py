"""aofx: quantize the linear layers of a PyTorch model by export-and-rewrite.

``quantize_(model, config)`` captures each selected layer with ``torch.export``, rewrites
``aten.linear`` into ``torch.ops.aofx.*`` ops backed by fused Triton kernels, and gives the layer a
generated subclass of its class whose forward runs the rewritten graph. The configs and names are
torchao's. ``save_quantized`` / ``load_quantized`` keep the configs in safetensors metadata;
``aofx.hf`` makes transformers' ``from_pretrained`` load saved aofx models.
"""

__version__ = "0.2.0"

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
    float8_dynamic_activation_float8_weight,
    float8_weight_only,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_weight_only,
)
from aofx.granularity import Granularity, MappingType, PerAxis, PerGroup, PerRow, PerTensor, PerToken
from aofx.registry import register_quantize_module_handler
from aofx.serialization import init_empty_weights, load_quantized, save_quantized

__all__ = [
    "__version__",
    "quantize_",
    "save_quantized",
    "load_quantized",
    "init_empty_weights",
    "AOBaseConfig",
    "Int4WeightOnlyConfig",
    "Int8WeightOnlyConfig",
    "Int8DynamicActivationInt8WeightConfig",
    "Float8WeightOnlyConfig",
    "Float8DynamicActivationFloat8WeightConfig",
    "Granularity",
    "PerTensor",
    "PerRow",
    "PerGroup",
    "PerAxis",
    "PerToken",
    "MappingType",
    "FqnToConfig",
    "ModuleFqnToConfig",
    "register_quantize_module_handler",
    "int4_weight_only",
    "int8_weight_only",
    "int8_dynamic_activation_int8_weight",
    "float8_weight_only",
    "float8_dynamic_activation_float8_weight",
]
