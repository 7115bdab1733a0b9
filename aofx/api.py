"""``quantize_``: plan -> validate -> quantize -> capture -> rewrite -> install.

Promises (DESIGN §2): the model stays the same object with the same class and module tree; every
error about the user's input is raised before anything is mutated; incompatible layers are skipped
with one ``UserWarning`` listing them; layers already quantized are skipped the same way.

Storage: a quantized weight ``<owner>.<name>`` becomes buffers ``<owner>.<prefix>qdata``,
``<prefix>scale`` (and ``<prefix>zero`` for int4), where ``prefix`` is empty for an ``nn.Linear``'s
``weight`` and ``"<name>_"`` for any other parameter used by ``F.linear``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import types
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from aofx import passes  # noqa: F401  (registers the built-in passes)
from aofx.capture import CapturedGraph, export_unit, resolve
from aofx.configs import AOBaseConfig, FqnToConfig, describe
from aofx.passes._graph import Target, drop_unused_inputs, linear_weight_inputs, placeholders, thread_targets
from aofx.registry import check_registered, find_handler, find_pass

log = logging.getLogger("aofx")
_REMOVED_KEYWORDS = ("apply_tensor_subclass", "tensor_subclass_inserter")


@dataclasses.dataclass
class _Weight:
    """A planned weight: the parameter ``owner.name`` at ``fqn``, and how to quantize it."""

    fqn: str
    owner: nn.Module
    owner_fqn: str
    name: str
    config: AOBaseConfig
    rewrite: object
    packed: dict = dataclasses.field(default_factory=dict)
    keep_param: bool = False

    def packed_fqn(self, key: str) -> str:
        prefix = "" if isinstance(self.owner, nn.Linear) and self.name == "weight" else f"{self.name}_"
        return f"{self.owner_fqn}.{prefix}{key}".lstrip(".")


class _LegacyCallable(AOBaseConfig):
    """torchao 0.9's ``quantize_(model, fn)``: ``fn(module) -> module`` on each selected module."""

    def __init__(self, fn: Callable):
        self.fn = fn


def quantize_(model: nn.Module, config=None, filter_fn: Optional[Callable] = None, device=None, *,
              example_inputs=None, **removed) -> None:
    """Quantize the linear layers of ``model`` in place (DESIGN §1).

    ``filter_fn(module, fqn) -> bool`` selects modules (default: every ``nn.Linear``); ``device``
    moves each selected module there before quantizing it; ``example_inputs`` (a tuple of
    positional args) captures the whole model, which also rewrites ``F.linear`` on parameters.
    """
    for key in removed:
        if key in _REMOVED_KEYWORDS:
            raise TypeError(f"quantize_() no longer takes {key}=; pass a config object as config= "
                            "(e.g. config=Int4WeightOnlyConfig())")
        raise TypeError(f"quantize_() got an unexpected keyword argument {key!r}")
    config = _as_config(config)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    start = time.perf_counter()

    # 1. plan (no mutation): handlers for user configs, weights for graph passes
    ep = export_unit(model, example_inputs) if example_inputs is not None else None
    handled, weights, skipped = _plan(model, config, filter_fn, ep)
    # 2. validate (no mutation)
    weights = _validate(weights, skipped)
    if skipped:
        lines = "\n".join(f"  {fqn}: {why}" for fqn, why in skipped)
        warnings.warn(f"aofx.quantize_ skipped {len(skipped)} layer(s):\n{lines}", UserWarning, stacklevel=2)

    for fqn, module, cfg in handled:
        _apply_handler(model, fqn, module, cfg)
    if ep is not None and handled:
        ep = export_unit(model, example_inputs)
    # 3. quantize, one weight at a time on `device`: peak memory stays near the quantized size
    for w in weights:
        weight = getattr(w.owner, w.name).detach()
        w.packed = w.rewrite.quantize(weight if device is None else weight.to(device), w.config)
    # 4-6. capture and rewrite
    per_linear = _capture_linears(weights)
    whole = _capture_model(model, ep, weights) if ep is not None and weights else None
    # 7. install
    for w in weights:
        _install_weight(w, per_linear.get(id(w.owner)))
        if device is not None:
            w.owner.to(device)  # the rest of the layer (bias), now that the float weight is gone
    if whole is not None:
        model.__dict__["_aofx_capture"] = whole
        model.forward = types.MethodType(_captured_forward_for(type(model).forward), model)
    if weights:
        log.info("aofx: quantized %d weight(s) in %.1f s", len(weights), time.perf_counter() - start)


def _as_config(config) -> AOBaseConfig:
    if isinstance(config, AOBaseConfig):
        if not isinstance(config, FqnToConfig):
            check_registered(config)
        else:
            for cfg in config.fqn_to_config.values():
                if cfg is not None:
                    check_registered(cfg)
        return config
    if callable(config) and not isinstance(config, type):
        warnings.warn("passing a callable to quantize_ is deprecated; pass a config object instead, "
                      "e.g. quantize_(model, Int4WeightOnlyConfig()) or a config registered with "
                      "register_quantize_module_handler", DeprecationWarning, stacklevel=3)
        return _LegacyCallable(config)
    raise TypeError(f"quantize_ needs a config object (an AOBaseConfig such as Int4WeightOnlyConfig()) "
                    f"or a callable; got {config!r}")


def _plan(model, config, filter_fn, ep):
    """``(handled, weights, skipped)``: modules for handlers, weights for passes, and skips."""
    linear_weight_ids = _linear_weight_ids(model, ep) if ep is not None else set()
    handled, weights, skipped, inside_handled = [], [], [], []
    for fqn, module in model.named_modules():
        if any(fqn.startswith(prefix + ".") for prefix in inside_handled):
            continue  # a handler replaces a whole subtree, as torchao's does
        owns_linear_weight = any(id(p) in linear_weight_ids for p in module.parameters(recurse=False))
        if filter_fn is not None:
            selected = filter_fn(module, fqn)
        else:
            selected = isinstance(module, nn.Linear) or owns_linear_weight
        cfg = config.config_for(fqn) if isinstance(config, FqnToConfig) else config
        if not selected or cfg is None:
            continue
        if isinstance(cfg, _LegacyCallable) or find_pass(cfg) is None:
            handled.append((fqn, module, cfg))
            inside_handled.append(fqn)
            continue
        if "_aofx_scheme" in module.__dict__:
            skipped.append((fqn, f"already quantized ({module.__dict__['_aofx_scheme']})"))
            continue
        if isinstance(module, nn.Linear):
            names = ["weight"]
        else:
            names = [n for n, p in module.named_parameters(recurse=False) if id(p) in linear_weight_ids]
            if not names and next(module.parameters(recurse=False), None) is None:
                continue  # a container (ModuleList, a block): its linears are planned on their own
            if not names:
                skipped.append((fqn, "not an nn.Linear" + ("" if ep is not None else
                                " (pass example_inputs to rewrite F.linear on its parameters)")))
                continue
        for name in names:
            weights.append(_Weight(f"{fqn}.{name}".lstrip("."), module, fqn, name, cfg, find_pass(cfg)))
    # A tied parameter is planned once, under its nn.Linear owner when it has one.
    by_param = {}
    for w in sorted(weights, key=lambda w: not isinstance(w.owner, nn.Linear)):
        by_param.setdefault(id(getattr(w.owner, w.name)), w)
    return handled, [w for w in weights if by_param[id(getattr(w.owner, w.name))] is w], skipped


def _linear_weight_ids(model, ep) -> set:
    """ids of the parameters used as a linear's weight anywhere in the exported graph."""
    capture = CapturedGraph(ep)
    sources = [capture.sources[n.name] for n in linear_weight_inputs(capture.gm)]
    return {id(resolve(model, fqn)) for kind, fqn in sources if kind == "state"}


def _validate(weights, skipped):
    """Raise on unusable weights (naming the fqn); move incompatible ones to ``skipped``."""
    kept = []
    for w in weights:
        weight = getattr(w.owner, w.name)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            skipped.append((w.fqn, f"not a 2-D floating-point weight ({getattr(weight, 'shape', None)})"))
            continue
        if weight.is_meta:
            skipped.append((w.fqn, "weight is on the meta device"))
            continue
        if not torch.isfinite(weight).all():
            raise ValueError(f"aofx.quantize_: weight {w.fqn} contains NaN or Inf; nothing was quantized")
        reason = w.rewrite.skip_reason(weight, w.config)
        if reason:
            skipped.append((w.fqn, reason))
            continue
        for key in w.rewrite.packed_names:
            name = w.packed_fqn(key).rsplit(".", 1)[-1]
            if hasattr(w.owner, name):
                raise ValueError(f"aofx.quantize_: {w.owner_fqn or 'the model'} already has an attribute "
                                 f"{name!r}, where aofx would store {w.fqn}'s quantized data")
        kept.append(w)
    return kept


def _apply_handler(model, fqn, module, cfg):
    new = cfg.fn(module) if isinstance(cfg, _LegacyCallable) else find_handler(cfg)(module, cfg)
    if new is None or new is module:
        return
    if not fqn:
        warnings.warn("a quantize_ handler returned a new root module; quantize_ works in place, so the "
                      "root cannot be replaced and the returned module is ignored", UserWarning, stacklevel=3)
        return
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def _rewrite(capture: CapturedGraph, targets: dict) -> int:
    """Run every pass that ``targets`` needs over the graph and its subgraphs; returns the count."""
    count = 0
    for gm, local in thread_targets(capture.gm, targets):
        for rewrite in {id(t.rewrite): t.rewrite for t in local.values()}.values():
            count += rewrite(gm, local)
    drop_unused_inputs(capture.gm)
    return count


def _capture_linears(weights) -> dict:
    """One captured graph per ``nn.Linear`` target, shared between layers of the same signature."""
    cache, out = {}, {}
    for w in weights:
        if not isinstance(w.owner, nn.Linear) or w.name != "weight":
            continue
        key = (w.rewrite.name, describe(w.config), w.owner.bias is not None, w.owner.weight.dtype)
        if key not in cache:
            weight = w.owner.weight
            ep = export_unit(w.owner, (torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device),))
            capture = CapturedGraph(ep)
            w_node = capture.placeholder_for(next(n for n, s in capture.sources.items() if s == ("state", "weight")))
            packed = [capture.add_state_input(k, w_node) for k in w.rewrite.packed_names]
            count = _rewrite(capture, {w_node: Target(w.rewrite, w.config, packed)})
            assert count == 1, f"expected one linear in the capture of {w.fqn}, rewrote {count}"
            capture.finalize({})
            cache[key] = capture
        out[id(w.owner)] = cache[key]
    return out


def _capture_model(model, ep, weights) -> CapturedGraph:
    """Rewrite the whole-model graph: every linear whose weight is a planned parameter."""
    capture = CapturedGraph(ep)
    by_param = {id(getattr(w.owner, w.name)): w for w in weights}
    targets, param_nodes, packed = {}, {}, {}
    for node in placeholders(capture.gm.graph):  # a tied parameter has one placeholder per fqn
        kind, fqn = capture.sources[node.name]
        w = by_param.get(id(resolve(model, fqn))) if kind == "state" else None
        if w is not None:
            if id(w) not in packed:
                packed[id(w)] = [capture.add_state_input(w.packed_fqn(k), node) for k in w.rewrite.packed_names]
            targets[node] = Target(w.rewrite, w.config, packed[id(w)])
            param_nodes[node] = w
    _rewrite(capture, targets)
    # A weight still read by other ops (an embedding tied to the head) stays a float parameter,
    # reached through an alias that survives installation, or kept where it is.
    rename, dropped = {}, {x.fqn for x in weights}
    for node, w in param_nodes.items():
        if not node.users:
            continue
        fqn = capture.sources[node.name][1]
        aliases = [n for n, p in model.named_parameters(remove_duplicate=False)
                   if p is getattr(w.owner, w.name) and n not in dropped]
        if aliases:
            rename[fqn] = aliases[0]
        else:
            w.keep_param = True
    capture.finalize(rename)
    return capture


def _install_weight(w: _Weight, capture: Optional[CapturedGraph]) -> None:
    for key, tensor in w.packed.items():
        w.owner.register_buffer(w.packed_fqn(key).rsplit(".", 1)[-1], tensor)
    if not w.keep_param:
        delattr(w.owner, w.name)
    if capture is None:
        return
    scheme = describe(w.config)
    w.owner.__dict__.update(_aofx_scheme=scheme, _aofx_capture=capture)
    if w.owner.bias is not None:
        w.owner.bias.requires_grad_(False)  # a grad-requiring input would make compile trace a joint graph
    w.owner.forward = types.MethodType(_linear_forward, w.owner)
    w.owner.extra_repr = types.MethodType(_linear_extra_repr, w.owner)


def _linear_forward(self, input):
    x = input.reshape(-1, input.shape[-1])  # (M, K): a Linear's capture is 2-D with a dynamic M
    out = self._aofx_capture(self, (x,), {})  # (M, N)
    return out.reshape(*input.shape[:-1], out.shape[-1])


def _linear_extra_repr(self) -> str:
    return (f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self._aofx_scheme}")


def _captured_forward_for(original: Callable) -> Callable:
    """The whole-model forward, with the signature of the one it replaces (``torch.export`` and
    ``dynamic_shapes`` bind arguments by that signature)."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return self._aofx_capture(self, args, kwargs)

    return forward
