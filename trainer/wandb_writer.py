"""Weights & Biases as one more metrics writer (rank 0 only), continued across resumes.

The run's wandb id is kept in run_dir/wandb_run.json. A resume at step k continues that same run
through wandb's rewind (`resume_from="ID?_step=k"`): the history is cut back to step k, so points an
interrupted attempt logged after its last checkpoint never show in the curve, as in metrics.jsonl
and TensorBoard. (`resume="must"` would keep them and silently drop the new points up to the old
last step; `fork_from` would start a run with another id.) wandb's own processes send the data: a
slow or lost connection never blocks a step, and a failed start falls back to offline mode.
"""
from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

from .trackers import TAGS, Writer

ID_FILE = "wandb_run.json"


class WandbWriter(Writer):
    def __init__(self, run_dir: Path, resume_step: int, tracking):
        import wandb

        self.wandb, self.samples = wandb, []
        id_file = run_dir / ID_FILE
        previous = json.loads(id_file.read_text()).get("id") if resume_step and id_file.exists() else None
        run_id = previous or secrets.token_hex(6)
        id_file.write_text(json.dumps({"id": run_id}))  # no key, no settings: just which run this is
        where = {"resume_from": f"{run_id}?_step={resume_step}"} if previous else {"id": run_id}
        options = dict(project=tracking.project, entity=tracking.entity or None,
                       name=tracking.name or run_dir.resolve().name, group=tracking.group or None,
                       tags=list(tracking.tags) or None, dir=str(run_dir), **where)
        settings = wandb.Settings(init_timeout=tracking.init_timeout_s)
        try:
            self.run = wandb.init(mode=tracking.mode, settings=settings, **options)
        except Exception as e:  # an outage or a refused key must not stop training
            print(f"warning: wandb did not start ({type(e).__name__}: {str(e)[:300]}); logging offline to "
                  f"{run_dir / 'wandb'} instead: `wandb sync {run_dir / 'wandb'}` uploads it later",
                  file=sys.stderr, flush=True)
            self.run = wandb.init(mode="offline", settings=settings, **options)

    def describe(self, facts: dict) -> None:
        self.run.config.update(facts, allow_val_change=True)

    def log(self, step: int, values: dict) -> None:
        self.run.log({TAGS[k]: v for k, v in values.items() if k in TAGS and v is not None}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.samples.append([step, text])  # the whole table again: wandb shows the last one logged
        self.run.log({tag: self.wandb.Table(columns=["step", "text"], data=list(self.samples))}, step=step)

    def close(self) -> None:
        self.run.finish()
