"""Deploy a quantized model: torch.export -> save/load -> AOTInductor package -> run it without aofx.

    python examples/export_aoti.py [--device cpu|cuda] [--config ID]   # ID: an id of aofx.schemes.SCHEMES

The package is loaded with ``torch._inductor.aoti_load_package`` in a fresh Python process that
never imports aofx, and run at several batch sizes along the exported dynamic dimension; its
outputs must match the quantized model's eager outputs. The package size is printed with the size of the
quantized and the bf16 weights. Exits non-zero on any mismatch.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

import aofx
from aofx.schemes import SCHEMES, scheme

BATCHES = (1, 3, 17, 64, 1024)
LOAD_TIMEOUT_S = 60  # loading and running the package takes seconds; a load that hangs is given up

# Runs in the fresh process: load the package, run it on each input, save the outputs.
LOADER = """
import sys, torch
package = torch._inductor.aoti_load_package(sys.argv[1])
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    outputs = [package(x) for x in inputs]
assert "aofx" not in sys.modules, "the package runner imported aofx"
torch.save([o.cpu() for o in outputs], sys.argv[3])
"""


def build_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 128, bias=False),
    ).to(device=device, dtype=torch.bfloat16)


def package(model: nn.Module, x: torch.Tensor, path: str) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return ep


def system_libstdcxx() -> str:
    """The C++ runtime of the system compiler (``g++ -print-file-name=libstdc++.so.6``), or ''."""
    try:
        found = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    return os.path.realpath(found.strip()) if os.path.isabs(found.strip()) else ""


def run_in_fresh_process(path: str, inputs: list, workdir: str) -> tuple:
    """Run the package in a new Python without aofx; returns ``(outputs on CPU, how it loaded)``.

    On an image whose Python maps one C++ runtime while the wrapper library resolves another, loading
    any package crashes (SIGSEGV in std::regex); preloading the system libstdc++ makes both agree,
    so that is tried, and reported, when the plain load crashes or hangs.
    """
    in_path, out_path = os.path.join(workdir, "in.pt"), os.path.join(workdir, "out.pt")
    torch.save(inputs, in_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    attempts = [("plain load", env)]
    if system_libstdcxx():
        attempts.append((f"LD_PRELOAD={system_libstdcxx()}", {**env, "LD_PRELOAD": system_libstdcxx()}))
    errors, stderr = [], ""
    for how, attempt_env in attempts:
        try:
            proc = subprocess.run([sys.executable, "-c", LOADER, path, in_path, out_path], env=attempt_env,
                                  capture_output=True, text=True, cwd=workdir, timeout=LOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:  # a hang, like a crash, is worth the preloaded try
            errors.append(f"{how} still running after {LOAD_TIMEOUT_S} s")
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            continue
        if proc.returncode == 0:
            return torch.load(out_path), how + (f" (after: {'; '.join(errors)})" if errors else "")
        errors.append(f"{how} exited {proc.returncode}")
        stderr = proc.stderr
        if proc.returncode != -11:  # only a crash is worth another try
            break
    raise RuntimeError(f"loading the package failed ({'; '.join(errors)}):\n{stderr[-3000:]}")


def main(device: str, config_name: str, workdir: str) -> None:
    base = build_model(device)
    model = copy.deepcopy(base)
    aofx.quantize_(model, scheme(config_name).config)
    x = torch.randn(8, 256, device=device, dtype=torch.bfloat16)

    print("packaging the quantized model", flush=True)
    ep = package(model, x, os.path.join(workdir, "quantized.pt2"))
    torch.export.save(ep, os.path.join(workdir, "quantized_ep.pt2"))
    reloaded = torch.export.load(os.path.join(workdir, "quantized_ep.pt2")).module()
    print("running the quantized package in a fresh process", flush=True)

    inputs = [torch.randn(m, 256, device=device, dtype=torch.bfloat16) for m in BATCHES]
    outputs, how = run_in_fresh_process(os.path.join(workdir, "quantized.pt2"), inputs, workdir)
    worst = 0.0
    for x_m, out in zip(inputs, outputs):
        eager = model(x_m).cpu()
        torch.testing.assert_close(reloaded(x_m).cpu(), eager, rtol=0, atol=0)
        # Inductor compiles the op's body (the Triton kernels on CUDA, the reference elsewhere);
        # allow for its own fusion of the fp32 scale math
        torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
        worst = max(worst, (out.float() - eager.float()).abs().max().item())

    package_mb = os.path.getsize(os.path.join(workdir, "quantized.pt2")) / 1e6
    weights_mb = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 1e6
                  for name, m in (("quantized", model), ("bf16", base))}
    print(f"device={device} config={config_name}")
    print(f"exported program: save/load round trip matches eager at batch sizes {BATCHES}")
    print(f"AOTInductor package, fresh process without aofx: matches eager at batch sizes {BATCHES} "
          f"(max abs diff {worst:.2e}; {how})")
    print(f"package size: {package_mb:.2f} MB, holding {weights_mb['quantized']:.2f} MB of quantized weights "
          f"(bf16: {weights_mb['bf16']:.2f} MB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="int4wo-128", choices=[s.id for s in SCHEMES])
    parser.add_argument("--workdir", default=None, help="keep the packages here (default: a temp dir)")
    args = parser.parse_args()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        main(args.device, args.config, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(args.device, args.config, tmp)
