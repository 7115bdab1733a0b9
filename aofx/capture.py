"""``torch.export`` capture of one module, and running the rewritten graph against its live state.

``run_examples`` runs a model once on ``example_inputs`` and records which parameters ``F.linear``
receives and each module's first inputs. A capture unit is one module: a selected ``nn.Linear``
(or ``Conv1D``), or a module that owns a weight used through ``F.linear``. ``export_unit`` exports
its ``forward`` (hooks excluded: the module's own ``__call__`` runs them) in training IR, every
tensor dimension ``Dim.AUTO``. The lifted graph takes every parameter, buffer and constant as a
placeholder; after the passes, ``CapturedGraph`` runs it at each call with the unit's current
tensors, read by fqn, so ``.to()``, ``load_state_dict`` and friends keep working.

Guards. An exported graph is only valid for inputs like the example it was traced with: the same
pytree structure, dtypes and ranks, the same size on every dimension export specialized (a size-1
example dimension, or one tied to a weight), and the same non-tensor values (a float scale or a
bool flag is baked in), and the same train/eval flags of the unit and its submodules (dropout is
baked in too), and the same attributes of the unit and its submodules that the forward may read and a
graph bakes in (``plain_attributes``: plain values and containers of them, such as a LoRA-style
``scaling`` or an on/off flag; functions; the fields of a held object that the trace read, such as
``self.config.scale``; each submodule's class and hooks, and which of its parameters are None); tensor
attributes are read at each call instead; and, where the forward read it while traced
(``torch.is_grad_enabled``, ``torch.is_inference_mode_enabled``, ``torch.is_autocast_enabled``, the
autocast dtype), the same grad mode, inference mode or autocast state (``ambient``).
``CapturedGraph.accepts`` checks all of these, as ``torch.export``'s own input guards do; the caller
captures again, or falls back, when no graph accepts.
A forward branching on a plain Python global (a module-level flag) keeps the branch it took when traced,
as ``torch.export`` bakes it in. A forward that sets attributes of its modules (a call counter, a cached
input) cannot be repeated by a graph: ``export_unit`` undoes what the trace set and raises. Hooks on
submodules would run only while traced: a unit with such hooks is not captured (``hooked_submodules``).
What a graph bakes in, and the recorders that find it during the trace, are in ``aofx/guards.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import sympy
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind
from torch.overrides import TorchFunctionMode
from torch.utils._sympy.numbers import int_oo

from aofx.guards import (AMBIENT_READERS, AmbientReads, AttributeWrites, FieldReads, ambient, modes,
                         plain_attributes, same)
from aofx.passes._graph import add_placeholder, placeholders


# ---------------------------------------------------------------- example_inputs: who calls F.linear

class _LinearWeights(TorchFunctionMode):
    """Records the weights passed to ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        return func(*args, **kwargs)


@dataclasses.dataclass
class Seen:
    linear: set  # ids of parameters used as F.linear weights
    sliced: set  # ids of parameters whose slices were F.linear weights (stacked MoE experts)
    inputs: dict  # id(module) -> (args, kwargs) of its first call


def run_examples(model: torch.nn.Module, example_inputs) -> Seen:
    """Run ``model`` once on ``example_inputs`` and record who uses F.linear, and with what inputs."""
    args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else \
        (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,), {})
    inputs = {}

    def record(module, a, k):
        inputs.setdefault(id(module), (a, k))

    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in owners]
    spy = _LinearWeights()
    try:
        with torch.no_grad(), spy:
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    params = {id(p) for p in model.parameters()}
    linear = {id(w) for w in spy.weights if id(w) in params}
    sliced = {id(w._base) for w in spy.weights if w._base is not None and id(w._base) in params}
    return Seen(linear, sliced, inputs)


class _Flat(torch.nn.Module):
    """Calls ``module.forward`` with the pytree leaves of its ``(args, kwargs)`` as positional inputs,
    so one flat ``dynamic_shapes`` tuple fits any signature (keywords and ``**kwargs`` included)."""

    def __init__(self, module: torch.nn.Module, spec):
        super().__init__()
        self.m = module
        self.spec = spec

    def forward(self, *leaves):
        args, kwargs = pytree.tree_unflatten(list(leaves), self.spec)
        return self.m.forward(*args, **kwargs)


def export_unit(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> "CapturedGraph":
    """Export ``module.forward(*args, **kwargs)`` in training IR (``aten.linear`` intact)."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    # Size-1 dimensions stay static (export would specialize them anyway, with a warning).
    dynamic = tuple({i: Dim.AUTO for i in range(a.dim()) if a.shape[i] != 1} if isinstance(a, torch.Tensor) else None
                    for a in leaves)
    now = ambient(AMBIENT_READERS)
    with AttributeWrites(module) as writes, AmbientReads() as reads, FieldReads(module) as fields:
        ep = torch.export.export(_Flat(module, spec), tuple(leaves), dynamic_shapes=(dynamic,), strict=False)
    if writes.names:
        raise RuntimeError(f"its forward sets {', '.join(writes.names)}, which a captured graph cannot repeat")
    capture = CapturedGraph(ep, spec, leaves, modes(module))
    capture.fields = fields.fields()
    capture.attributes = plain_attributes(module, capture.fields)
    capture.ambient = tuple((kind, value) for kind, value in now if kind in reads.kinds) or None
    return capture


def resolve(owner: torch.nn.Module, fqn: str):
    return functools.reduce(getattr, fqn.split("."), owner)


def _size_range(size) -> tuple:
    """``(lowest, highest or None, symbol or None)`` that export allows for one input dimension."""
    if isinstance(size, int):
        return size, size, None
    expr = size.node.expr
    bounds = size.node.shape_env.bound_sympy(expr)
    lower = int(bounds.lower) if bounds.lower not in (-int_oo, -sympy.oo) else 0
    upper = None if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper)
    return lower, upper, (str(expr) if getattr(expr, "is_Symbol", False) else None)


class _TensorGuard(NamedTuple):
    dtype: torch.dtype
    sizes: tuple  # per dimension: (lowest, highest or None, symbol or None)


def _guard(example):
    """What a later input must match: a ``_TensorGuard``, or the constant itself."""
    if isinstance(example, torch.Tensor):
        return _TensorGuard(example.dtype, tuple(_size_range(s) for s in example.shape))
    return example


class CapturedGraph:
    """A rewritten exported graph, run as a module's forward with the module's own state."""

    def __init__(self, ep: torch.export.ExportedProgram, spec, example_leaves: list, training: tuple = ()):
        self.gm = ep.graph_module
        self.spec = spec
        self.training = training
        # Where each placeholder's value comes from, by placeholder name. State fqns drop _Flat's "m.".
        self.sources: dict[str, tuple] = {}
        self.guards = []
        n_inputs = 0
        for spec_ in ep.graph_signature.input_specs:
            name = spec_.arg.name
            if spec_.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.sources[name] = ("state", spec_.target.removeprefix("m."))
            elif spec_.kind == InputKind.CONSTANT_TENSOR and spec_.target.startswith("m."):
                # a plain tensor attribute of the unit (``self.mask = torch.ones(k)``): read it from the
                # owner at each call, so re-assigning it (or a deep copy's own tensor) is seen
                self.sources[name] = ("state", spec_.target.removeprefix("m."))
            elif spec_.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                self.sources[name] = ("const", ep.constants[spec_.target])
            elif spec_.kind == InputKind.USER_INPUT:
                val = self.placeholder_for(name).meta.get("val", example_leaves[n_inputs])
                self.guards.append(_guard(val if isinstance(val, torch.Tensor) else example_leaves[n_inputs]))
                self.sources[name] = ("input", n_inputs)
                n_inputs += 1
            else:
                raise NotImplementedError(f"aofx cannot run an exported graph with a {spec_.kind} input")
        # Leading outputs that write back into buffers or user inputs, then the user outputs.
        self.mutations = []
        user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        for spec_ in ep.graph_signature.output_specs:
            if spec_.kind == OutputKind.BUFFER_MUTATION:
                self.mutations.append(("state", spec_.target.removeprefix("m.")))
            elif spec_.kind == OutputKind.USER_INPUT_MUTATION:
                self.mutations.append(("input", user_inputs.index(spec_.target)))
            elif spec_.kind != OutputKind.USER_OUTPUT:
                raise NotImplementedError(f"aofx cannot run an exported graph with a {spec_.kind} output")
        self.out_spec = ep.call_spec.out_spec
        self.order: list[tuple] = []
        self.attributes: dict = {}  # plain_attributes of the unit when traced
        self.fields: dict = {}  # the fields of objects it read (see FieldReads)
        self.ambient: tuple | None = None  # the ambient state the forward read, as when traced (see ambient)

    def placeholder_for(self, name: str) -> torch.fx.Node:
        return next(n for n in placeholders(self.gm.graph) if n.name == name)

    def state_placeholders(self) -> dict:
        """``{state fqn: placeholder}`` (a tied tensor may have several fqns; each gets its own)."""
        return {self.sources[n.name][1]: n for n in placeholders(self.gm.graph) if self.sources[n.name][0] == "state"}

    def add_state_input(self, fqn: str, like=None) -> torch.fx.Node:
        """A new placeholder fed from the owner's tensor at ``fqn`` (a packed weight)."""
        name = fqn.replace(".", "_")
        node = add_placeholder(self.gm.graph, f"_{name}" if name[0].isdigit() else name, like)  # nn.Sequential's "0"
        self.sources[node.name] = ("state", fqn)
        return node

    def finalize(self) -> None:
        """Drop unused state placeholders and fix the order in which ``__call__`` feeds them."""
        for node in placeholders(self.gm.graph):
            if not node.users and self.sources[node.name][0] != "input":
                self.gm.graph.erase_node(node)
        self.order = [self.sources[node.name] for node in placeholders(self.gm.graph)]
        self.gm.graph.lint()
        self.gm.recompile()

    def accepts(self, leaves: list, spec, training: tuple | None = None, any_rows: bool = False,
                owner: torch.nn.Module | None = None) -> bool:
        """Whether inputs with these pytree ``leaves`` and ``spec`` (and, when given, the unit's
        train/eval flags and its ``owner``'s plain attributes) satisfy the capture's guards, in the
        current ambient state. ``any_rows``: the graph is a standard linear's, valid for every number
        of rows, so only its static sizes are checked."""
        if spec != self.spec or len(leaves) != len(self.guards):
            return False
        if training is not None and training != self.training:
            return False
        if not any_rows and self.ambient is not None:
            kinds = [kind for kind, _ in self.ambient]
            # dynamo cannot read inference mode; the original forward runs (and reads it) instead
            if "inference" in kinds and torch.compiler.is_dynamo_compiling():
                return False
            if ambient(kinds) != self.ambient:
                return False
        if owner is not None and not any_rows:  # a standard linear's forward reads no attribute
            try:
                now = plain_attributes(owner, self.fields)
            except Exception:  # noqa: BLE001
                return False
            if now.keys() != self.attributes.keys() or not all(same(now[k], v) for k, v in self.attributes.items()):
                return False
        symbols = {}
        for guard, value in zip(self.guards, leaves):
            if isinstance(value, torch.Tensor):
                if not isinstance(guard, _TensorGuard) or value.dtype != guard.dtype or value.dim() != len(guard.sizes):
                    return False
                for (lower, upper, symbol), v in zip(guard.sizes, value.shape):
                    if lower == upper:
                        if v != lower:
                            return False
                    elif not any_rows and (v < lower or (upper is not None and v > upper)
                                           or symbols.setdefault(symbol, v) != v):
                        return False
            elif type(value) is not type(guard) or value != guard:
                return False
        return True

    def run(self, owner: torch.nn.Module, leaves: list):
        values = [resolve(owner, v) if k == "state" else leaves[v] if k == "input" else v for k, v in self.order]
        outputs = self.gm.forward(*values)  # not gm(...): global module hooks are the user's, not ours
        n = len(self.mutations)
        if n:
            with torch.no_grad():
                for (kind, where), new in zip(self.mutations, outputs[:n]):
                    (resolve(owner, where) if kind == "state" else leaves[where]).copy_(new)
        return pytree.tree_unflatten(list(outputs[n:]), self.out_spec)
