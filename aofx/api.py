"""``quantize_``: plan -> validate -> capture -> quantize -> install.

Promises (docs/design.md, "Invariants"): the model stays the same object with the same module tree;
a quantized module gets a generated subclass of its own class (``aofx.install``); every error about
the user's input is raised before anything is mutated; every weight the user asked for is quantized
or named, with the reason, in one ``UserWarning``. About 515 lines, to keep torchao's selection
rules (filters, fqn keys, aliases) and every check that runs before mutation in one file.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
import time
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from aofx import passes  # noqa: F401  (registers the built-in passes)
from aofx.capture import Seen, export_unit, run_examples
from aofx.configs import AOBaseConfig, FqnToConfig, check_version, describe
from aofx.guards import hooked_submodules
from aofx.install import (QuantizedModule, QuantizedWeight, _SHARED, install, linear_like, replaced_forward,
                          rewrite_capture, shared_key)
from aofx.registry import check_registered, find_handler, find_pass, handler_takes_parameter, uses_handler

log = logging.getLogger("aofx")
_REMOVED_KEYWORDS = ("apply_tensor_subclass", "tensor_subclass_inserter")


class _LegacyCallable(AOBaseConfig):
    """torchao 0.9's ``quantize_(model, fn)``: ``fn(module) -> module`` on each selected module."""

    def __init__(self, fn: Callable):
        self.fn = fn


@dataclasses.dataclass
class _Unit:
    """A module to quantize: its planned weights, and the inputs to capture it with."""

    fqn: str
    module: nn.Module
    weights: dict  # name -> QuantizedWeight
    inputs: Optional[tuple] = None  # (args, kwargs) recorded by example_inputs
    captures: list = dataclasses.field(default_factory=list)
    key: object = None


def quantize_(model: nn.Module, config=None, filter_fn: Optional[Callable] = None, device=None, *,
              example_inputs=None, **removed) -> None:
    """Quantize the linear layers of ``model`` in place, with torchao's API.

    Args:
        model: any ``nn.Module``; it stays the same object with the same module tree. It may be on
            the meta device: the packed buffers are then created on meta, with their final shapes
            and dtypes, ready for ``model.load_state_dict(sd, assign=True)`` (or
            ``aofx.load_quantized``).
        config: a config object (``Int4WeightOnlyConfig()``, ...; see ``aofx.configs``), an
            ``FqnToConfig`` mapping fqns to configs, a config registered with
            ``register_quantize_module_handler``, or (deprecated, with a ``DeprecationWarning``) a
            callable ``fn(module) -> module``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` selects modules. Default: every ``nn.Linear``
            (not ``MultiheadAttention.out_proj``, as torchao) and ``transformers``' ``Conv1D``, plus (with ``example_inputs``) every module seen using
            its own parameter as an ``F.linear`` weight, plus modules named by an ``FqnToConfig`` key.
        device: move each selected module there as it is quantized, so peak memory stays near the
            quantized size; then (unless ``config`` is an ``FqnToConfig``) the rest of the model, as
            torchao does. An unusable device raises before anything changes.
        example_inputs: a tuple of positional inputs (or a dict of keyword inputs) of ``model``. The
            model runs once on them, eagerly (a real call: buffers it updates keep the update); each
            module seen using a parameter through ``F.linear`` is then captured alone with the
            inputs it received. The model's own Python forward stays, so keyword calls,
            ``generate``, other batch sizes and train/eval work.

    ``FqnToConfig`` precedence, for a weight ``<module fqn>.<name>`` (torchao's): an exact key for the
    parameter fqn, then one for the module fqn, then the first ``"re:<regex>"`` key (in dict order)
    that fullmatches the parameter fqn, then the first that fullmatches the module fqn, then
    ``"_default"`` (linear layers only). ``None`` leaves it float. ``filter_fn`` cannot be combined
    with an ``FqnToConfig``.

    What happens to the model: each quantized module's class becomes a generated subclass of its
    class (``isinstance`` holds). Its float weight parameter is replaced by buffers ``qdata``,
    ``scale`` (and ``zero``), which ``state_dict`` holds; ``module.weight`` still reads (dequantized
    on each read); ``.to(dtype)`` never casts the packed tensors; ``repr`` shows the scheme; pickling
    and ``deepcopy`` work. Biases keep their ``requires_grad``.

    Warns:
        UserWarning: once, listing every weight asked for that stays float and why: a shape the
            scheme cannot take, already quantized, not a linear layer, a weight used outside
            ``F.linear`` or parametrized, 3-D MoE expert weights (with the count of parameters that
            stay float), and ``FqnToConfig`` keys that match nothing.

    Raises:
        TypeError: a config that is not registered (the message lists the registered types), a
            removed keyword (``apply_tensor_subclass=``), or a non-config argument.
        UnsupportedVersionError: (a ValueError and an AssertionError) ``version=1`` of the int4 or fp8
            configs, which torchao 0.18 removed; nothing is changed.
        ValueError: a weight with NaN or Inf, an uninitialized lazy layer, a packed buffer name
            that is already taken, or one tied weight given two configs; each names the layer, and
            the model is left exactly as it was. Also ``filter_fn`` together with an ``FqnToConfig``.
        NotImplementedError: an ``FqnToConfig`` key naming a parameter, for a config whose handler
            takes no ``parameter_name`` (as torchao); nothing is changed.
    """
    for key in removed:
        if key in _REMOVED_KEYWORDS:
            raise TypeError(f"quantize_() no longer takes {key}=; pass a config object as config= "
                            "(e.g. config=Int4WeightOnlyConfig())")
        raise TypeError(f"quantize_() got an unexpected keyword argument {key!r}")
    config = _as_config(config)
    if isinstance(config, FqnToConfig) and filter_fn is not None:
        raise ValueError("quantize_: pass filter_fn or an FqnToConfig, not both (as torchao); FqnToConfig "
                         "selects layers by its keys, and a key mapped to None leaves a layer float")
    if device is not None:
        device = torch.device(device)
        torch.empty(0, device=device)  # an unusable device raises here, before anything changes
    start = time.perf_counter()

    # 1. plan and 2. validate: no mutation; errors name the layer
    seen = run_examples(model, example_inputs) if example_inputs is not None else None
    handled, units, skipped = _plan(model, config, filter_fn, seen)
    _check_tied(units)
    # 3. handlers (user configs), then capture each unit; a unit that cannot be captured is skipped
    for fqn, module, cfg, parameter_name in handled:
        _apply_handler(model, fqn, module.to(device) if device is not None else module, cfg, parameter_name)
    units = _capture(units, skipped)
    if skipped:
        lines = "\n".join(f"  {fqn or '(the model)'}: {why}" for fqn, why in skipped)
        warnings.warn(f"aofx.quantize_ skipped {len(skipped)} weight(s) or layer(s), left as they were:\n{lines}",
                      UserWarning, stacklevel=2)
    # 4. quantize, one weight at a time on `device`; tied parameters once
    packed_by_param, packed = {}, {}
    for unit in units:
        for name, w in unit.weights.items():
            param = unit.module._parameters[name]
            if id(param) not in packed_by_param:
                packed_by_param[id(param)] = w.pack(param, device)
            packed[(id(unit.module), name)] = packed_by_param[id(param)]
    # 5. install
    for unit in units:
        install(unit.module, unit.weights, {n: packed[(id(unit.module), n)] for n in unit.weights},
                unit.captures, unit.key)
        if device is not None:
            unit.module.to(device)  # the rest of the layer (bias)
    if device is not None and not isinstance(config, FqnToConfig):
        model.to(device)  # as torchao: the whole model ends on `device`, not only its quantized layers
    _record_for_transformers(model)
    _refuse_diffusers_save()
    if units:
        log.info("aofx: quantized %d module(s) in %.1f s", len(units), time.perf_counter() - start)


def _refuse_diffusers_save() -> None:
    """diffusers' own ``save_pretrained`` would write the packed tensors without their configs, and its
    ``from_pretrained`` would then initialize those layers afresh: it refuses a quantized model instead."""
    mixin = getattr(sys.modules.get("diffusers"), "ModelMixin", None)
    if mixin is None or getattr(mixin.save_pretrained, "_aofx", False):
        return
    save = mixin.save_pretrained

    def save_pretrained(self, *args, **kwargs):
        if quantized_configs(self):
            raise ValueError(f"{type(self).__name__} has aofx-quantized layers, which diffusers' save_pretrained "
                             "cannot record (its from_pretrained would initialize them afresh): save with "
                             "aofx.save_quantized(model, path) and load with aofx.load_quantized")
        return save(self, *args, **kwargs)

    save_pretrained._aofx = True
    save_pretrained.__doc__, save_pretrained.__wrapped__ = save.__doc__, save
    mixin.save_pretrained = save_pretrained


def _record_for_transformers(model: nn.Module) -> None:
    """A quantized transformers model records its configs in its config (``aofx.hf.record``), so that
    its own ``save_pretrained`` writes a loadable checkpoint, unless a layer has no checkpoint form; its
    configs say ``_is_quantized`` as after a quantized load (``aofx.hf.mark_quantized``)."""
    tf = sys.modules.get("transformers")
    if tf is None or not quantized_configs(model):
        return
    from aofx import hf  # also makes every PreTrainedModel.save_pretrained record its configs when it saves

    hf.mark_quantized(model)
    if not isinstance(model, tf.PreTrainedModel) or found_by_examples(model):
        return  # no checkpoint form: aofx.hf.save_pretrained says why it cannot save them
    hf.record(model)


def _as_config(config) -> AOBaseConfig:
    if isinstance(config, AOBaseConfig):
        for cfg in config.fqn_to_config.values() if isinstance(config, FqnToConfig) else [config]:
            if cfg is not None:
                check_registered(cfg)
                if not uses_handler(cfg):  # a user's handler decides about its versions itself
                    check_version(cfg)
        return config
    if callable(config) and not isinstance(config, type):
        warnings.warn("passing a callable to quantize_ is deprecated; pass a config object instead, "
                      "e.g. quantize_(model, Int4WeightOnlyConfig()) or a config registered with "
                      "register_quantize_module_handler", DeprecationWarning, stacklevel=3)
        return _LegacyCallable(config)
    raise TypeError(f"quantize_ needs a config object (an AOBaseConfig such as Int4WeightOnlyConfig()) "
                    f"or a callable; got {config!r}")


# ---------------------------------------------------------------- planning

def _lookup(config: FqnToConfig, fqns: list, param: bool = False) -> tuple:
    """``(config, matching key)`` for ``fqns``: ``[parameter fqn, module fqn]``, or one module fqn (one
    parameter fqn with ``param``).

    torchao's order: exact keys, then regexes on the parameter fqn, then on the module fqn, then
    ``"_default"``. torchao applies every regex that matches a parameter, so there a ``None`` only
    skips itself and a later match still applies; on the module fqn the first match decides."""
    table = config.fqn_to_config
    for fqn in fqns:
        if fqn in table:
            return table[fqn], fqn
    for i, fqn in enumerate(fqns):
        hits = [(cfg, key) for key, cfg in table.items() if key.startswith("re:") and re.fullmatch(key[3:], fqn)]
        if hits:
            is_param = i == 0 and (len(fqns) > 1 or param)
            return next((h for h in hits if h[0] is not None), hits[0]) if is_param else hits[0]
    return table.get("_default"), ("_default" if "_default" in table else None)


def _lookup_aliases(config: FqnToConfig, aliases: list, name: str = "", param_only: bool = False) -> tuple:
    """``_lookup`` for a module registered under several fqns (one instance shared, ALBERT-style), or for
    its parameter ``name`` (by the parameter's keys alone with ``param_only``): a key naming any of them
    counts, an exact key over a regex, and two of the same kind that say different things raise."""
    found = [(a, *_lookup(config, [f"{a}.{name}".strip(".")] + ([a] if name and not param_only else []),
                          param=param_only)) for a in aliases]

    def rank(key):  # 0: an exact name, 1: a regex, 2: "_default" or nothing
        return 2 if key in (None, "_default") else 1 if key.startswith("re:") else 0

    best = min(rank(k) for _, _, k in found)
    named = {describe(c) if c is not None else None: (a, c) for a, c, k in found if rank(k) == best < 2}
    if len(named) > 1:
        (a, c), (b, d) = list(named.values())[:2]
        raise ValueError(f"aofx.quantize_: {a} and {b} are one module registered twice but were given different "
                         f"configs ({c} and {d}); give them the same config; nothing was quantized")
    return next((c, k) for _, c, k in found if rank(k) == best)


def _unmatched_keys(model: nn.Module, config: FqnToConfig) -> list:
    names = [f for f, _ in model.named_modules(remove_duplicate=False)]
    names += [f for f, _ in model.named_parameters(remove_duplicate=False)]
    unmatched = []
    for key in config.fqn_to_config:
        if key == "_default":
            continue
        if key.startswith("re:"):
            if not any(re.fullmatch(key[3:], f) for f in names):
                unmatched.append(key)
        elif key not in names:
            unmatched.append(key)
    return unmatched


def _expert_params(module: nn.Module, seen: Optional[Seen]) -> list:
    """Stacked (3-D) MoE expert weights: (experts, out, in) tensors sliced per expert."""
    n = getattr(module, "num_experts", None)
    return [(name, p) for name, p in module.named_parameters(recurse=False)
            if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() == 3 and p.is_floating_point()
            and ((seen is not None and id(p) in seen.sliced) or (isinstance(n, int) and p.shape[0] == n))]


def _plan(model, config, filter_fn, seen):
    """``(handled, units, skipped)``: modules for handlers, units for passes, and what stays float."""
    handled, units, skipped, inside_handled = [], [], [], set()
    weighty_keys = set()  # keys that decided for a module holding a weight (or named exactly)
    fqn_map = isinstance(config, FqnToConfig)
    regexes = {k for k in config.fqn_to_config if k.startswith("re:")} if fqn_map else set()
    # A weight tied between a linear layer and another module (an embedding) is the linear's to quantize.
    if seen is not None:
        seen.linear -= {id(m._parameters.get("weight")) for m in model.modules() if linear_like(m) is not None}
    aliases = {}  # every fqn of each module instance, the first being named_modules' own
    for fqn, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(fqn)
    for fqn, module in model.named_modules():
        parts = fqn.split(".") if fqn else []
        if any(".".join(parts[:i]) in inside_handled for i in range(len(parts))):  # O(depth), not O(taken layers)
            continue  # inside a taken layer or a handler's module: torchao's walk stops there (at the root too)
        own = dict(module.named_parameters(recurse=False))
        kind = linear_like(module)
        if fqn_map:  # named by a key of its own (module or parameter fqn), not just by "_default"
            cfg, key = _lookup_aliases(config, aliases[id(module)])
            found = [(cfg, key)] + [_lookup_aliases(config, aliases[id(module)], p, param_only=True) for p in own]
            explicit = any(k not in (None, "_default") for _, k in found)
            asked = any(k not in (None, "_default") and c is not None for c, k in found)  # and not left alone
            module_named = key in aliases[id(module)]  # an exact module key, which beats regexes on its parameters
            exact = module_named or any(k is not None and not k.startswith("re:") and k != "_default"
                                        for _, k in found[1:])
            if own or exact:
                weighty_keys.update(k for _, k in found)
                # a regex that names this module, though a stronger key decided for it, names a weight too
                fqns = [f"{a}.{p}".strip(".") for a in aliases[id(module)] for p in ["", *own]]
                weighty_keys.update(k for k in regexes - weighty_keys if any(re.fullmatch(k[3:], f) for f in fqns))
        else:
            cfg, explicit, exact, module_named = config, False, False, False
        uses_linear = seen is not None and any(id(p) in seen.linear for p in own.values())
        experts = _expert_params(module, seen)
        if filter_fn is not None:
            selected = any(filter_fn(module, a) for a in aliases[id(module)])
        else:  # as torchao's default: not MultiheadAttention's out_proj, whose weight MHA reads itself
            linear = kind is not None and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)
            selected = linear or uses_linear or explicit or bool(experts and cfg is not None)
        if not selected:
            continue
        if cfg is not None and (isinstance(cfg, _LegacyCallable) or uses_handler(cfg)):
            if kind is not None or explicit or filter_fn is not None:
                handled.append((fqn, module, cfg, None))
                if not fqn_map:  # torchao's filter walk stops at a match; its FqnToConfig walk visits every module
                    inside_handled.add(fqn)
            continue
        if not fqn_map and kind is not None:
            inside_handled.add(fqn)  # as torchao's _replace_with_custom_fn_if_matches_filter: no recursion past a
            # selected linear layer (a selected container holds no weight: its children are still visited)
        if isinstance(module, QuantizedModule):
            skipped.append((fqn, f"already quantized ({module._aofx.scheme})"))
            continue
        if replaced_forward(module):
            skipped.append((fqn, "its forward was replaced on the instance, which the quantized layer's forward "
                                 "cannot reach; quantize before wrapping it"))
            continue
        if kind is not None:
            names = ["weight"]
        else:
            names = [n for n, p in own.items() if seen is not None and id(p) in seen.linear]
        if experts:
            count = sum(p.numel() for _, p in experts)
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in experts)
            skipped.append((fqn, f"stacked 3-D MoE expert weights ({shapes}) have no aofx kernel; "
                                 f"{count:,} parameters stay float"))
        if not names:
            if filter_fn is not None and not own and not experts:
                skipped.append((fqn, f"filter_fn selected this {type(module).__name__}, which holds no weight of its "
                                     "own; select its linear layers instead"))
            elif not experts and (own or exact) and (asked if fqn_map else cfg is not None):
                hint = "" if seen is not None else " (pass example_inputs to find modules that call F.linear)"
                skipped.append((fqn, f"{type(module).__name__} is not a linear layer and was not seen using a "
                                     f"parameter through F.linear{hint}"))
            continue
        if fqn_map:  # a parameter named by a key that aofx cannot quantize is said, not dropped
            for p in own:
                p_cfg, p_key = _lookup_aliases(config, aliases[id(module)], p, param_only=True)
                if (p not in names and p_cfg is not None and p_key not in (None, "_default")
                        and not (module_named and p_key.startswith("re:"))):
                    skipped.append((f"{fqn}.{p}".lstrip("."), "aofx quantizes weights used as an F.linear weight "
                                                              "(a linear layer's weight, or one seen with example_inputs)"))
        weights = {}
        for name in names:
            w_cfg = _lookup_aliases(config, aliases[id(module)], name)[0] if fqn_map else cfg
            if w_cfg is None:
                continue
            if uses_handler(w_cfg):
                if not handler_takes_parameter(w_cfg):  # torchao's wording
                    raise NotImplementedError(
                        f"aofx.quantize_: {type(w_cfg).__name__}'s handler does not yet support parameter "
                        f"quantization ({fqn}.{name}): it takes no parameter_name; name the module instead. "
                        "Nothing was quantized")
                handled.append((fqn, module, w_cfg, name))
                continue
            w, why = _check_weight(module, fqn, name, w_cfg, kind)
            if w is None:
                skipped.append((f"{fqn}.{name}".lstrip("."), why))
            else:
                weights[name] = w
        if weights:
            inputs = seen.inputs.get(id(module)) if seen is not None else None
            units.append(_Unit(fqn, module, weights, inputs))
    if fqn_map:
        unmatched = _unmatched_keys(model, config)
        skipped += [(key, "FqnToConfig key matches no module or parameter") for key in unmatched]
        # a regex that names only containers (torchao would hand each to the config's handler, and fail)
        skipped += [(key, "FqnToConfig key matches only modules that hold no weight; name their linear layers")
                    for key, c in config.fqn_to_config.items()
                    if key.startswith("re:") and c is not None and key not in weighty_keys and key not in unmatched]
    return handled, units, skipped


def _check_tied(units: list) -> None:
    """One parameter tied between layers is packed once, so its layers must ask for the same scheme."""
    first = {}
    for unit in units:
        for name, w in unit.weights.items():
            where = f"{unit.fqn}.{name}".lstrip(".")
            other = first.setdefault(id(unit.module._parameters[name]), (where, w.config))
            if describe(other[1]) != describe(w.config):
                raise ValueError(f"aofx.quantize_: {other[0]} and {where} are one tied parameter but were given "
                                 f"different configs ({describe(other[1])} and {describe(w.config)}); give them "
                                 "the same config or untie them; nothing was quantized")


def _check_weight(module, fqn, name, config, kind: Optional[bool]):
    """``(QuantizedWeight, None)``, or ``(None, why it stays float)``; raises on unusable input."""
    where = f"{fqn}.{name}".lstrip(".")
    if torch.nn.utils.parametrize.is_parametrized(module, name):
        return None, "the weight is parametrized (torch.nn.utils.parametrize); aofx quantizes stored weights"
    weight = module._parameters.get(name)
    if weight is None:
        if name in module._parameters or getattr(module, name, None) is None:
            return None, "the layer has no weight"
        return None, "the weight is computed before each call (weight_norm or a similar hook), not a stored parameter"
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"aofx.quantize_: {where} is an uninitialized lazy parameter; run the model once "
                         "(or call its initialize_parameters) before quantize_; nothing was quantized")
    if weight.dim() != 2 or not weight.is_floating_point():
        return None, f"not a 2-D floating-point weight ({tuple(weight.shape)}, {weight.dtype})"
    if weight.is_inference() and not torch.is_inference_mode_enabled():  # export cannot trace it outside
        return None, "the weight was made under torch.inference_mode(); call quantize_ under it too"
    if weight.numel() == 0:
        return None, f"the weight has no elements ({tuple(weight.shape)})"
    if not weight.is_meta and not torch.isfinite(weight).all():
        raise ValueError(f"aofx.quantize_: weight {where} contains NaN or Inf; nothing was quantized")
    transposed = bool(kind)
    reason = find_pass(config).skip_reason(weight.t() if transposed else weight, config)  # (N, K)
    if reason:
        return None, reason
    w = QuantizedWeight(name, config, weight.dtype, tuple(weight.shape), transposed,
                        QuantizedWeight.prefix_for(name, kind))
    for buffer in w.buffer_names():
        if hasattr(module, buffer):
            raise ValueError(f"aofx.quantize_: {fqn or 'the model'} already has an attribute {buffer!r}, where aofx "
                             f"would store {where}'s quantized data; nothing was quantized")
    return w, None


def _apply_handler(model, fqn, module, cfg, parameter_name=None):
    if isinstance(cfg, _LegacyCallable):
        new = cfg.fn(module)
    elif parameter_name is not None:  # a parameter key, for a handler that takes one
        new = find_handler(cfg)(module, cfg, parameter_name=parameter_name)
    else:
        new = find_handler(cfg)(module, cfg)
    if new is None or new is module:
        return
    if not fqn:
        warnings.warn("a quantize_ handler returned a new root module; quantize_ works in place, so the "
                      "root cannot be replaced and the returned module is ignored", UserWarning, stacklevel=3)
        return
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


# ---------------------------------------------------------------- capture

def _capture(units: list, skipped: list) -> list:
    """Capture and rewrite each unit on its float module; returns the units that captured."""
    kept, by_fqn = [], {}
    # Deepest first: a unit's graph inlines the planned units below it, which must have captured.
    for unit in sorted(units, key=lambda u: -u.fqn.count(".") - bool(u.fqn)):
        unit.key = shared_key(unit.module, unit.weights)
        if unit.key is not None and unit.key in _SHARED:
            unit.captures = [_SHARED[unit.key]]
            kept.append(unit)
            by_fqn[unit.fqn] = unit
            continue
        # Planned weights of this unit and of planned units below it, by fqn relative to the unit.
        planned = {name: (w, "") for name, w in unit.weights.items()}
        for fqn, other in by_fqn.items():
            if other is not unit and fqn.startswith(unit.fqn + "." if unit.fqn else ""):
                rel = fqn[len(unit.fqn) + 1:] if unit.fqn else fqn
                planned.update({f"{rel}.{n}": (w, f"{rel}.") for n, w in other.weights.items()})
        hooked = hooked_submodules(unit.module)
        if hooked:
            skipped.append((unit.fqn, f"hooks on {', '.join(hooked)} would run only while the layer is captured"))
            continue
        capture, errors = None, []
        for args, kwargs in _examples(unit):
            try:
                capture = export_unit(unit.module, args, kwargs)
                break
            except Exception as e:  # noqa: BLE001  (export's errors are many; the first line says which)
                errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        if capture is None:
            why = "; then ".join(errors) or "no example inputs reached this module"
            skipped.append((unit.fqn, f"torch.export could not capture it: {why}"))
            continue
        if errors:
            warnings.warn(f"aofx.quantize_: {unit.fqn or 'the model'} could not be captured with its recorded inputs "
                          f"({errors[0]}); it was captured alone as a linear layer instead", UserWarning, stacklevel=3)
        leftover = rewrite_capture(capture, planned)
        mine = [fqn for fqn in leftover if fqn in unit.weights]
        if mine:
            skipped.append((unit.fqn, f"its forward uses {', '.join(mine)} outside F.linear (transformed or read "
                                      "twice), so the float weight would still be needed"))
            continue
        unit.captures = [capture]
        if unit.key is not None:
            _SHARED[unit.key] = capture
        kept.append(unit)
        by_fqn[unit.fqn] = unit
    return sorted(kept, key=units.index)


def _examples(unit: _Unit) -> list:
    """Inputs to capture a unit with: the recorded ones (not for a standard linear, whose graph is
    shared), then, for a one-weight linear layer, two rows of zeros."""
    out = [unit.inputs] if unit.inputs is not None and unit.key is None else []
    if len(unit.weights) == 1:
        (w,) = unit.weights.values()
        if linear_like(unit.module) is not None:
            out.append(((w.example_rows(unit.module._parameters[w.name].device),), {}))
    return out


def found_by_examples(model: nn.Module) -> list:
    """The fqns of quantized modules that are not linear layers: found through ``example_inputs``,
    which a saved config cannot find again."""
    return [fqn for fqn, m in model.named_modules() if isinstance(m, QuantizedModule) and linear_like(m) is None]


def quantized_weights(model: nn.Module) -> dict:
    """``{parameter fqn: QuantizedWeight}`` for every quantized weight of ``model``."""
    return {f"{fqn}.{name}".lstrip("."): w for fqn, m in model.named_modules()
            if isinstance(m, QuantizedModule) for name, w in m._aofx.weights.items()}


def quantized_configs(model: nn.Module) -> dict:
    """``{parameter fqn: config}`` for every quantized weight of ``model``."""
    return {fqn: w.config for fqn, w in quantized_weights(model).items()}
