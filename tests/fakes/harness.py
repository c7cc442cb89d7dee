"""The offline world the cluster-driver tests run in: the real `vastai` package against the stand-in
REST API (vast_api.py), nodes that are folders reached through the fake ssh, and node0's training
through the fake deepspeed launcher and the stand-in trainer (node_train.py). What is real: the
driver, the vastai SDK and its HTTP requests, bash on the "nodes", tar, signals, processes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

FAKES = Path(__file__).resolve().parent
ROOT = FAKES.parents[1]
sys.path.insert(0, str(FAKES))
from helpers import wait_for  # noqa: E402
from vast_api import StandIn  # noqa: E402

SECRET = "vast-key-SECRET-0123456789abcdef"


class World:
    def __init__(self, tmp: Path, user_key: Path, name: str, gpus: int = 2, lab=None, nodes: bool = True):
        self.tmp = tmp
        self.lab = lab
        self.run_name = re.sub(r"[^a-z0-9-]+", "-", f"t-{name}".lower()).strip("-")[:40] + f"-{os.getpid() % 10000}"
        self.api = StandIn(tmp / "cloud", SECRET, (user_key.with_suffix(".pub")).read_text(), gpus=gpus, lab=lab)
        self.run_dir = ROOT / "outputs" / self.run_name
        if lab is not None:   # real hosts: real ssh, make setup, pdsh and deepspeed; the driver's defaults
            self.env = dict(
                os.environ, HOME=str(self._home()), VAST_URL=self.api.url, VAST_API_KEY=SECRET, POLL="0.5",
                DESTROY_RETRY_S="20", FETCH_ATTEMPTS="3", FETCH_BACKOFF_S="0.5", WAIT_TIMEOUT="120",
                STOP_WAIT_S="60", GRACE_MINUTES="2", LATE_CREATE_WAIT_S="2", CONFIRM_POLLS="2", SSH_KEY=str(user_key),
                PYTHONUNBUFFERED="1")
            self.env.pop("PYTHONPATH", None)
            return
        if not nodes:   # the run must end before it reaches a node: no ssh is faked, a real one finds nothing
            self.env = dict(
                os.environ, HOME=str(self._home()), VAST_URL=self.api.url, VAST_API_KEY=SECRET, POLL="0.1",
                DESTROY_RETRY_S="3", WAIT_TIMEOUT="20", LATE_CREATE_WAIT_S="2", CONFIRM_POLLS="3",
                SSH_KEY=str(user_key), PYTHONUNBUFFERED="1")
            self.env.pop("PYTHONPATH", None)
            return
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool in ("ssh",):
            (bin_dir / tool).write_text(f"#!{sys.executable}\n" + (FAKES / tool).read_text())
            (bin_dir / tool).chmod(0o755)
        home = self._home()
        setup = (f"mkdir -p .venv/bin && ln -sf {sys.executable} .venv/bin/python && "
                 f"cp {FAKES / 'deepspeed'} .venv/bin/deepspeed && chmod +x .venv/bin/deepspeed")
        self.env = dict(
            os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), VAST_URL=self.api.url,
            VAST_API_KEY=SECRET, PYTHON=sys.executable, FAKE_VAST_NODES=str(self.api.registry),
            FAKE_SSH_LOG=str(tmp / "ssh.jsonl"), FAKE_NODE_TRAIN=str(FAKES / "node_train.py"),
            FAKE_SYNC_DIR=str(tmp / "sync"), FAKE_STEP_S="0.02", NODE_SETUP=setup, POLL="0.1",
            DESTROY_RETRY_S="3", FETCH_ATTEMPTS="3", FETCH_BACKOFF_S="0.1", NET_DEV="lo", REMOTE_DIR="shakespeare",
            WAIT_TIMEOUT="20", STOP_WAIT_S="30", GRACE_MINUTES="0.5", LATE_CREATE_WAIT_S="2", CONFIRM_POLLS="3",
            SSH_KEY=str(user_key), PYTHONUNBUFFERED="1")
        self.env.pop("PYTHONPATH", None)

    def _home(self) -> Path:
        home = self.tmp / "laptop"
        home.mkdir(exist_ok=True)
        return home

    def __enter__(self):
        self.api.__enter__()
        return self

    def __exit__(self, *exc):
        for proc in Path("/proc").iterdir():   # stand-in trainers and watchdogs this test started, by their folder
            try:
                if proc.name.isdigit() and str(self.api.base) in os.readlink(proc / "cwd"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass
        self.api.__exit__()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def args(self, *extra, nodes=2, command="run", steps=12, overrides=()):
        """A run of the debug preset at ZeRO-1: the stand-in trainer writes ZeRO-1's files (the fetch
        bounds each by the stage the driver composed)."""
        return [command, *(["--yes"] if command in ("run", "up") else []),   # no terminal here to answer the question
                "--nodes", str(nodes), "--gpus", "2", "--gpu-name", "H100_SXM", "--max-dph", "20",
                "--conf", "debug", "--run", self.run_name, *extra, "--", "deepspeed=zero1",
                f"train.max_steps={steps}", "train.ckpt_every=4", *overrides]

    def command(self, argv) -> list[str]:
        """The driver's command line, in the lab's laptop namespace when there is a lab."""
        command = ["bash", "launch/vast_cluster.sh", *argv]
        return command if self.lab is None else self.lab.laptop(command)

    def driver(self, *argv, timeout=120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    def start(self, *argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), cwd=ROOT, env=self.env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, **kw)

    def fetched_checkpoint(self, step: int, nodes: int, slots: int):
        """outputs/RUN as a finished run leaves it: every node's share of checkpoint `step` merged here
        (written by node_train.py's own code), `latest`, and a state whose instances are destroyed."""
        world, checkpoints, procs = nodes * slots, self.run_dir / "checkpoints", []
        for node in range(nodes):
            (self.tmp / f"prep{node}").mkdir()
            (self.tmp / f"prep{node}" / "trainer").symlink_to(ROOT / "trainer")
        for node in range(nodes):
            env = dict(os.environ, FAKE_NODE_RANK=str(node), FAKE_NODES=str(nodes), FAKE_SLOTS=str(slots),
                       FAKE_RANK_OFFSET=str(node * slots), FAKE_WORLD=str(world), FAKE_SESSION="prep",
                       FAKE_SYNC_DIR=str(self.tmp / "prep-sync"), FAKE_STEP_S="0")
            procs.append(subprocess.Popen([sys.executable, str(FAKES / "node_train.py"), "launch/train.py",
                                           f"run_dir=outputs/{self.run_name}", f"train.max_steps={step}",
                                           f"train.ckpt_every={step}"], cwd=self.tmp / f"prep{node}", env=env,
                                          stdout=subprocess.DEVNULL))
        assert [p.wait(timeout=60) for p in procs] == [0] * nodes
        tag = f"step{step:08d}"
        (checkpoints / tag).mkdir(parents=True)
        for node in range(nodes):
            for f in (self.tmp / f"prep{node}" / "outputs" / self.run_name / "checkpoints" / tag).iterdir():
                shutil.copy(f, checkpoints / tag / f.name)
        (checkpoints / "latest").write_text(tag)
        (self.run_dir / "cluster").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "cluster" / "state.json").write_text(json.dumps(
            {"run": self.run_name, "phase": "down", "instances": [{"id": 1, "destroyed": True}]}))

    def ssh_calls(self) -> list[dict]:
        path = self.tmp / "ssh.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def node(self, inst: int) -> Path:
        return self.api.node_dir(inst) / "shakespeare"

    def node_run(self, inst: int) -> Path:
        return self.node(inst) / "outputs" / self.run_name

    def state(self) -> dict:
        return json.loads((self.run_dir / "cluster" / "state.json").read_text())

    def metrics_step(self, inst: int) -> int:
        path = self.node_run(inst) / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return json.loads(lines[-1])["step"] if lines else 0

    def wait_for(self, predicate, timeout=60, what="condition"):
        return wait_for(predicate, timeout=timeout, what=what)

    def assert_clean(self, proc_output: str = ""):
        """Nothing left billing, every request carried the key, the key is nowhere else."""
        assert self.api.alive() == [], f"instances left: {self.api.alive()}"
        assert self.api.overlays == {}, f"overlays left: {self.api.overlays}"
        assert all(r["key"] for r in self.api.requests), [r for r in self.api.requests if not r["key"]]
        assert SECRET not in proc_output
        for call in self.ssh_calls():
            assert SECRET not in call["cmd"]
        for path in self.run_dir.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
