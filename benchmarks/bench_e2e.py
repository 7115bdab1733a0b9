"""End-to-end decode speed: a Llama-3-8B-shaped decoder, batch 1, one token per step.

The model is a plain-torch Llama block stack (RMSNorm, grouped-query attention with RoPE and a static KV
cache, SwiGLU MLP) with random weights, so nothing is downloaded. Each config quantizes every
``nn.Linear`` (the output head included) with ``aofx.quantize_``, then the decode step runs under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs). It reports tokens per second
over ``--steps`` steps after warm-up, and writes one JSON row per config. ``--configs`` takes ``bf16``
(no quantization) and the ids of ``aofx.schemes.SCHEMES``.

    python -m benchmarks.bench_e2e --configs bf16,int4wo-128,int8wo,fp8dq-row --out benchmarks/results/h100_e2e.json

``--aoti`` also packages each config's decode step with AOTInductor (static shapes: one token; the KV
caches are buffers the package updates in place) and times the loaded package, replayed as one CUDA
graph per step, in the same call: ``aoti_tok_s`` next to ``tok_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import aofx
from aofx.schemes import SCHEMES

CONFIGS = {"bf16": None, **{s.id: s.config for s in SCHEMES}}  # bf16: the unquantized baseline
LLAMA3_8B = dict(dim=4096, layers=32, heads=32, kv_heads=8, hidden=14336, vocab=128256)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, max_seq):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.attn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-5)
        cache = (1, kv_heads, max_seq, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache), persistent=False)

    def forward(self, x, pos, rope, mask):
        h = self.attn_norm(x)
        q = _rotate(self.wq(h).view(1, 1, self.heads, self.head_dim), rope).transpose(1, 2)
        k = _rotate(self.wk(h).view(1, 1, self.kv_heads, self.head_dim), rope).transpose(1, 2)
        v = self.wv(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(1, 1, -1))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def _rotate(t, rope):
    """RoPE on (1, 1, heads, head_dim) with rope = (cos, sin), each (1, 1, 1, head_dim // 2)."""
    cos, sin = rope
    a, b = t.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(t.dtype)


class Decoder(nn.Module):
    def __init__(self, dim, layers, heads, kv_heads, hidden, vocab, max_seq):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, hidden, max_seq) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)
        half = dim // heads // 2
        angles = torch.outer(torch.arange(max_seq).float(), 500000.0 ** (-torch.arange(half).float() / half))
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("causal", torch.ones(max_seq, max_seq, dtype=torch.bool).tril(), persistent=False)

    def forward(self, token, pos):
        """token (1, 1) int64, pos (1,) int64 -> the next token (1, 1), greedy."""
        rope = (self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1))
        mask = self.causal[pos].view(1, 1, 1, -1)
        x = self.embed(token)
        for block in self.blocks:
            x = block(x, pos, rope, mask)
        return self.output(self.norm(x)).argmax(-1)


def decode(step, token, steps: int, start: int = 0) -> list[int]:
    """Greedy decode ``steps`` tokens from ``token`` (1, 1) at positions start, start + 1, ..."""
    out = []
    with torch.no_grad():
        for i in range(start, start + steps):
            token = step(token, torch.tensor([i], device=token.device)).clone()
            out.append(token)
    return [t.item() for t in out]


def package_step(model: nn.Module, path: str, device: str, single_threaded: bool = False):
    """The decode step exported (one token, static shapes) and packaged with AOTInductor, loaded back.
    The package holds its own copy of the KV caches (zeros, as exported) and updates them in place."""
    example = (torch.zeros(1, 1, dtype=torch.int64, device=device), torch.tensor([0], device=device))
    with torch.no_grad():
        ep = torch.export.export(model, example)
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
    # run_single_threaded: otherwise each call waits on the previous call's event, which CUDA-graph
    # capture forbids
    return torch._inductor.aoti_load_package(path, run_single_threaded=single_threaded)


class GraphedStep:
    """A CUDA-graph replay of ``step`` on static token and position inputs (what reduce-overhead does
    for the compiled step). Warm-up and capture write cache row 0, which step 0 writes again."""

    def __init__(self, step, device="cuda"):
        self.token = torch.zeros(1, 1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            step(self.token, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = step(self.token, self.pos)

    def __call__(self, token, pos):
        self.token.copy_(token)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.out


def _timed_decode(step, args) -> tuple[float, float, list[int]]:
    """(tokens per second over args.steps, warm-up seconds, the first tokens) of ``step`` on CUDA."""
    token = torch.zeros(1, 1, dtype=torch.int64, device="cuda")
    start = time.perf_counter()
    first = decode(step, token, args.warmup)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    decode(step, torch.tensor([[first[-1]]], device="cuda"), args.steps, start=args.warmup)
    torch.cuda.synchronize()
    return args.steps / (time.perf_counter() - start), warmup_s, first


def _build(name, args) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(**dict(LLAMA3_8B, layers=args.layers), max_seq=args.max_seq).to(torch.bfloat16)
    start = time.perf_counter()
    if CONFIGS[name] is not None:
        aofx.quantize_(model, CONFIGS[name])
    return model, time.perf_counter() - start


def run_config(name, args):
    model, quantize_s = _build(name, args)
    weight_gb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    tok_s, compile_s, first = _timed_decode(step, args)
    row = dict(config=name, layers=args.layers, tok_s=round(tok_s, 1), weight_gb=round(weight_gb, 2),
               quantize_s=round(quantize_s, 1), warmup_s=round(compile_s, 1))
    print(f"  {name}: quantized in {quantize_s:.1f} s, compiled in {compile_s:.1f} s, {tok_s:.1f} tok/s", flush=True)
    del step
    torch._dynamo.reset()
    if args.aoti:
        for block in model.blocks:  # the package starts from the caches as exported
            block.k_cache.zero_()
            block.v_cache.zero_()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            package = package_step(model, f"{tmp}/step.pt2", "cuda", single_threaded=True)
            row["aoti_package_s"] = round(time.perf_counter() - start, 1)
            print(f"  {name}: packaged in {row['aoti_package_s']} s", flush=True)
        del model  # the package holds its own copy of the weights
        torch.cuda.empty_cache()
        aoti_tok_s, _, aoti_first = _timed_decode(GraphedStep(package), args)
        row.update(aoti_tok_s=round(aoti_tok_s, 1), aoti_vs_compile=round(aoti_tok_s / tok_s, 3),
                   aoti_same_first_tokens=aoti_first == first)
        del package
    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="bf16,int4wo-128,int8wo,fp8dq-row",
                   help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--layers", type=int, default=LLAMA3_8B["layers"])
    p.add_argument("--max-seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--aoti", action="store_true", help="also time each config's AOTInductor package")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU")
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    rows = []
    for name in names:
        rows.append(run_config(name, args))
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
