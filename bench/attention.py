"""Attention variants on this machine: training tokens/s (forward + backward) of einsum vs SDPA for
MHA/GQA/MQA x learned/RoPE, and decoding tokens/s with and without the KV cache.

    python bench/attention.py [--ctx 256] [--steps 10] [--decode 256]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from model import GPT, GPTConfig, generate


def train_rate(cfg: GPTConfig, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start = time.perf_counter()
        _, loss = model(idx, idx)
        loss.backward()
    return steps * batch * cfg.block_size / (time.perf_counter() - start)


def decode_rate(cfg: GPTConfig, tokens: int, use_cache: bool) -> float:
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    generate(model, prompt, 8, temperature=0, use_cache=use_cache)  # warm-up
    start = time.perf_counter()
    generate(model, prompt, tokens, temperature=0, use_cache=use_cache)
    return tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode", type=int, default=240, help="tokens to generate (< ctx - 16 keeps one window)")
    args = parser.parse_args()
    base = dict(vocab_size=70, n_layer=4, n_head=4, d_model=128, block_size=args.ctx)
    kv_names = {4: "MHA", 2: "GQA-2", 1: "MQA"}
    print(f"\nbaby-size model (4 layers, 4 heads, width 128), ctx {args.ctx}, batch {args.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| heads | positions | einsum tok/s | sdpa tok/s | sdpa / einsum |\n|---|---|---:|---:|---:|")
    for kv, pos in itertools.product([4, 2, 1], ["learned", "rope"]):
        rates = [train_rate(GPTConfig(**base, n_kv_head=kv, pos_emb=pos, attn=attn), args.batch, args.steps)
                 for attn in ("einsum", "sdpa")]
        print(f"| {kv_names[kv]} | {pos} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[1] / rates[0]:.2f} |")

    print(f"\ndecoding {args.decode} tokens after a 16-token prompt, batch 1, greedy, sdpa\n")
    print("| heads | KV cache bytes/token | no cache tok/s | cache tok/s | speed-up |\n|---|---:|---:|---:|---:|")
    for kv in (4, 1):
        cfg = GPTConfig(**base, n_kv_head=kv, attn="sdpa")
        plain, cached = decode_rate(cfg, args.decode, False), decode_rate(cfg, args.decode, True)
        per_token = GPT(cfg).new_cache(1).bytes_per_token()
        print(f"| {kv_names[kv]} | {per_token:,} | {plain:,.0f} | {cached:,.0f} | {cached / plain:.2f} |")


if __name__ == "__main__":
    main()
