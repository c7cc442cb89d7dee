"""Text generation: prefill a KV cache with the prompt, then decode one token at a time."""
from __future__ import annotations

import torch

from .gpt import GPT


def pick_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (batch, 1) from last-position logits (batch, vocab); temperature 0 is greedy."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Append max_new_tokens ids to idx (batch, time).

    The context never exceeds model.block_size. Without the cache it slides by one token (always the
    last block_size tokens). With the cache, once block_size positions are filled, the cache is
    refilled from the last block_size // 2 tokens and decoding goes on: the same text as without the
    cache up to block_size tokens, then a context of between half and all of block_size.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    T = model.cfg.block_size
    if not use_cache:
        for _ in range(max_new_tokens):
            nxt = pick_next(model(idx[:, -T:])[:, -1], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
    cache = model.new_cache(idx.shape[0])
    logits = model(idx[:, -T:], cache=cache)[:, -1]
    for i in range(max_new_tokens):
        nxt = pick_next(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt], dim=1)
        if i == max_new_tokens - 1:
            break
        if cache.length == T:
            cache.length = 0
            logits = model(idx[:, -(T // 2):], cache=cache)[:, -1]
        else:
            logits = model(nxt, cache=cache)[:, -1]
    return idx
