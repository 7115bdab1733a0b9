"""Shared graph helpers: find linears, thread packed weights into subgraphs, replace a node.

The built-in passes all have one shape, ``LinearRewrite``: in export's training IR (where
``aten.linear.default`` is still intact),

    before:  linear = aten.linear.default(x, p_weight, p_bias)
    after:   linear = aofx.<scheme>_linear(x, qdata, scale, ..., p_bias)

A weight used as ``x @ W.T`` (``matmul`` or ``mm`` of x and a transpose of W, as custom ``nn.Linear``
subclasses write it) is a linear without bias and is rewritten the same way; so is Conv1D's
``addmm(bias, x, W)`` with W stored (in, out).

Invariants: only linears whose weight is a planned target are touched; the new node keeps the old
node's ``meta`` (``val``, ``stack_trace``, ``nn_module_stack``); the graph still lints.

The rewrite is a direct node replacement rather than ``replace_pattern_with_filters``: the
replacement's inputs (each layer's own packed tensors) are not inputs of the matched pattern, which
the pattern rewriter cannot express.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import fx

LINEAR = torch.ops.aten.linear.default
ADDMM = torch.ops.aten.addmm.default  # Conv1D: addmm(bias, x, W) with W stored (in, out)
_PRODUCTS = (torch.ops.aten.matmul.default, torch.ops.aten.mm.default)  # x @ W.T


def _transposed_weight(node) -> Optional[fx.Node]:
    """W when ``node`` swaps the two dims of a 2-D W (``W.T``, ``W.t()``, ``W.transpose(0, 1)``,
    ``W.permute(1, 0)``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    aten = torch.ops.aten
    if node.target in (aten.t.default, aten.numpy_T.default):
        return node.args[0]
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        return node.args[0]
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return node.args[0]
    return None
# Higher-order ops of export's IR whose operands follow their subgraph one-to-one.
_SUBGRAPH_HOPS = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}


@dataclasses.dataclass
class Target:
    """One weight to rewrite: its pass and config, and the graph nodes holding its packed tensors."""

    rewrite: "LinearRewrite"
    config: Any
    packed: list  # fx.Node per packed tensor, in the pass's op-argument order
    transposed: bool = False  # the weight is stored (in, out) and used by addmm, as in Conv1D


class LinearRewrite:
    """Base of the built-in passes. Subclasses set ``name`` and ``op`` and define the three hooks."""

    name: str = ""
    op = None
    packed_names: tuple = ("qdata", "scale")  # the keys ``quantize`` returns, in op-argument order

    def skip_reason(self, weight: torch.Tensor, config) -> Optional[str]:
        """Why this weight cannot take the scheme (it is then skipped with a warning), or None."""
        return None

    def quantize(self, weight: torch.Tensor, config) -> dict[str, torch.Tensor]:
        """Packed tensors keyed by ``packed_names``."""
        raise NotImplementedError

    def op_args(self, x, packed: list, bias, config) -> tuple:
        raise NotImplementedError

    def dequantize(self, packed: dict, config) -> torch.Tensor:
        """The (N, K) fp32 weight that the packed tensors stand for."""
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, targets: dict) -> int:
        """Rewrite the linears of ``gm`` (not its subgraphs) whose weight node is one of this pass's
        ``targets``; returns how many were rewritten."""
        count = 0
        for node in list(gm.graph.nodes):
            transposed, swap = False, None
            if node.target is LINEAR:
                x, weight, bias = (list(node.args) + [None])[:3]
            elif node.target is ADDMM and len(node.args) == 3 and not node.kwargs:
                (bias, x, weight), transposed = node.args, True
            elif node.target in _PRODUCTS and len(node.args) == 2 and not node.kwargs:
                (x, swap), bias = node.args, None
                weight = _transposed_weight(swap)
            else:
                continue
            target = targets.get(weight)
            if target is None or target.rewrite is not self or target.transposed != transposed:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(self.op, self.op_args(x, target.packed, bias, target.config))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if swap is not None and not swap.users:
                gm.graph.erase_node(swap)
            count += 1
        return count


def placeholders(graph: fx.Graph) -> list:
    return [n for n in graph.nodes if n.op == "placeholder"]


def add_placeholder(graph: fx.Graph, name: str, like: Optional[fx.Node] = None) -> fx.Node:
    """A new placeholder after the existing ones (placeholders must precede every other node)."""
    first_other = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_other):
        node = graph.placeholder(name)
    if like is not None and "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def subgraph_calls(gm: fx.GraphModule):
    """``(hop_node, subgraph_module, index of its first operand)`` for the subgraph HOPs in ``gm``."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") not in _SUBGRAPH_HOPS:
            continue
        for i, arg in enumerate(node.args):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                yield node, getattr(gm, arg.target), i + 1
                break


def thread_targets(gm: fx.GraphModule, targets: dict) -> list:
    """Make each target's packed tensors reachable inside the subgraphs that use its weight.

    A linear under ``torch.no_grad()`` in ``forward`` lands in a ``wrap_with_set_grad_enabled``
    subgraph whose operands include the weight; we append the packed tensors as extra operands and
    subgraph placeholders. Returns ``[(graph_module, local_targets)]`` for ``gm`` and every subgraph.
    """
    out = [(gm, targets)]
    for hop, sub, first in subgraph_calls(gm):
        sub_inputs = placeholders(sub.graph)
        local = {}
        for operand, inner in zip(hop.args[first:], sub_inputs):
            target = targets.get(operand)
            if target is None:
                continue
            inner_packed = [add_placeholder(sub.graph, f"{inner.name}_{i}", p) for i, p in enumerate(target.packed)]
            hop.args = (*hop.args, *target.packed)
            local[inner] = dataclasses.replace(target, packed=inner_packed)
        out += thread_targets(sub, local)
    return out


def drop_unused_inputs(gm: fx.GraphModule) -> None:
    """Remove subgraph placeholders (and their HOP operands) that no node uses any more, then
    recompile; the top-level placeholders are the caller's, since they are the graph's signature."""
    for hop, sub, first in subgraph_calls(gm):
        drop_unused_inputs(sub)
        keep = []
        for operand, inner in zip(hop.args[first:], placeholders(sub.graph)):
            if inner.users:
                keep.append(operand)
            else:
                sub.graph.erase_node(inner)
        hop.args = (*hop.args[:first], *keep)
        sub.recompile()
    gm.graph.lint()
    gm.recompile()
