"""The run directory, described once. The trainer writes it; sample, eval, export and the cluster
driver read it, the driver's node side (launch/vast/node.py, pack.py) included:

    RUN_DIR/config.yaml                 the run's resolved config
    RUN_DIR/metrics.jsonl               one JSON object per logged step
    RUN_DIR/tensorboard/
    RUN_DIR/checkpoints/latest          the tag of the newest complete checkpoint
    RUN_DIR/checkpoints/stepNNNNNNNN/   one checkpoint: meta.json and DeepSpeed's files
    RUN_DIR/cluster/                    the cluster driver's record: state.json, logs, the guard's

Standard library only (data/files.py is too): the nodes import this with the image's python3 before
anything is installed, and the driver runs on a laptop without torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from data.files import atomic_write

__all__ = ["CHECKPOINTS", "CONFIG", "LATEST", "METRICS", "TAG", "RunDirError", "atomic_write", "checkpoints",
           "config_path", "is_tag", "metrics_path", "named", "read_latest", "read_metrics", "run_root", "step_tag",
           "tags"]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TAG = re.compile(r"step[0-9]{8}")  # with fullmatch; zero-padded, so tags sort as their steps do


class RunDirError(ValueError):
    """A run dir's file names something that is not there (`latest` naming no checkpoint)."""


def named(run: str) -> Path:
    """The run dir of a run the cluster driver names, relative to a project folder (laptop or node)."""
    return Path("outputs") / run


def checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def is_tag(text) -> bool:
    return isinstance(text, str) and TAG.fullmatch(text) is not None


def tags(checkpoints_dir: str | Path) -> list[str]:
    """The checkpoint folders in a checkpoints dir, oldest first (complete or not: `latest` says which is)."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if is_tag(p.name) and p.is_dir() and not p.is_symlink())


def read_latest(checkpoints_dir: str | Path) -> str | None:
    """The tag `latest` names; None without a `latest`. RunDirError when it names anything but a
    checkpoint folder beside it: the file may have come from another machine."""
    path = Path(checkpoints_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(errors="replace").strip()
    folder = path.parent / tag
    if not is_tag(tag) or folder.is_symlink() or not folder.is_dir():
        raise RunDirError(f"{path}: names {tag[:80]!r}, which is not a checkpoint in {path.parent}")
    return tag


def run_root(path: str | Path) -> Path:
    """The run dir of a run dir, its checkpoints dir or one checkpoint dir."""
    path = Path(path)
    if checkpoints(path).is_dir():
        return path
    if (path / LATEST).is_file():
        return path.parent
    return path.parent.parent if (path / "meta.json").is_file() else path


def read_metrics(run_dir: str | Path, tail: int | None = None) -> list[dict]:
    """metrics.jsonl's entries, oldest first ([] without the file). A line that is not a JSON object
    is skipped: the trainer may be writing the last line now, or a crash cut it. tail: read only the
    last `tail` bytes, whose first line may be cut too."""
    try:
        with open(metrics_path(run_dir), "rb") as f:
            start = max(0, f.seek(0, 2) - tail) if tail is not None else 0
            f.seek(start)
            lines = f.read().split(b"\n")[1 if start else 0:]  # a line begun before `start` is cut
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
