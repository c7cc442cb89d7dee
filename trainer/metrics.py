"""Rank 0's record of a run: one interface, written to metrics.jsonl, TensorBoard and (optionally)
Weights & Biases. A new tracker is one more `Writer`."""
from __future__ import annotations

import json
import time
from pathlib import Path

# every logged value's name -> its tag in TensorBoard and wandb (metrics.jsonl keeps the names)
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s", "mfu": "perf/mfu",
        "usd_per_hour": "cost/usd_per_hour", "tokens_per_usd": "cost/tokens_per_usd", "usd_spent": "cost/usd_spent",
        "val_loss": "val/loss", "val_bpc": "val/bpc", "val_perplexity": "val/perplexity",
        "val_accuracy": "val/accuracy", "val_top5_accuracy": "val/top5_accuracy"}


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


class Writer:
    """One tracker. Each is opened knowing the step a run resumed at (0: a new run), and drops or
    hides whatever an interrupted attempt logged after that step."""

    def describe(self, facts: dict) -> None:
        """Once per attempt: the resolved config, parameter count, world size, MFU peak."""

    def log(self, step: int, values: dict) -> None:
        """values: name -> number (None: not measured this time)."""

    def text(self, tag: str, text: str, step: int) -> None:
        """A text sample."""

    def close(self) -> None:
        pass


class JsonlWriter(Writer):
    """metrics.jsonl: one JSON object per logged step."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")

    def log(self, step: int, values: dict) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter(Writer):
    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def describe(self, facts: dict) -> None:
        self.tb.add_text("run", "    " + json.dumps(facts, indent=1, default=str).replace("\n", "\n    "), 0)

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            if name in TAGS and value is not None:
                self.tb.add_scalar(TAGS[name], value, step)
        self.tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders Markdown: keep line breaks and spacing as generated.
        self.tb.add_text(tag, "    " + text.replace("\n", "\n    "), step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


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
    path = Path(run_dir) / "metrics.jsonl"
    value = 0.0
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry.get("step", up_to_step + 1) <= up_to_step and entry.get(name) is not None:
                value = entry[name]
    return value
