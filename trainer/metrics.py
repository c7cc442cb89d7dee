"""Rank 0's record of a run: the rates a step's timing gives, and every enabled tracker behind one
MetricsWriter (the trackers themselves are in trackers.py and wandb_writer.py)."""
from __future__ import annotations

import time
from pathlib import Path

from . import rundir
from .trackers import JsonlWriter, TensorBoardWriter, Writer


class Throughput:
    """Steps, micro-steps and tokens since the last read, and the rates they give."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        """Start a new timing window (after evaluation or a checkpoint, which are not training)."""
        self.start, self.steps, self.micro_steps, self.tokens = time.perf_counter(), 0, 0, 0

    def add(self, micro_steps: int, tokens: int) -> None:
        self.steps += 1
        self.micro_steps += micro_steps
        self.tokens += tokens

    def read(self) -> dict:
        elapsed = time.perf_counter() - self.start
        out = {"micro_steps": self.micro_steps, "tokens_per_s": self.tokens / elapsed,
               "step_time_s": elapsed / max(1, self.steps)}
        self.restart()
        return out


class MetricsWriter(Writer):
    """Every enabled tracker on rank 0; nothing on the other ranks (one writer, whatever the world size)."""

    def __init__(self, run_dir, enabled: bool, resume_step: int = 0, tracking=None):
        self.writers: list[Writer] = []
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.writers.append(JsonlWriter(run_dir, resume_step))
        if tracking is None or tracking.tensorboard:
            self.writers.append(TensorBoardWriter(run_dir, resume_step))
        if tracking is not None and tracking.wandb:
            from .wandb_writer import WandbWriter

            self.writers.append(WandbWriter(run_dir, resume_step, tracking))

    def describe(self, facts: dict) -> None:
        for w in self.writers:
            w.describe(facts)

    def log(self, step: int, values: dict) -> None:
        for w in self.writers:
            w.log(step, values)

    def text(self, tag: str, text: str, step: int) -> None:
        for w in self.writers:
            w.text(tag, text, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def last_logged(run_dir, name: str, up_to_step: int) -> float:
    """The last value of `name` in metrics.jsonl at or before a step (0 if none): what an interrupted
    run had counted, such as the dollars spent."""
    value = 0.0
    for entry in rundir.read_metrics(run_dir):
        if entry.get("step", up_to_step + 1) <= up_to_step and entry.get(name) is not None:
            value = entry[name]
    return value
