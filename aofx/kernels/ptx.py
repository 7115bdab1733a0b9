"""Inline PTX the kernels use where Triton's own conversions or reductions cost more.

Each snippet is one line: Inductor's copy of a kernel's source (torch 2.11) cannot hold a newline in a
global string. The interpreter cannot run PTX, so every user keeps a plain-Triton fallback behind a
constexpr flag that launchers set only for CUDA tensors.
"""

import triton
import triton.language as tl

# e4m3 -> bf16 for 4 codes packed in one register ($2), as two bf16x2 words ($0: codes 0, 1; $1: codes 2, 3).
# Each code's bits s eeee mmm become the bf16 bits s 0000eeee mmm0000 (PRMT puts the code in a half-word's
# high byte, then mask, shift, sign), i.e. the value times 2**-120; one mul.bf16x2 by 2**120 (0x7b80) rescales
# it exactly (e4m3 subnormals are bf16 subnormals, which bf16 arithmetic keeps). Ten PTX (eight SASS)
# integer/FMA-pipe instructions per 4 codes, in place of the hardware e4m3 -> f16 -> bf16 conversions.
# The NaN codes 0x7f / 0xff become +-480 (quantized weights never hold NaN). ``mm`` uses it without swap_ab
# (the M <= 16 tiles), where it beats the hardware conversions; with swap_ab it is not faster.
E4M3_TO_BF16 = tl.constexpr(" ".join((  # noqa: FLY002 (one comment per step)
    "{", ".reg .b32 p<2>, m<2>, k;",
    "prmt.b32 p0, $2, 0, 0x1404;", "prmt.b32 p1, $2, 0, 0x3424;",  # codes 0, 1 (2, 3) into half-word high bytes
    "and.b32 m0, p0, 0x7f007f00;", "and.b32 m1, p1, 0x7f007f00;",
    "shr.b32 m0, m0, 4;", "shr.b32 m1, m1, 4;",
    "lop3.b32 p0, m0, 0x80008000, p0, 0xf8;", "lop3.b32 p1, m1, 0x80008000, p1, 0xf8;",  # a | (b & c): the sign
    "mov.b32 k, 0x7b807b80;", "mul.rn.bf16x2 $0, p0, k;", "mul.rn.bf16x2 $1, p1, k;", "}")))


def _int4_to_bf16() -> str:
    """One int32 word of 8 nibbles ($8), its bf16 scale ($9) and zero ($10) -> the 8 bf16 weights ($0..$7).

    Per pair of nibbles (i, i + 4): one LOP3 puts both into bf16 mantissas of 128 (0x4300 | n is
    128 + n), ``sub.bf16x2`` of 136 leaves q - 8 exactly, and ``fma.rn.bf16x2`` gives
    (q - 8) * s + z rounded once to bf16."""
    lines = ["{", ".reg .b32 t, s2, z2, o2;", "mov.b32 o2, 0x43084308;", "mov.b32 s2, {$9, $9};",
             "mov.b32 z2, {$10, $10};"]
    for i in range(4):
        if i:
            lines.append(f"shr.b32 t, $8, {4 * i};")
        lines += [f"lop3.b32 t, {'t' if i else '$8'}, 0x000F000F, 0x43004300, 0xea;",  # (a & b) | c
                  "sub.bf16x2 t, t, o2;", "fma.rn.bf16x2 t, t, s2, z2;", f"mov.b32 {{${i}, ${i + 4}}}, t;"]
    return " ".join(lines + ["}"])


INT4_TO_BF16 = tl.constexpr(_int4_to_bf16())


@triton.jit
def dot4(w, x, acc, ASM: tl.constexpr):
    """``acc`` plus the dot products of the 4 int8 codes packed in each int32 word of w and x (byte i is
    code i): one ``dp4a`` per word on the GPU (inline PTX), shifts and multiplies elsewhere (interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            # shift byte i to the top, then arithmetic-shift it back down: the sign-extended code
            acc += ((w << (24 - 8 * i)) >> 24) * ((x << (24 - 8 * i)) >> 24)
        return acc
