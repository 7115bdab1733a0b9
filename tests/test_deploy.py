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
    """The CUDA package holds the aofx Triton kernels as compiled cubins, and loads (with the C++
    runtime preloaded on an image where a plain load crashes; see the README) and matches eager at M = 1, 3,
    17, 64 and 1024."""
    proc, names = _export_aoti("cuda", config, tmp_path)
    archive = zipfile.ZipFile(tmp_path / "quantized.pt2")
    # the kernels of the largest M of the exported range (fp8dq-row: the per-token quantization before
    # torch._scaled_mm, which is a library GEMM with a C shim and no cubin of its own)
    kernel_prefix = {"int4wo-128": b"_int4_mm_kernel", "int8dq": b"_quantized_mm_kernel",
                     "fp8dq-row": b"_quantize_per_token_kernel"}[config]
    cubins = [n for n in names if n.endswith(".cubin")]  # named by hash; the kernel symbol is inside
    assert any(kernel_prefix in archive.read(n) for n in cubins), f"no aofx kernel in the cubins {cubins}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fresh process without aofx: matches eager" in proc.stdout
    print(proc.stdout)
