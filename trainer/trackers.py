"""The trackers a run writes to: one interface (`Writer`), implemented by metrics.jsonl and
TensorBoard here and by Weights & Biases in wandb_writer.py. A new tracker is one more `Writer`."""
from __future__ import annotations

import json
from pathlib import Path

from . import rundir

# every logged value's name -> its tag in TensorBoard and wandb (metrics.jsonl keeps the names)
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s", "mfu": "perf/mfu",
        "usd_per_hour": "cost/usd_per_hour", "tokens_per_usd": "cost/tokens_per_usd", "usd_spent": "cost/usd_spent",
        "val_loss": "val/loss", "val_bpc": "val/bpc", "val_perplexity": "val/perplexity",
        "val_accuracy": "val/accuracy", "val_top5_accuracy": "val/top5_accuracy"}


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
        self.path = rundir.metrics_path(run_dir)
        if resume_step and self.path.exists():
            kept = [entry for entry in rundir.read_metrics(run_dir) if entry.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(entry) + "\n" for entry in kept))
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
