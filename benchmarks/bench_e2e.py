"""End-to-end decode speed: a Llama-3-8B-shaped decoder, batch 1, one token per step.

The model is a plain-torch Llama block stack (RMSNorm, grouped-query attention with RoPE and a static KV
cache, SwiGLU MLP) with random weights, so nothing is downloaded. Each config quantizes every
``nn.Linear`` (the output head included) with ``aofx.quantize_``, then the decode step runs under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs). It reports tokens per second
over ``--steps`` steps after warm-up, and writes one JSON row per config. ``--configs`` takes ``bf16``
(no quantization) and the ids of ``aofx.schemes.SCHEMES``.

    python -m benchmarks.bench_e2e --configs bf16,int4wo-128,int8wo,fp8dq-row --out benchmarks/results/h100_e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
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


def run_config(name, args):
    torch.manual_seed(0)
    shape = dict(LLAMA3_8B, layers=args.layers)
    with torch.device("cuda"):
        model = Decoder(**shape, max_seq=args.max_seq).to(torch.bfloat16)
    start = time.perf_counter()
    if CONFIGS[name] is not None:
        aofx.quantize_(model, CONFIGS[name])
    quantize_s = time.perf_counter() - start
    weight_gb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    token = torch.zeros(1, 1, dtype=torch.int64, device="cuda")
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(args.warmup):
            token = step(token, torch.tensor([i], device="cuda")).clone()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            token = step(token, torch.tensor([i], device="cuda")).clone()
        torch.cuda.synchronize()
    tok_s = args.steps / (time.perf_counter() - start)
    row = dict(config=name, layers=args.layers, tok_s=round(tok_s, 1), weight_gb=round(weight_gb, 2),
               quantize_s=round(quantize_s, 1), warmup_s=round(compile_s, 1))
    print(f"{name:12s} {tok_s:8.1f} tok/s   weights {weight_gb:6.2f} GB   quantize {quantize_s:5.1f} s   "
          f"warm-up {compile_s:5.1f} s", flush=True)
    del model, step
    torch._dynamo.reset()
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
