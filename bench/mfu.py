"""Tokens/s and MFU of whole training runs (the real loop: loader, engine, guard, logging), one row per
configuration, each in its own `python launch/train.py` process.

    python bench/mfu.py [--steps 60] [--row "NAME: override override ..."] ...

Without --row it measures the baby and shakespeare presets (fp32 on this machine). The figures
are those the trainer logs at its last step: the mean over the second half of the run, so start-up
and compilation stay out. MFU counts 6N + 12·L·H·Q·T FLOPs per token (trainer/mfu.py) against the
GPU's datasheet peak, or the matmul peak measured once on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer import rundir  # noqa: E402

DEFAULT_ROWS = ["baby: conf=baby", "shakespeare: conf=shakespeare"]


def run_row(overrides: list[str], steps: int, run_dir: Path) -> dict:
    cmd = [sys.executable, "launch/train.py", *overrides, f"run_dir={run_dir}", "resume=never",
           f"train.max_steps={steps}", f"train.log_every={steps // 2}", "train.eval_every=0",
           "train.eval_steps=1", "train.ckpt_every=0", "train.sample_tokens=0", "train.progress=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    last = [r for r in rundir.read_metrics(run_dir) if "tokens_per_s" in r][-1]
    params = next((line for line in proc.stdout.splitlines() if line.startswith("model:")), "")
    return {**last, "wall_s": time.perf_counter() - start, "params": params.split("|")[0][7:].split(" parameters")[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per run; the second half is measured")
    parser.add_argument("--row", action="append", help='"NAME: key=value ..." (repeatable)')
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be >= 4")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(args.row or DEFAULT_ROWS):
            name, _, overrides = row.partition(":")
            r = run_row(overrides.split(), args.steps, Path(tmp) / str(i))
            results.append({"name": name.strip(), "overrides": overrides.strip(), **r})
            print(f"{name.strip()}: {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}", flush=True)
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}, torch {torch.__version__}, {args.steps} steps a run (second half measured)\n")
    print("| run | overrides | params | tokens/s | step time | MFU |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | `{r['overrides']}` | {r['params']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_time_s'] * 1e3:.1f} ms | {r['mfu']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
