"""Which recipe changes buy a better model per second: the baby shape trained on the Shakespeare
shards, with each change alone and in combination, at several seeds, one process at a time.

Every variant but the shipped preset ("new default": conf=baby as it is) is today's recipe (before
this bench) with some changes. For each it prints the val loss at its last step, the val loss when
today's recipe (timed in this same run) finishes, and the training time to reach today's final val
loss, as a fraction of today's time. Times are training only (evaluation and checkpoints are left
out, as the trainer's step_time_s leaves them out), so the figures are ratios within one run.

    python bench/recipe.py [--seeds 1337 1338] [--only rope muon ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainer import rundir  # noqa: E402

# today's baby run, before this bench: the GPT-3 recipe (learned positions, GELU, a tied head, AdamW,
# a cosine from 1e-3 to 1e-4) over 2000 steps; each variant but the shipped preset changes it
TODAY = ["recipe=gpt3", "train.max_steps=2000"]
MODEL = ["model.pos_emb=rope", "model.qk_norm=true", "model.mlp=relu2", "model.tie_head=false"]
SHIPPED = "new default"  # conf=baby as it is in conf/, with no override
VARIANTS: dict[str, list[str]] = {
    "today": [],
    "rope": ["model.pos_emb=rope"],
    "lr 2e-3": ["train.lr=2e-3", "train.min_lr=2e-4"],
    "qk-norm": ["model.qk_norm=true"],
    "relu2": ["model.mlp=relu2"],
    "untied head": ["model.tie_head=false"],
    "muon": ["train.optimizer=muon"],
    "wsd": ["train.schedule=wsd"],
    "rope + muon": ["model.pos_emb=rope", "train.optimizer=muon"],
    "model changes, adamw": MODEL,
    "model changes + muon": [*MODEL, "train.optimizer=muon"],
    SHIPPED: [],
}


def run(name: str, seed: int, data_dir: str, eval_every: int, eval_steps: int, out: Path) -> dict:
    """Train one variant; {step: (training seconds so far, val loss)} plus its tokens/s."""
    run_dir = out / f"{name.replace(' ', '_').replace('+', '').replace(',', '')}_{seed}"
    recipe = [] if name == SHIPPED else [*TODAY, *VARIANTS[name]]
    overrides = ["conf=baby", *recipe, f"train.seed={seed}",
                 f"data.dir={data_dir}", f"run_dir={run_dir}", "resume=never", f"train.eval_every={eval_every}",
                 f"train.eval_steps={eval_steps}", "train.ckpt_every=0", "train.log_every=10",
                 "train.sample_tokens=0", "train.progress=false", "tracking.tensorboard=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "launch/train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{name} (seed {seed}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    elapsed, last_step, curve, rates = 0.0, 0, {}, []
    for entry in rundir.read_metrics(run_dir):
        if "step_time_s" in entry:
            elapsed += entry["step_time_s"] * (entry["step"] - last_step)
            last_step = entry["step"]
            rates.append(entry["tokens_per_s"])
        if "val_loss" in entry:
            curve[entry["step"]] = (elapsed, entry["val_loss"])
    return {"curve": curve, "tokens_per_s": mean(rates[1:] or rates), "time": elapsed}


def loss_at_time(curve: dict, t: float) -> float:
    """The val loss at training time t, linear between evaluations; a run already over by then has
    its final loss."""
    points = sorted(curve.values())
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0)
    return points[-1][1] if t > points[-1][0] else points[0][1]


def time_to_reach(curve: dict, target: float) -> float | None:
    """The first training time at which the val loss reaches target, linear between evaluations;
    None if it never does."""
    points = sorted(curve.values())
    if points[0][1] <= target:
        return points[0][0]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def final(run: dict) -> float:
    return run["curve"][max(run["curve"])][1]


def summarize(results: dict[str, list[dict]]) -> tuple[list[dict], float, float]:
    """Each seed's variant against the same seed's today run (its time, its final loss), then the
    mean over seeds; a time to reach is given only when every seed reached the target."""
    today = results["today"]
    rows = []
    for name, runs in results.items():
        reach = [time_to_reach(r["curve"], final(t)) for r, t in zip(runs, today)]
        rows.append({
            "variant": name,
            "steps": max(runs[0]["curve"]),
            "final": mean(final(r) for r in runs),
            "at_budget": mean(loss_at_time(r["curve"], t["time"]) for r, t in zip(runs, today)),
            "reach": mean(x / t["time"] for x, t in zip(reach, today)) if None not in reach else None,
            "tokens_per_s": mean(r["tokens_per_s"] for r in runs),
            "time": mean(r["time"] / t["time"] for r, t in zip(runs, today)),
        })
    return rows, mean(t["time"] for t in today), mean(final(t) for t in today)


def print_table(rows: list[dict], budget: float, target: float, seeds: list[int]) -> None:
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"\nbaby shape, seeds {', '.join(map(str, seeds))} (means; each seed against today's run of the "
          f"same seed); today's recipe: {budget:.1f} s of training, final val loss {target:.4f}. Times are "
          "fractions of today's.")
    print("| variant | steps | final val loss | val loss at today's time | time to today's final loss | run time "
          "| tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['final']:.4f} | {fmt(r['at_budget'], '.4f')} "
              f"| {fmt(r['reach'], '.0%')} | {r['time']:.0%} | {r['tokens_per_s']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (today always runs)")
    parser.add_argument("--data-dir", default="shards/shakespeare", help="prepared shards (make train prepares them)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=60)
    parser.add_argument("--json", help="also write every curve here")
    args = parser.parse_args()
    names = ["today", *[n for n in (args.only or VARIANTS) if n != "today"]]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:  # seed-major: a drift in the machine's speed touches every variant alike
            for name in names:
                r = run(name, seed, args.data_dir, args.eval_every, args.eval_steps, Path(out))
                results.setdefault(name, []).append(r)
                print(f"{name} (seed {seed}): val {final(r):.4f}, {r['time']:.1f} s, "
                      f"{r['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows, budget, target = summarize(results)
    print_table(rows, budget, target, args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
