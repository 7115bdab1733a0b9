"""The device branch shared by every aofx op body."""

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DEVICES = ("cuda",)  # the device types whose tensors take the Triton kernels


def run(kernel, reference, x: torch.Tensor, *args) -> torch.Tensor:
    """``kernel(x2d, *args)`` on CUDA bf16/fp16, else ``reference(x, *args)``; x is (..., K) -> (..., N)."""
    if x.device.type not in KERNEL_DEVICES or x.dtype not in KERNEL_DTYPES:
        out = reference(x, *args)
    else:
        out = kernel(x.reshape(-1, x.shape[-1]), *args)  # (M, N); x2d is a view whenever the leading dims allow
        if x.dim() != 2:
            out = out.reshape(*x.shape[:-1], out.shape[-1])
    # Autograd forbids in-place writes (Falcon's `mlp_output += attention_output`) to a view made inside
    # a custom op, so the op returns a tensor of its own; the kernels' 2-D outputs already are.
    return out.clone() if out._is_view() else out


def register(op, dequantize) -> None:
    """Register the op's fake kernel and its autograd formula.

    Fake: ``(..., K) -> (..., N)`` in x's dtype, without running the body. (``triton_op``'s default
    fake runs the body, whose kernel-selection branches on M would add guards that narrow an
    exported program's dynamic batch.)

    Autograd: gradient for ``x`` (and ``bias``) through the dequantized weight, so a quantized layer
    can sit inside a graph that trains other parameters (adapters, say); the packed tensors get none.
    ``dequantize(*weight_inputs) -> (N, K)`` receives the op's inputs between ``x`` and ``bias``.
    """

    @op.register_fake
    def _(x, qdata, *rest):
        return x.new_empty((*x.shape[:-1], qdata.shape[0]))

    def setup_context(ctx, inputs, output):
        ctx.weight_inputs = inputs[1:-1]

    def backward(ctx, grad):  # grad: (..., N)
        grad_x = grad @ dequantize(*ctx.weight_inputs).to(grad.dtype)  # (..., K)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[-1] else None
        return (grad_x, *[None] * len(ctx.weight_inputs), grad_bias)

    op.register_autograd(backward, setup_context=setup_context)
    for device_type in ("cpu", "cuda"):
        _register_autocast(op, device_type)


_LIB = torch.library.Library("aofx", "FRAGMENT")


def _register_autocast(op, device_type: str) -> None:
    """Under ``torch.autocast`` the op casts x and bias, not the packed tensors, to the autocast dtype, as
    ``F.linear`` casts its inputs: a quantized layer then returns the dtype its float layer would (an
    fp32 model under bf16 autocast gets bf16, and on CUDA the Triton kernels). The registration mirrors
    ``CustomOpDef.register_autocast``, whose fixed dtype would also cast the scales."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)

    def cast(t):
        ok = t is not None and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == device_type
        return t.to(torch.get_autocast_dtype(device_type)) if ok else t

    def kernel(_, x, *rest):
        *weights, bias = rest
        with torch.autocast(device_type, enabled=False):
            return op._opoverload(cast(x), *weights, cast(bias))

    _LIB.impl(op._name, kernel, key, with_keyset=True)
