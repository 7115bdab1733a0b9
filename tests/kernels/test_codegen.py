"""What a symbolic M costs in generated code: none of the memory instructions may change, the weight-only
GEMM's 16-row tiles (M <= 16) must compile to the same PTX, and its taller tiles to the same PTX up to the
end of the K loop.

``torch.compile`` passes M as a number, which Triton specializes (a multiple of 16 is marked so); an
AOTInductor package passes a symbolic M, which is not. A kernel whose loads or stores vectorize only when
M is a multiple of 16 therefore runs slower in a package. Each case compiles a kernel for sm_90 (Triton's
NVIDIA backend needs no GPU for that) with and without that mark on M and compares the PTX's global and
asynchronous memory instructions (or, for the whole-PTX and K-loop cases, the PTX itself). The compiling
runs in a subprocess without TRITON_INTERPRET, which the test session sets and under which ``triton.jit``
gives interpreter functions that cannot be compiled."""

import collections
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import aofx
from aofx.kernels import common, mm

HOPPER = GPUTarget("cuda", 90, 32)


def ptx(kernel, pointers: dict, constexprs: dict, multiples_of_16: set) -> str:
    """PTX of ``kernel`` with ``pointers`` ({name: '*type'}) 16-byte aligned, ``constexprs`` (NUM_WARPS /
    NUM_STAGES, where given, are also the launch options; an int argument of 1 is one too, as Triton
    specializes it), the named int arguments marked multiples of 16 and the other arguments i32."""
    names = kernel.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in multiples_of_16}
    options = {"num_warps": constexprs.get("NUM_WARPS", 4), "num_stages": constexprs.get("NUM_STAGES", 3)}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs), target=HOPPER,
                          options=options).asm["ptx"]


def memory_instructions(kernel, pointers: dict, constexprs: dict, multiples_of_16: set) -> collections.Counter:
    """The global and cp.async instructions of ``ptx(...)``."""
    return collections.Counter(re.findall(r"\b(?:ld|st)\.global[\w.:]*|\bcp\.async\.\w+",
                                          ptx(kernel, pointers, constexprs, multiples_of_16)))


# int8 weight-only, M = 16 on 4096 x 14336: 16 x 64 x 256 swap_ab tiles, K split 4 ways, then the split sum
_SPLIT_GEMM = dict(SPLIT_K=4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, SWAP_AB=True, NUM_WARPS=4, NUM_STAGES=4)
CASES = {
    "split sum": (common._sum_splits_kernel, {"ws_ptr": "*fp32", "y_ptr": "*bf16"}, dict(SPLIT_K=4, BLOCK=1024),
                  {"N"}),
    "codes mm": (mm._codes_mm_kernel,
                 {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*fp32"},
                 dict(HAS_BIAS=False, GROUP_SIZE=0, EVEN_K=True, E4M3_PTX=False, **_SPLIT_GEMM),
                 {"N", "K", "stride_xm", "stride_wn", "stride_ym"}),
    "quantized mm": (mm._quantized_mm_kernel,
                     {"x_ptr": "*i8", "sx_ptr": "*fp32", "w_ptr": "*i8", "sw_ptr": "*fp32", "b_ptr": "*fp32",
                      "y_ptr": "*bf16"},
                     dict(HAS_BIAS=False, QUANTIZE_X=False, SPLIT_K=1, EVEN_K=True, BLOCK_M=128, BLOCK_N=128,
                          BLOCK_K=128, GROUP_M=8, AMAX_BLOCK_K=256, AMAX_STAGES=2, SWAP_AB=False, FP8=False,
                          NUM_WARPS=4, NUM_STAGES=3, FMA=True),
                     {"N", "K", "stride_xm", "stride_wn", "stride_ym"}),
    "int4 mm": (mm._int4_mm_kernel,
                {"x_ptr": "*bf16", "q_ptr": "*i32", "scale_ptr": "*bf16", "zero_ptr": "*bf16", "bias_ptr": "*bf16",
                 "out_ptr": "*bf16"},
                dict(GROUP_SIZE=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, SPLIT_K=1, SWAP_AB=False,
                     HAS_BIAS=False, DEQUANT_PTX=True, NUM_WARPS=4, NUM_STAGES=4, stride_xk=1),
                {"N", "K", "stride_xm", "stride_qw", "stride_sn", "stride_om"}),
}


# The weight-only M <= 16 tiles as the table picks them for 4096 x 14336 (16 x 32 x 512, 4 stages), without and
# with swap_ab. With a row mask on x they compiled to more predicated code for a symbolic M, and a package ran
# ~2 us a layer slower than compile at M = 16 with the same memory instructions; they now compile the same.
_M16_TILE = dict(HAS_BIAS=False, GROUP_SIZE=0, EVEN_K=True, E4M3_PTX=False, SPLIT_K=1, BLOCK_M=16, BLOCK_N=32,
                 BLOCK_K=512, GROUP_M=8, NUM_WARPS=4, NUM_STAGES=4)
WHOLE_PTX_CASES = {f"codes mm 16-row swap_ab={swap}": (*CASES["codes mm"][:2], dict(_M16_TILE, SWAP_AB=swap),
                                                       CASES["codes mm"][3])
                   for swap in (False, True)}
# The taller weight-only tiles of the table (M <= 128, <= 256, larger). Their row mask cost a package 7% at
# M = 128 (14336 x 4096, 128 x 64 tiles); now only the epilogue's store mask may differ, so everything up to
# the K loop's back edge must be the same.
K_LOOP_CASES = {f"codes mm {bm}x{bn}": (*CASES["codes mm"][:2],
                                        dict(_M16_TILE, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_WARPS=warps,
                                             NUM_STAGES=3, SWAP_AB=True),
                                        CASES["codes mm"][3])
                for bm, bn, bk, warps in ((128, 64, 128, 4), (128, 128, 128, 8), (256, 128, 64, 8))}


def through_k_loop(ptx_text: str) -> str:
    """``ptx_text`` up to the K loop's backward branch, without register declarations (the epilogue's store
    predicates change their counts)."""
    lines = [line for line in ptx_text.splitlines() if not line.strip().startswith(".reg")]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\$L__BB\w+):", line))}
    back_edges = [i for i, line in enumerate(lines)
                  if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)) and labels.get(m.group(1), i) < i]
    assert len(back_edges) == 1, back_edges  # one loop
    return "\n".join(lines[:back_edges[0] + 1])


def main():
    """In the subprocess, as JSON: ``{case: [instructions with M a multiple of 16, without]}`` and, for the
    whole-PTX and K-loop cases, ``{case: [PTX with that mark, without]}``."""
    found = {case: [memory_instructions(kernel, pointers, constexprs, static | {"M"}),
                    memory_instructions(kernel, pointers, constexprs, static)]
             for case, (kernel, pointers, constexprs, static) in CASES.items()}
    found |= {case: [ptx(kernel, pointers, constexprs, static | {"M"}), ptx(kernel, pointers, constexprs, static)]
              for case, (kernel, pointers, constexprs, static) in (WHOLE_PTX_CASES | K_LOOP_CASES).items()}
    print(json.dumps(found))


@functools.cache
def _compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(aofx.__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_a_symbolic_m_keeps_every_memory_instruction(case):
    with_m, without_m = _compiled()[case]
    assert with_m == without_m
    # the comparison is of vector code: 16-byte global accesses or asynchronous copies
    assert any(".v4." in op or op.startswith("cp.async") for op in with_m), with_m


@pytest.mark.parametrize("case", WHOLE_PTX_CASES)
def test_a_symbolic_m_leaves_the_16_row_weight_only_tile_unchanged(case):
    with_m, without_m = _compiled()[case]
    assert "cp.async" in with_m or ".v4." in with_m  # vector code, as above
    assert with_m == without_m


@pytest.mark.parametrize("case", K_LOOP_CASES)
def test_a_symbolic_m_leaves_the_taller_weight_only_tiles_unchanged_through_the_k_loop(case):
    with_m, without_m = _compiled()[case]
    assert "cp.async" in with_m or ".v4." in with_m
    assert through_k_loop(with_m) == through_k_loop(without_m)


if __name__ == "__main__":
    main()
