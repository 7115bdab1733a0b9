"""Pure-torch quantize / dequantize / pack: the single source of truth for aofx numerics.

Every Triton kernel is checked against these functions, and the ``*_linear`` functions here are
also the CPU (non-CUDA) path of the matching ``torch.ops.aofx.*`` op.

Weights ``w`` are (N out, K in); activations ``x`` are (M, K). Storage of every scheme:

| scheme     | qdata                                   | scale                                 | zero            |
|------------|-----------------------------------------|---------------------------------------|-----------------|
| int4 wo    | uint8 (N, K//2), two 4-bit q per byte   | bf16 (N, K//group_size)               | bf16, as scale  |
| int8 wo    | int8 (N, K)                             | fp32 (N,) per row or (N, K//gs)       | -               |
| int8 dq    | int8 (N, K)                             | fp32 (N,)                             | -               |
| fp8 wo     | float8_e4m3fn (N, K)                    | fp32 (N,)                             | -               |
| fp8 dq     | float8_e4m3fn (N, K)                    | fp32 () per tensor or (N,) per row    | -               |

int4 packing: byte ``j`` of row ``n`` holds ``q[n, 2j]`` in its low nibble and ``q[n, 2j+1]`` in its
high nibble. q is in [0, 15] and ``w ~= (q - 8) * scale + zero`` (tinygemm's float-zero domain), so
``zero`` is the value of the group's midpoint code 8.

Scales are never clamped to bf16 eps (torchao 0.14-0.17 did, which costs ~7 dB on small weights):
they are clamped to the smallest normal float32, so an all-zero row or group gives exact zeros.

Extremes: any finite weight dequantizes to a finite value, in fp32 and in bf16 (an fp16 int8 weight in
fp16 too). A group spanning more than fp32's range (-3e38 .. 3e38) gets its int4 scale and zero from
float64, and int4 / int8 codes whose dequantized value would overflow bf16 are not used. A group of only subnormals
(|w| < 2**-126) comes back no worse than zeros: every element within min(|w|, scale / 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TINY = torch.finfo(torch.float32).tiny
BF16_MAX = torch.finfo(torch.bfloat16).max
GROUP_SIZES = (32, 64, 128, 256)  # the legal group sizes of every grouped scheme (configs and kernels check them)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0


def safe_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax`` in fp32, clamped to the smallest normal float so zeros stay zeros.

    Divides by a tensor: CUDA turns division by a Python scalar into a multiply by its reciprocal,
    one ulp off about half the time, and the kernels divide exactly."""
    amax = amax.float()
    return (amax / torch.full_like(amax, qmax)).clamp(min=TINY)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    return w.float().reshape(n, k // group_size, group_size)  # (N, G, gs)


# ---------------------------------------------------------------- int4 weight-only

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K//2) uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qdata: torch.Tensor) -> torch.Tensor:
    """(N, K//2) uint8 -> (N, K) uint8 codes in [0, 15]."""
    low, high = qdata & 0xF, qdata >> 4
    return torch.stack([low, high], dim=-1).reshape(qdata.shape[0], -1)


def _int4_scale_zero(lo: torch.Tensor, hi: torch.Tensor):
    """bf16 ``(scale, zero)`` of groups with fp32 bounds ``lo``, ``hi`` (N, G).

    ``scale = (hi - lo) / 15`` and ``zero = lo + 8 * scale`` in fp32 wherever that is finite; the
    float64 values only where fp32 overflows (a group spanning more than fp32's max), so ordinary
    weights get the fp32 results bit for bit."""
    rng = hi - lo
    wide = (hi.double() - lo.double()) / 15
    scale = torch.where(torch.isfinite(rng), safe_scale(rng, 15.0), wide.float()).to(torch.bfloat16)
    zero = lo + 8 * scale.float()
    zero = torch.where(torch.isfinite(zero), zero, (lo.double() + 8 * scale.double()).float())
    # A group of only subnormals: its scale is the smallest normal (the clamp) and lo + 8 * scale
    # would be rounded to bf16 with an error larger than the weights. A zero on the scale's grid
    # (7, 8 or 9 times it, exact in bf16) makes every code an exact multiple of the scale, so each
    # weight comes back as round(w / scale) * scale: within min(|w|, scale / 2). All-zero groups
    # get 8 * scale, as before.
    subnormal = torch.maximum(lo.abs(), hi.abs()) < TINY
    zero = torch.where(subnormal, (torch.round(lo / TINY) + 8) * TINY, zero)
    return scale, zero.clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16)


def _overflowing_codes(scale: torch.Tensor, zero: torch.Tensor, codes: range) -> torch.Tensor:
    """(N, G): how many of the int4 ``codes`` dequantize (``(c - 8) * scale + zero`` in fp32) to a
    value that overflows bf16. The value is monotone in the code and finite at code 8 (``zero``)."""
    s, z = scale.float(), zero.float()
    return sum((~torch.isfinite(((c - 8) * s + z).to(torch.bfloat16))).float() for c in codes)


def quantize_int4(w: torch.Tensor, group_size: int = 128):
    """Asymmetric round-to-nearest per (row, group). Returns ``(qdata, scale, zero)``."""
    wg = _grouped(w, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale, zero = _int4_scale_zero(lo, hi)  # (N, G) bf16 each
    # Round against the stored bf16 scale and zero, so dequantization sees what quantization saw.
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]) + 8
    # Codes are 0..15 except in groups near fp32's max, where the end codes would overflow bf16.
    qmin = _overflowing_codes(scale, zero, range(0, 8))  # (N, G)
    qmax = 15 - _overflowing_codes(scale, zero, range(9, 16))
    q = torch.minimum(torch.maximum(q, qmin[..., None]), qmax[..., None]).reshape(w.shape)
    return pack_int4(q), scale, zero


def dequantize_int4(qdata, scale, zero, group_size: int) -> torch.Tensor:
    q = unpack_int4(qdata).float()
    n, k = q.shape
    w = (q.reshape(n, k // group_size, group_size) - 8) * scale.float()[..., None]
    return (w + zero.float()[..., None]).reshape(n, k)  # fp32 (N, K)


def int4_weight_only_linear(x, qdata, scale, zero, group_size: int, bias=None):
    w = dequantize_int4(qdata, scale, zero, group_size).to(x.dtype)
    return F.linear(x, w, bias)


# ---------------------------------------------------------------- int8 weight-only

def quantize_int8(w: torch.Tensor, group_size: int | None = None):
    """Symmetric per row (``group_size=None``) or per (row, group). Returns ``(qdata, scale)``."""
    wg = _grouped(w, group_size or w.shape[1])
    scale = safe_scale(wg.abs().amax(dim=-1), 127.5)  # (N, G) fp32
    # -128 * scale overflows bf16 (or an fp16 weight's own dtype) only for weights within 0.4% of its max:
    # -127 there
    low = -128 * scale
    fits = torch.isfinite(low.to(torch.bfloat16))
    if w.dtype == torch.float16:
        fits &= torch.isfinite(low.to(torch.float16))
    qmin = torch.where(fits, -128.0, -127.0)  # (N, G)
    q = torch.round(wg / scale[..., None])
    q = torch.maximum(q, qmin[..., None]).clamp(max=127).to(torch.int8).reshape(w.shape)
    return q, (scale[:, 0].contiguous() if group_size is None else scale)


def dequantize_int8(qdata, scale) -> torch.Tensor:
    n, k = qdata.shape
    s = scale.reshape(n, -1)  # (N, G)
    w = qdata.float().reshape(n, s.shape[1], -1) * s[..., None]
    return w.reshape(n, k)


def int8_weight_only_linear(x, qdata, scale, bias=None):
    return F.linear(x, dequantize_int8(qdata, scale).to(x.dtype), bias)


# ---------------------------------------------------------------- int8 dynamic activation

def quantize_int8_per_token(x: torch.Tensor):
    """(M, K) -> (int8 (M, K), fp32 scale (M,)) with ``s_x = amax_row / 127``."""
    s = safe_scale(x.abs().amax(dim=-1), 127.0)
    q = torch.round(x.float() / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def int8_dynamic_activation_int8_weight_linear(x, qdata, scale, bias=None):
    k = x.shape[-1]
    xq, sx = quantize_int8_per_token(x.reshape(-1, k))
    if xq.device.type == "cpu":
        acc = xq.to(torch.int32) @ qdata.to(torch.int32).t()  # (M, N), exact
    else:  # CUDA has no int32 matmul; float64 is exact too (|sum| < 2**53 for K < 2**39)
        acc = xq.double() @ qdata.double().t()
    y = acc.float() * sx[:, None] * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])


# ---------------------------------------------------------------- float8

def quantize_float8(w: torch.Tensor, per_row: bool = True):
    """e4m3 with ``scale = amax / 448``; per row ``scale`` is (N,), per tensor it is ()."""
    if per_row:
        amax = w.abs().amax(dim=-1)
    else:  # the appended zero keeps an empty (M=0) activation valid without a shape branch
        amax = torch.cat([w.abs().flatten().float(), w.new_zeros(1, dtype=torch.float32)]).amax()
    scale = safe_scale(amax, FP8_MAX)
    s = scale[:, None] if per_row else scale
    q = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_float8(qdata, scale) -> torch.Tensor:
    s = scale[:, None] if scale.dim() == 1 else scale
    return qdata.float() * s


def float8_weight_only_linear(x, qdata, scale, bias=None):
    return F.linear(x, dequantize_float8(qdata, scale).to(x.dtype), bias)


def float8_dynamic_activation_float8_weight_linear(x, qdata, scale, activation_per_row: bool, bias=None):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (M, K)
    xq, sx = quantize_float8(x2, per_row=activation_per_row)
    acc = xq.float() @ qdata.float().t()  # fp8 products, fp32 accumulate
    sx = sx[:, None] if activation_per_row else sx
    sw = scale[None, :] if scale.dim() == 1 else scale
    y = acc * sx * sw
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(|ref| / |ref - actual|)``."""
    ref, actual = ref.double(), actual.double()
    noise = torch.linalg.vector_norm(ref - actual)
    if noise == 0:
        return float("inf")
    return (20 * torch.log10(torch.linalg.vector_norm(ref) / noise)).item()
