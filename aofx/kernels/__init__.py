"""Triton kernels, one family per file (``<scheme>.py``), each with its layout doc, config table,
selector and launcher. Shared here: the M that the selectors branch on, the large-M rule of the
weight-only schemes, the grouped tile order, and 1-byte codes viewed as int32 words."""

import sympy
import torch
import triton
import triton.language as tl
from torch.utils._sympy.numbers import int_oo


def bucket_m(m) -> int:
    """The M a launcher's config selection should branch on.

    Eagerly and under ``torch.compile`` this is M itself: a branch on a symbolic M becomes a guard,
    so compile specializes per bucket and recompiles when M crosses one. Under ``torch.export`` and
    AOTInductor a guard would instead narrow the exported dynamic range, so there the selection sees
    the largest M the range allows; the large-M configs are correct for every M.
    """
    if not isinstance(m, torch.SymInt) or not torch.compiler.is_exporting():
        return m
    upper = m.node.shape_env.bound_sympy(m.node.expr).upper
    return 2**31 - 1 if upper in (int_oo, sympy.oo) else int(upper)


# Weight-only schemes at large M: a Triton kernel dequantizes the whole weight to x's dtype (memory bound,
# one read of the codes and one write), then one cuBLAS GEMM (``F.linear``) does the compute-bound work,
# faster there than the Triton GEMMs that dequantize inside their main loop. The copy is a temporary of
# N x K elements, so weights whose copy would exceed this many bytes keep the in-loop kernel.
# Evidence: `python -m benchmarks.sweep --families int4,int8wo,fp8wo --m 256,512,1024` (at M = 1024 the
# "default" rows are dequant and the "mm" rows in-loop tiles; M = 256 and 512 bracket the switch); the data
# belongs in benchmarks/results/tuning/ once a sweep has been run there.
DEQUANTIZE_MAX_BYTES = 256 << 20


def dequantize_first(N: int, K: int) -> bool:
    """Whether a large-M weight-only call may dequantize its (N, K) weight to a temporary and run cuBLAS.

    Not while exporting: an exported graph serves every M of its range with one choice (``bucket_m``), and at
    small M the copy costs more than the GEMM it saves. Not when the copy would exceed DEQUANTIZE_MAX_BYTES.
    """
    return N * K * 2 <= DEQUANTIZE_MAX_BYTES and not torch.compiler.is_exporting()


def int32_words(codes: torch.Tensor) -> torch.Tensor:
    """A (R, C) 1-byte tensor contiguous along C (C % 4 == 0) as int32 words, (R, C // 4): byte i of a word
    is column 4 j + i. Rows must start on 4-byte bounds; a tensor whose rows do not is copied first."""
    if codes.stride(0) % 4 or codes.storage_offset() % 4:
        codes = codes.contiguous()
    return codes.view(torch.int32)


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
