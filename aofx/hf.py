"""transformers integration: ``from_pretrained`` of a saved aofx model returns the quantized model.

Importing this module registers the quantization method ``"aofx"`` with transformers. Then::

    import aofx, aofx.hf
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig())
    aofx.hf.save_pretrained(model, "out")          # config.json names "aofx" and every layer's config
    model = AutoModelForCausalLM.from_pretrained("out")   # quantized, loaded without the float weights

``from_pretrained`` builds the model on the meta device, where ``quantize_`` creates the packed
buffers with their final shapes and dtypes (the saved configs, by parameter fqn), and then loads the
saved tensors into them, so the float weights are never materialized.

Importing it also wraps ``PreTrainedModel.save_pretrained`` so that saving a model with aofx layers
records their configs from the model as it is then (a model without them saves as before).
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path
from typing import Optional

import torch
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

    def preprocess_model(self, model, dtype=None, **kwargs):
        self._dtype = dtype  # HfQuantizer.preprocess_model does not pass it on
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # Meta packed buffers; quantize_ also records the configs and unties quantized heads (record).
        configs = _in_model(model, self.quantization_config.configs)
        if self.quantization_config.configs and not configs:
            raise ValueError(f"this checkpoint's quantization_config names layers that {type(model).__name__} lacks "
                             f"(such as {next(iter(self.quantization_config.configs))}): it was saved from another "
                             "architecture")
        quantize_(model, config_from_metadata(configs))
        _check_packed_saved(model, checkpoint_files)
        _keep_in_fp32(model, getattr(self, "_dtype", None))
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
        return True  # adapters train on top: the ops have input gradients; the packed weights get none


def _in_model(model, configs: dict) -> dict:
    """The saved configs under the model's own fqns. transformers loads a checkpoint saved with a head into
    the bare model (``AutoModel``) and back by stripping or adding ``base_model_prefix`` to its keys; the
    configs follow. A config whose layer the model lacks (the head, in the bare model) is left out, as
    transformers leaves out its tensors."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for fqn, cfg in configs.items():
        for name in (fqn, fqn.removeprefix(f"{prefix}.") if prefix else fqn, f"{prefix}.{fqn}" if prefix else fqn):
            if name in names:
                out[name] = cfg
                break
    return out


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


def _check_packed_saved(model, checkpoint_files) -> None:
    """Raise when the checkpoint lacks packed tensors that its config names (a config recorded before the
    model changed, or edited): transformers would otherwise "newly initialize" them and load garbage."""
    missing = _missing_packed(model, checkpoint_files)
    if missing is not None:
        raise ValueError(f"this checkpoint holds fewer packed tensors than its quantization_config names ({missing}); "
                         "it was saved without aofx.hf, after the model changed since quantize_ recorded its configs, "
                         "or edited, or transformers merged this architecture's weights while saving it (GTE's "
                         "qkv_proj). Save the quantized model again with save_pretrained after `import aofx.hf`, "
                         "or with aofx.save_quantized")


def _missing_packed(model, checkpoint_files) -> Optional[str]:
    """None when the safetensors files hold every packed tensor of the model's quantized layers (by count),
    else the names of those that seem missing."""
    from safetensors import safe_open

    keys = set()
    for path in checkpoint_files or []:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                keys.update(f.keys())
    if not keys:
        return None
    expected = {}  # packed tensor -> its names (tied layers register one tensor on each)
    for fqn, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            for w in m._aofx.weights.values():
                for b in w.buffer_names():
                    expected.setdefault(id(m._buffers[b]), []).append((f"{fqn}.{b}".lstrip("."), b))
    # transformers renames keys while loading (ViT saves encoder.layer.0.attention.attention.query for the
    # module it calls layers.0.attention.q_proj), so names alone cannot say what is missing: the count of
    # packed tensors can, and the names then say which (a key ending with the name from the part before
    # its first index, layers.1.mlp.up_proj.qdata, which keeps block indices)
    suffixes = {b for names in expected.values() for _, b in names}
    if sum(k.rsplit(".", 1)[-1] in suffixes for k in keys) >= len(expected):
        return None
    tails = {tail for k in keys for tail in _tails(k)}
    missing = [names[0][0] for names in expected.values()
               if not any(n in keys or _tails(n)[-1] in tails for n, _ in names)]
    return ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "") if missing else "names renamed"


def _tails(key: str) -> list:
    """Every suffix of ``key`` that ``_check_packed_saved`` may match, the one it requires last."""
    parts = key.split(".")
    first_index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    start = max(first_index - 1, 0) if first_index is not None else max(len(parts) - 3, 0)
    return [".".join(parts[i:]) for i in range(start + 1)]


def _keep_in_fp32(model, dtype) -> None:
    """Quantized layers of ``_keep_in_fp32_modules`` compute in float32, as their float weights would load."""
    plan = model._get_dtype_plan(dtype) if dtype is not None and hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    pattern = re.compile("|".join(rf"(^|\.){re.escape(k)}(\.|$)" for k in plan))
    for fqn, module in model.named_modules():
        if isinstance(module, QuantizedModule) and pattern.search(fqn):
            module.to(torch.float32)  # packed codes keep their dtypes; the layer computes in float32


def _save_with_record(save):
    """``PreTrainedModel.save_pretrained`` that first records the aofx configs of the model being saved.
    transformers offers no save-time hook to a model it did not load quantized, and a record made at
    quantize time goes stale: a quantized submodule names its layers from itself, a resized head is float
    again, a config object shared with a float model claims its layers."""

    @functools.wraps(save)
    def save_pretrained(self, *args, **kwargs):
        quantized = bool(quantized_configs(self))
        if quantized or _recorded(self.config):
            record(self)  # from the live model, at save time: fqns from this root, current layers
        with _shared_packed_cloned(self):
            out = save(self, *args, **kwargs)
        directory = Path(args[0] if args else kwargs["save_directory"])
        missing = _missing_packed(self, sorted(directory.glob("*.safetensors"))) if quantized else None
        if missing is not None:  # say so now, not when a load fails later
            raise ValueError(f"{type(self).__name__}.save_pretrained: transformers merged or renamed this model's "
                             f"packed tensors while writing {directory} ({missing}: this architecture converts its "
                             "weights on save), so that checkpoint will not load. Save the quantized model with "
                             "aofx.save_quantized(model, path) instead")
        return out

    save_pretrained._aofx = True
    return save_pretrained


@contextlib.contextmanager
def _shared_packed_cloned(model):
    """While saving: layers that share packed tensors (one weight tied between two linear layers) write
    their own copies, which safetensors requires and transformers' tied-weight keys (named for the float
    ``weight``) cannot dedupe; the reloaded layers hold equal, untied tensors."""
    seen, restore = set(), []
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            for w in m._aofx.weights.values():
                for b in w.buffer_names():
                    t = m._buffers[b]
                    if id(t) in seen:
                        restore.append((m, b, t))
                        m._buffers[b] = t.clone()
                    seen.add(id(t))
    try:
        yield
    finally:
        for m, b, t in restore:
            m._buffers[b] = t


def _recorded(config) -> bool:
    q = getattr(config, "quantization_config", None)
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) == METHOD


def _register() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(AofxConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(AofxHfQuantizer)


def record(model: "transformers.PreTrainedModel") -> None:
    """Record the aofx configs as ``model.config.quantization_config`` (``quantize_`` calls this on a
    transformers model), so that ``model.save_pretrained`` writes a checkpoint that ``from_pretrained``
    loads quantized once aofx.hf is imported. Without the record, or without the import (transformers
    skips a quantization method it does not know), the model loads float, with random weights in place
    of the packed ones."""
    configs = quantized_metadata(model)  # raises for layers without a checkpoint form, before any change
    for sub in _sub_configs(model.config):  # a record made by quantize_ on a submodel (language_model)
        if _recorded(sub):
            del sub.quantization_config
    if configs:
        model.config.quantization_config = AofxConfig(configs)
    elif _recorded(model.config):
        del model.config.quantization_config
    untie_quantized(model)


def mark_quantized(model) -> None:
    """Set ``config._is_quantized = True``, as transformers' quantizers do on a quantized load, on the config
    of every module of ``model`` that holds one (each ``PreTrainedModel``, and the layers of a part of a model
    given to ``quantize_``). Some models branch on it: Jamba's and FalconMamba's mixers call ``dt_proj``
    only then (else they read ``dt_proj.weight``, dequantized), so a model quantized in session computes as
    its reloaded checkpoint does. transformers leaves the flag out of ``config.json``."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, transformers.PretrainedConfig):
            config._is_quantized = True


def _sub_configs(config) -> list:
    return [getattr(config, k) for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]


def save_pretrained(model: "transformers.PreTrainedModel", save_directory, **kwargs) -> None:
    """``model.save_pretrained`` with the aofx configs recorded in ``config.json`` (raises for layers
    found through ``example_inputs``, which a checkpoint cannot rebuild)."""
    record(model)
    model.save_pretrained(save_directory, **kwargs)


_register()
if not getattr(transformers.PreTrainedModel.save_pretrained, "_aofx", False):
    transformers.PreTrainedModel.save_pretrained = _save_with_record(transformers.PreTrainedModel.save_pretrained)
