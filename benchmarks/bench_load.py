"""Peak host memory of loading a saved quantized Llama-shaped model with ``from_pretrained``.

Builds a Llama-shaped model with random weights, quantizes it, saves it with
``aofx.hf.save_pretrained``, then loads it in a fresh process with
``AutoModelForCausalLM.from_pretrained`` and reports that process's peak resident memory above what
it held before the call, and its resident size after one forward pass (which makes every
memory-mapped tensor resident), against the size of the saved tensors. (The forward's own peak is
not reported: on CPU the reference path dequantizes each weight to a temporary.) The baseline is taken after a
warm-up load of a one-layer checkpoint, so imports and one-time caches are not counted; the peak is
the kernel's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``).

    python -m benchmarks.bench_load [--config int8wo] [--layers 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

from aofx.schemes import SCHEMES, scheme

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=32000, tie_word_embeddings=False)


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def _load(path: str, warmup: str) -> None:
    import transformers

    import aofx.hf  # noqa: F401  (registers the "aofx" quantization method)

    transformers.AutoModelForCausalLM.from_pretrained(warmup)  # imports and one-time caches
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status_mb("VmRSS")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    loaded = _status_mb("VmHWM")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    with torch.no_grad():  # touches every tensor: the memory-mapped file pages become resident
        model(torch.zeros(1, 8, dtype=torch.long))
    print(json.dumps({"before_mb": before, "peak_mb": loaded, "after_forward_mb": _status_mb("VmRSS")}))


def _save(config, layers: int, out: str) -> float:
    """Quantize a random Llama-shaped model and save it; returns its float size in MiB."""
    import transformers

    import aofx
    import aofx.hf

    torch.manual_seed(0)
    shape = transformers.LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **SHAPE)
    model = transformers.LlamaForCausalLM(shape).bfloat16()
    float_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    aofx.quantize_(model, config)
    aofx.hf.save_pretrained(model, out)
    return float_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="int8wo", choices=[s.id for s in SCHEMES],
                        help="a scheme id of aofx.schemes.SCHEMES")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--load", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        return _load(*args.load)

    config = scheme(args.config).config
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as warmup:
        float_mb = _save(config, args.layers, out)
        _save(config, 1, warmup)
        file_mb = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
        run = subprocess.run([sys.executable, "-m", "benchmarks.bench_load", "--load", out, warmup],
                             capture_output=True, text=True, check=True)
        mem = json.loads(run.stdout.strip().splitlines()[-1])
    row = {"config": args.config, "layers": args.layers, "float_mb": round(float_mb, 1),
           "quantized_mb": round(file_mb, 1), "load_peak_above_start_mb": round(mem["peak_mb"] - mem["before_mb"], 1),
           "resident_after_forward_mb": round(mem["after_forward_mb"] - mem["before_mb"], 1)}
    row["load_peak_ratio"] = round(row["load_peak_above_start_mb"] / row["quantized_mb"], 3)
    row["resident_ratio"] = round(row["resident_after_forward_mb"] / row["quantized_mb"], 2)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([row], f, indent=1)


if __name__ == "__main__":
    main()
