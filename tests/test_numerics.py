"""numerics: primitives against independent references, edge cases, and the SQNR floors (docs/design.md)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aofx import numerics
from tests.common import CASES, seeded

import aofx  # noqa: F401  (registers torch.ops.aofx)
from aofx.passes._graph import LinearRewrite
from aofx.registry import find_pass


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 8), half_k=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_int4_pack_roundtrip_bit_exact(n, half_k, seed):
    q = torch.randint(0, 16, (n, 2 * half_k), generator=seeded(seed), dtype=torch.uint8)
    packed = numerics.pack_int4(q)
    assert packed.shape == (n, half_k) and packed.dtype == torch.uint8
    assert torch.equal(numerics.unpack_int4(packed), q)
    # independent reference for the documented layout: even k in the low nibble
    assert torch.equal(packed, (q[:, 0::2] + 16 * q[:, 1::2]).to(torch.uint8))


def test_int4_codes_match_formula():
    w = torch.randn(4, 64, generator=seeded(1))
    qdata, scale, zero = numerics.quantize_int4(w, 32)
    q = numerics.unpack_int4(qdata).float().reshape(4, 2, 32)
    lo, hi = w.reshape(4, 2, 32).amin(-1), w.reshape(4, 2, 32).amax(-1)
    # round-to-nearest against the stored bf16 scale and zero, clamped to [0, 15]
    expected = ((w.reshape(4, 2, 32) - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    assert torch.equal(q, expected)
    torch.testing.assert_close(scale.float(), ((hi - lo) / 15).bfloat16().float())
    # dequantization error is at most half a step (plus bf16 rounding of zero)
    err = (numerics.dequantize_int4(qdata, scale, zero, 32) - w).abs().reshape(4, 2, 32)
    assert (err <= 0.5 * scale.float()[..., None] + 1e-2 * w.abs().max()).all()


def test_int8_and_fp8_match_formulas():
    w = torch.randn(8, 64, generator=seeded(2))
    q, s = numerics.quantize_int8(w)
    assert torch.equal(s, w.abs().amax(-1) / 127.5)
    assert torch.equal(q, (w / s[:, None]).round().clamp(-128, 127).to(torch.int8))
    q8, s8 = numerics.quantize_float8(w)
    assert torch.equal(s8, w.abs().amax(-1) / 448)
    assert torch.equal(q8.float(), (w / s8[:, None]).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_weights_near_the_dtype_max_dequantize_finite(dtype):
    # code -128 is one step past amax: within 0.4% of the dtype's max it would overflow to -inf
    big = torch.finfo(dtype).max * 0.999
    w = torch.tensor([[-big, big / 2, 1.0, 0.0], [1.0, -3.0, 2.0, 0.5]], dtype=dtype)
    q, s = numerics.quantize_int8(w)
    deq = numerics.dequantize_int8(q, s)  # fp32
    assert torch.isfinite(deq.to(dtype)).all() and q[0, 0] == -127 and q[1].min() == -128
    assert ((deq - w.float()).abs() <= 0.5001 * s[:, None]).all()  # half a step


@pytest.mark.parametrize("scheme", ["int4", "int8", "int8g", "fp8row", "fp8tensor"])
def test_all_zero_rows_give_zeros_not_nan(scheme):
    w = torch.randn(4, 128, generator=seeded(3))
    w[1] = 0
    if scheme == "int4":
        deq = numerics.dequantize_int4(*numerics.quantize_int4(w, 64), 64)
    elif scheme.startswith("int8"):
        deq = numerics.dequantize_int8(*numerics.quantize_int8(w, 32 if scheme == "int8g" else None))
    else:
        deq = numerics.dequantize_float8(*numerics.quantize_float8(w, per_row=scheme == "fp8row"))
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[1], torch.zeros(128))


def test_small_weights_keep_their_scale():
    # torchao 0.14-0.17 clamped scales to bf16 eps (~0.0078), flattening weights this small
    w = torch.full((2, 32), 1e-4)
    w[:, ::2] = -1e-4
    deq = numerics.dequantize_int4(*numerics.quantize_int4(w, 32), 32)
    assert numerics.sqnr(w, deq) > 30


def test_dynamic_activation_quantization_zero_rows_and_m0():
    x = torch.randn(3, 64, generator=seeded(4))
    x[1] = 0
    q, s = numerics.quantize_int8_per_token(x)
    assert torch.equal(q[1], torch.zeros(64, dtype=torch.int8)) and torch.isfinite(s).all()
    assert numerics.quantize_int8_per_token(torch.empty(0, 64))[0].shape == (0, 64)


def _layer(n, k, std, seed):
    g = seeded(seed)
    if std is None:  # default nn.Linear init: U(-1/sqrt(k), 1/sqrt(k))
        w = (torch.rand(n, k, generator=g) * 2 - 1) / k ** 0.5
    else:
        w = torch.randn(n, k, generator=g) * std
    x = torch.randn(32, k, generator=g)
    return w.bfloat16(), x.bfloat16()


@pytest.mark.parametrize("name,config,floor", CASES, ids=[c[0] for c in CASES])
def test_sqnr_floor(name, config, floor):
    w, x = _layer(512, 1024, 0.02, seed=5)
    rewrite: LinearRewrite = find_pass(config)
    packed = rewrite.quantize(w, config)
    y = rewrite.op(*[a for a in rewrite.op_args(x, list(packed.values()), None, config)])
    ref = F.linear(x.float(), w.float())
    db = numerics.sqnr(ref, y)
    assert db >= floor, f"{name}: SQNR {db:.2f} dB is under the floor {floor} dB"


def test_int4_default_init_sqnr():
    w, x = _layer(512, 1024, None, seed=6)
    y = numerics.int4_weight_only_linear(x, *numerics.quantize_int4(w, 128), 128)
    db = numerics.sqnr(F.linear(x.float(), w.float()), y)
    assert db >= 22, f"int4-g128 on default nn.Linear init: SQNR {db:.2f} dB < 22 dB (torchao 0.17: 12.0)"
