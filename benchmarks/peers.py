"""The peers, built as their users run them, for ``bench_layers.py`` to time next to aofx.

- torchao: the stack's layers as ``nn.Linear`` modules of one ``PeerStack``, torchao's ``quantize_`` (which
  also applies torchao's Inductor settings), then ``torch.compile`` of the whole module, by default with
  torchao's recommended max-autotune.
- gemlite: its ``helper`` layers in a ``PeerStack``, called directly (gemlite's own API).

Each builder returns ``x -> [each layer's output]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _torchao_config(name: str):
    import torchao.quantization as tq

    try:
        from torchao.quantization import PerRow, PerTensor
    except ImportError:
        from torchao.quantization.granularity import PerRow, PerTensor
    if name == "int4wo-128":
        try:  # torchao >= 0.14: v2 config; tile_packed_to_4d is the tinygemm kernel
            return tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        except TypeError:
            return tq.Int4WeightOnlyConfig(group_size=128)
    return {
        "int8wo": lambda: tq.Int8WeightOnlyConfig(),
        "int8dq": lambda: tq.Int8DynamicActivationInt8WeightConfig(),
        "fp8dq-row": lambda: tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "fp8dq-tensor": lambda: tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
        "fp8wo": lambda: tq.Float8WeightOnlyConfig(),
    }[name]()


class PeerStack(torch.nn.Module):
    """A peer's layers applied to one x, every output returned: the model its users would compile."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [layer(x) for layer in self.layers]


def torchao_stack(name: str, weights: Sequence[torch.Tensor], compile_mode: str) -> Callable:
    """``x -> [x @ w_q.T for each weight]``: the weights as ``nn.Linear`` layers of one module, quantized by
    torchao's ``quantize_`` (which also applies torchao's Inductor settings) and compiled as a whole, as
    torchao's users run a model."""
    from torchao.quantization import quantize_

    n, k = weights[0].shape
    linears = []
    for w in weights:
        lin = torch.nn.Linear(k, n, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w, requires_grad=False)  # shares w; quantize_ swaps in a new one
        linears.append(lin)
    stack = PeerStack(linears)
    quantize_(stack, _torchao_config(name))
    if compile_mode == "none":
        return stack
    # One compiled graph per M (dynamic=False); the reset keeps each (config, shape) under dynamo's
    # recompile limit, since every stack shares PeerStack.forward's code object.
    torch.compiler.reset()
    return torch.compile(stack, mode=None if compile_mode == "default" else compile_mode, dynamic=False)


def gemlite_stack(name: str, weights: Sequence[torch.Tensor], numerics) -> Callable | None:
    """``x -> [each gemlite layer(x)]`` for ``weights``, through gemlite's own API, or None where gemlite has
    no matching scheme."""
    from gemlite import helper

    n, k = weights[0].shape
    device = str(weights[0].device)
    if name == "int4wo-128":
        layers = []
        for w in weights:
            qdata, scale, zero = numerics.quantize_int4(w, 128)
            codes = numerics.unpack_int4(qdata)  # (N, K) uint8 in [0, 15]
            # gemlite dequantizes (q - zero_g) * scale; ours is (q - 8) * scale + zero.
            zero_g = (8 - zero.float() / scale.float()).to(scale.dtype)  # (N, K // 128)
            layers.append(helper.A16Wn(device=device).from_weights(codes, scale, zero_g, 4, 128))
        return PeerStack(layers)
    maker = {
        "int8wo": getattr(helper, "A16W8_INT8", getattr(helper, "A16W8", None)),
        "fp8wo": getattr(helper, "A16W8_FP8", None),
        "int8dq": getattr(helper, "A8W8_int8_dynamic", None),
        "fp8dq-row": getattr(helper, "A8W8_fp8_dynamic", None),
    }.get(name)
    if maker is None:
        return None
    layers = []
    for w in weights:
        lin = torch.nn.Linear(k, n, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        layers.append(maker(device=device).from_linear(lin))
    return PeerStack(layers)
