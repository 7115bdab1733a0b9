"""``torch.export`` capture units, and running a rewritten graph against a module's live state.

A capture unit is one selected ``nn.Linear`` (the default) or the whole model (when
``quantize_`` gets ``example_inputs``). Its exported, *lifted* graph takes every parameter, buffer and
constant as a placeholder. After the passes, ``CapturedGraph`` becomes the unit's ``forward``: at
each call it reads the unit's current tensors by fqn, so ``.to()``, ``load_state_dict`` and friends
keep working, then runs the graph, writes back buffer mutations, and rebuilds the output pytree.
"""

from __future__ import annotations

import functools

import torch
import torch.utils._pytree as pytree
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from aofx.passes._graph import add_placeholder, placeholders


def export_unit(module: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """Export in training IR (``aten.linear`` intact) with every tensor dimension ``Dim.AUTO``."""
    dynamic = pytree.tree_map(
        lambda a: {i: Dim.AUTO for i in range(a.dim())} if isinstance(a, torch.Tensor) else None, args)
    return torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)


def resolve(owner: torch.nn.Module, fqn: str):
    return functools.reduce(getattr, fqn.split("."), owner)


class CapturedGraph:
    """A rewritten exported graph, run as ``owner``'s forward with ``owner``'s own state."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.gm = ep.graph_module
        # Where each placeholder's value comes from, by placeholder name.
        self.sources: dict[str, tuple] = {}
        user_inputs = []
        for spec in ep.graph_signature.input_specs:
            name = spec.arg.name
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.sources[name] = ("state", spec.target)
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                self.sources[name] = ("const", ep.constants[spec.target])
            elif spec.kind == InputKind.USER_INPUT:
                self.sources[name] = ("input", len(user_inputs))
                user_inputs.append(name)
            else:
                raise NotImplementedError(f"aofx cannot run an exported graph with a {spec.kind} input")
        # Leading outputs that write back into buffers or user inputs, then the user outputs.
        self.mutations = []
        for spec in ep.graph_signature.output_specs:
            if spec.kind == OutputKind.BUFFER_MUTATION:
                self.mutations.append(("state", spec.target))
            elif spec.kind == OutputKind.USER_INPUT_MUTATION:
                self.mutations.append(("input", user_inputs.index(spec.target)))
            elif spec.kind != OutputKind.USER_OUTPUT:
                raise NotImplementedError(f"aofx cannot run an exported graph with a {spec.kind} output")
        self.in_spec, self.out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
        self.order: list[tuple] = []

    def placeholder_for(self, name: str) -> torch.fx.Node:
        return next(n for n in placeholders(self.gm.graph) if n.name == name)

    def add_state_input(self, fqn: str, like=None) -> torch.fx.Node:
        """A new placeholder fed from ``owner``'s tensor at ``fqn`` (a packed weight)."""
        node = add_placeholder(self.gm.graph, fqn.replace(".", "_"), like)
        self.sources[node.name] = ("state", fqn)
        return node

    def finalize(self, rename: dict) -> None:
        """Drop unused top-level placeholders; ``rename`` maps state fqns that will not survive
        installation (a tied weight's quantized alias) to ones that will."""
        for node in placeholders(self.gm.graph):
            source = self.sources[node.name]
            if not node.users and source[0] != "input":
                self.gm.graph.erase_node(node)
        self.order = []
        for node in placeholders(self.gm.graph):
            kind, value = self.sources[node.name]
            self.order.append((kind, rename.get(value, value) if kind == "state" else value))
        self.gm.graph.lint()
        self.gm.recompile()

    def __call__(self, owner: torch.nn.Module, args: tuple, kwargs: dict):
        flat, spec = pytree.tree_flatten((args, kwargs))
        if not torch.compiler.is_compiling() and spec != self.in_spec:
            raise TypeError(f"{type(owner).__name__} was captured by aofx.quantize_ for inputs shaped like "
                            f"{self.in_spec}, but was called with {spec}")
        values = [resolve(owner, v) if k == "state" else flat[v] if k == "input" else v for k, v in self.order]
        outputs = self.gm(*values)
        n = len(self.mutations)
        if n:
            with torch.no_grad():
                for (kind, where), new in zip(self.mutations, outputs[:n]):
                    (resolve(owner, where) if kind == "state" else flat[where]).copy_(new)
        return pytree.tree_unflatten(list(outputs[n:]), self.out_spec)
