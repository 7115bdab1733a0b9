"""How a quantized module lives in the model: a generated subclass of its own class.

``quantize_`` gives each quantized module a class made for it, ``Quantized<Class>``, a subclass of
its original class (as ``torch.nn.utils.parametrize`` does), so ``isinstance`` checks still hold and
the module object, its fqn and its children stay. The subclass owns everything that has to know the
weight is packed:

* ``forward`` runs the module's captured, rewritten graph (``aofx.capture``). A call whose inputs no
  captured graph accepts is captured again (eagerly); under ``torch.compile`` or ``torch.export`` it
  runs the original forward with the weight dequantized instead, slower but never wrong.
* ``weight`` (each quantized parameter name) is a property: reading it returns the dequantized
  weight in the layer's dtype, a new tensor each time (one dequantization of the whole weight, so
  code that reads ``.weight.dtype`` in every forward pays for it in eager mode; ``torch.compile``
  drops the unused computation). Writing a tensor to it quantizes the new value with the layer's
  config; writing back an unchanged tensor it returned restores the codes it was read from
  (``torch.func.functional_call`` does that), since quantizing it again would drift. An in-place
  write to the returned tensor (not through ``.data``) quantizes the layer again from it, at the
  layer's next call or when the tensor is dropped.
* ``_apply``: ``.to(device)``, ``.cuda()`` and friends move the packed tensors; a dtype change
  (``.to(dtype)``, ``.half()``, ``.float()``) never casts packed codes or scales. It changes the
  dtype the layer computes in, as it does for a float layer.
* pickling (``torch.save``, ``pickle``, ``copy.deepcopy``) rebuilds the generated class from the
  original one. ``deepcopy`` keeps the captured graphs; pickles hold none: a standard linear takes (or
  captures, while unpickling) the shared graph of its key; other units capture again on their first
  eager call. A call the float module itself rejects (a wrong width) raises its error and changes
  nothing.
* ``extra_repr`` adds the scheme.

The packed tensors are buffers named ``<prefix><key>`` (``qdata``, ``scale``, ``zero``), where the
prefix is empty for the ``weight`` of a Linear-like module and ``"<name>_"`` otherwise.

About 570 lines: the class, its weight property, moves and pickling keep one invariant (the packed
buffers stand in for the weight), so they stay together.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
import types
import warnings
import weakref
from typing import Optional

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from aofx.capture import CapturedGraph, export_unit
from aofx.configs import AOBaseConfig, describe
from aofx.guards import hooked_submodules, modes
from aofx.passes._graph import Target, drop_unused_inputs, thread_targets
from aofx.registry import find_pass


def conv1d_class() -> Optional[type]:
    """``transformers.pytorch_utils.Conv1D`` when transformers is loaded (GPT-2's linear, weight (in, out))."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_like(module: nn.Module) -> Optional[bool]:
    """None if ``module`` is not a linear layer; else whether its weight is stored transposed."""
    if isinstance(module, nn.Linear):
        return False
    conv1d = conv1d_class()
    return True if conv1d is not None and isinstance(module, conv1d) else None


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_aofx_base", type(module))


def standard_linear(module: nn.Module) -> bool:
    """A linear layer whose forward is the library's own, so it maps (..., K) to (..., N) row by row."""
    conv1d = conv1d_class()
    return original_class(module).forward in (nn.Linear.forward, getattr(conv1d, "forward", None))


@dataclasses.dataclass
class QuantizedWeight:
    """One quantized parameter of a module: its scheme and what it was."""

    name: str
    config: AOBaseConfig
    dtype: torch.dtype  # the float dtype it reads back in
    shape: tuple
    transposed: bool = False  # stored (in, out), as Conv1D does
    prefix: str = ""

    @staticmethod
    def prefix_for(name: str, kind: Optional[bool]) -> str:
        """The packed buffers' prefix: none for the ``weight`` of a linear-like module (``kind``:
        ``linear_like``), ``"<name>_"`` otherwise."""
        return "" if kind is not None and name == "weight" else f"{name}_"

    @property
    def rewrite(self):
        return find_pass(self.config)

    def buffer_names(self) -> list[str]:
        return [self.prefix + key for key in self.rewrite.packed_names]

    def target(self, packed_nodes: list) -> Target:
        return Target(self.rewrite, self.config, packed_nodes, self.transposed)

    def example_rows(self, device) -> torch.Tensor:
        """Two rows of zeros (M, K) to capture a linear layer with: M stays dynamic (a size-1
        example dimension would be specialized)."""
        return torch.zeros(2, self.shape[0] if self.transposed else self.shape[1], dtype=self.dtype, device=device)

    def pack(self, value: torch.Tensor, device=None) -> dict:
        """Quantize a float weight stored as the layer stores it; contiguous packed tensors."""
        weight = value.detach().t() if self.transposed else value.detach()  # (N, K)
        weight = weight.contiguous() if device is None else weight.to(device).contiguous()
        return {k: t.contiguous() for k, t in self.rewrite.quantize(weight, self.config).items()}


# Captured graphs of standard linear layers hold no value of their own layer, so layers of one class,
# config, bias presence, dtype and shape share one graph, in this process and after unpickling.
_SHARED: dict = {}


class LayerState:
    """What ``quantize_`` keeps on a quantized module (``module.__dict__["_aofx"]``)."""

    def __init__(self, weights: dict, captures: list, shared_key=None):
        self.weights = weights  # name -> QuantizedWeight
        self.captures = captures  # CapturedGraph list, tried in order
        self.shared_key = shared_key
        self.uncapturable = False  # an eager capture failed: misses run the original forward
        self.reads: dict = {}  # id of a live tensor `weight` returned -> (name, its version, packed, alias)

    def remember_read(self, module: nn.Module, name: str, value: torch.Tensor, packed: tuple) -> None:
        key = id(value)
        # A detached alias shares the read's storage and version counter: it tells, even after the read
        # itself is dropped, whether it was written in place (RWKV rescales its weights so).
        self.reads[key] = (name, value._version, packed, value.detach())
        weakref.finalize(value, self.released, weakref.ref(module), key).atexit = False  # not at exit

    def released(self, module_ref, key) -> None:
        """A read tensor was dropped: what was written into it in place reaches the layer."""
        entry = self.reads.pop(key, None)
        module = module_ref()
        if entry is not None and module is not None:
            self.write_back(module, key, entry)

    def apply_writes(self, module: nn.Module) -> None:
        """Quantize again, from the tensor, each weight whose read was written in place since."""
        for key, entry in list(self.reads.items()):
            self.write_back(module, key, entry)

    def write_back(self, module: nn.Module, key, entry: tuple) -> None:
        name, version, packed, alias = entry
        w = self.weights[name]
        current = tuple(module._buffers[n] for n in w.buffer_names())
        if alias._version == version or any(a is not b for a, b in zip(packed, current)):
            return  # unchanged, or the layer was set again since: the later write wins
        requantize(module, name, alias, in_place=True)
        if key in self.reads:  # later checks compare against the codes just made
            self.reads[key] = (name, alias._version, tuple(module._buffers[n] for n in w.buffer_names()), alias)

    def packed_behind(self, name: str, value) -> Optional[tuple]:
        """The packed tensors ``value`` was read from, if it is such a read (still alive, so its id is
        its own), unmodified and of the layer's current shape and dtype; else None."""
        read_name, version, packed, _ = self.reads.get(id(value), (None, None, None, None))
        w = self.weights[name]
        if read_name != name or value.is_inference() or value._version != version:
            return None
        return packed if (tuple(value.shape), value.dtype) == (w.shape, w.dtype) else None

    def __getstate__(self):
        return {"weights": self.weights, "captures": [], "shared_key": self.shared_key, "uncapturable": False}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.reads = {}

    def __deepcopy__(self, memo):
        # A copy shares the graphs (they hold no tensor of their owner; they read its state when run),
        # so a deep-copied unit compiles and exports to the same ops without an eager call first.
        new = copy.copy(self)
        new.weights = copy.deepcopy(self.weights, memo)
        new.captures = list(self.captures)
        new.reads = {}
        return new

    @property
    def scheme(self) -> str:
        return ", ".join(sorted({describe(w.config) for w in self.weights.values()}))


def _in_features(state: LayerState) -> int:
    """K of a one-weight linear layer (Conv1D stores its weight (in, out))."""
    (w,) = state.weights.values()
    return w.shape[0] if w.transposed else w.shape[1]


def shared_key(module: nn.Module, weights: dict):
    """The sharing key of a standard linear layer's graph, or None for a module captured alone."""
    if not standard_linear(module):
        return None
    (w,) = weights.values()
    # The shape too: the graph's guards hold K (and Conv1D's view bakes N in).
    return (original_class(module), describe(w.config), module.bias is not None, w.dtype, w.shape)


# ---------------------------------------------------------------- capture + rewrite

def rewrite_capture(capture: CapturedGraph, planned: dict) -> list[str]:
    """Rewrite every linear in ``capture`` whose weight fqn is in ``planned`` ({fqn: (QuantizedWeight,
    packed fqn prefix)}). Returns the planned fqns still read by something other than a linear."""
    targets, nodes = {}, {}
    for fqn, node in capture.state_placeholders().items():
        if fqn in planned:
            w, where = planned[fqn]
            packed = [capture.add_state_input(where + name, node) for name in w.buffer_names()]
            targets[node] = w.target(packed)
            nodes[fqn] = node
    for gm, local in thread_targets(capture.gm, targets):
        for rewrite in {id(t.rewrite): t.rewrite for t in local.values()}.values():
            rewrite(gm, local)
    drop_unused_inputs(capture.gm)
    leftover = [fqn for fqn, node in nodes.items() if node.users]
    capture.finalize()
    return leftover


def stand_in(module: nn.Module, weights: dict) -> nn.Module:
    """A shallow float twin of a quantized module for ``torch.export``: the original class, zero
    weights of the recorded shape and dtype, the same children, buffers and attributes."""
    base = type(module)._aofx_base
    twin = base.__new__(base)
    twin.__dict__.update(module.__dict__)
    del twin.__dict__["_aofx"]
    packed = {n for w in weights.values() for n in w.buffer_names()}
    twin._buffers = {k: v for k, v in module._buffers.items() if k not in packed}
    twin._parameters = dict(module._parameters)
    device = next(iter(module._buffers[n] for n in packed)).device
    for name, w in weights.items():
        twin._parameters[name] = nn.Parameter(torch.zeros(w.shape, dtype=w.dtype, device=device), requires_grad=False)
    return twin


def capture_quantized(module: nn.Module, args: tuple, kwargs: dict) -> CapturedGraph:
    """Capture a quantized module again, for inputs no existing graph accepts."""
    weights = module._aofx.weights
    capture = export_unit(stand_in(module, weights), args, kwargs)
    leftover = rewrite_capture(capture, {name: (w, "") for name, w in weights.items()})
    if leftover:  # quantize_ checked this on the same forward; a data-dependent path may differ
        raise RuntimeError(f"{type(module).__name__} uses {leftover} outside F.linear for these inputs")
    return capture


# ---------------------------------------------------------------- the generated class

_LINEAR_SPEC = pytree.tree_flatten(((torch.empty(0),), {}))[1]
_MAX_CAPTURES = 32  # graphs kept by one module captured alone: batch of 1 or more, 1 token or more, train or
# eval, grad or not, two dtypes make 32 states; more means state that changes on (nearly) every call


class QuantizedModule:
    """Mixin of every generated ``Quantized<Class>``; see the module docstring."""

    _aofx_base: type
    _aofx_names: tuple

    def forward(self, *args, **kwargs):
        state = self.__dict__["_aofx"]
        if not torch.compiler.is_compiling() and state.reads:  # (no guard on reads under dynamo)
            state.apply_writes(self)  # a weight read earlier and written in place since
        if _fx_symbolic_tracing():  # fx traces into this class, which is not torch.nn's
            if state.shared_key is None:
                return self._aofx_base.forward(self, *args, **kwargs)  # on the weight dequantized on read
            (w,) = state.weights.values()  # a standard linear shows up as its op on the packed buffers
            packed = [self._buffers[b] for b in w.buffer_names()]
            x = args[0] if args else next(iter(kwargs.values()))
            return w.rewrite.op(*w.rewrite.op_args(x, packed, self.bias, w.config))
        # Ragged (nested) inputs, as nn.TransformerEncoder's padding path makes, have no (M, K) view: a
        # standard linear runs each sequence, another module its own forward on the weight dequantized on read.
        if state.shared_key is not None:  # a standard linear: rows are independent, run (M, K)
            x = args[0] if args else next(iter(kwargs.values()))
            if x.is_nested:  # QuantizedModule.forward, not self(t): the hooks ran once already
                return torch.nested.as_nested_tensor([QuantizedModule.forward(self, t) for t in x.unbind()],
                                                     layout=x.layout)
            leaves, spec = [x.reshape(-1, x.shape[-1])], _LINEAR_SPEC  # (M, K)
            training = None  # nn.Linear and Conv1D behave the same in train and eval
        else:
            leaves, spec = pytree.tree_flatten((args, kwargs))
            # hooks given to a submodule since quantize_ (or global ones) run: a graph would have run them once
            if any(isinstance(leaf, torch.Tensor) and leaf.is_nested for leaf in leaves) or hooked_submodules(self):
                return self._aofx_base.forward(self, *args, **kwargs)
            training = modes(self)

        def run(capture):
            out = capture.run(self, leaves)
            return out.reshape(*x.shape[:-1], out.shape[-1]) if state.shared_key is not None else out

        def accepts(capture):
            return capture.accepts(leaves, spec, training, any_rows=state.shared_key is not None, owner=self)

        for capture in state.captures:
            if accepts(capture):
                return run(capture)
        if (torch.compiler.is_compiling() or torch.compiler.is_exporting() or state.uncapturable
                or (state.shared_key is not None and x.shape[-1] != _in_features(state))):
            # weights dequantized on read; a linear given the wrong width raises the float layer's own error
            return self._aofx_base.forward(self, *args, **kwargs)
        if len(state.captures) >= _MAX_CAPTURES:  # what it reads changes on (nearly) every call
            state.uncapturable = True
            warnings.warn(f"aofx: {type(self).__name__} was captured {_MAX_CAPTURES} times for changing inputs or "
                          "state; it runs its original forward with the weight dequantized from now on", UserWarning)
            return self._aofx_base.forward(self, *args, **kwargs)
        try:
            capture = capture_quantized(self, *pytree.tree_unflatten(leaves, spec))
        except Exception as e:  # noqa: BLE001  (export's errors are many)
            # Inputs the float module rejects raise its own error here and change nothing.
            out = self._aofx_base.forward(self, *args, **kwargs)
            state.uncapturable = True
            warnings.warn(f"aofx: {type(self).__name__} could not be captured for these inputs "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                          "it runs its original forward with the weight dequantized from now on", UserWarning)
            return out
        state.captures.append(capture)
        if state.shared_key is not None:
            _SHARED.setdefault(state.shared_key, capture)
        # a graph that rejects the very inputs it was traced on (state that never compares equal) is not
        # run, and not traced again on every call: the layer runs its original forward from then on
        if accepts(capture):
            return run(capture)
        state.uncapturable = True
        warnings.warn(f"aofx: {type(self).__name__}'s graph does not accept the inputs it was captured for (its "
                      "state changes on every call); it runs its original forward with the weight dequantized "
                      "from now on", UserWarning)
        return self._aofx_base.forward(self, *args, **kwargs)

    def _get_name(self) -> str:
        return self._aofx_base.__name__  # repr reads as the user's class (as torchao's), plus the scheme

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, scheme={self._aofx.scheme}" if base else f"scheme={self._aofx.scheme}"

    def __repr__(self) -> str:
        text = super().__repr__()  # a class with its own __repr__ (Conv1D) skips extra_repr
        if "scheme=" not in text and text.endswith(")"):
            text = f"{text[:-1]}, scheme={self._aofx.scheme})"
        return text

    def __setattr__(self, name, value):
        if name in type(self)._aofx_names:
            object.__setattr__(self, name, value)  # the property's setter, even for a Parameter
        else:
            super().__setattr__(name, value)
            if name == "bias" and "_aofx" in self.__dict__:
                refresh_shared(self)  # a bias added or removed changes the standard linear's graph key

    def _apply(self, fn, recurse=True):
        state = self.__dict__["_aofx"]
        names = [n for w in state.weights.values() for n in w.buffer_names()]
        order = list(self._buffers)
        packed = {n: self._buffers.pop(n) for n in names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in packed.items():
                moved = fn(t)
                if moved.dtype != t.dtype:  # a dtype cast: keep the codes, follow the device only
                    moved = t.to(device=moved.device)
                if moved is not t and torch._has_compatible_shallow_copy_type(t, moved):
                    t.data = moved  # in place, so tensors shared by tied layers stay shared
                    moved = t
                self._buffers[name] = moved
            self._buffers = {k: self._buffers[k] for k in order}
        for w in state.weights.values():
            probe = fn(torch.empty(0, dtype=w.dtype))
            if probe.is_floating_point():
                w.dtype = probe.dtype
        refresh_shared(self)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch casts a saved tensor into a buffer of another dtype: another scheme's codes (e4m3 into int8,
        # same names and shapes) would load as garbage. Such a layer reports the error and loads nothing.
        state = self.__dict__["_aofx"]
        wrong = [f"{prefix}{n} is {state_dict[prefix + n].dtype} in the state_dict, but {self._buffers[n].dtype} "
                 f"in this layer ({state.scheme})"
                 for w in state.weights.values() for n in w.buffer_names()
                 if isinstance(state_dict.get(prefix + n), torch.Tensor)
                 and _codes_differ(state_dict[prefix + n].dtype, self._buffers[n].dtype)]
        if wrong:
            error_msgs.append(f"aofx: {'; '.join(wrong)}: load a state_dict saved from a model quantized with "
                              "the same config")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setstate__(self, state):
        super().__setstate__(state)
        layer = self.__dict__["_aofx"]
        if layer.shared_key is not None:
            # Take this process's graph for the key, or capture it now, eagerly, so a torch.compile
            # or torch.export right after loading finds one.
            layer.shared_key = None
            refresh_shared(self)

    def __reduce_ex__(self, protocol):
        state = dict(self.__dict__)
        state["_buffers"] = {k: _Float8Bits(v) if v is not None and v.dtype in _FLOAT8 else v
                             for k, v in self._buffers.items()}
        return _rebuild, (self._aofx_base, self._aofx_names), state


def _codes_differ(saved: torch.dtype, own: torch.dtype) -> bool:
    """Packed tensors of different kinds: integer or float8 codes of another dtype. Scales cast between
    16- and 32-bit floats load as torch loads any float buffer."""
    wide = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return saved != own and not (saved in wide and own in wide)


# pickle cannot rebuild float8 tensors (torch.save can): they travel as their uint8 bits.
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class _Float8Bits:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return _float8_from_bits, (self.tensor.view(torch.uint8), self.tensor.dtype)


def _float8_from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.view(dtype)


def _weight_property(name: str) -> property:
    def read(self):
        w = self._aofx.weights[name]
        packed = dict(zip(w.rewrite.packed_names, (self._buffers[n] for n in w.buffer_names())))
        # Outside inference mode even under it: an inference tensor has no version counter, so a write into
        # it could not be seen (and it could not be used in a later autograd call).
        with torch.inference_mode(False):
            value = w.rewrite.dequantize(packed, w.config).to(w.dtype)  # (N, K)
        value = value.t() if w.transposed else value
        if not torch.compiler.is_compiling():
            # transformers' initializers (from_pretrained initializes what it did not load) skip a tensor so
            # marked: a quantized weight holds loaded or trained values, and a write into the read now lands
            value._is_hf_initialized = True
            self._aofx.remember_read(self, name, value, tuple(packed.values()))
        return value

    def write(self, value):
        # Writing back an unchanged tensor this property returned (`layer.weight = layer.weight`,
        # torch.func.functional_call restoring the original) restores the codes it came from:
        # quantizing a dequantized weight again would drift.
        if torch.compiler.is_exporting() or is_fake(value):
            # the packed tensors made here would be export's fake ones, left in the real model
            raise RuntimeError(f"aofx: {type(self).__name__}.{name} is quantized; torch.export cannot trace an "
                               "assignment to it (torch.func.functional_call on it, say)")
        packed = self._aofx.packed_behind(name, value)
        if packed is None:
            requantize(self, name, value)
        else:
            self._buffers.update(zip(self._aofx.weights[name].buffer_names(), packed))

    return property(read, write, doc=f"The dequantized ``{name}`` (a new tensor on each read).")


_CLASSES: dict = {}


def quantized_class(base: type, names: tuple) -> type:
    """The generated subclass of ``base`` whose parameters ``names`` are quantized (one per pair)."""
    if issubclass(base, QuantizedModule):
        base = base._aofx_base
    key = (base, names)
    if key not in _CLASSES:
        namespace = {name: _weight_property(name) for name in names}
        namespace.update(_aofx_base=base, _aofx_names=names, __module__=__name__,
                         __qualname__=f"Quantized{base.__qualname__}", forward=_forward_like(base))
        _CLASSES[key] = type(f"Quantized{base.__name__}", (QuantizedModule, base), namespace)
    return _CLASSES[key]


def _forward_like(base: type):
    """``QuantizedModule.forward`` showing ``base.forward``'s signature, which ``torch.export`` binds
    ``dynamic_shapes`` (and ``inspect.signature``) to: ``({0: batch},)`` for a quantized root layer."""

    def forward(self, *args, **kwargs):
        return QuantizedModule.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(base.forward)
    return forward


def _rebuild(base: type, names: tuple):
    cls = quantized_class(base, names)
    return cls.__new__(cls)


def _fx_symbolic_tracing() -> bool:
    """``torch.fx.symbolic_trace`` is running (export and compile set fx's flag too: torch's own
    ``is_fx_symbolic_tracing``, which torch 2.11 may lack)."""
    return torch.fx._symbolic_trace._is_fx_tracing_flag and not torch.compiler.is_compiling()


def install(module: nn.Module, weights: dict, packed: dict, captures: list, key) -> None:
    """Make ``module`` quantized: packed buffers in, float parameters out, class swapped last.

    ``packed``: {name: {key: tensor}}; tensors shared by tied layers are registered on each."""
    for name, w in weights.items():
        for buffer, tensor in zip(w.buffer_names(), packed[name].values()):
            module.register_buffer(buffer, tensor)
        del module._parameters[name]
    module.__dict__["_aofx"] = LayerState(weights, captures, key)
    module.__class__ = quantized_class(type(module), tuple(weights))
    if isinstance(module.__dict__.get("_old_forward"), types.MethodType):
        # accelerate's hooks (device maps, offload) wrap the instance's forward around the bound original,
        # which would keep calling the float class's forward on the dequantized weight
        module._old_forward = types.MethodType(type(module).forward, module)


def replaced_forward(module: nn.Module) -> bool:
    """A forward set on the instance that a quantized class cannot reach (accelerate's hook it can)."""
    return "forward" in module.__dict__ and not isinstance(module.__dict__.get("_old_forward"), types.MethodType)


def requantize(module: nn.Module, name: str, value, in_place: bool = False) -> None:
    """``module.<name> = value`` on a quantized module: quantize ``value`` with the layer's config.
    ``in_place`` (a write into a read of the weight): into the packed tensors themselves, which a weight
    tied between layers shares, so that the write reaches every layer, as it does in float."""
    w = module._aofx.weights[name]
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        raise TypeError(f"{type(module).__name__}.{name} is quantized ({describe(w.config)}); it can only be "
                        f"set to a 2-D floating-point tensor, got {type(value).__name__}")
    reason = w.rewrite.skip_reason(value.t() if w.transposed else value, w.config)
    if reason:
        raise ValueError(f"cannot quantize the new {type(module).__name__}.{name}: {reason}")
    new = w.pack(value)
    for buffer, tensor in zip(w.buffer_names(), new.values()):
        old = module._buffers[buffer]
        if in_place and (old.shape, old.dtype, old.device) == (tensor.shape, tensor.dtype, tensor.device):
            with torch.inference_mode(old.is_inference()):  # (a model quantized under inference mode)
                old.copy_(tensor)
        else:
            module._buffers[buffer] = tensor
    state = module._aofx
    if tuple(value.shape) != w.shape or value.dtype != w.dtype:
        w.shape, w.dtype = tuple(value.shape), value.dtype
        if state.shared_key is None:
            state.captures = []  # captured again on the next call
        refresh_shared(module)


def set_weight_dtype(module: nn.Module, name: str, dtype: torch.dtype) -> None:
    """What the quantized weight ``name`` dequantizes to, and its layer computes in (a loaded model's)."""
    w = module._aofx.weights[name]
    if w.dtype != dtype:
        w.dtype = dtype
        refresh_shared(module)


def refresh_shared(module: nn.Module) -> None:
    """After a standard linear's dtype or shape changed: take (or make, eagerly) the shared graph of
    its new key, so that the next call, even under torch.compile, finds a graph that accepts it."""
    state = module._aofx
    key = shared_key(module, state.weights)
    if key is None or key == state.shared_key:
        return
    if key not in _SHARED:
        (w,) = state.weights.values()
        rows = w.example_rows(module._buffers[w.buffer_names()[0]].device)
        _SHARED[key] = capture_quantized(module, (rows,), {})
    state.shared_key, state.captures = key, [_SHARED[key]]
