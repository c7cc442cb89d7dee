"""Memory of each training rank (its process plus its DataLoader workers) while it trains on a
small and on a large corpus: the loader must not grow with the corpus beyond its manifest.

    python bench/rank_memory.py --data-dir shards/shakespeare --data-dir shards/bench_wikipedia

Each data dir gets a 2-rank `deepspeed` run of the baby model (2 loader workers per rank); every
0.2 s the proportional set size (PSS: shared pages split among the processes sharing them) of each
rank's process tree is summed, and the peak is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def pss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def rank_trees(launcher: psutil.Process) -> list[psutil.Process]:
    """The rank processes: the children of DeepSpeed's per-node launcher."""
    out = []
    for p in launcher.children(recursive=True):
        try:
            if "deepspeed.launcher.launch" in " ".join(p.parent().cmdline()):
                out.append(p)  # a rank (its DataLoader workers are the rank's children)
        except psutil.NoSuchProcess:
            pass
    return out


def measure(data_dir: str, steps: int) -> dict:
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    source = manifest["source"].get("source", "shakespeare")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               "launch/train.py", "conf=baby", f"data.source={source}", f"data.dir={data_dir}", "data.workers=2",
               f"run_dir={run_dir}", f"train.max_steps={steps}", "train.eval_every=0", "train.ckpt_every=0",
               "train.sample_tokens=0", "train.progress=false", "resume=never"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peaks: dict[int, int] = {}
        proc = psutil.Process(launcher.pid)
        while launcher.poll() is None:
            for rank in rank_trees(proc):
                total = pss(rank) + sum(pss(c) for c in rank.children(recursive=True))
                peaks[rank.pid] = max(peaks.get(rank.pid, 0), total)
            time.sleep(0.2)
        if launcher.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {launcher.returncode}")
    frames = sum(len(s["frames"]) for info in manifest["splits"].values() for s in info["shards"])
    return {"data_dir": data_dir, "tokens": manifest["splits"]["train"]["tokens"], "frames": frames,
            "manifest_mb": (Path(data_dir) / "manifest.json").stat().st_size / 1e6,
            "peaks_mb": sorted(v / 1e6 for v in peaks.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", action="append", required=True)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    rows = [measure(d, args.steps) for d in args.data_dir]
    print(f"\nbaby model, 2 ranks, 2 DataLoader workers a rank, {args.steps} steps; peak PSS of each rank's "
          "process tree\n")
    print("| data | train tokens | frames | manifest | one rank | the other |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        peaks = " | ".join(f"{p:,.0f} MB" for p in r["peaks_mb"][:2])
        print(f"| `{r['data_dir']}` | {r['tokens']:,} | {r['frames']:,} | {r['manifest_mb']:.2f} MB | {peaks} |")


if __name__ == "__main__":
    main()
