"""transformers integration: ``from_pretrained`` of a saved aofx model returns the quantized model.

Importing this module registers the quantization method ``"aofx"`` with transformers. Then::

    import aofx, aofx.hf
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig())
    aofx.hf.save_pretrained(model, "out")          # config.json names "aofx" and every layer's config
    model = AutoModelForCausalLM.from_pretrained("out")   # quantized, loaded without the float weights

``from_pretrained`` builds the model on the meta device, where ``quantize_`` creates the packed
buffers with their final shapes and dtypes (the saved configs, by parameter fqn), and then loads the
saved tensors into them, so the float weights are never materialized.
"""

from __future__ import annotations

import transformers
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from aofx.api import quantize_, quantized_configs
from aofx.install import QuantizedModule
from aofx.serialization import config_from_metadata, quantized_metadata

METHOD = "aofx"


class AofxConfig(QuantizationConfigMixin):
    """``quantization_config`` of a saved aofx model: ``configs`` maps parameter fqns to config dicts."""

    def __init__(self, configs: dict | None = None, **kwargs):
        self.quant_method = METHOD
        self.configs = dict(configs or {})


class AofxHfQuantizer(HfQuantizer):
    """Loads pre-quantized aofx checkpoints (quantizing inside ``from_pretrained`` is not supported:
    quantize the loaded float model with ``aofx.quantize_`` instead)."""

    requires_calibration = True  # i.e. only pre-quantized checkpoints

    def _process_model_before_weight_loading(self, model, **kwargs):
        # Meta packed buffers; quantize_ also records the configs and unties quantized heads (record).
        quantize_(model, config_from_metadata(self.quantization_config.configs))
        for module in model.modules():
            if isinstance(module, QuantizedModule):
                # Every tensor of a quantized layer comes from the checkpoint. Without this flag the
                # weight initializers would read `weight`, dequantizing each layer once for nothing.
                module._is_hf_initialized = True

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def untie_quantized(model) -> None:
    """Drop the tied-weight entries (``lm_head.weight`` -> ``embed_tokens.weight``) that name a quantized
    weight: quantizing unties it (the embedding stays float), and transformers would otherwise look the
    head's ``weight`` up as a parameter while loading, or tie a float tensor back into it."""
    quantized = set(quantized_configs(model))
    for prefix, sub in model.named_modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            at = f"{prefix}." if prefix else ""
            for target, source in list(tied.items()):
                if at + target in quantized or at + source in quantized:
                    del tied[target]


def _register() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(AofxConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(AofxHfQuantizer)


def record(model: "transformers.PreTrainedModel") -> None:
    """Record the aofx configs as ``model.config.quantization_config`` (``quantize_`` calls this on a
    transformers model), so that ``model.save_pretrained`` writes a checkpoint that ``from_pretrained``
    loads quantized, or refuses with an unknown-method error where aofx.hf is not imported; without it
    transformers would load random float weights in place of the packed ones."""
    model.config.quantization_config = AofxConfig(quantized_metadata(model))
    untie_quantized(model)


def save_pretrained(model: "transformers.PreTrainedModel", save_directory, **kwargs) -> None:
    """``model.save_pretrained`` with the aofx configs recorded in ``config.json`` (raises for layers
    found through ``example_inputs``, which a checkpoint cannot rebuild)."""
    record(model)
    model.save_pretrained(save_directory, **kwargs)


_register()
