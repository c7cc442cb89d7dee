"""launch/vast/node.py as it runs on a rented node: a real subprocess in a folder laid out like the
project folder on a node, with real processes, real signals, and real HTTP to the stand-in of the
vast.ai REST API (tests/fakes/vast_api.py), which records every request."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, wait_for

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from vast_api import StandIn  # noqa: E402

pytestmark = pytest.mark.cluster   # `make test-cluster`: the rented-cluster scenarios

KEY = "guard-key-SECRET-0123456789abcdef"   # each instance's own key (CONTAINER_API_KEY) in these tests
ACCOUNT_KEY = "account-key-0123456789abcdef0123"
RUN = "t-guard"
TAG = "step00000007"
NO_KEY = "no CONTAINER_API_KEY in this container: cannot destroy itself"
DELETE = r"/api/v0/instances/\d+/"
# A training rank as the node's process list shows it (argv holds launch/train.py and run_dir=outputs/RUN):
# on SIGTERM it saves checkpoint TAG and `latest`, as the trainer does, then exits 0.
RANK = f"""
import os, signal, sys, time
from pathlib import Path
checkpoints = Path(sys.argv[-1].split("=", 1)[1]) / "checkpoints"
def save(*_):
    (checkpoints / "{TAG}").mkdir(parents=True, exist_ok=True)
    (checkpoints / "{TAG}" / "model.pt").write_bytes(b"weights")
    (checkpoints / "latest.tmp").write_text("{TAG}")
    os.replace(checkpoints / "latest.tmp", checkpoints / "latest")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
Path("rank.ready").write_text(str(os.getpid()))
while True:
    time.sleep(0.02)
"""


# launch/vast/node.py and the project modules it imports, which need only the standard library
NODE_FILES = ("launch/vast/node.py", "launch/__init__.py", "launch/cli.py", "trainer/__init__.py", "trainer/rundir.py",
              "data/__init__.py", "data/files.py")


class Node:
    """A project folder on a rented node, holding its own copy of launch/vast/node.py and what it imports."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.cluster = folder / "outputs" / RUN / "cluster"
        self.env = {**os.environ, "CONTAINER_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
        self.outputs: list[str] = []   # everything the commands printed, to look for the key in

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-S", "launch/vast/node.py", *args]   # -S: no installed package, as before setup

    def run(self, *args: str, code: int = 0) -> dict | str:
        proc = subprocess.run(self.argv(*args), cwd=self.folder, env=self.env, capture_output=True, text=True,
                              timeout=30)
        self.outputs += [proc.stdout, proc.stderr]
        assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
        if code != 0:
            assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
            return proc.stderr
        assert len(proc.stdout.splitlines()) == 1, proc.stdout
        return json.loads(proc.stdout)

    def guard_args(self, api: StandIn, inst: int, started: float, **options) -> list[str]:
        settings = {"usd-per-hour": 2.0, "max-hours": 1.0, "grace": 20, "wait": 10, "poll": 0.05, **options}
        args = ["guard", "--run", RUN, "--instance", str(inst), "--started", str(started), "--api-url", api.url]
        for name, value in settings.items():
            args += [f"--{name}", str(value)]
        return args

    def guard(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=self.folder, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(self, guard: subprocess.Popen, timeout: float = 15) -> dict:
        out, err = guard.communicate(timeout=timeout)
        self.outputs += [out, err]
        assert guard.returncode == 0 and len(out.splitlines()) == 1, (guard.returncode, out, err)
        return json.loads(out)

    def start(self, command: str, run: str = RUN) -> dict:
        cmd_file = self.folder / f"{run}.cmd"
        cmd_file.write_text(command)
        return self.run("start", "--run", run, "--cmd-file", str(cmd_file))

    def rank_command(self) -> str:
        return f"exec {sys.executable} rank.py launch/train.py run_dir=outputs/{RUN}\n"

    def guard_json(self) -> dict | None:
        path = self.cluster / "guard.json"
        return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def node(tmp_path):
    folder = tmp_path / "node"
    for name in NODE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, folder / name)
    (folder / "rank.py").write_text(RANK)
    yield Node(folder)
    for proc in Path("/proc").iterdir():   # what this test started there: trainings, ranks, guards
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(str(folder)):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def api(tmp_path):
    with StandIn(tmp_path / "cloud", ACCOUNT_KEY, "ssh-ed25519 AAAA test") as standin:
        yield standin


def create_instance(api: StandIn) -> int:
    request = urllib.request.Request(f"{api.url}/api/v0/asks/101/", method="PUT", data=b'{"image": "x"}',
                                     headers={"Authorization": f"Bearer {ACCOUNT_KEY}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        inst = json.loads(reply.read())["new_contract"]
    api.instance_keys[inst] = KEY   # the key vast.ai scopes to this one instance
    return inst


def pid_start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.processes
def test_start_records_the_exit_code_and_refuses_a_second_start(node):
    assert node.run("status", "--run", "t-ok")["state"] == "not started"
    assert node.start("echo out; exit 0", run="t-ok")["started"]
    assert node.start("echo err >&2; exit 3", run="t-fail")["started"]
    busy = node.start("sleep 30", run="t-busy")
    assert busy["started"]
    cluster = node.folder / "outputs" / "t-busy" / "cluster"
    assert (cluster / "train.pidstart").read_text() == pid_start_time(busy["pid"])
    again = node.start("exit 0", run="t-busy")
    assert again["started"] is False and again["pid"] == busy["pid"] and "already running" in again["why"]
    assert node.run("status", "--run", "t-busy")["state"] == "running"

    ok = wait_for(lambda: (s := node.run("status", "--run", "t-ok"))["state"] != "running" and s)
    assert (ok["state"], ok["exit"], ok["running"], ok["log"]) == ("succeeded", 0, False, "out\n")
    failed = wait_for(lambda: (s := node.run("status", "--run", "t-fail"))["state"] != "running" and s)
    assert (failed["state"], failed["exit"], failed["running"], failed["log"]) == ("failed", 3, False, "err\n")
    assert failed["started"] <= time.time() and failed["guard"] is None


def test_status_reads_metrics_latest_log_and_config_and_checks_its_input(node):
    run_dir = node.folder / "outputs" / RUN
    (run_dir / "checkpoints" / "step00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step00000004\n")
    (run_dir / "config.yaml").write_text("train:\n  max_steps: 120\n  lr: 0.001\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
                                           '{"step": 2, "val_loss": 1.6}\n{"step": 3, "loss": 1.')   # torn
    node.cluster.mkdir(parents=True)
    (node.cluster / "train.log").write_bytes(b"abc\xffdef")
    st = node.run("status", "--run", RUN, "--log-from", "2")
    assert st["metrics"] == {"step": 2, "loss": 1.5} and st["latest"] == "step00000004"
    assert (st["log"], st["log_end"], st["log_size"], st["max_steps"]) == ("c\ufffddef", 7, 7, 120)
    (run_dir / "checkpoints" / "latest").write_text("step00000009")   # names no checkpoint folder
    assert node.run("status", "--run", RUN)["latest"] is None
    (run_dir / "checkpoints" / "latest").write_text("../../etc")
    assert node.run("status", "--run", RUN)["latest"] is None

    for run in ("Bad", "123", "-a", "a" * 64, "a/b", "a b", "a\n"):
        assert "--run" in node.run("status", "--run", run, code=2)
    for tag in ("step1", "step000000012", "../step00000001", "step00000001\n"):
        assert "--tag" in node.run("fetched", "--run", RUN, "--tag", tag, code=2)
    good = {"--instance": "5", "--api-url": "http://127.0.0.1:1"}
    for flag, bad in (("--instance", "0"), ("--instance", "-3"), ("--instance", "1.5"), ("--instance", " 7"),
                      ("--api-url", "ftp://host"), ("--api-url", "http://a b"), ("--api-url", "http://")):
        options = {**good, flag: bad}
        args = ["guard", "--run", RUN, "--started", "0", "--usd-per-hour", "1", "--max-hours", "1", "--grace", "0",
                "--wait", "0", "--poll", "1", *[x for item in options.items() for x in item]]
        assert flag in node.run(*args, code=2)
    assert not (node.cluster / "guard.json").exists()
    node.run("fetched", "--run", RUN, "--tag", "step00000009")
    node.run("fetched", "--run", RUN, "--tag", "step00000004")   # a late report of an older checkpoint
    assert (node.cluster / "fetched").read_text() == "step00000009"


def test_training_killed_before_it_wrote_its_exit_code_is_lost(node):
    started = node.start("sleep 30")
    assert node.run("status", "--run", RUN)["state"] == "running"
    os.killpg(started["pid"], signal.SIGKILL)   # the wrapper and its command: no exit code is written
    st = wait_for(lambda: (s := node.run("status", "--run", RUN))["state"] != "running" and s)
    assert (st["state"], st["exit"], st["running"], st["pid"]) == ("lost", None, False, started["pid"])


@pytest.mark.processes
def test_a_recycled_pid_is_not_taken_for_training(node):
    other = subprocess.Popen(["sleep", "30"], cwd=node.folder)   # alive, but not our training
    node.cluster.mkdir(parents=True)
    (node.cluster / "train.pid").write_text(str(other.pid))
    (node.cluster / "train.pidstart").write_text(pid_start_time(other.pid))
    assert node.run("status", "--run", RUN)["running"] is True   # the same pid and start time: it is ours
    assert node.start("exit 0")["started"] is False
    (node.cluster / "train.pidstart").write_text(str(int(pid_start_time(other.pid)) + 1))
    st = node.run("status", "--run", RUN)
    assert (st["state"], st["running"], st["exit"]) == ("lost", False, None)
    assert node.start("exit 0")["started"] is True
    other.kill()
    other.wait()


def test_guard_at_the_cap_has_the_ranks_save_waits_for_the_fetch_then_destroys(node, api):
    inst = create_instance(api)
    node.start(node.rank_command())
    rank = int(wait_for(lambda: (node.folder / "rank.ready").exists() and (node.folder / "rank.ready").read_text()))
    guard = node.guard(*node.guard_args(api, inst, started=time.time() - 7200))   # 2 h of a 1 h cap
    wait_for(lambda: (node.cluster / "train.exit").exists())   # the rank saved on SIGTERM, then exited
    wait_for(lambda: (node.guard_json() or {}).get("event") == "cap")
    time.sleep(0.5)   # ten polls: the guard waits for the laptop to fetch that checkpoint
    assert guard.poll() is None and api.calls("DELETE") == [] and node.guard_json()["event"] == "cap"
    fetched_at = time.time()
    assert node.run("fetched", "--run", RUN, "--tag", TAG) == {"fetched": TAG}
    record = node.finish(guard)
    assert record == node.guard_json()
    assert record["destroyed"] is True and record["fetched"] is True and record["checkpoint"] == TAG
    assert record["signalled"] == [rank] and record["stopped"] is True and record["exit"] == 0
    assert record["hours"] >= 2 and record["usd"] >= 4
    [call] = api.calls("DELETE", DELETE)
    assert call["path"] == f"/api/v0/instances/{inst}/" and call["auth"] == f"Bearer {KEY}"
    assert call["t"] >= fetched_at and inst not in api.alive()


def test_guard_destroys_a_grace_after_training_ended_even_with_nothing_fetched(node, api):
    inst = create_instance(api)
    (node.folder / "outputs" / RUN / "checkpoints" / TAG).mkdir(parents=True)
    (node.folder / "outputs" / RUN / "checkpoints" / "latest").write_text(TAG)
    guard = node.guard(*node.guard_args(api, inst, started=time.time(), grace=1.0))
    wait_for(node.guard_json)   # written within a poll or two (longer on a loaded machine)
    time.sleep(0.3)
    assert guard.poll() is None and node.guard_json()["event"] == "armed"   # set-up: nothing to end yet
    node.start("exit 1")
    record = node.finish(guard)
    assert (record["event"], record["exit"], record["state"]) == ("ended", 1, "failed")
    assert record["fetched"] is False and record["destroyed"] is True
    [call] = api.calls("DELETE", DELETE)
    assert call["t"] - record["at"] >= 1.0 and inst not in api.alive()


def test_with_no_checkpoint_the_guard_still_waits_for_the_laptop_to_hold_the_run_files(node, api):
    """Training that fails before its first checkpoint: the logs and metrics are still worth fetching,
    so the guard waits for the laptop's mark (`fetched none`), not a moment less."""
    inst = create_instance(api)
    guard = node.guard(*node.guard_args(api, inst, started=time.time(), grace=30))
    node.start("exit 3")
    wait_for(lambda: (node.guard_json() or {}).get("event") == "ended")
    time.sleep(0.5)
    assert guard.poll() is None and api.calls("DELETE") == []   # waiting for the laptop
    node.run("fetched", "--run", RUN, "--tag", "none")
    record = node.finish(guard)
    assert (record["fetch"], record["fetched"], record["destroyed"]) == ("fetched", True, True)


@pytest.mark.processes
def test_worker_guard_takes_training_as_ended_only_after_its_ranks_came_and_went(node, api):
    """A node without train.pid sees training only through its ranks; `stop` signals ranks, never the
    DeepSpeed launcher (it would kill its ranks before they save)."""
    inst = create_instance(api)
    node.run("training-started", "--run", RUN)
    guard = node.guard(*node.guard_args(api, inst, started=time.time(), grace=0, wait=60))
    time.sleep(0.4)
    assert guard.poll() is None and api.calls("DELETE") == []   # no ranks yet: not started, not ended
    train_args = ["launch/train.py", f"run_dir=outputs/{RUN}"]
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "deepspeed.launcher.launch",
                                 *train_args], cwd=node.folder)
    rank = subprocess.Popen([sys.executable, "rank.py", *train_args], cwd=node.folder)
    wait_for(lambda: (node.folder / "rank.ready").exists())
    time.sleep(0.3)
    assert guard.poll() is None
    assert node.run("stop", "--run", RUN) == {"signalled": [rank.pid]}
    assert rank.wait(timeout=10) == 0
    record = node.finish(guard)
    assert (record["event"], record["state"], record["exit"]) == ("ended", "ranks gone", None)
    assert record["checkpoint"] == TAG and record["destroyed"] is True and inst not in api.alive()
    assert launcher.poll() is None
    launcher.kill()
    launcher.wait()


def test_guard_goes_back_to_watching_when_training_is_started_again_during_the_grace(node, api):
    inst = create_instance(api)
    (node.folder / "outputs" / RUN / "checkpoints" / TAG).mkdir(parents=True)
    (node.folder / "outputs" / RUN / "checkpoints" / "latest").write_text(TAG)
    node.start("exit 1")
    guard = node.guard(*node.guard_args(api, inst, started=time.time(), grace=30))
    wait_for(lambda: (node.guard_json() or {}).get("event") == "ended")
    node.start("while [ ! -e go ]; do sleep 0.02; done; exit 0")   # the driver retries on the same nodes
    wait_for(lambda: node.guard_json().get("restarted"))
    assert node.guard_json()["event"] == "armed" and api.calls("DELETE") == []
    (node.folder / "go").touch()
    node.run("fetched", "--run", RUN, "--tag", TAG)
    record = node.finish(guard)
    assert (record["event"], record["exit"], record["fetched"], record["destroyed"]) == ("ended", 0, True, True)


def test_a_200_answer_without_success_is_not_a_destroy(node, api):
    inst = create_instance(api)
    api.soft_failures[("DELETE", rf"/api/v0/instances/{inst}/")] = True
    node.start("exit 0")
    record = node.finish(node.guard(*node.guard_args(api, inst, started=time.time(), grace=0, poll=0.02)))
    assert record["event"] == "ended" and record["destroyed"] is False
    assert "HTTP 200" in record["result"] and '"success": false' in record["result"]
    calls = api.calls("DELETE", DELETE)
    assert len(calls) == 6 and all(c["status"] == 200 for c in calls) and inst in api.alive()
    assert node.guard_json()["destroyed"] is False


def test_without_a_key_the_ranks_still_save_and_no_destroy_is_sent(node, api):
    inst = create_instance(api)
    del node.env["CONTAINER_API_KEY"]
    node.start(node.rank_command())
    wait_for(lambda: (node.folder / "rank.ready").exists())
    record = node.finish(node.guard(*node.guard_args(api, inst, started=time.time() - 7200, grace=0.2)))
    assert (node.folder / "outputs" / RUN / "checkpoints" / "latest").read_text() == TAG
    assert record["event"] == "cap" and record["can_destroy"] is False and record["destroyed"] is False
    assert record["result"] == NO_KEY and node.guard_json()["result"] == NO_KEY
    assert api.calls("DELETE") == [] and inst in api.alive()


def test_detached_guard_runs_once_and_keeps_the_key_out_of_argv_and_files(node, api):
    inst = create_instance(api)
    args = node.guard_args(api, inst, started=time.time(), grace=0)
    pid = node.run(*args, "--detach")["guard"]
    assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert f"CONTAINER_API_KEY={KEY}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert node.run(*args, "--detach") == {"guard": pid, "already_running": True}
    time.sleep(0.2)
    guards = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_guard(p, node.folder)]
    assert [int(p.name) for p in guards] == [pid]

    node.start("exit 0")
    wait_for(lambda: gone(pid), timeout=15)
    record = node.guard_json()
    assert record["event"] == "ended" and record["destroyed"] is True and inst not in api.alive()
    assert "DELETE instance" in (node.cluster / "guard.log").read_text()
    assert [c["auth"] for c in api.calls("DELETE")] == [f"Bearer {KEY}"]
    for path in node.folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert all(KEY not in out for out in node.outputs)


def _is_guard(proc: Path, folder: Path) -> bool:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        return b"guard" in argv and b"launch/vast/node.py" in argv[1] and os.readlink(proc / "cwd") == str(folder)
    except (OSError, IndexError):
        return False
