"""Save and load quantized models as safetensors files that carry their configs.

``save_quantized(model, path)`` writes ``model.state_dict()`` (packed tensors under each layer's
fqn) with the metadata key ``"aofx.configs"``: ``{parameter fqn: config_to_dict(config)}``.
``load_quantized(model, path)`` takes a model built from its architecture, float or with its
parameters on the meta device (``init_empty_weights``), quantizes it with those configs (on meta that
only creates meta buffers of the right shapes and dtypes) and loads the tensors with ``assign=True``:
peak host memory stays near the quantized size when the model was built on meta.

Tensors shared by tied layers are written once; ``"aofx.aliases"`` maps the other names to it.
``"aofx.dtypes"`` holds each quantized weight's dtype (what it dequantizes to, and its layer computes in),
which the codes do not tell: a model saved after ``.half()`` loads computing in fp16, as its biases load.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from aofx.api import found_by_examples, quantize_, quantized_configs, quantized_weights
from aofx.configs import FqnToConfig, config_from_dict, config_to_dict, describe
from aofx.install import QuantizedWeight, linear_like, set_weight_dtype
from aofx.registry import find_pass

CONFIGS_KEY, ALIASES_KEY, DTYPES_KEY = "aofx.configs", "aofx.aliases", "aofx.dtypes"


def quantized_metadata(model: nn.Module) -> dict:
    """``{parameter fqn: config dict}`` for every quantized weight of ``model``. Raises for layers that
    ``quantize_`` found through ``example_inputs``: a saved config cannot rebuild those."""
    found = found_by_examples(model)
    if found:
        raise ValueError(f"cannot save {', '.join(found[:4])}: quantize_ found these through example_inputs, which "
                         "loading cannot repeat; save the whole model with torch.save instead")
    return {fqn: config_to_dict(cfg) for fqn, cfg in quantized_configs(model).items()}


@contextlib.contextmanager
def init_empty_weights():
    """Build a model with its parameters on the meta device and its buffers real, for ``load_quantized``:
    buffers that are computed, not saved (rotary ``inv_freq``, BERT's ``position_ids``), keep their values.
    (``with torch.device("meta")`` would leave those on meta, and loading would raise.)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def config_from_metadata(configs: dict) -> FqnToConfig:
    """The ``FqnToConfig`` that quantizes a fresh model the way the saved one was (and nothing else)."""
    return FqnToConfig({fqn: config_from_dict(d) for fqn, d in configs.items()})


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state dict and per-layer configs to the safetensors file ``path``."""
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.contiguous()
    dtypes = {fqn: str(w.dtype).removeprefix("torch.") for fqn, w in quantized_weights(model).items()}
    metadata = {CONFIGS_KEY: json.dumps(quantized_metadata(model)), ALIASES_KEY: json.dumps(aliases),
                DTYPES_KEY: json.dumps(dtypes)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_quantized(model: nn.Module, path: str | os.PathLike, device=None, strict: bool = True) -> nn.Module:
    """Quantize ``model`` with the configs saved in ``path`` and load its tensors; returns ``model``.

    ``model`` has the saved model's architecture and is not quantized yet: built normally, or with its
    parameters on the meta device (``with aofx.init_empty_weights(): model = MyModel(...)``) to skip
    the float weights.
    ``device`` is where the tensors are loaded (default: CPU).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if CONFIGS_KEY not in metadata:
        raise ValueError(f"{path} has no {CONFIGS_KEY!r} metadata: it was not written by aofx.save_quantized")
    aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
    shapes.update({alias: shapes[name] for alias, name in aliases.items() if name in shapes})
    saved = config_from_metadata(json.loads(metadata[CONFIGS_KEY]))
    problems = _misfits(model, saved.fqn_to_config, shapes, strict)
    if problems:  # before quantize_, so that a model the file does not fit is left as it was
        raise ValueError(f"{path} does not fit this model, which is left unchanged: " + "; ".join(problems[:8])
                         + ("; ..." if len(problems) > 8 else ""))
    quantize_(model, saved)
    state = load_file(os.fspath(path), device=str(device or "cpu"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=strict, assign=True)
    for fqn, dtype in json.loads(metadata.get(DTYPES_KEY, "{}")).items():  # (files of aofx 0.2.0 lack them)
        owner, _, name = fqn.rpartition(".")
        set_weight_dtype(model.get_submodule(owner), name, getattr(torch, dtype))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"after loading {path}, these tensors are still on the meta device (not in the file; "
                         f"build the model under aofx.init_empty_weights(), which keeps buffers real): "
                         f"{', '.join(leftover[:8])}")
    return model


def _misfits(model: nn.Module, configs: dict, shapes: dict, strict: bool) -> list[str]:
    """What keeps the file (``shapes``: {key: shape}, ``configs``: {weight fqn: config}) from loading into
    ``model``: layers it lacks or quantized with another config, tensors of other shapes, and, with
    ``strict``, missing and unexpected keys. Packed tensors stand for their weight, whose rows they keep."""
    done = quantized_configs(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    problems, packed = [], set()
    for fqn, cfg in configs.items():
        owner, _, name = fqn.rpartition(".")
        kind = linear_like(model.get_submodule(owner)) if fqn in params or fqn in done else None
        stem = f"{owner}.{QuantizedWeight.prefix_for(name, kind)}".lstrip(".")
        packed.update(f"{stem}{k}" for k in find_pass(cfg).packed_names)
        if fqn in done:
            if done[fqn] != cfg:
                problems.append(f"{fqn} is quantized with {describe(done[fqn])}, the file holds {describe(cfg)}")
        elif fqn not in params:
            problems.append(f"the file quantizes {fqn}, which the model lacks")
        elif stem + "qdata" in shapes:
            n, k = params[fqn].shape[::-1] if kind else params[fqn].shape  # Conv1D stores (K, N)
            if shapes[stem + "qdata"] not in ((n, k), (n, k // 2)):  # int4 packs two codes a byte
                problems.append(f"{fqn} is {tuple(params[fqn].shape)}, the file's {stem}qdata {shapes[stem + 'qdata']}")
    for key, shape in state.items():
        if key in configs or key in packed:
            continue
        if key in shapes and shapes[key] != shape:
            problems.append(f"{key} is {shape}, {shapes[key]} in the file")
        elif key not in shapes and strict:
            problems.append(f"{key} is not in the file")
    if strict:
        problems += [f"the file's {k} is not in the model" for k in shapes if k not in state and k not in packed]
    return problems
