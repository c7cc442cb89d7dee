"""Replacing a file atomically. Standard library only: trainer/rundir.py, which the cluster driver
runs on a laptop without torch, uses it too."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, content: str | bytes) -> None:
    """Temp file beside `path`, fsync, os.replace: a crash leaves the old file or the new one, never
    half of one. Text is written as UTF-8. The directory is not fsynced: after a power loss the
    rename may be undone, which leaves the old file, still whole."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: concurrent writers never share one
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed (a full disk)
