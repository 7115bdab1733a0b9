"""int4 weight-only linear: ``y = x @ w.T (+ bias)`` with ``w = (q - 8) * scale + zero`` per (row, group).

Layout read (``numerics.quantize_int4``):

    qdata  uint8 (N, K//2), row-major; byte j of row n = q[n, 2j] | q[n, 2j+1] << 4, q in [0, 15]
    scale  bf16 (N, K//group_size)
    zero   bf16 (N, K//group_size), the value of the group's midpoint code 8

group_size is one of 32/64/128/256 and divides K, so every group starts on a byte boundary and a
K tile that divides group_size never needs a K mask.

Dequantization without int->float conversion instructions (they run at 1/8 of the FP32 rate on
H100 and would bound the kernel): a nibble q shifted to bit 19 and or-ed with the bits of 1.0
is the fp32 number ``f = 1 + q/16`` exactly, so

    (q - 8) * s + z  =  f * (16 s) + (z - 24 s)          one FMA per weight

Kernel paths, chosen per M bucket by ``select_config`` (plain Python ``if``: Inductor ignores
``triton.autotune`` keys for user kernels):

    M <= 2     ``gemv``: CUDA-core GEMV, one x row per program (grid axis 0, fastest, so the
               programs of the M rows that share a weight tile run together and the second read
               hits L2). qdata is read as int32 words (8 nibbles, k = 8 * word + i): a step is a
               (BLOCK_N rows, G groups, GROUP_SIZE/8 words) tile, 16-byte loads of 4 words per
               thread; nibble i of every word is unpacked in registers (shift, mask, or: the fp32
               ``1 + q/16`` below) and multiplied by x[8 * word + i], read by the same thread, so no
               layout conversion or cross-thread reduction runs inside the loop. Each word's partial
               is scaled in the loop, ``acc += 16 s * sum_i(f x) + (z - 24 s) * sum_i(x)``, and
               one reduction over the tile runs after it. Split-K only when N / BLOCK_N is too few
               programs to fill the GPU.
    M <= 16    ``mm`` with BLOCK_M=16, SWAP_AB (the dequantized weight tile is the MMA's A
               operand, x.T the B operand), split-K to fill the GPU. Memory-bound.
    M <= 64    ``mm`` with BLOCK_M=64, SWAP_AB, BLOCK_N=256 (the x tile re-read from L2 costs
               4*M/BLOCK_N of the weight bytes), split-K.
    M <= 256   ``mm`` 128x128 tiles, split-K to fill the GPU.
    larger     ``mm`` 256x128 tiles (the dequantization of a weight tile is shared by 256 rows of
               x), grouped program order for L2 reuse, no split.

The ``mm`` main loop loads a [BLOCK_N, BLOCK_K//2] byte tile, unpacks it with tl.join(low, high)
+ reshape to [BLOCK_N, BLOCK_K], applies the group's scale/zero in fp32 (BLOCK_K divides
group_size, so one scale column per step), casts to x.dtype and feeds tl.dot (fp32 accumulate).
Bias and the output cast are in the epilogue. Split-K programs add fp32 partials atomically into
a zeroed fp32 output that the launcher casts afterwards; bias is added by the pid_k == 0 program.

Weights are loaded ``evict_first`` (streamed once), activations ``evict_last`` (re-read by every
column block).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from aofx.kernels import bucket_m

__all__ = ["Int4Config", "select_config", "linear"]

GROUP_SIZES = (32, 64, 128, 256)


# ---------------------------------------------------------------- kernels

@triton.jit
def _int4_gemv_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    # dimensions
    N, K,
    # strides (stride_qw: qdata row stride in int32 words)
    stride_xm, stride_xk, stride_qw, stride_sn, stride_sg, stride_om,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, GROUPS_PER_ITER: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # One step is a (BLOCK_N rows, G groups, GW int32 words) tile of the weight: each thread loads
    # 16 bytes (4 words) of a row, and nibble i of every word (k = 8 * word + i) is unpacked in
    # registers and multiplied by x[k]. No cross-thread reduction happens in the loop: per-word
    # partials are scaled and accumulated, and one reduction runs after the loop.
    # (Left shifts that overflow, e.g. (q << 19) & mask, were miscompiled to constants by the
    # sm_90 backend of Triton 3.8: the nibble is masked first, then shifted.)
    G: tl.constexpr = GROUPS_PER_ITER
    GW: tl.constexpr = GROUP_SIZE // 8  # int32 words per group row
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # Out-of-range rows read row 0 instead of being masked (never stored).
    rows = tl.where(mask_n, offs_n, 0)
    offs_g = tl.arange(0, G)
    offs_w = tl.arange(0, GW)

    # split-K in whole groups
    num_groups = K // GROUP_SIZE
    groups_per_split = tl.cdiv(num_groups, SPLIT_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)

    words = offs_g[:, None] * GW + offs_w[None, :]  # (G, GW) word index in the step
    q_ptrs = q_ptr + rows[:, None, None] * stride_qw + words[None, :, :]  # (BN, G, GW)
    x_ptrs = x_ptr + m * stride_xm + (8 * words[None, :, :]) * stride_xk  # (1, G, GW): k of nibble 0
    offs_v = tl.arange(0, GW * 8)
    xv_ptrs = x_ptr + m * stride_xm + (offs_g[None, :, None] * GROUP_SIZE + offs_v[None, None, :]) * stride_xk
    s_ptrs = scale_ptr + rows[:, None, None] * stride_sn + offs_g[None, :, None] * stride_sg  # (BN, G, 1)
    z_ptrs = zero_ptr + rows[:, None, None] * stride_sn + offs_g[None, :, None] * stride_sg

    acc = tl.zeros((BLOCK_N, G, GW), dtype=tl.float32)
    # A loop without tl.dot is software-pipelined (cp.async stages) only when asked to, with tl.range.
    for g0 in tl.range(g_start, g_end, G, num_stages=NUM_STAGES):
        gmask = ((g0 + offs_g) < g_end)[None, :, None]  # the last step may hang over g_end
        q = tl.load(q_ptrs + g0 * GW, mask=gmask, other=0, eviction_policy="evict_first")
        s = tl.load(s_ptrs + g0 * stride_sg, mask=gmask, other=0.0).to(tl.float32)  # (BN, G, 1)
        z = tl.load(z_ptrs + g0 * stride_sg, mask=gmask, other=0.0).to(tl.float32)
        # x of the step, loaded once per program and split into x_i[word] = x[8 * word + i]:
        # only this small tile changes layout (through shared memory), never the weight tile
        xv = tl.load(xv_ptrs + g0 * GROUP_SIZE * stride_xk, mask=gmask, other=0.0,
                     eviction_policy="evict_last").to(tl.float32)  # (1, G, GW * 8)
        xv = tl.reshape(xv, (1, G, GW, 2, 2, 2))  # k = 8 * word + 4 * a + 2 * b + c
        xa, xb = tl.split(xv)
        xa0, xa1 = tl.split(xa)
        xb0, xb1 = tl.split(xb)
        x0, x4 = tl.split(xa0)
        x2, x6 = tl.split(xa1)
        x1, x5 = tl.split(xb0)
        x3, x7 = tl.split(xb1)
        fx = tl.zeros((BLOCK_N, G, GW), dtype=tl.float32)
        xs = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
        for i in tl.static_range(8):
            xi = [x0, x1, x2, x3, x4, x5, x6, x7][i]
            fi = (((q >> (4 * i)) & 0xF) << 19) | 0x3F800000  # bits of 1 + q_i/16
            fx += fi.to(tl.float32, bitcast=True) * xi
        # per (row, word): 16 s * sum(f x) + (z - 24 s) * sum(x), s and z of the word's group
        acc += fx * (16.0 * s) + xs * (z - 24.0 * s)

    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,)
    # epilogue: bias in fp32, cast (or fp32 atomic partials for split-K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        y += bias
    out_ptrs = out_ptr + m * stride_om + offs_n
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, y, mask=mask_n, sem="relaxed")
    else:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _int4_mm_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    # dimensions
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_qn, stride_sn, stride_sg, stride_om,
    # meta-parameters
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)

    # grouped (swizzled) tile order: GROUP_M row blocks share each weight column block in L2
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * grid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Out-of-range rows/columns read row 0 instead of being masked (never stored).
    xrows = tl.where(mask_m, offs_m, 0)
    wrows = tl.where(mask_n, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)

    # split-K in whole BLOCK_K steps; BLOCK_K divides GROUP_SIZE divides K: no K mask
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    x_ptrs = x_ptr + xrows[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk  # (BM, BK)
    q_ptrs = q_ptr + wrows[:, None] * stride_qn + (k_start // 2 + offs_b)[None, :]  # (BN, BK//2)
    s_rows = scale_ptr + wrows * stride_sn  # (BN,)
    z_rows = zero_ptr + wrows * stride_sn

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        xt = tl.load(x_ptrs, eviction_policy="evict_last")  # (BM, BK)
        b = tl.load(q_ptrs, eviction_policy="evict_first")  # (BN, BK//2) uint8
        g = k // GROUP_SIZE
        s = tl.load(s_rows + g * stride_sg).to(tl.float32)  # (BN,)
        z = tl.load(z_rows + g * stride_sg).to(tl.float32)

        bi = b.to(tl.int32)
        lo = ((bi & 0xF) << 19) | 0x3F800000  # bits of 1 + q_even/16
        hi = ((bi & 0xF0) << 15) | 0x3F800000  # bits of 1 + q_odd/16
        f = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)  # (BN, BK)
        w = (f * (16.0 * s)[:, None] + (z - 24.0 * s)[:, None]).to(xt.dtype)  # (BN, BK)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(xt), acc)  # (BN, BM)
        else:
            acc = tl.dot(xt, tl.trans(w), acc)  # (BM, BN)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K // 2

    # epilogue: bias in fp32, cast (or fp32 atomic partials for split-K)
    if SWAP_AB:
        acc = tl.trans(acc)  # (BM, BN)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + wrows).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class Int4Config:
    """One launch configuration.

    kernel: "gemv" or "mm". block_k: the K step of ``mm`` (clamped to group_size); for ``gemv``
    the step is max(1, block_k // group_size) whole groups. split_k: None picks it from the
    problem size (``_auto_split_k``), an int forces it. block_m, group_m, swap_ab: ``mm`` only.
    """

    kernel: str
    block_n: int
    block_k: int
    block_m: int = 16
    split_k: int | None = None
    group_m: int = 8
    swap_ab: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        if self.kernel not in ("gemv", "mm"):
            raise ValueError(f"Int4Config.kernel must be 'gemv' or 'mm', got {self.kernel!r}")
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"Int4Config.{name} must be a power of two, got {v}")
        if self.kernel == "mm" and (self.block_m < 16 or self.block_n < 16 or self.block_k < 32):
            raise ValueError(f"Int4Config for 'mm' needs block_m, block_n >= 16 and block_k >= 32: {self}")
        if self.split_k is not None and self.split_k < 1:
            raise ValueError(f"Int4Config.split_k must be >= 1 or None, got {self.split_k}")


# (largest M of the bucket, config); the first bucket with M <= bound wins, the last covers the rest.
# Measured on H100 (benchmarks/bench_layers.py stacks, 14336x4096 and 4096x14336, group 128):
#   M=1 gemv 128 rows x 1 group, 8 warps, no software pipeline: 26 / 24 us (tl.range with 2-4 stages:
#       27-29 / 26-28 us, benchmarks/sweep.py; 64 rows, 4 warps: 28 / 27; two groups per step: 240
#       registers, 30-74 us); the previous join/reshape GEMV took 41 / 41 us.
#   M=16 16x128x128 swap_ab, 8 warps: 35 / 33 us (4 warps, 4 stages: 41 / 38).
#   M=128 128x128x64 without swap, 8 warps, 4 stages: 62 / 61 us (128x256x64 swap: 97 / 95).
#   M=1024 256x128x64, 8 warps: 333 / 379 us (128x256x64: 518 / 591).
CONFIGS = (
    (2, Int4Config("gemv", block_n=128, block_k=128, num_warps=8, num_stages=1)),
    (16, Int4Config("mm", block_m=16, block_n=128, block_k=128, swap_ab=True, num_warps=8, num_stages=3)),
    (64, Int4Config("mm", block_m=64, block_n=256, block_k=64, swap_ab=True, num_warps=8, num_stages=4)),
    (256, Int4Config("mm", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)),
    (None, Int4Config("mm", block_m=256, block_n=128, block_k=64, split_k=1, group_m=8, num_warps=8, num_stages=3)),
)

# Split-K aims for at least this many programs per SM. Splitting costs a zero-fill and a cast
# kernel, so it is used only to fill the GPU, never to balance waves.
_CTAS_PER_SM = {"gemv": 2, "mm": 1}
_MIN_STEPS_PER_SPLIT = 4  # K steps each split keeps, so a program amortizes its prologue/epilogue
_MAX_SPLIT_K = 16


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 132  # H100 SXM; the interpreter has no device to ask
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_split_k(tiles: int, k_steps: int, min_programs: int) -> int:
    """Smallest power-of-two split giving >= min_programs programs, keeping >= _MIN_STEPS_PER_SPLIT steps."""
    split = 1
    while (tiles * split < min_programs and split * 2 <= _MAX_SPLIT_K
           and k_steps // (split * 2) >= _MIN_STEPS_PER_SPLIT):
        split *= 2
    return split


def select_config(M: int, N: int, K: int, group_size: int, device: torch.device | None = None) -> Int4Config:
    """The bucket's config with split_k resolved for this (M, N, K)."""
    for bound, cfg in CONFIGS:
        if bound is None or M <= bound:
            break
    return _resolve(cfg, M, N, K, group_size, device)


def _resolve(cfg: Int4Config, M: int, N: int, K: int, group_size: int, device) -> Int4Config:
    if cfg.kernel == "mm":
        cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, group_size))
        tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
        k_steps = K // cfg.block_k
    else:
        tiles = M * triton.cdiv(N, cfg.block_n)
        k_steps = (K // group_size) // max(1, cfg.block_k // group_size)
    if cfg.split_k is None:
        index = device.index if device is not None and device.type == "cuda" else None
        if device is not None and device.type == "cuda" and index is None:
            index = torch.cuda.current_device()
        split = _auto_split_k(tiles, k_steps, _num_sms(index) * _CTAS_PER_SM[cfg.kernel])
        cfg = dataclasses.replace(cfg, split_k=split)
    return cfg


# ---------------------------------------------------------------- launcher

def linear(x, qdata, scale, zero, group_size: int, bias=None, *, config=None) -> torch.Tensor:
    """``x @ dequantize_int4(qdata, scale, zero, group_size).T (+ bias)`` in x.dtype.

    x (M, K) bf16/fp16, any strides; qdata uint8 (N, K//2); scale, zero (N, K//group_size);
    bias (N,) or None. ``config`` (an Int4Config) overrides the M-bucket choice (tests, tuning).
    """
    # 1. checks
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"int4 linear: x must be bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"int4 linear: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 linear: group_size must be one of {GROUP_SIZES}, got {group_size}")
    M, K = x.shape
    if qdata.dtype != torch.uint8 or qdata.dim() != 2:
        raise TypeError(f"int4 linear: qdata must be 2-D uint8 (N, K//2), got {qdata.dtype} {tuple(qdata.shape)}")
    N = qdata.shape[0]
    if K % group_size != 0 or qdata.shape[1] * 2 != K:
        raise ValueError(f"int4 linear: x has K={K}, qdata {tuple(qdata.shape)} needs K//2 columns and "
                         f"K must be a multiple of group_size={group_size}")
    groups = K // group_size
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (N, groups):
            raise ValueError(f"int4 linear: {name} must be (N, K//group_size) = {(N, groups)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"int4 linear: {name} must be a floating tensor, got {t.dtype}")
    if scale.stride() != zero.stride():
        zero = zero.contiguous()
        scale = scale.contiguous()
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"int4 linear: bias must be (N,) = ({N},), got {tuple(bias.shape)}")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if qdata.stride(1) != 1:
        qdata = qdata.contiguous()

    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=x.dtype, device=x.device)
    if config is None:
        cfg = select_config(bucket_m(M), N, K, group_size, x.device)
    else:
        cfg = _resolve(config, M, N, K, group_size, x.device)

    # 2. output: fp32 zeros for split-K atomics (cast after), else x.dtype directly
    split = cfg.split_k
    if split > 1:
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    else:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False

    # 3. launch
    if cfg.kernel == "gemv":
        # the kernel reads qdata as int32 words (8 nibbles each): rows must start on 4-byte bounds
        if qdata.stride(0) % 4 or qdata.storage_offset() % 4:
            qdata = qdata.contiguous()
        qwords = qdata.view(torch.int32)  # (N, K//8)
        grid = (M, triton.cdiv(N, cfg.block_n), split)
        torch.library.wrap_triton(_int4_gemv_kernel)[grid](
            x, qwords, scale, zero, bias_arg, out,
            N, K,
            x.stride(0), x.stride(1), qwords.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
            GROUP_SIZE=group_size, GROUPS_PER_ITER=max(1, cfg.block_k // group_size), BLOCK_N=cfg.block_n,
            SPLIT_K=split, HAS_BIAS=bias is not None, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
        torch.library.wrap_triton(_int4_mm_kernel)[grid](
            x, qdata, scale, zero, bias_arg, out,
            M, N, K,
            x.stride(0), x.stride(1), qdata.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
            GROUP_SIZE=group_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, SPLIT_K=split, SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out.to(x.dtype) if split > 1 else out
