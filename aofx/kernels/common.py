"""What every kernel family shares: the launch config, argument checks, the M the selectors branch on, the
split-K policy, the SM count, and the device helpers for tile order, code conversion and the epilogue."""

from __future__ import annotations

import dataclasses
import functools

import sympy
import torch
import triton
import triton.language as tl
from torch.utils._sympy.numbers import int_oo

from aofx.numerics import GROUP_SIZES

X_DTYPES = (torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PATHS = ("gemv", "mm", "dequant", "quantized", "fused", "fused_gemv", "scaled_mm")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch: ``path`` names the algorithm (the scheme modules list theirs), the rest its tile.

    ``block_m x block_n x block_k`` is the tile (``gemv``: block_n weight rows x block_k codes a step);
    ``split_k`` divides K between programs whose fp32 partials are summed afterwards (``split_k_for``);
    ``group_m`` is the grouped tile order; ``swap_ab`` (tensor-core paths) computes ``y.T = W @ x.T`` so
    that the weight tile is the MMA's A operand.
    """

    path: str
    block_m: int = 1
    block_n: int = 16
    block_k: int = 64
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"KernelConfig.path must be one of {PATHS}, got {self.path!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k must be >= 1, got {self.split_k}")
        if self.path in ("mm", "quantized", "fused") and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"KernelConfig: tensor-core tiles need block_m, block_n, block_k >= 16: {self}")


# ---------------------------------------------------------------- the M a selection sees

def bucket_m(m) -> int:
    """M itself, or, while exporting, the largest M of the exported range: what a launch-shape choice sees
    when no ``by_m`` segment tells it (a forced config's per-token quantization)."""
    if not isinstance(m, torch.SymInt) or not torch.compiler.is_exporting():
        return m
    return _m_range(m)[1]


def _m_range(m: torch.SymInt) -> tuple[int, int]:
    bounds = m.node.shape_env.bound_sympy(m.node.expr)
    upper = 2**31 - 1 if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper)
    return max(1, int(bounds.lower)), upper


def launch_options(cfg: KernelConfig, num_stages: int | None = None) -> dict:
    """The launch keywords of ``cfg``: ``num_warps`` and ``num_stages`` (``num_stages`` overrides the config's),
    repeated as the constexprs ``NUM_WARPS`` and ``NUM_STAGES`` that every kernel launched from a config takes.

    Inductor names, and reuses, a user Triton kernel by its function and constant arguments, not by its
    launch options. Without the repeat, two configs of one graph that differ only in warps or stages (an
    AOTInductor package holds every M range's) would both run the binary compiled for the first one.
    """
    stages = cfg.num_stages if num_stages is None else num_stages
    return {"num_warps": cfg.num_warps, "num_stages": stages, "NUM_WARPS": cfg.num_warps, "NUM_STAGES": stages}


def check_one_row(name: str, path: str, x: torch.Tensor, rows) -> None:
    """A one-row path (an M = 1 GEMV) needs M == 1. ``rows``, ``by_m``'s largest M of the config, says so
    without reading x's M (1 for M = 1's own config in an exported program, where a check of the symbolic M
    would guard on it); a forced config (``rows`` None) is checked against x."""
    if (x.shape[0] if rows is None else rows) != 1:
        raise ValueError(f"{name}: the {path} path needs M == 1, got M={x.shape[0]}")


# Every table is constant above this M, so an exported range is split into configs only up to here.
_SEGMENTS_UP_TO = 4096


def m_segments(select, lo: int, hi: int) -> list[tuple[int, int, object]]:
    """``[(first, last, select(first))]``: [lo, hi] cut where ``select``'s choice changes, exactly up to
    _SEGMENTS_UP_TO; M above it takes ``select(hi)``, the largest M's config (right for every such M)."""
    segments = []
    for m in range(lo, min(hi, _SEGMENTS_UP_TO) + 1):
        cfg = select(m)
        if segments and segments[-1][2] == cfg:
            segments[-1][1] = m
        else:
            segments.append([m, m, cfg])
    if hi > _SEGMENTS_UP_TO:
        tail = select(hi)
        if segments[-1][2] == tail:
            segments[-1][1] = hi
        else:
            segments.append([_SEGMENTS_UP_TO + 1, hi, tail])
    return [tuple(s) for s in segments]


def by_m(m, select, launch, *args):
    """``launch(select(m), m, *args)``: every scheme's per-M kernel choice.

    Eagerly and under ``torch.compile`` the choice is made once for this M (a symbolic M guards, and
    compile recompiles when M crosses a table's threshold). Under ``torch.export`` and AOTInductor a
    guard would narrow the exported range, so the range is cut into segments of one config each
    (``m_segments``), chosen here, before any branch, and the launches become a chain of ``torch.cond``
    on M: a package then picks each M's config at run time, as compile does. ``launch(cfg, rows, *args)``
    gets ``rows``, the largest M that config serves, for the choices made inside it (the per-token
    quantization's), since the symbolic M inside a branch still spans the whole range. ``args`` are x first,
    then the other tensors (or None) the launch reads; the branches take them as operands.
    """
    if not isinstance(m, torch.SymInt) or not torch.compiler.is_exporting():
        return launch(select(m), m, *args)
    segments = m_segments(select, *_m_range(m))
    present = [a is not None for a in args]

    def branch(cfg, rows, *operands):  # the operands back in their places, None where an arg was None
        it = iter(operands)
        return launch(cfg, rows, *[next(it) if p else None for p in present])

    # Export traces a dynamic size as >= 2 and lets a size of 1 run that trace, so no predicate on the symbolic
    # M can pick M = 1's own config; a value computed from M at run time (a CPU scalar: no device sync) can.
    # It is tested in the first segment's launch.
    one = select(1) if segments[0][0] == 2 else None

    def first_or_one(cfg, last, *operands):
        is_one = torch.scalar_tensor(operands[0].shape[0], dtype=torch.int64, device="cpu") == 1
        return torch.cond(is_one, functools.partial(branch, one, 1), functools.partial(branch, cfg, last), operands)

    def chain(i, *operands):
        _, last, cfg = segments[i]
        here = functools.partial(first_or_one if i == 0 and one not in (None, cfg) else branch, cfg, last)
        if i == len(segments) - 1:
            return here(*operands)
        return torch.cond(operands[0].shape[0] <= last, here, functools.partial(chain, i + 1), operands)

    # torch.cond traces its branches with dynamo, which would otherwise make the ints bound in a later call's
    # branches (which differ from the first call's) inputs of the branch graphs, and Inductor's cond
    # lowering takes tensor operands only
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        return chain(0, *[a for a in args if a is not None])


# Weight-only schemes at large M: a Triton kernel dequantizes the whole weight to x's dtype (memory bound,
# one read of the codes and one write), then one cuBLAS GEMM (``F.linear``) does the compute-bound work,
# faster there than Triton GEMMs that dequantize inside their main loop. The copy is a temporary of
# N x K elements, so weights whose copy would exceed this many bytes keep the in-loop kernel.
# Evidence: benchmarks/results/tuning/ (`python -m benchmarks.sweep --families int4,int8wo,fp8wo`).
DEQUANTIZE_MAX_BYTES = 256 << 20


def dequantize_first(N: int, K: int) -> bool:
    """Whether a large-M weight-only call may dequantize its (N, K) weight to a temporary and run cuBLAS.

    Not when the copy would exceed DEQUANTIZE_MAX_BYTES.
    """
    return N * K * 2 <= DEQUANTIZE_MAX_BYTES


# ---------------------------------------------------------------- the split-K policy

# K is split only to fill the GPU, never to balance waves: a split costs an fp32 workspace and one more
# kernel that sums it and casts. The sum runs in a fixed order, so results are deterministic (fp32 atomics
# would not be).
MAX_SPLIT_K = 16


def split_k_for(programs: int, k_steps: int, min_programs: int, min_steps: int = 2) -> int:
    """The smallest power-of-two K split that gives >= ``min_programs`` programs, each split keeping
    >= ``min_steps`` K steps and at most MAX_SPLIT_K splits."""
    split = 1
    while programs * split < min_programs and split * 2 <= MAX_SPLIT_K and k_steps // (split * 2) >= min_steps:
        split *= 2
    return split


def split_k_output(x: torch.Tensor, M: int, N: int, split: int) -> torch.Tensor:
    """The kernels' output: (M, N) in x.dtype, or a (split, M, N) fp32 workspace of per-split partials."""
    if split > 1:
        return torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    return torch.empty((M, N), device=x.device, dtype=x.dtype)


_SUM_BLOCK = 1024  # columns a program, at most


@triton.jit
def _sum_splits_kernel(ws_ptr, y_ptr, M, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # A program sums BLOCK columns of one row. Offsets and masks then follow N, which is static, so the loads
    # and stores vectorize even where M is symbolic (an AOTInductor package); over a flat index into M * N
    # they would not, as nothing tells the compiler that M * N is a multiple of 16.
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = tl.program_id(0) * N + cols
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def split_k_result(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, N) in ``dtype``: a split-K workspace summed over its splits in a fixed order and cast, in one
    kernel (a sum then a cast would be two, with an fp32 (M, N) between them)."""
    if out.dim() != 3:
        return out
    split, M, N = out.shape
    y = torch.empty((M, N), device=out.device, dtype=dtype)
    block = min(_SUM_BLOCK, triton.next_power_of_2(N))
    # M, N > 0: the launchers return empty results before launching
    torch.library.wrap_triton(_sum_splits_kernel)[(M, triton.cdiv(N, block))](out, y, M, N, SPLIT_K=split, BLOCK=block)
    return y


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device | None) -> int:
    """The device's SM count; 132 (an H100 SXM) for CPU tensors, which the interpreter runs, or no device."""
    if device is None or device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------- argument checks

def check_linear_args(name: str, x, qdata, bias, codes: torch.dtype, codes_per_byte: int = 1):
    """Shape / dtype / device checks shared by every launcher. Returns (M, N, K).

    x (M, K) bf16/fp16; qdata 2-D ``codes`` of (N, K // codes_per_byte), contiguous along K; bias (N,) float
    or None; all on x's device. The scale (and zero) checks are the scheme's (``check_scale``).
    """
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{name}: x must be bfloat16 or float16, got {x.dtype}")
    if qdata.dtype != codes or qdata.dim() != 2:
        raise TypeError(f"{name}: qdata must be a 2-D {str(codes).removeprefix('torch.')} tensor, "
                        f"got {qdata.dtype} {tuple(qdata.shape)}")
    M, K = x.shape
    N = qdata.shape[0]
    if qdata.shape[1] * codes_per_byte != K:
        raise ValueError(f"{name}: x has K={K} but qdata is {tuple(qdata.shape)} "
                         f"(expected (N, {K // codes_per_byte if K % codes_per_byte == 0 else K / codes_per_byte}))")
    if qdata.stride(1) != 1:
        raise ValueError(f"{name}: qdata must be contiguous along K (stride {qdata.stride()})")
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype not in _FLOAT_DTYPES):
        raise ValueError(f"{name}: bias must be a float tensor of shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
    for t in (qdata, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: all tensors must be on {x.device}, got one on {t.device}")
    return M, N, K


def check_scale(name: str, what: str, t: torch.Tensor, x: torch.Tensor, shapes: tuple, dtypes=_FLOAT_DTYPES):
    """``t`` (a scale or zero) must have one of ``shapes`` (None: any size), a dtype of ``dtypes`` and x's
    device."""
    fits = any(len(s) == t.dim() and all(a is None or a == b for a, b in zip(s, t.shape)) for s in shapes)
    if t.dtype not in dtypes or not fits:
        allowed = " or ".join(str(s).replace("None", "G") for s in shapes)
        kinds = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: {what} must be {kinds} of shape {allowed}, got {t.dtype} {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: all tensors must be on {x.device}, got {what} on {t.device}")


def empty_result(x, M: int, N: int, K: int, bias) -> torch.Tensor | None:
    """The finished (M, N) output when there is nothing to multiply (M, N or K is 0), else None."""
    if M and N and K:
        return None
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    return out.copy_(bias.expand(M, N)) if bias is not None and K == 0 else out.zero_()


def group_size_of(name: str, K: int, scale: torch.Tensor) -> int:
    """The group size a (N, G) scale implies for K columns, K // G, one of ``numerics.GROUP_SIZES`` (a ValueError
    otherwise); 0 for a 1-D per-row scale. Every launcher takes its group size from the scale's shape."""
    if scale.dim() < 2:
        return 0
    G = scale.shape[1]
    if K % G or K // G not in GROUP_SIZES:
        raise ValueError(f"{name}: scale {tuple(scale.shape)} implies group_size K/G = {K}/{G}; "
                         f"group_size must be one of {GROUP_SIZES} and divide K")
    return K // G


def offset_aligned(t: torch.Tensor, elements: int) -> bool:
    """Whether ``t`` starts a multiple of ``elements`` elements into its storage. Assumed inside a ``by_m``
    branch, which dynamo traces and where the offset is not readable: an AOTInductor package aligns its
    inputs and constants."""
    return torch.compiler.is_compiling() or t.storage_offset() % elements == 0


def int32_words(codes: torch.Tensor) -> torch.Tensor:
    """A (R, C) 1-byte tensor contiguous along C (C % 4 == 0) as int32 words, (R, C // 4): byte i of a word
    is column 4 j + i. Rows must start on 4-byte bounds; a tensor whose rows do not is copied first."""
    if codes.stride(0) % 4 or not offset_aligned(codes, 4):
        codes = codes.contiguous()
    return codes.view(torch.int32)


# ---------------------------------------------------------------- device helpers

@triton.jit
def grid_order(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped (swizzled) tile order: GROUP_M row blocks share each weight column block in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def code_to_f32(q):
    """int8 or e4m3 codes -> fp32, exactly."""
    if q.dtype.is_int8():
        # 0x4B400000 is 1.5 * 2**23: adding q (|q| < 2**22) to its bit pattern gives the float 1.5 * 2**23 + q
        # exactly, so one integer add and one float subtract replace the slow I2F conversion.
        return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return q.to(tl.float32)


@triton.jit
def store_tile(y, y_ptr, b_ptr, rm, rn, rn_safe, m_mask, M, N, stride_ym, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the tensor-core kernels: ``y`` (BLOCK_M, BLOCK_N) fp32 with scales applied; bias is
    added by split 0. A split stores its fp32 partial in slice pid_k of the (SPLIT_K, M, N) workspace."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn_safe).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_mask & (rn[None, :] < N)
    if SPLIT_K > 1:
        tl.store(y_ptrs + pid_k * M * stride_ym, y, mask=mask)
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
