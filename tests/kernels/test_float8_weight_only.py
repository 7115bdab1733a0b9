"""fp8 weight-only kernels (aofx/kernels/float8_weight_only.py) against ``numerics``.

The reference is ``numerics.float8_weight_only_linear`` evaluated in fp32 (x, bias upcast) and cast
to x.dtype: the kernels dequantize exactly (e4m3 -> fp16/bf16 is exact) and apply the fp32 row scale
in the epilogue, so kernel and reference differ only in fp32 summation order, i.e. by about one ulp
of the output dtype. Interpreter tests use fp16 x for the tensor-core path (bf16 tl.dot is wrong in
the interpreter); the GEMV path has no tl.dot, so it is also checked with bf16.
"""

import pytest
import torch

from aofx import numerics
from aofx.kernels import float8_weight_only as kernels
from aofx.kernels import int8_weight_only
from aofx.kernels.common import KernelConfig as Cfg

# Every path the fp8 launcher reaches (the int8 weight-only kernels with e4m3 codes), with blocks small
# enough for the interpreter. "mm-swizzle" has several row and column blocks per group so the grouped
# program order is exercised; the GEMV takes M = 1 only.
GEMV_CONFIGS = [
    pytest.param(Cfg("gemv", 1, 16, 64, num_warps=2), id="gemv"),
    pytest.param(Cfg("gemv", 1, 8, 64, split_k=2, num_warps=2), id="gemv-split"),
]
MM_CONFIGS = [
    pytest.param(Cfg("mm", 16, 32, 64), id="mm-m16"),
    pytest.param(Cfg("mm", 16, 16, 32, group_m=2), id="mm-swizzle"),
    pytest.param(Cfg("mm", 32, 64, 128, group_m=1, split_k=2), id="mm-m32-split"),
    pytest.param(Cfg("mm", 16, 64, 64, swap_ab=True), id="swap-m16"),
    pytest.param(Cfg("mm", 32, 16, 32, group_m=2, swap_ab=True), id="swap-swizzle"),
    pytest.param(Cfg("dequant", 1, 16, 64), id="dequant"),
]
INTERP_CONFIGS = GEMV_CONFIGS + MM_CONFIGS


def make_weight(n, k, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0] = 0.0  # an all-zero row: scale clamps to tiny, output must be exactly the bias
    qdata, scale = numerics.quantize_float8(w, per_row=True)
    return qdata.to(device), scale.to(device)


def make_x(m, k, dtype, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(device=device, dtype=dtype)


def reference(x, qdata, scale, bias):
    b = None if bias is None else bias.float()
    return numerics.float8_weight_only_linear(x.float(), qdata, scale, b).to(x.dtype)


def check(x, qdata, scale, bias, config=None, **tol):
    out = kernels.linear(x, qdata, scale, bias, config=config)
    ref = reference(x, qdata, scale, bias)
    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, **tol)
    return out


# ---------------------------------------------------------------- interpreter

@pytest.mark.interpret
@pytest.mark.parametrize("config,m", [pytest.param(c.values[0], m, id=f"{c.id}-m{m}") for c in INTERP_CONFIGS
                                      for m in (1, 3, 17) if c.values[0].path != "gemv" or m == 1])
@pytest.mark.parametrize("n,k", [(40, 200), (64, 256)], ids=["ragged", "even"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_interp_paths(config, m, n, k, with_bias):
    qdata, scale = make_weight(n, k)
    x = make_x(m, k, torch.float16)
    bias = torch.randn(n).half() if with_bias else None
    # dequant rounds q * s to x.dtype before the GEMM, as the scheme's reference does (2^-11 relative per
    # product in fp16); the other paths apply the scale to fp32 sums, as the fp32 reference here does
    tol = dict(rtol=2e-3, atol=1e-3) if config.path == "dequant" else {}
    out = check(x, qdata, scale, bias, config, **tol)
    expected_row0 = bias[None, :1].expand(m, 1) if with_bias else torch.zeros(m, 1, dtype=x.dtype)
    assert torch.equal(out[:, :1], expected_row0)


@pytest.mark.interpret
@pytest.mark.parametrize("m", [1, 2, 16, 17])
def test_interp_default_buckets(m):
    qdata, scale = make_weight(48, 160)
    check(make_x(m, 160, torch.float16), qdata, scale, torch.randn(48).half())


@pytest.mark.interpret
def test_interp_gemv_bf16():
    qdata, scale = make_weight(40, 200)
    x = make_x(1, 200, torch.bfloat16)
    check(x, qdata, scale, torch.randn(40, dtype=torch.bfloat16), GEMV_CONFIGS[0].values[0])
    with pytest.raises(ValueError, match="gemv path needs M == 1"):
        kernels.linear(make_x(2, 200, torch.bfloat16), qdata, scale, config=GEMV_CONFIGS[0].values[0])


@pytest.mark.interpret
@pytest.mark.parametrize("view", ["transposed", "row-stride", "column-slice"])
@pytest.mark.parametrize("config", [MM_CONFIGS[0], MM_CONFIGS[3]])
def test_interp_noncontiguous_x(view, config):
    m, n, k = 5, 40, 96
    g = torch.Generator().manual_seed(3)
    if view == "transposed":
        x = torch.randn(k, m, generator=g).half().t()  # stride(1) != 1
    elif view == "row-stride":
        x = torch.randn(2 * m, k, generator=g).half()[::2]  # stride(0) = 2K
    else:
        x = torch.randn(m, k + 13, generator=g).half()[:, 5:5 + k]  # stride(0) = K+13, offset 5
    assert not x.is_contiguous()
    qdata, scale = make_weight(n, k)
    check(x, qdata, scale, None, config)


@pytest.mark.interpret
def test_interp_m0():
    qdata, scale = make_weight(40, 64)
    out = kernels.linear(torch.empty(0, 64, dtype=torch.float16), qdata, scale, torch.randn(40).half())
    assert out.shape == (0, 40) and out.dtype == torch.float16


def test_rejects_bad_inputs():
    qdata, scale = make_weight(8, 32)
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        kernels.linear(x, qdata, scale)
    with pytest.raises(ValueError, match="K=16"):
        kernels.linear(x[:, :16].half(), qdata, scale)
    with pytest.raises(ValueError, match="scale must be float32"):
        kernels.linear(x.half(), qdata, scale[:4])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        kernels.linear(x.half(), qdata.float(), scale)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear(x.half(), qdata, scale, torch.zeros(3))


def test_select_config_buckets():
    for n, k in ((14336, 4096), (4096, 14336), (24, 40)):
        for m in (1, 2, 16, 17, 128, 1024):
            assert kernels.select_config(m, n, k) == int8_weight_only.select_config(m, n, k)
    assert kernels.select_config(1, 14336, 4096).path == "gemv"
    assert kernels.select_config(16, 14336, 4096).block_m == 16


# ---------------------------------------------------------------- GPU

CUDA_MS = [0, 1, 3, 16, 17, 64, 129, 1024]
CUDA_SHAPES = [pytest.param(4096, 4096, id="4096x4096"), pytest.param(1000, 768, id="1000x768"),
               pytest.param(4096, 14336, id="4096x14336")]
CUDA_FORCED = [pytest.param(cfg, id=f"table-{max_m}") for max_m, cfg in int8_weight_only._MM_TABLE] + [
    pytest.param(Cfg("mm", 16, 64, 256, num_stages=4, split_k=4), id="m16-split"),
    pytest.param(Cfg("mm", 128, 256, 64, num_warps=8, num_stages=3), id="large-noswap"),
    pytest.param(Cfg("dequant", 1, 16, 256, num_warps=2), id="dequant"),
]


def gpu_tol(ref):
    # one ulp of the output dtype relative, plus fp32 summation-order noise near zero
    rtol = 1.6e-2 if ref.dtype == torch.bfloat16 else 2e-3
    return dict(rtol=rtol, atol=2e-3 * ref.float().abs().max().item() + 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,k", CUDA_SHAPES)
@pytest.mark.parametrize("m", CUDA_MS)
def test_cuda_default(dtype, n, k, m):
    qdata, scale = make_weight(n, k, device="cuda")
    x = make_x(m, k, dtype, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=dtype)
    out = kernels.linear(x, qdata, scale, bias)
    ref = reference(x, qdata, scale, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    if m:
        torch.testing.assert_close(out, ref, **gpu_tol(ref))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", CUDA_FORCED)
@pytest.mark.parametrize("m", [2, 17, 129])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_every_bucket(dtype, config, m, with_bias):
    n, k = 1000, 768
    qdata, scale = make_weight(n, k, device="cuda")
    x = make_x(m, k, dtype, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    out = kernels.linear(x, qdata, scale, bias, config=config)
    ref = reference(x, qdata, scale, bias)
    torch.testing.assert_close(out, ref, **gpu_tol(ref))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 200])
def test_cuda_noncontiguous_and_odd_k(m):
    n, k = 1000, 770  # K not a multiple of 16: unaligned rows, masked K tail
    qdata, scale = make_weight(n, k, device="cuda")
    x = make_x(m, k + 10, torch.bfloat16, device="cuda")[:, 3:3 + k]
    ref = reference(x, qdata, scale, None)
    torch.testing.assert_close(kernels.linear(x, qdata, scale), ref, **gpu_tol(ref))
    xt = make_x(k, m, torch.bfloat16, device="cuda").t()
    ref = reference(xt, qdata, scale, None)
    torch.testing.assert_close(kernels.linear(xt, qdata, scale), ref, **gpu_tol(ref))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [16, 128, 256])
def test_cuda_every_e4m3_code(m):
    """Every finite e4m3 code (subnormals, +-0, +-448) reaches the bf16 tensor-core kernels exactly: row n of
    the weight is all 256 codes rotated by n (NaN codes zeroed), scales are 1 and x is the identity's first
    m rows, so y holds the weight codes themselves."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    qdata = torch.stack([codes.roll(n) for n in range(256)]).view(torch.float8_e4m3fn).cuda()  # (256, 256)
    x = torch.eye(256, device="cuda", dtype=torch.bfloat16)[:m]
    out = kernels.linear(x, qdata, torch.ones(256, device="cuda"))
    assert torch.equal(out, qdata.float().t()[:m].to(torch.bfloat16))
