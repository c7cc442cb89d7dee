"""The node side of the run-files fetch: `python3 launch/vast/pack.py --run RUN [--cluster-only]`, from
the project folder on a node, writes to stdout a tar of outputs/RUN without its checkpoints (which are
fetched on their own, verified against meta.json): metrics.jsonl, config.yaml, tensorboard/, wandb/
and cluster/ (the node's logs and guard record); with --cluster-only, cluster/ alone. Each file is
read once and its sha256 and size go into a last member, `.manifest.json`, so the laptop checks what
arrived against exactly what was sent, while the files still grow. Standard library only, and of the
project only modules that need nothing more (trainer/rundir.py, launch/cli.py), as node.py."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script: the project folder is not on the path
from launch.cli import FlagParser  # noqa: E402
from trainer import rundir  # noqa: E402

RUN_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")   # what the laptop accepts as a path part


def files_to_send(run_dir: Path, cluster_only: bool) -> list[str]:
    """Plain files (no links), with names the laptop accepts, in a stable order."""
    top = run_dir / "cluster" if cluster_only else run_dir
    names = []
    for folder, dirs, files in os.walk(top):
        rel = Path(folder).relative_to(run_dir)
        dirs[:] = sorted(d for d in dirs if NAME.fullmatch(d) and not (rel == Path(".") and d == rundir.CHECKPOINTS))
        for name in sorted(files):
            path = Path(folder) / name
            if NAME.fullmatch(name) and path.is_file() and not path.is_symlink():
                names.append(str(path.relative_to(run_dir)))
    return names


def pack(run: str, cluster_only: bool, out) -> None:
    run_dir = rundir.named(run)
    manifest = {}
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for name in files_to_send(run_dir, cluster_only):
            try:
                data = (run_dir / name).read_bytes()
            except OSError:
                continue   # removed meanwhile (a temporary file)
            manifest[name] = [len(data), hashlib.sha256(data).hexdigest()]
            add(tar, name, data)
        add(tar, ".manifest.json", json.dumps({"files": manifest}).encode())


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main(argv: list[str] | None = None) -> int:
    p = FlagParser(prog="python3 launch/vast/pack.py")
    p.add_argument("--run", required=True)
    p.add_argument("--cluster-only", action="store_true")
    opts = p.parse_args(argv)
    if not RUN_NAME.fullmatch(opts.run):
        p.error(f"--run {opts.run!r}: not a run name")
    pack(opts.run, opts.cluster_only, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
