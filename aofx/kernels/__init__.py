"""Triton kernels, one family per file (``<scheme>.py``), each with its layout doc, config table,
selector and launcher. Shared here: the M that the selectors branch on."""

import sympy
import torch
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
