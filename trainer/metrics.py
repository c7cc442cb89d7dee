"""Rank 0's record of a run: TensorBoard scalars and text, and the same scalars in metrics.jsonl."""
from __future__ import annotations

import json
import time
from pathlib import Path


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


class MetricsWriter:
    """Does nothing on ranks other than 0. Resuming at step k drops what a killed run logged after k."""

    def __init__(self, run_dir, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = run_dir / "metrics.jsonl"
        if resume_step and self.jsonl.exists():
            kept = [line for line in self.jsonl.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        elif self.jsonl.exists():
            self.jsonl.unlink()
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self._file = open(self.jsonl, "a")

    def log(self, step: int, values: dict, tb_tags: dict[str, str]) -> None:
        """values: name -> number, written as one JSON line; tb_tags maps names to TensorBoard tags."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for name, value in values.items():
            if name in tb_tags and value is not None:
                self.tb.add_scalar(tb_tags[name], value, step)
        self.tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            # TensorBoard renders Markdown: keep line breaks and spacing as generated.
            self.tb.add_text(tag, "    " + text.replace("\n", "\n    "), step)
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self._file.close()
