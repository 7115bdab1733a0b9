"""What a captured graph bakes in of its module and of torch's state, and the recorders that find it
while ``capture.export_unit`` traces (see the guards in ``aofx/capture.py``).

- ``plain_attributes``: the module's plain attributes (and containers of them), functions, the fields
  of held objects that the trace read (``FieldReads``), each submodule's class and hooks, and which
  parameters are None; ``CapturedGraph.accepts`` compares them at each call.
- ``AttributeWrites``: attributes the forward sets (a graph cannot repeat them; undone, then refused).
- ``AmbientReads`` / ``ambient``: the grad mode, inference mode and autocast state the forward read.
- ``hooked_submodules``: hooks a graph would run only while traced.
"""

from __future__ import annotations

import functools
import logging
import sys
import types

import torch
from torch.nn.modules import module as nn_module


def _public(module: torch.nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, type(None))


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.MethodWrapperType)


class _Unchecked:
    """Stands for an attribute value that is not compared (an arbitrary object)."""


def _baked(v):
    """What a graph bakes in of an attribute value: plain values, and containers of them, by value; a
    tensor inside a container by identity and version (the graph holds it as a constant); a function by
    identity; other objects are not compared here (an object held as an attribute: ``_fields``). Tensor
    attributes themselves are read at run time (see ``CapturedGraph``)."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v._version)
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_baked(e) for e in v))
    if isinstance(v, dict):
        return (dict, tuple((k, _baked(e)) for k, e in v.items()))
    if isinstance(v, _FUNCTIONS):
        return v  # equal only to itself (a bound method: the same function of the same object)
    if isinstance(v, functools.partial):
        return (functools.partial, _baked(v.func), _baked(v.args), _baked(v.keywords))
    return _Unchecked


def _is_object(v) -> bool:
    """An instance whose fields a forward may read (a config, a helper), not a class or a module, nor a
    logger (it does not change what a graph computes, and torch.compile cannot read its fields)."""
    return isinstance(getattr(v, "__dict__", None), dict) and not isinstance(
        v, (type, types.ModuleType, torch.nn.Module, torch.Tensor, functools.partial, logging.Logger, *_FUNCTIONS,
            *_PLAIN))


_MISSING = object()


def _read(v, name: str):
    try:
        return getattr(v, name)
    except Exception:  # noqa: BLE001  (a property may raise)
        return _MISSING


def _fields(v, names: tuple) -> tuple:
    """The class of object ``v`` and the values of its fields ``names``, baked."""
    return (type(v), tuple((n, _baked(_read(v, n))) for n in names))


def same(now, then) -> bool:
    """``is`` first: an unchanged NaN equals itself, as it does inside tuples."""
    return type(now) is type(then) and (now is then or now == then)


def plain_attributes(module: torch.nn.Module, fields: dict | None = None) -> dict:
    """``{(submodule fqn, name): value}`` of what a forward may read and a graph bakes in: plain values
    (and tuples, lists, dicts of them, and functions, see ``_baked``), each submodule's class and hooks
    (the unit's own hooks run outside the graph), and which parameters and buffers are None (a bias
    set later). ``fields`` (``FieldReads.fields``): ``{(fqn, name): field names}`` of the objects held
    as attributes when traced, compared on those fields (the ones the trace read: a helper's call
    counter the forward never reads is not)."""
    fields = fields or {}
    out = {}
    for fqn, m in module.named_modules():
        out[(fqn, "<none>")] = tuple(n for table in (m._parameters, m._buffers) for n, t in table.items() if t is None)
        if fqn:  # the unit itself changes class when quantized, and its own hooks run outside the graph
            out[(fqn, "<class>")] = getattr(type(m), "_aofx_base", type(m))  # a quantized child keeps its class
            out[(fqn, "<hooks>")] = tuple(id(h) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values())
        for name, v in _public(m).items():
            if not isinstance(v, torch.Tensor):
                out[(fqn, name)] = _fields(v, fields[(fqn, name)]) if (fqn, name) in fields else _baked(v)
    return out


class FieldReads:
    """While tracing: which fields of the objects held by the unit's modules the forward reads. Each such
    object gets, for the trace, a subclass of its class that records attribute reads (an object whose class
    cannot be swapped, such as a ``SimpleNamespace``, is compared on all its fields instead)."""

    def __init__(self, module: torch.nn.Module):
        self.paths = {(fqn, name): v for fqn, m in module.named_modules() for name, v in _public(m).items()
                      if _is_object(v)}
        self.reads: dict = {}  # id(object) -> names read
        self.swapped: dict = {}  # id(object) -> (object, its class)

    def __enter__(self):
        for v in self.paths.values():
            if id(v) in self.swapped:
                continue
            cls = type(v)
            try:
                v.__class__ = _recording(cls)
            except Exception:  # noqa: BLE001  (immutable or incompatible classes)
                continue
            self.swapped[id(v)] = (v, cls)
            self.reads[id(v)] = _TRACE_READS[id(v)] = set()
        return self

    def __exit__(self, *exc):
        for key, (v, cls) in self.swapped.items():
            v.__class__ = cls
            _TRACE_READS.pop(key, None)
        return False

    def fields(self) -> dict:
        """``{(fqn, name): field names}`` to compare: those read (all, for an object not followed) whose values
        ``_baked`` compares. Objects below and the object's own methods are left out (torch.compile cannot
        inspect every object; a method's reads of fields are recorded themselves)."""
        out = {}
        for path, v in self.paths.items():
            names = self.reads[id(v)] if id(v) in self.reads else vars(v)
            out[path] = tuple(n for n in sorted(names) if not n.startswith("__") and _compared(v, _read(v, n)))
        return out


def _compared(owner, value) -> bool:
    return _baked(value) is not _Unchecked and not (isinstance(value, types.MethodType) and value.__self__ is owner)


_TRACE_READS: dict = {}  # id(object) -> the names read, while a trace follows it


@functools.cache
def _recording(cls: type) -> type:
    def __getattribute__(self, name):
        reads = _TRACE_READS.get(id(self))
        if reads is not None:
            reads.add(name)
        return cls.__getattribute__(self, name)

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__slots__": (),
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def hooked_submodules(module: torch.nn.Module) -> list[str]:
    """Fqns of ``module``'s submodules with forward or backward hooks (all of them while global module hooks
    are registered). A graph would run those hooks only while traced (their side effects lost, what they
    read baked in), so such a unit is not captured."""
    subs = [(fqn, m) for fqn, m in module.named_modules() if fqn]
    if subs and any(_global_hooks()):
        return [f"{fqn} (global module hooks)" for fqn, _ in subs]
    return [fqn for fqn, m in subs if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
            or m._backward_pre_hooks]


def _global_hooks() -> tuple:
    # register_module_forward_hook and friends keep them in torch.nn.modules.module
    return (nn_module._global_forward_pre_hooks, nn_module._global_forward_hooks, nn_module._global_backward_hooks,
            nn_module._global_backward_pre_hooks)


class AttributeWrites:
    """While tracing: the attributes the forward sets on the unit's modules (a call counter, public or
    ``_private``, a cached input), recorded and then undone, so the trace leaves the model as it was.
    Setting an attribute to the object it already holds (``self.buf += 1`` on a buffer, updated in place,
    which the graph repeats) is not a write."""

    def __init__(self, module: torch.nn.Module):
        self.fqns = {id(m): fqn for fqn, m in module.named_modules()}
        self.saved = {id(m): dict(vars(m)) for m in module.modules()}
        self.modules = list(module.modules())
        self.names: list[str] = []

    def __enter__(self):
        self.setattr = torch.nn.Module.__setattr__
        fqns, names, setattr_ = self.fqns, self.names, self.setattr

        def record(m, name, value):
            if id(m) in fqns and name != "training" and not _holds(m, name, value):
                names.append(f"{fqns[id(m)]}.{name}".lstrip("."))
            setattr_(m, name, value)

        torch.nn.Module.__setattr__ = record
        return self

    def __exit__(self, *exc):
        torch.nn.Module.__setattr__ = self.setattr
        if self.names:
            for m in self.modules:  # what the trace wrote (proxies, counters) must not stay on the model
                vars(m).clear()
                vars(m).update(self.saved[id(m)])
        self.names = list(dict.fromkeys(self.names))
        return False


def _holds(m: torch.nn.Module, name: str, value) -> bool:
    """Whether ``m.<name>`` already is ``value`` (a plain attribute, parameter, buffer or submodule)."""
    for table in (vars(m), m._parameters, m._buffers, m._modules):
        if name in table:
            return table[name] is value
    return False


# Ambient torch state a forward may branch on, and a graph then bakes in: kind -> the torch functions reading it.
AMBIENT_READERS = {
    "grad": ("is_grad_enabled",),
    "inference": ("is_inference_mode_enabled",),
    "autocast": ("is_autocast_enabled", "is_autocast_cpu_enabled", "get_autocast_dtype",
                 "get_autocast_gpu_dtype", "get_autocast_cpu_dtype"),
}


def ambient(kinds) -> tuple:
    """``((kind, value), ...)``: the current grad mode, inference mode or autocast state (enabled and
    dtype on CPU and CUDA), for each of ``kinds``. Read through ``torch``'s attributes, so that a graph
    chosen by it inside an enclosing unit's trace guards that unit's graph too."""
    out = []
    for kind in kinds:
        if kind == "grad":
            value = torch.is_grad_enabled()
        elif kind == "inference":
            value = torch.is_inference_mode_enabled()
        else:
            value = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
        out.append((kind, value))
    return tuple(out)


class AmbientReads:
    """While tracing: the kinds of ambient state that code outside torch (the forward) reads through
    ``torch.is_grad_enabled`` and the like. Torch's own reads (export's, ``torch.autocast``'s) are not
    branches of the forward."""

    def __init__(self):
        self.kinds: set[str] = set()
        self.saved: dict = {}

    def __enter__(self):
        for kind, names in AMBIENT_READERS.items():
            for name in names:
                if hasattr(torch, name):
                    self.saved[name] = fn = getattr(torch, name)
                    setattr(torch, name, self._spy(kind, fn))
        return self

    def _spy(self, kind: str, fn):
        kinds = self.kinds

        @functools.wraps(fn)
        def spy(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").partition(".")[0] != "torch":
                kinds.add(kind)
            return fn(*args, **kwargs)
        return spy

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch, name, fn)
        return False


def modes(module: torch.nn.Module) -> tuple:
    """The train/eval flags of ``module`` and its submodules: a graph bakes them in (dropout)."""
    return tuple(m.training for m in module.modules())
