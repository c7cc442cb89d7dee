"""Evaluation metrics (loss, bits per char, perplexity, top-1/top-5 accuracy) and text samples."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import generate


def batch_stats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sums over one batch: [nll in nats, top-1 correct, top-5 correct, tokens] (float64)."""
    logits = logits.float().flatten(0, 1)
    targets = targets.flatten()
    nll = F.cross_entropy(logits, targets, reduction="sum")
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return torch.stack([nll.double(), (top5[:, 0] == targets).sum().double(),
                        (top5 == targets[:, None]).any(-1).sum().double(),
                        # a fill, not a copy from the host (on a GPU, torch.tensor(...) would wait for it)
                        torch.full((), float(targets.numel()), dtype=torch.float64, device=logits.device)])


def summarize(stats: torch.Tensor) -> dict:
    nll, top1, top5, tokens = stats.tolist()
    loss = nll / tokens
    return {"loss": loss, "bpc": loss / math.log(2), "perplexity": math.exp(loss),
            "accuracy": top1 / tokens, "top5_accuracy": top5 / tokens, "tokens": int(tokens)}


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
             device) -> torch.Tensor:
    """Summed batch_stats of forward(x) -> logits over the batches (this rank's share), each a block of
    windows (micro_batch, block_size + 1) as RankLoader.next_windows() gives: x and y are its slices."""
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    for windows in batches:
        # one copy, non_blocking: a blocking copy to a GPU waits for all queued work, once per batch
        windows = windows.to(device, non_blocking=True).long()
        stats += batch_stats(forward(windows[:, :-1]), windows[:, 1:])
    return stats


def evaluate_engine(engine, batches: Iterable[torch.Tensor]) -> dict:
    """evaluate() on every rank, summed over ranks, as val_* metrics."""
    engine.eval()
    stats = evaluate(engine, batches, engine.device)
    engine.train()
    dist.all_reduce(stats)
    return {f"val_{k}": v for k, v in summarize(stats).items()}


@torch.no_grad()
def sample_text(engine, tokenizer, prompt: str, max_new_tokens: int, seed: int, zero_stage: int) -> str | None:
    """Collective under ZeRO-3 (parameters are gathered on every rank); the text is returned on rank 0."""
    import deepspeed  # here, so that eval.py's stdout stays one JSON object

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
        out = generate(model, ids, max_new_tokens, temperature=0.8, generator=gen)
        model.train(was_training)
        return tokenizer.decode_text(out[0].tolist())
