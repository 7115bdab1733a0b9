"""The torch.ops.aofx ops: opcheck, shapes, and agreement with the numerics reference on CPU.

On CPU the op bodies take the aten reference branch; the Triton branches are tested in
tests/kernels (interpreter) and under `pytest -m cuda`.
"""

import pytest
import torch

import aofx
from aofx import numerics
from aofx.registry import find_pass
from tests.common import CONFIGS, seeded

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def _op_args(config, x, n=48, bias=True, seed=0):
    g = seeded(seed)
    w = (torch.randn(n, x.shape[-1], generator=g) * 0.02).to(x.dtype)
    b = torch.randn(n, generator=g).to(x.dtype) if bias else None
    rewrite = find_pass(config)
    packed = {k: v.to(x.device) for k, v in rewrite.quantize(w, config).items()}
    return rewrite.op, rewrite.op_args(x, list(packed.values()), None if b is None else b.to(x.device), config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
def test_opcheck(config, device):
    for shape, bias in [((5, 128), True), ((2, 3, 128), False), ((0, 128), True)]:
        x = torch.randn(shape, generator=seeded(1)).bfloat16().to(device)
        op, args = _op_args(config, x, bias=bias)
        checks = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
        if args[1].dtype == torch.float8_e4m3fn:
            checks = checks[1:]  # SchemaCheckMode compares inputs with a multiply, undefined for float8
        torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("config", CONFIGS)
def test_op_matches_reference_and_shapes(config):
    x = torch.randn(2, 3, 128, generator=seeded(2)).bfloat16()
    op, args = _op_args(config, x)
    out = op(*args)
    assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
    flat = op(x.reshape(6, 128), *args[1:])
    assert torch.equal(out.reshape(6, 48), flat)


def test_fp32_activations_use_the_reference_everywhere():
    x = torch.randn(4, 64, generator=seeded(3))
    qdata, scale = numerics.quantize_int8(torch.randn(16, 64, generator=seeded(4)))
    torch.testing.assert_close(torch.ops.aofx.int8_weight_only_linear(x, qdata, scale, None),
                               numerics.int8_weight_only_linear(x, qdata, scale))


def test_backward_through_dequantized_weight():
    x = torch.randn(3, 64, generator=seeded(5), requires_grad=True)
    w = torch.randn(16, 64, generator=seeded(6)) * 0.02
    qdata, scale, zero = numerics.quantize_int4(w, 32)
    torch.ops.aofx.int4_weight_only_linear(x, qdata, scale, zero, 32, None).sum().backward()
    expected = numerics.dequantize_int4(qdata, scale, zero, 32).sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected)


def test_kernel_string_constants_fit_one_line():
    """Inductor copies a user kernel's global constexprs into its generated source as repr()s inside a
    string literal; on torch 2.11 a newline in one (an inline-PTX string) breaks that source's syntax."""
    import triton.language as tl

    from aofx.kernels import dequant, gemv, mm, ptx, quantize
    found = {}
    for module in (gemv, mm, quantize, dequant, ptx):
        for name, value in vars(module).items():
            if isinstance(value, tl.constexpr) and isinstance(value.value, str):
                found[f"{module.__name__}.{name}"] = value.value
    assert len(found) >= 2  # the int4 dequantization and the e4m3 conversion
    assert not [name for name, text in found.items() if "\n" in text]


def test_int4_group_size_must_match_the_scale():
    # the kernels read the group size from the scale's shape; the op's argument may not contradict it
    x = torch.randn(3, 64, generator=seeded(7)).bfloat16()
    qdata, scale, zero = numerics.quantize_int4(torch.randn(16, 64, generator=seeded(8)) * 0.02, 32)
    with pytest.raises(ValueError, match="group_size=64 does not match K=64"):
        torch.ops.aofx.int4_weight_only_linear(x, qdata, scale, zero, 64, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
def test_output_takes_in_place_writes_under_autograd(config, device):
    # As nn.Linear's: Falcon adds into its MLP output in place (`h += attn`) with the bias requiring grad.
    for shape in [(5, 128), (2, 3, 128)]:
        x = torch.randn(shape, generator=seeded(1)).bfloat16().to(device)
        op, args = _op_args(config, x)
        bias = args[-1].requires_grad_()
        y = op(*args)
        assert not y._is_view()
        expected = y.detach() + 1
        y += 1
        torch.testing.assert_close(y.detach(), expected, rtol=0, atol=0)
        y.sum().backward()
        assert bias.grad is not None and bias.grad.shape == bias.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS)
def test_autocast_casts_x_and_bias_like_f_linear(config, device):
    # An fp32 layer under bf16/fp16 autocast returns the autocast dtype, as nn.Linear does; the packed
    # tensors are not cast (the scales keep their precision).
    x = torch.randn(5, 128, generator=seeded(1)).to(device)
    op, args = _op_args(config, x)  # fp32 x, weight and bias
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device, dtype=dtype):
            y = op(*args)
        want = op(args[0].to(dtype), *args[1:-1], args[-1].to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y, want, rtol=0, atol=0)
    assert op(*args).dtype == torch.float32  # outside autocast nothing changes
