"""The learning-rate schedules (cosine and WSD) and the batch ramp, in tokens: pure functions of
the config, independent of the world size and the micro-batch."""
from __future__ import annotations

import math

import pytest

from trainer.config import TrainConfig, to_config
from trainer.schedule import accum_at, lr_at, planned_tokens


def test_wsd_holds_the_peak_then_cools_down_linearly_to_min_lr():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_tokens=100, schedule="wsd", cooldown=0.25)
    total = 1100  # 1000 tokens after the warmup: flat to 850, then down to 0.1 at 1100
    assert lr_at(99, t, total) == 1.0 and lr_at(50, t, total) == pytest.approx(0.51)
    assert lr_at(100, t, total) == lr_at(850, t, total) == 1.0
    assert lr_at(975, t, total) == pytest.approx(0.55)
    assert lr_at(1100, t, total) == lr_at(5000, t, total) == 0.1
    cosine = TrainConfig(lr=1.0, min_lr=0.1, warmup_tokens=100)
    assert lr_at(600, cosine, total) == pytest.approx(0.55)  # the cosine's midpoint, for contrast


def test_lr_schedule_in_tokens_is_linear_warmup_then_cosine_to_min_then_flat():
    t = to_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_tokens": 1000, "decay_tokens": 11000}}).train
    assert lr_at(0, t, 99) == pytest.approx(1 / 1000) and lr_at(999, t, 99) == pytest.approx(1.0)
    assert lr_at(1000, t, 99) == pytest.approx(1.0)
    assert lr_at(6000, t, 99) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(8500, t, 99) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(11000, t, 99) == pytest.approx(0.1) and lr_at(10**9, t, 99) == pytest.approx(0.1)
    default_end = to_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_tokens": 1000}}).train
    assert lr_at(6000, default_end, total_tokens=11000) == pytest.approx(0.55)  # decays to the run's end


def test_schedule_does_not_depend_on_world_size_or_micro_batch():
    ramp = to_config({"train": {"grad_accum": 8, "batch_ramp_tokens": 10_000, "batch_start_tokens": 1000}}).train
    assert accum_at(0, ramp, 1000) == 1 and accum_at(10_000, ramp, 1000) == 8
    # the same global batch in tokens whether a micro-step is 1000 tokens (1 rank) or 2000 (2 ranks)
    ramp2 = to_config({"train": {"grad_accum": 4, "batch_ramp_tokens": 10_000, "batch_start_tokens": 1000}}).train
    for tokens in (0, 2500, 5000, 7500, 10_000):
        assert abs(accum_at(tokens, ramp, 1000) * 1000 - accum_at(tokens, ramp2, 2000) * 2000) <= 1000


def test_batch_ramp_grows_linearly_then_stays_full():
    t = to_config({"train": {"grad_accum": 8, "batch_ramp_tokens": 70_000, "batch_start_tokens": 1000}}).train
    micro = 1000  # tokens of one micro-step on all ranks
    for tokens in range(0, 80_000, 5000):
        target = 1000 + (8000 - 1000) * tokens / 70_000 if tokens < 70_000 else 8000
        assert accum_at(tokens, t, micro) == max(1, min(8, round(target / micro)))
    flat = to_config({"train": {"grad_accum": 8, "max_steps": 10}}).train
    assert planned_tokens(flat, micro) == 80_000
    # by hand: targets 1000, 1750, 3250 tokens -> 1, 2, 3 micro-steps, then the full 4 twice
    small = to_config({"train": {"grad_accum": 4, "max_steps": 5, "batch_ramp_tokens": 4000,
                                 "batch_start_tokens": 1000}}).train
    assert planned_tokens(small, micro) == 1000 + 2000 + 3000 + 4000 + 4000
