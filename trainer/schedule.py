"""Learning rate as a pure function of the step, so resuming needs no scheduler state."""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to train.lr, cosine decay to train.min_lr at decay_steps, then flat."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay_steps = t.decay_steps or t.max_steps
    if step >= decay_steps:
        return t.min_lr
    progress = (step - t.warmup_steps) / max(1, decay_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)
