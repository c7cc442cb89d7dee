"""Validation loss over a fixed set of windows, averaged over all ranks, and text samples."""
from __future__ import annotations

import contextlib
import math

import deepspeed
import torch
import torch.distributed as dist

from data.loader import RankLoader


@torch.no_grad()
def evaluate(engine, loader: RankLoader) -> dict:
    """Mean loss (nats/char), bits per char and next-char accuracy over the loader's batches."""
    engine.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss sum, correct, tokens
    for x, y in loader:
        x, y = x.to(engine.device), y.to(engine.device)
        logits, loss = engine(x, y)
        totals[0] += loss.double() * y.numel()
        totals[1] += (logits.argmax(-1) == y).sum()
        totals[2] += y.numel()
    engine.train()
    dist.all_reduce(totals)
    loss = (totals[0] / totals[2]).item()
    return {"val_loss": loss, "val_bpc": loss / math.log(2), "val_accuracy": (totals[1] / totals[2]).item()}


@torch.no_grad()
def sample_text(engine, tokenizer, prompt: str, max_new_tokens: int, seed: int, zero_stage: int) -> str | None:
    """Collective under ZeRO-3 (parameters are gathered on every rank); the text is returned on rank 0."""
    model = engine.module
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()))
              if zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if dist.get_rank() != 0:
            return None
        was_training = model.training
        model.eval()
        ids = torch.tensor([list(tokenizer.encode(tokenizer.normalize(prompt)))], device=engine.device)
        gen = torch.Generator(device=engine.device).manual_seed(seed)
        out = model.generate(ids, max_new_tokens, temperature=0.8, generator=gen)
        model.train(was_training)
        return tokenizer.decode(out[0].tolist())
