"""Deployment: exported programs need aofx to load; AOTInductor packages run without it.

The AOTInductor round trip is examples/export_aoti.py itself: it packages a quantized model, loads
the package in a fresh process that never imports aofx, and compares at several batch sizes.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import aofx

ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kwargs):
    """A Python subprocess that imports the aofx under test, installed or not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(aofx.__file__).parents[1]), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, **kwargs)


def test_loading_an_exported_program_without_aofx_says_to_import_it(tmp_path):
    model = nn.Linear(64, 32, dtype=torch.bfloat16)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    path = tmp_path / "ep.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 64).bfloat16(),)), path)
    proc = _run(["-c", f"import torch; torch.export.load({str(path)!r})"])
    assert proc.returncode != 0
    assert "torch.ops.aofx.int8_weight_only_linear" in proc.stderr
    assert "import the custom op" in proc.stderr
    ok = _run(["-c", f"import torch, aofx; torch.export.load({str(path)!r})"])
    assert ok.returncode == 0, ok.stderr[-2000:]


def _export_aoti(device, config, workdir):
    """Run examples/export_aoti.py; returns its process, the package's file names and wrapper source."""
    proc = _run([str(ROOT / "examples" / "export_aoti.py"), "--device", device, "--config", config,
                 "--workdir", str(workdir)], cwd=ROOT)
    package = workdir / "quantized.pt2"
    assert package.exists(), proc.stderr[-4000:]
    archive = zipfile.ZipFile(package)
    names = archive.namelist()
    wrapper = "".join(archive.read(n).decode(errors="replace") for n in names if n.endswith("wrapper.cpp"))
    assert wrapper, f"no wrapper source in {names}"
    # everything is compiled in: no call back into Python or into a custom-op proxy
    assert "proxy_executor_call_function" not in wrapper
    assert "aofx" not in wrapper
    return proc, names


def test_aoti_package_runs_without_aofx_on_cpu(tmp_path):
    proc, _ = _export_aoti("cpu", "int4wo-128", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "fresh process without aofx: matches eager" in proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("config", ["int4wo-128", "int8dq", "fp8dq-row"])
def test_aoti_package_on_cuda(config, tmp_path):
    """The CUDA package holds the aofx Triton kernels of every M bucket as compiled cubins, picks one at run
    time, loads (with the C++ runtime preloaded on an image where a plain load crashes; see the README) and
    matches eager at M = 1, 3, 17, 64 and 1024."""
    proc, names = _export_aoti("cuda", config, tmp_path)
    archive = zipfile.ZipFile(tmp_path / "quantized.pt2")
    # Several M ranges' kernels, one cubin per compiled config (named by hash; the symbol is inside): int4's
    # GEMV (M <= 2) and its tensor-core tiles for M = 3..16, ..64 and ..256; the dynamic schemes' GEMM tiles
    # for M = 2..16 and 17..128 (and fp8dq-row's per-token quantization before torch._scaled_mm, a library
    # GEMM with a C shim and no cubin of its own, from M = 129), and their M = 1 GEMV
    expected = {"int4wo-128": {b"_int4_gemv_kernel": 1, b"_int4_mm_kernel": 2},
                "int8dq": {b"_quantized_mm_kernel": 2, b"_quantize_gemv_kernel": 1},
                "fp8dq-row": {b"_quantized_mm_kernel": 2, b"_quantize_per_token_kernel": 1,
                              b"_quantize_gemv_kernel": 1}}[config]
    cubins = [archive.read(n) for n in names if n.endswith(".cubin")]
    for kernel, at_least in expected.items():
        assert sum(kernel in cubin for cubin in cubins) >= at_least, f"{kernel} in fewer than {at_least} cubins"
    wrapper = "".join(archive.read(n).decode(errors="replace") for n in names if n.endswith("wrapper.cpp"))
    assert "subgraph: true_graph" in wrapper  # a torch.cond on M: the run-time choice
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fresh process without aofx: matches eager" in proc.stdout
    print(proc.stdout)


# Run in a process without TRITON_INTERPRET (which the test session sets), so the kernels are JITFunctions that
# dynamo wraps. Prints, per torch.cond AOTInductor lowers: the kinds of its operands; then the kernels launched.
LOWERED_GRAPH = """
import json, sys, torch
from torch import nn
import torch._inductor.compile_fx as compile_fx
import torch.utils._triton as triton_utils
from torch._higher_order_ops import triton_kernel_wrap
import aofx
from aofx.ops import _dispatch
from aofx.schemes import scheme

triton_utils.has_triton = lambda: True  # dynamo wraps Triton kernels only when it believes a GPU exists
_dispatch.KERNEL_DEVICES = ("cuda", "cpu")  # the ops' Triton branch, on CPU tensors
lowered = []

class Lowered(Exception):
    pass

def spy(gm, *args, **kwargs):
    lowered.append(gm)
    raise Lowered

compile_fx._compile_fx_inner = spy
torch.manual_seed(0)
# two shapes; N = 16384 gives int8dq unsplit 128 x 128 tiles from M = 129 on, with 8 warps up to M = 256, 4 above
model = nn.Sequential(nn.Linear(256, 16384), nn.SiLU(), nn.Linear(16384, 128)).bfloat16()
aofx.quantize_(model, scheme(sys.argv[1]).config)
batch = torch.export.Dim("batch", min=1, max=1024)
ep = torch.export.export(model, (torch.randn(8, 256).bfloat16(),), dynamic_shapes=({0: batch},))
try:
    torch._inductor.aoti_compile_and_package(ep)
except Exception:
    if not lowered:
        raise
graphs = [g for g in lowered[0].modules() if isinstance(g, torch.fx.GraphModule)]
cond = torch.ops.higher_order.cond
launches = [n.kwargs for g in graphs for n in g.graph.nodes
            if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
# Inductor names a user kernel by its function and constant arguments, not by its launch options: launches
# that agree on those but differ in warps or stages would run the first one's binary.
table = triton_kernel_wrap.kernel_side_table
options = {}
for kw in launches:
    kernel = table.get_kernel(kw["kernel_idx"])
    name = repr(sorted((k, repr(v)) for k, v in table.get_constant_args(kw["constant_args_idx"]).items()))
    option = [(c.num_warps, c.num_stages) for c in getattr(kernel, "configs", [])]
    options.setdefault((kernel.fn.__name__, name), set()).add(repr(option))
print(json.dumps({
    "top": sum(n.target is cond for n in lowered[0].graph.nodes),
    "operands": [["Tensor" if isinstance(getattr(a, "meta", {}).get("val"), torch.Tensor) else repr(a)
                  for a in n.args[3]] for g in graphs for n in g.graph.nodes if n.target is cond],
    "kernels": sorted({kw["kernel_idx"] for kw in launches}),
    "reused": [[key[0], *sorted(o)] for key, o in options.items() if len(o) > 1],
}))
"""


@pytest.mark.parametrize("config", ["int4wo-128", "int8dq", "fp8dq-row"])
def test_package_graph_branches_on_m_between_kernels(config):
    """What AOTInductor lowers for a CUDA package, traced on CPU up to codegen (which needs the GPU): each
    op is a chain of ``torch.cond`` on M whose branches launch that M range's Triton kernels, with tensor
    operands only (Inductor's cond lowering takes no others)."""
    import json

    proc = _run(["-c", LOWERED_GRAPH, config])
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["top"] == 2 and len(found["operands"]) >= 4  # a chain per layer, at least three M ranges each
    assert all(kind == "Tensor" for operands in found["operands"] for kind in operands), found["operands"]
    assert len(found["kernels"]) >= 4, found  # distinct kernels (or launch configs) across the ranges
    assert not found["reused"], found["reused"]  # each launch option compiled on its own
