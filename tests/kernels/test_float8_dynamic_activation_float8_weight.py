"""fp8 dynamic-activation kernels (aofx/kernels/float8_dynamic_activation_float8_weight.py) vs ``numerics``.

The reference is ``numerics.float8_dynamic_activation_float8_weight_linear`` on x.float() (same
amax, scale and e4m3 codes as on x itself) cast to x.dtype.

Interpreter caveat (Triton 3.8): the interpreter's fp32 -> float8e4nv cast drops the carry when
rounding up overflows the mantissa (e.g. 31.9 -> 16 instead of 32). Loads, exact casts and fp8
``tl.dot`` are correct. So the interpreter tests use two kinds of activations:

* "exact" x: each row is e4m3 codes times a power of two, with a +-448 code setting the amax, so
  s_x is that power of two and x / s_x needs no rounding: kernel and reference must agree to the
  last bit of fp32 accumulation, through the unpatched interpreter;
* random x with the ``exact_fp8_cast`` fixture, which swaps the interpreter's fp32 -> e4m3
  conversion for torch's round-to-nearest-even one (what the H100's cvt.rn.satfinite does).

On the GPU nothing is patched and x is random.
"""

import pytest
import torch

from aofx import numerics
from aofx.kernels import float8_dynamic_activation_float8_weight as kernels
from aofx.kernels import int8_dynamic_activation_int8_weight as int8dq
from aofx.kernels import quantize
from aofx.kernels.common import KernelConfig as Cfg

# Every path with interpreter-sized blocks; "swizzle" has several row and column blocks per group.
GEMV_CONFIGS = [  # M = 1 only
    pytest.param(Cfg("gemv", 1, 8, 64, num_warps=2, num_stages=2), id="gemv"),
    pytest.param(Cfg("gemv", 1, 16, 64, split_k=2, num_warps=2, num_stages=2), id="gemv-split"),
    pytest.param(Cfg("fused_gemv", 1, 8, 256, num_stages=1), id="fused-gemv"),  # one chunk: x in registers
    pytest.param(Cfg("fused_gemv", 1, 4, 64, num_warps=2, num_stages=1), id="fused-gemv-chunks"),
]
MM_CONFIGS = [
    pytest.param(Cfg("quantized", 16, 32, 64), id="quantized"),
    pytest.param(Cfg("quantized", 16, 16, 32, group_m=2), id="quantized-swizzle"),
    pytest.param(Cfg("quantized", 16, 64, 64, split_k=2, swap_ab=True), id="quantized-swap-split"),
    pytest.param(Cfg("quantized", 32, 32, 64, swap_ab=True, group_m=1), id="quantized-m32-swap"),
]
FUSED_CONFIGS = [  # activation per row only
    pytest.param(Cfg("fused", 16, 32, 64), id="fused"),
    pytest.param(Cfg("fused", 16, 64, 64, swap_ab=True, split_k=2), id="fused-swap-split"),
]
INTERP_CONFIGS = GEMV_CONFIGS + MM_CONFIGS + FUSED_CONFIGS


def valid(config, m, x_per_row):
    """Whether a forced config applies: the GEMVs need M = 1, the fused prologue a per-row scale."""
    return (config.path not in ("gemv", "fused_gemv") or m == 1) and (config.path != "fused" or x_per_row)


GRANULARITIES = [
    pytest.param(True, True, id="x-row-w-row"),
    pytest.param(True, False, id="x-row-w-tensor"),
    pytest.param(False, True, id="x-tensor-w-row"),
    pytest.param(False, False, id="x-tensor-w-tensor"),
]


def make_weight(n, k, per_row, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0] = 0.0  # all-zero row: with a per-row weight scale it clamps to tiny; output is the bias
    qdata, scale = numerics.quantize_float8(w, per_row=per_row)
    return qdata.to(device), scale.to(device)


def make_x(m, k, dtype, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device=device, dtype=dtype)


def make_exact_x(m, k, per_row, dtype=torch.float16, seed=1):
    """x whose quantization is exact: e4m3 codes * 2**e with a +-448 code in every row."""
    g = torch.Generator().manual_seed(seed)
    codes = (torch.randn(m, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    codes[torch.arange(m), torch.randint(0, k, (m,), generator=g)] = 448.0 * (1 - 2 * (torch.arange(m) % 2))
    e = torch.randint(-6, -1, (m, 1), generator=g) if per_row else torch.full((m, 1), -3)
    if m > 1:
        codes[1] = 0.0  # an all-zero row: per-row scale clamps to tiny, xq row is exactly zero
    return (codes * torch.exp2(e.float())).to(dtype)


def reference(x, qdata, scale, per_row, bias):
    """numerics on x.float(), evaluated on the CPU and returned on x's device.

    On the CPU torch divides by the Python scalar 448 exactly; on CUDA it multiplies by 1/448, which
    is one fp32 ulp off about half the time. With bf16 x many x / s_x values sit exactly on an e4m3
    rounding midpoint, so one ulp of scale flips those codes (6% of them for a per-tensor scale,
    36.9 dB against the kernel, measured). The kernels divide exactly, like the CPU reference.
    """
    b = None if bias is None else bias.float().cpu()
    y = numerics.float8_dynamic_activation_float8_weight_linear(x.float().cpu(), qdata.cpu(), scale.cpu(), per_row, b)
    return y.to(x.dtype).to(x.device)


@pytest.fixture
def exact_fp8_cast(monkeypatch):
    """Round-to-nearest-even fp32 -> e4m3 in the Triton interpreter (see the module docstring)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        pytest.skip("this Triton's interpreter has no _convert_float to patch")

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.float8e4nv:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


# ---------------------------------------------------------------- interpreter

@pytest.mark.interpret
@pytest.mark.parametrize("config", INTERP_CONFIGS)
@pytest.mark.parametrize("x_per_row,w_per_row", GRANULARITIES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 64, 256), (17, 40, 200)])
def test_interp_exact_x(config, x_per_row, w_per_row, m, n, k):
    if not valid(config, m, x_per_row):
        match = "gemv path needs M == 1|scale needs the 'quantized', 'gemv' or 'fused_gemv' path"
        with pytest.raises(ValueError, match=match):
            kernels.linear(make_exact_x(m, k, x_per_row), *make_weight(n, k, w_per_row), x_per_row, config=config)
        return
    qdata, scale = make_weight(n, k, w_per_row)
    x = make_exact_x(m, k, x_per_row)
    bias = torch.randn(n).half() if m != 3 else None
    out = kernels.linear(x, qdata, scale, x_per_row, bias, config=config)
    ref = reference(x, qdata, scale, x_per_row, bias)
    assert out.shape == (m, n) and out.dtype == x.dtype
    # exact products, fp32 accumulation in another order: at most ~1 fp16 ulp
    torch.testing.assert_close(out, ref)
    if w_per_row:
        assert torch.equal(out[:, 0], bias[0].expand(m) if bias is not None else torch.zeros(m).half())
    if m > 1:
        assert torch.equal(out[1], bias if bias is not None else torch.zeros(n).half())


@pytest.mark.interpret
@pytest.mark.parametrize("config,x_per_row,w_per_row,m", [
    pytest.param(c.values[0], xr, wr, m, id=f"{c.id}-{g.id}-m{m}")
    for c in INTERP_CONFIGS for g in GRANULARITIES[::3] for xr, wr in [g.values] for m in (1, 17)
    if valid(c.values[0], m, xr)])
def test_interp_random_x(exact_fp8_cast, config, x_per_row, w_per_row, m):
    n, k = 40, 200
    qdata, scale = make_weight(n, k, w_per_row)
    x = make_x(m, k, torch.float16) * 3
    bias = torch.randn(n).half()
    out = kernels.linear(x, qdata, scale, x_per_row, bias, config=config)
    ref = reference(x, qdata, scale, x_per_row, bias)
    # every path divides like the reference (same codes), so this is exact up to summation order
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=2e-3 * ref.abs().max().item())


@pytest.mark.interpret
@pytest.mark.parametrize("m", [1, 7])
def test_interp_quantize_per_token_matches_numerics(exact_fp8_cast, m):
    """The per-token kernel's fp8 mode: xq and s_x bit-exact vs numerics.quantize_float8 per row."""
    k = 200
    x = make_x(m, k, torch.float16) * 5
    x[m // 2] = 0.0
    xq, sx = int8dq.quantize_per_token(x, fp8=True)
    ref_q, ref_s = numerics.quantize_float8(x.float(), per_row=True)
    assert xq.dtype == torch.float8_e4m3fn
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(sx, ref_s)


@pytest.mark.interpret
@pytest.mark.parametrize("m,k,hot", [(300, 200, (290, 7)), (3, 4500, (2, 4499)), (1, 64, (0, 0))])
def test_interp_amax_partials(m, k, hot):
    """The per-tensor amax kernel: the max of its partials is max |x| exactly, where programs take
    several (row, K tile) pairs (300 rows > 256 programs), where a row spans several K tiles with a
    ragged last one, and where most programs have no tile."""
    x = make_x(m, k, torch.bfloat16)
    x[hot] = -3 * x.abs().max()
    partials = int8dq.amax_partials(x)
    assert partials.shape == (quantize.AMAX_PARTIALS,) and partials.dtype == torch.float32
    assert partials.max() == x.abs().max().float()
    _, sx = int8dq.quantize_per_token(x, fp8=True, amax=partials)
    assert torch.equal(sx, torch.full((m,), (x.abs().max().float() / numerics.FP8_MAX).item()))


@pytest.mark.interpret
@pytest.mark.parametrize("m", [1, 2, 16, 17])
@pytest.mark.parametrize("x_per_row", [True, False], ids=["x-row", "x-tensor"])
def test_interp_default_buckets(m, x_per_row):
    qdata, scale = make_weight(48, 160, True)
    x = make_exact_x(m, 160, x_per_row)
    bias = torch.randn(48).half()
    out = kernels.linear(x, qdata, scale, x_per_row, bias)
    torch.testing.assert_close(out, reference(x, qdata, scale, x_per_row, bias))


@pytest.mark.interpret
@pytest.mark.parametrize("view", ["transposed", "row-stride", "column-slice"])
@pytest.mark.parametrize("config", MM_CONFIGS[:1] + FUSED_CONFIGS[:1])
def test_interp_noncontiguous_x(view, config):
    m, n, k = 5, 40, 96
    base = make_exact_x(2 * m if view == "row-stride" else m, k, True)
    if view == "transposed":
        x = base.t().contiguous().t()  # same values, stride(1) != 1
    elif view == "row-stride":
        x = base[::2]
    else:
        x = torch.zeros(m, k + 13, dtype=base.dtype)
        x[:, 5:5 + k] = base
        x = x[:, 5:5 + k]
    assert not x.is_contiguous()
    qdata, scale = make_weight(n, k, True)
    out = kernels.linear(x, qdata, scale, True, None, config=config)
    torch.testing.assert_close(out, reference(x, qdata, scale, True, None))


@pytest.mark.interpret
@pytest.mark.parametrize("x_per_row", [True, False])
def test_interp_m0(x_per_row):
    qdata, scale = make_weight(40, 64, False)
    out = kernels.linear(torch.empty(0, 64, dtype=torch.float16), qdata, scale, x_per_row, None)
    assert out.shape == (0, 40) and out.dtype == torch.float16


def test_rejects_bad_inputs():
    qdata, scale = make_weight(8, 32, True)
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        kernels.linear(x, qdata, scale, True)
    with pytest.raises(ValueError, match="K=16"):
        kernels.linear(x[:, :16].half(), qdata, scale, True)
    with pytest.raises(ValueError, match="scale must be float32"):
        kernels.linear(x.half(), qdata, scale[:4], True)
    with pytest.raises(ValueError, match="scale must be float32"):
        kernels.linear(x.half(), qdata, scale.double(), True)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        kernels.linear(x.half(), qdata.float(), scale, True)
    with pytest.raises(ValueError, match="scale needs the 'quantized', 'gemv' or 'fused_gemv' path"):
        kernels.linear(x.half(), qdata, scale, False, config=Cfg("fused", 16, 32, 64))


@pytest.mark.interpret
@pytest.mark.parametrize("forced", [True, False], ids=["forced", "default"])
@pytest.mark.parametrize("x_per_row,w_per_row", GRANULARITIES)
def test_interp_scaled_mm(x_per_row, w_per_row, forced):
    """The torch._scaled_mm path (bf16 x, N and K multiples of 16, M > 128): the Triton quantization, then the
    library GEMM with the four scale layouts (it runs on CPU too, so the interpreter checks the launcher)."""
    m, n, k = 130, 64, 128
    qdata, scale = make_weight(n, k, w_per_row)
    x = make_exact_x(m, k, x_per_row, dtype=torch.bfloat16)
    bias = torch.randn(n).bfloat16()
    assert kernels.select_config(m, n, k).path == "scaled_mm"
    out = kernels.linear(x, qdata, scale, x_per_row, bias, config=Cfg("scaled_mm") if forced else None)
    ref = reference(x, qdata, scale, x_per_row, bias)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)  # exact products: they differ by summation order and one rounding
    with pytest.raises(ValueError, match="scaled_mm path needs"):  # fp16 x: the row-wise GEMM writes bf16
        kernels.linear(x.half(), qdata, scale, x_per_row, config=Cfg("scaled_mm"))
    with pytest.raises(ValueError, match="scaled_mm path needs"):  # K = 120: not a multiple of 16
        kernels.linear(x[:, :120], *make_weight(n, 120, w_per_row), x_per_row, config=Cfg("scaled_mm"))


def test_select_config_buckets():
    assert [kernels.select_config(1, n, k).path for n, k in ((14336, 4096), (4096, 14336))] == ["fused_gemv", "gemv"]
    for n, k in ((14336, 4096), (4096, 14336)):
        for m in (2, 16, 17, 64, 128, 1024):
            assert kernels.select_config(m, n, k, library=False) == int8dq.select_config(m, n, k, fp8=True)
        for m in (2, 16, 17, 64, 128):  # the int8 table, but for int8's own tiles past M = 256
            assert kernels.select_config(m, n, k, library=False) == int8dq.select_config(m, n, k)
        # where torch._scaled_mm takes the call (bf16 x, aligned N and K), it does from M = 129 on
        assert [kernels.select_config(m, n, k).path for m in (128, 129, 1024)] == ["quantized", "scaled_mm", "scaled_mm"]
    assert kernels.select_config(16, 14336, 4096).block_m == 16
    assert kernels.select_config(1024, 14336, 4096, library=False).block_m == 256
    assert int8dq.select_config(1024, 14336, 4096) == int8dq._INT8_LARGE


# ---------------------------------------------------------------- GPU

CUDA_MS = [0, 1, 3, 16, 17, 64, 128, 129, 1024]
CUDA_SHAPES = [pytest.param(4096, 4096, id="4096x4096"), pytest.param(1000, 768, id="1000x768"),
               pytest.param(4096, 14336, id="4096x14336")]
CUDA_FORCED = [pytest.param(cfg, id=f"table-{max_m}") for max_m, cfg in int8dq._TABLE] + [
    pytest.param(Cfg("quantized", 16, 64, 256, split_k=4, swap_ab=True), id="small-swap-split"),
    pytest.param(Cfg("fused", 64, 128, 128), id="m64-fused"),
    pytest.param(Cfg("fused", 16, 64, 256, swap_ab=True), id="small-fused-swap"),
    pytest.param(int8dq._NARROW, id="narrow"),
]


def gpu_tol(ref):
    # the fp8 MMA accumulates all of K in reduced precision (Hopper's fast accumulation)
    rtol = 1.6e-2 if ref.dtype == torch.bfloat16 else 4e-3
    return dict(rtol=rtol, atol=4e-3 * ref.float().abs().max().item() + 1e-5)


def assert_fp8dq_close(out, ref):
    """Dynamic-activation outputs vs ``reference``: SQNR >= 40 dB and >= 99% of elements within gpu_tol.

    Every path quantizes x with an IEEE division, like the reference on the CPU, so the codes agree
    (``test_cuda_quantize_kernel_bit_exact``); what differs is the accumulation, which on the fp8
    tensor cores is in reduced precision over all of K. The element check allows 1% of elements past
    gpu_tol for that, and the SQNR floor bounds the total. A layout, scale or masking bug shows up in
    both checks: a wrong row of 1000 or a wrong column block of 4096 costs more than 1% of the elements
    or drops SQNR far under 40 dB.
    """
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = gpu_tol(ref)
    close = torch.isclose(out.float(), ref.float(), rtol=tol["rtol"], atol=tol["atol"])
    missed = 1.0 - close.float().mean().item()
    db = numerics.sqnr(ref.float(), out.float())
    assert db >= 40.0 and missed <= 1e-2, (
        f"SQNR {db:.1f} dB vs numerics (floor 40), {missed:.2%} of elements outside rtol={tol['rtol']}, "
        f"atol={tol['atol']:.3g} (at most 1%); max abs diff {(out.float() - ref.float()).abs().max().item():.3g}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("x_per_row,w_per_row", GRANULARITIES)
@pytest.mark.parametrize("n,k", CUDA_SHAPES)
@pytest.mark.parametrize("m", CUDA_MS)
def test_cuda_default(dtype, x_per_row, w_per_row, n, k, m):
    qdata, scale = make_weight(n, k, w_per_row, device="cuda")
    x = make_x(m, k, dtype, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = kernels.linear(x, qdata, scale, x_per_row, bias)
    ref = reference(x, qdata, scale, x_per_row, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    if m:
        assert_fp8dq_close(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config,x_per_row", [
    pytest.param(c.values[0], xr, id=f"{c.id}-x-{'row' if xr else 'tensor'}")
    for c in CUDA_FORCED for xr in (True, False) if valid(c.values[0], 17, xr)])
@pytest.mark.parametrize("m", [17, 129])
def test_cuda_every_bucket(dtype, config, x_per_row, m):
    n, k = 1000, 768
    qdata, scale = make_weight(n, k, True, device="cuda")
    x = make_x(m, k, dtype, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = kernels.linear(x, qdata, scale, x_per_row, bias, config=config)
    ref = reference(x, qdata, scale, x_per_row, bias)
    assert_fp8dq_close(out, ref)


@pytest.mark.cuda
def test_cuda_quantize_kernel_bit_exact():
    """The per-token kernel's fp8 xq and s_x bit for bit against ``numerics.quantize_float8``'s
    formula evaluated with IEEE division (s = amax / 448, xq = e4m3(clamp(x / s))); the hardware cvt
    is RTNE like torch's cast. ``numerics`` itself on CUDA may divide through a reciprocal (see
    ``reference``): its scale may be one ulp off and flip a few midpoint codes."""
    for m, k in ((300, 4096), (3, 14336)):  # one program per row; several programs per row
        x = make_x(m, k, torch.bfloat16, device="cuda") * 7
        x[1] = 0.0
        xq, sx = int8dq.quantize_per_token(x, fp8=True)
        xf = x.float()
        amax = xf.abs().amax(dim=-1)
        ieee_s = (amax / torch.full_like(amax, numerics.FP8_MAX)).clamp(min=numerics.TINY)  # tensor / tensor: IEEE
        ieee_q = (xf / ieee_s[:, None]).clamp(-numerics.FP8_MAX, numerics.FP8_MAX).to(torch.float8_e4m3fn)
        assert torch.equal(xq.view(torch.uint8), ieee_q.view(torch.uint8))
        assert torch.equal(sx, ieee_s)


@pytest.mark.cuda
@pytest.mark.parametrize("x_per_row", [True, False], ids=["x-row", "x-tensor"])
@pytest.mark.parametrize("m", [1, 16, 1024])
def test_cuda_fast_accum_sqnr(m, x_per_row):
    """The fp8 MMA's fast accumulation over all of K stays far above the fp8dq floor (28 dB)."""
    n, k = 4096, 14336
    qdata, scale = make_weight(n, k, True, device="cuda")
    x = make_x(m, k, torch.bfloat16, device="cuda")
    out = kernels.linear(x, qdata, scale, x_per_row, None)
    ref = numerics.float8_dynamic_activation_float8_weight_linear(  # fp32, on the CPU (see reference)
        x.float().cpu(), qdata.cpu(), scale.cpu(), x_per_row).to(x.device)
    db = numerics.sqnr(ref, out.float())
    assert db > 40.0, f"SQNR {db:.1f} dB vs the fp32-accumulated reference"


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 200])
@pytest.mark.parametrize("x_per_row", [True, False], ids=["x-row", "x-tensor"])
def test_cuda_noncontiguous_and_odd_k(m, x_per_row):
    n, k = 1000, 770  # K not a multiple of 16: unaligned rows, masked K tail
    qdata, scale = make_weight(n, k, True, device="cuda")
    x = make_x(m, k + 10, torch.bfloat16, device="cuda")[:, 3:3 + k]
    ref = reference(x, qdata, scale, x_per_row, None)
    assert_fp8dq_close(kernels.linear(x, qdata, scale, x_per_row), ref)
    xt = make_x(k, m, torch.bfloat16, device="cuda").t()
    ref = reference(xt, qdata, scale, x_per_row, None)
    assert_fp8dq_close(kernels.linear(xt, qdata, scale, x_per_row), ref)
