"""What a logged step costs the training process with each set of trackers: the time MetricsWriter.log
takes on rank 0 for one step's scalars (metrics.jsonl always; TensorBoard; wandb offline, whose
own process does the writing).

    python bench/tracking.py [--steps 2000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import TrackingConfig  # noqa: E402
from trainer.metrics import MetricsWriter  # noqa: E402

STEP = {"tokens": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "batch_tokens": 8192, "tokens_per_s": 2e4,
        "step_time_s": 0.4, "mfu": 0.3, "usd_per_hour": 2.0, "tokens_per_usd": 3.6e7, "usd_spent": 1.2}


def per_step_us(tracking: TrackingConfig, steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        writer = MetricsWriter(run_dir, enabled=True, tracking=tracking)
        writer.log(0, STEP)  # first call outside the timing (lazy set-up)
        start = time.perf_counter()
        for step in range(1, steps + 1):
            writer.log(step, {**STEP, "tokens": step})
        elapsed = time.perf_counter() - start
        writer.close()
    return elapsed / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    rows = [("metrics.jsonl", TrackingConfig(tensorboard=False)),
            ("metrics.jsonl + TensorBoard (default)", TrackingConfig()),
            ("metrics.jsonl + TensorBoard + wandb offline", TrackingConfig(wandb=True, mode="offline"))]
    results = [(name, per_step_us(cfg, args.steps)) for name, cfg in rows]
    base = results[1][1]
    print("| trackers | µs per logged step | vs default |\n|---|---:|---:|")
    for name, us in results:
        print(f"| {name} | {us:,.0f} | {us / base:.2f} |")


if __name__ == "__main__":
    main()
