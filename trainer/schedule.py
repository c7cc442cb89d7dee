"""The GPT-3 recipe's schedules, as pure functions of tokens trained (not steps), so they stay the
same when the world size, micro-batch or accumulation changes, and resuming needs no state."""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(tokens: int, t: TrainConfig, total_tokens: int) -> float:
    """Linear warmup over warmup_tokens, then the decay to min_lr at decay_tokens (default: the run's
    end), flat after: a cosine, or (wsd) flat at lr and a linear cooldown over its last fraction."""
    if tokens < t.warmup_tokens:
        return t.lr * (tokens + 1) / t.warmup_tokens
    decay_end = t.decay_tokens or total_tokens
    if tokens >= decay_end:
        return t.min_lr
    progress = (tokens - t.warmup_tokens) / max(1, decay_end - t.warmup_tokens)
    if t.schedule == "wsd":
        left = (1.0 - progress) / t.cooldown  # 1 where the cooldown starts, 0 at its end
        return t.lr if left >= 1 else t.min_lr + left * (t.lr - t.min_lr)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def accum_at(tokens: int, t: TrainConfig, micro_tokens: int) -> int:
    """Micro-steps per optimizer step. With a batch ramp the global batch grows linearly from
    batch_start_tokens to its full size (grad_accum micro-steps) over batch_ramp_tokens."""
    if not t.batch_ramp_tokens or tokens >= t.batch_ramp_tokens:
        return t.grad_accum
    full = t.grad_accum * micro_tokens
    target = t.batch_start_tokens + (full - t.batch_start_tokens) * tokens / t.batch_ramp_tokens
    return max(1, min(t.grad_accum, round(target / micro_tokens)))


def planned_tokens(t: TrainConfig, micro_tokens: int) -> int:
    """Tokens a run of max_steps will have trained on (the default end of the cosine decay)."""
    if not t.batch_ramp_tokens:
        return t.max_steps * t.grad_accum * micro_tokens
    tokens = 0
    for _ in range(t.max_steps):
        tokens += accum_at(tokens, t, micro_tokens) * micro_tokens
    return tokens
