"""On the GPU: quantized models compile to the aofx Triton kernels, with no graph break, and pick the
right kernel for each batch size under a dynamic batch. Run with `pytest -m cuda` on a CUDA machine."""

import functools
import importlib
import pkgutil
import re

import pytest
import torch
import triton
from torch import nn
from torch._inductor.utils import run_and_get_code

import aofx
from tests.common import CONFIGS, normal_weights, two_layer

pytestmark = pytest.mark.cuda


@functools.cache
def _kernel_names() -> frozenset:
    """The launchable @triton.jit kernels (``*_kernel``) of aofx's kernel files. Kernels are shared by
    algorithm (every scheme reaches gemv.py, mm.py, ...), so the tests below compare sets: compiled
    against eager."""
    import aofx.kernels as package
    modules = [importlib.import_module(f"aofx.kernels.{info.name}") for info in pkgutil.iter_modules(package.__path__)]
    return frozenset(name for m in modules for name, obj in vars(m).items()
                     if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"))


def _model(config):
    model = normal_weights(two_layer(dims=(1024, 512, 256))).cuda()
    aofx.quantize_(model, config)
    return model


@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_model_runs_aofx_kernels(config):
    model = _model(config)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    source = "\n".join(code)
    used = {name for name in _kernel_names() if name in source}
    assert used, f"no aofx kernel of {sorted(_kernel_names())} in the generated code"
    assert "torch.ops.aofx" not in source, "an aofx op was left as an opaque call"
    torch.testing.assert_close(out, model(x), rtol=2e-2, atol=2e-2)


def _launched(fn, x) -> set:
    """The aofx kernels (by @triton.jit name) that running ``fn(x)`` launches on the GPU."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    launched = {event.name for event in prof.events()}
    return {name for name in _kernel_names() if any(name in event for event in launched)}


@pytest.mark.parametrize("config", CONFIGS)
def test_dynamic_batch_picks_each_buckets_kernel(config):
    model = _model(config)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for m in (1, 2, 16, 17, 64, 129, 1024):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), rtol=2e-2, atol=2e-2, msg=lambda s, m=m: f"M={m}: {s}")
        eager = _launched(model, x)
        assert eager and _launched(compiled, x) == eager, f"M={m}: compiled launched other kernels"


def test_int4_small_and_large_batch_compile_to_different_kernels():
    model = _model(aofx.Int4WeightOnlyConfig())
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    sources = {}
    for m in (1, 1024):
        _, code = run_and_get_code(compiled, torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16))
        sources[m] = "\n".join(code)
    assert "_int4_gemv_kernel" in sources[1] and "_int4_dequantize_kernel" in sources[1024]
    assert re.search(r"extern_kernels\.(add)?mm\(", sources[1024])  # the dequantized weight goes to cuBLAS


@pytest.mark.parametrize("config", CONFIGS)
def test_export_on_cuda_matches_eager(config):
    model = _model(config)
    ep = torch.export.export(model, (torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16),),
                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
    for m in (1, 33, 256):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=2e-2, atol=2e-3)


def _quantize_peak(model) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig(), device="cuda")
    return torch.cuda.max_memory_allocated() - start


def test_device_argument_quantizes_on_the_gpu_one_layer_at_a_time():
    one = _quantize_peak(normal_weights(nn.Linear(4096, 4096, dtype=torch.bfloat16)))
    model = normal_weights(two_layer(dims=(4096, 4096, 4096)))  # on CPU
    two = _quantize_peak(model)
    assert model.up.qdata.is_cuda and model.up.bias.is_cuda and model.down.scale.is_cuda
    # one layer's temporaries at a time, plus the packed layers already done
    assert two < 1.3 * one, f"peak {two / 1e6:.1f} MB for two layers vs {one / 1e6:.1f} MB for one"
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    assert model(x).shape == (3, 4096)
