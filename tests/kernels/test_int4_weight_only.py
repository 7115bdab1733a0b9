"""int4 weight-only kernels (aofx/kernels/int4_weight_only.py) against the numerics reference.

The reference is ``F.linear`` in fp32 on ``numerics.dequantize_int4`` (exact fp32 weights), then
cast to x.dtype. Tolerances, relative to the spread of the reference output (``ref.std()``):
- the output cast rounds by half an ulp of x.dtype (2^-11 fp16, 2^-8 bf16 relative), covered by rtol;
- the ``mm`` path rounds each dequantized weight to x.dtype before tl.dot, as
  ``numerics.int4_weight_only_linear`` does: a random-sign error of 2^-11 (fp16) or 2^-8 (bf16)
  relative per product, about that fraction of ``ref.std()`` in the sum; atol allows ~8x that;
- fp32 accumulation order and the ``1 + q/16`` dequant form add only fp32-level error.
A wrong nibble order, group index or scale/zero gives errors of the order of ``ref.std()`` itself.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from aofx import numerics
from aofx.kernels import int4_weight_only as int4
from aofx.kernels.common import KernelConfig

TOL = {  # dtype: (rtol, atol as a fraction of ref.std())
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3e-2),
}


def make_case(M, N, K, group_size, dtype, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    qdata, scale, zero = numerics.quantize_int4(w, group_size)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype) if bias else None
    to = dict(device=device)
    return (x.to(**to), qdata.to(**to), scale.to(**to), zero.to(**to), b.to(**to) if bias else None)


def reference(x, qdata, scale, zero, group_size, bias):
    w = numerics.dequantize_int4(qdata.cpu(), scale.cpu(), zero.cpu(), group_size)  # fp32 (N, K)
    y = F.linear(x.cpu().float(), w, None if bias is None else bias.cpu().float())
    return y.to(x.dtype)


def check(out, x, qdata, scale, zero, group_size, bias):
    ref = reference(x, qdata, scale, zero, group_size, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    rtol, atol = TOL[x.dtype]
    spread = ref.float().std().item() if ref.numel() > 1 else 1.0
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=rtol, atol=atol * spread)


def forced(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


# Every bucket's config from the table, forced so the interpreter can run each at small M.
TABLE = [pytest.param(cfg, id=f"bucket-M<={bound}") for bound, cfg in int4.CONFIGS]
GEMV = int4.CONFIGS[0][1]
MM16 = int4.CONFIGS[1][1]
DEQUANT = int4.CONFIGS[-1][1]


# ---------------------------------------------------------------- interpreter (CPU tensors)

@pytest.mark.interpret
@pytest.mark.parametrize("cfg", TABLE)
@pytest.mark.parametrize("split_k", [1, 2])
def test_every_bucket_config(cfg, split_k):
    # N=40 and M=5 are not multiples of any block; K=256 with group 64 gives 4 groups.
    case = make_case(5, 40, 256, 64, torch.float16)
    if cfg.path != "mm" and split_k > 1:  # only mm splits K; gemv and dequant reject it
        with pytest.raises(ValueError, match="split_k is for 'mm'"):
            int4.linear(*case[:4], case[4], config=forced(cfg, split_k=split_k))
        return
    out = int4.linear(*case[:4], case[4], config=forced(cfg, split_k=split_k))
    check(out, *case[:4], 64, case[4])


@pytest.mark.interpret
@pytest.mark.parametrize("M", [1, 2, 3, 16, 17])
def test_default_selection(M):
    case = make_case(M, 24, 128, 32, torch.float16)
    check(int4.linear(*case[:4], case[4]), *case[:4], 32, case[4])


@pytest.mark.interpret
@pytest.mark.parametrize("group_size", numerics.GROUP_SIZES)
@pytest.mark.parametrize("kernel", ["gemv", "mm", "dequant"])
def test_group_sizes(group_size, kernel):
    cfg = {"gemv": GEMV, "mm": MM16, "dequant": DEQUANT}[kernel]
    case = make_case(3, 33, 256, group_size, torch.float16, bias=False)
    out = int4.linear(*case[:4], None, config=forced(cfg, block_n=16))
    check(out, *case[:4], group_size, None)


@pytest.mark.interpret
@pytest.mark.parametrize("block_k", [32, 64, 128, 256])
def test_gemv_steps(block_k):
    # 5 groups of 32 in steps of 1, 2, 4 or 8 groups: the last step ends on K or hangs over it (masked);
    # 42 rows: the last row tile of 4 is partial; two x rows
    case = make_case(2, 42, 160, 32, torch.float16)
    cfg = KernelConfig("gemv", block_n=4, block_k=block_k, num_warps=2, num_stages=2)
    check(int4.linear(*case[:4], case[4], config=cfg), *case[:4], 32, case[4])


@pytest.mark.interpret
@pytest.mark.parametrize("split_k", [2, 3, 5])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_mm_uneven_split_k(split_k, swap_ab):
    # 3 K steps of 64 over 2, 3 or 5 splits: uneven and empty splits; bias added once.
    case = make_case(17, 40, 192, 64, torch.float16)
    cfg = KernelConfig("mm", block_m=16, block_n=32, block_k=64, split_k=split_k, swap_ab=swap_ab)
    check(int4.linear(*case[:4], case[4], config=cfg), *case[:4], 64, case[4])


@pytest.mark.interpret
def test_gemv_bfloat16():
    # the gemv path has no tl.dot, so bf16 is exact under the interpreter too
    case = make_case(1, 40, 256, 128, torch.bfloat16)
    check(int4.linear(*case[:4], case[4], config=GEMV), *case[:4], 128, case[4])


@pytest.mark.interpret
@pytest.mark.parametrize("groups", [5, 6, 8])
@pytest.mark.parametrize("scale_layout", ["contiguous", "offset"])
def test_gemv_scale_words(groups, scale_layout):
    # bf16 scales and zeros are read as int32 words of two groups when a row has an even number of
    # groups and starts on a word: 6 groups in steps of 4 mask the last step's second word, 8 do not;
    # 5 groups, or a view starting one bf16 into its storage, take the 2-byte loads
    x, qdata, scale, zero, bias = make_case(1, 36, 32 * groups, 32, torch.bfloat16)
    if scale_layout == "offset":
        wide = torch.zeros(2, 36, groups + 1, dtype=torch.bfloat16)
        wide[0, :, 1:], wide[1, :, 1:] = scale, zero
        scale, zero = wide[0, :, 1:], wide[1, :, 1:]  # storage offsets 1 and 36 * (groups + 1) + 1
    cfg = KernelConfig("gemv", block_n=4, block_k=128, num_warps=2, num_stages=2)
    check(int4.linear(x, qdata, scale, zero, bias, config=cfg), x, qdata, scale, zero, 32, bias)


@pytest.mark.interpret
@pytest.mark.parametrize("kernel", ["gemv", "mm"])
def test_qdata_off_word_bounds(kernel):
    # both kernels read qdata as int32 words: a view whose rows start off 4-byte bounds is copied first
    x, qdata, scale, zero, bias = make_case(3, 40, 128, 64, torch.float16)
    wide = torch.zeros(40, 64 + 3, dtype=torch.uint8)
    wide[:, 1:65] = qdata
    view = wide[:, 1:65]  # row stride 67 bytes, offset 1
    cfg = GEMV if kernel == "gemv" else MM16
    check(int4.linear(x, view, scale, zero, bias, config=cfg), x, qdata, scale, zero, 64, bias)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("kernel", ["gemv", "mm"])
def test_non_contiguous_x(layout, kernel):
    _, qdata, scale, zero, bias = make_case(3, 40, 128, 64, torch.float16)
    g = torch.Generator().manual_seed(1)
    if layout == "transposed":
        x = torch.randn(128, 3, generator=g).half().t()  # (3, 128), stride (1, 3)
    else:
        x = torch.randn(3, 200, generator=g).half()[:, 40:168]  # (3, 128), stride (200, 1), offset
    assert not x.is_contiguous()
    cfg = GEMV if kernel == "gemv" else MM16
    check(int4.linear(x, qdata, scale, zero, bias, config=cfg), x, qdata, scale, zero, 64, bias)


@pytest.mark.interpret
def test_empty_m():
    _, qdata, scale, zero, bias = make_case(1, 40, 128, 64, torch.float16)
    out = int4.linear(torch.empty(0, 128, dtype=torch.float16), qdata, scale, zero, bias)
    assert out.shape == (0, 40) and out.dtype == torch.float16


def test_rejects_bad_inputs():
    x, qdata, scale, zero, bias = make_case(2, 16, 128, 64, torch.float16)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        int4.linear(x.float(), qdata, scale, zero, bias)
    three = torch.cat([scale, scale[:, :1]], 1)  # 3 groups do not divide K = 128
    with pytest.raises(ValueError, match="group_size"):
        int4.linear(x, qdata, three, three, bias)
    with pytest.raises(ValueError, match="scale"):
        int4.linear(x, qdata, scale[:, 0], zero[:, 0], bias)
    with pytest.raises(ValueError, match="zero"):
        int4.linear(x, qdata, scale, zero[:, :1], bias)
    with pytest.raises(ValueError, match=r"expected \(N, 32\)"):
        int4.linear(x[:, :64], qdata, scale, zero, bias)
    with pytest.raises(ValueError, match="bias"):
        int4.linear(x, qdata, scale, zero, bias[:8])
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig("mm", block_n=96, block_k=64)


def test_select_config_buckets():
    N, K = 14336, 4096
    assert int4.select_config(1, N, K, 128) == GEMV
    assert int4.select_config(2, 4096, K, 128) == int4.GEMV_WIDE  # 512 row tiles of 8
    small = int4.select_config(16, N, K, 128)
    assert (small.path, small.block_m) == ("mm", 16)
    assert int4.select_config(17, N, K, 128).block_m == 64
    assert int4.select_config(256, N, K, 128).path == "mm"
    assert int4.select_config(257, N, K, 128).path == "dequant"
    # the dequant tile never crosses the end of K (a multiple of the group size only)
    assert int4.select_config(1024, 1000, 768, 128).block_k == 256
    assert int4.select_config(1024, 1000, 32 * 7, 32).block_k == 32
    # no bf16 copy over the byte cap (a 128256 x 4096 vocabulary head)
    assert int4.select_config(1024, 128256, 4096, 128) == int4.MM_LARGE
    # a narrow layer is split along K to fill the GPU; the K tile never exceeds a group
    narrow = int4.select_config(16, 1024, 14336, 32)
    assert narrow.split_k > 1 and narrow.block_k == 32


# ---------------------------------------------------------------- GPU

SHAPES = [(4096, 4096), (1000, 768), (14336, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,K", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("M", [0, 1, 3, 16, 17, 64, 129, 1024])
def test_cuda_default(M, N, K, dtype):
    case = make_case(M, N, K, 128, dtype, device="cuda")
    check(int4.linear(*case[:4], case[4]), *case[:4], 128, case[4])


@pytest.mark.cuda
@pytest.mark.parametrize("group_size", numerics.GROUP_SIZES)
@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_cuda_group_sizes(M, group_size):
    case = make_case(M, 1000, 768, group_size, torch.bfloat16, bias=False, device="cuda")
    check(int4.linear(*case[:4], None), *case[:4], group_size, None)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", TABLE)
@pytest.mark.parametrize("M", [1, 16, 129])
def test_cuda_every_bucket_config(cfg, M):
    case = make_case(M, 4096, 4096, 128, torch.bfloat16, device="cuda")
    check(int4.linear(*case[:4], case[4], config=cfg), *case[:4], 128, case[4])


@pytest.mark.cuda
def test_cuda_non_contiguous_x():
    _, qdata, scale, zero, bias = make_case(1, 1000, 768, 128, torch.bfloat16, device="cuda")
    base = torch.randn(768, 40, device="cuda", dtype=torch.bfloat16)
    for x in (base.t(), base.t()[::3], torch.randn(16, 1000, device="cuda", dtype=torch.bfloat16)[:, 100:868]):
        check(int4.linear(x, qdata, scale, zero, bias), x, qdata, scale, zero, 128, bias)
