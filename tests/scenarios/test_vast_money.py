"""What protects the user's money when the provider says no, a node goes quiet, or the laptop is gone:
the driver's verdicts, and the nodes' own guard (launch/vast/node.py) destroying them at the cap or a
grace period after training ends. Same offline world as scenarios/test_vast_driver.py (its docstring says what
is real and what is faked): the real `vastai` SDK against the stand-in API, nodes through the fake ssh.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = [pytest.mark.processes, pytest.mark.cluster,
              pytest.mark.skipif(__import__("shutil").which("ssh-keygen") is None,
                                 reason="ssh-keygen missing (`make test-cluster` installs openssh-client)")]


def _destroys_by_own_key(world) -> list[int]:
    """Instances destroyed by their own guard: DELETE answered success, sent with the instance's own key."""
    return sorted(int(r["path"].split("/")[-2]) for r in world.api.calls("DELETE", r"/api/v0/instances/\d+/")
                  if r["key"] == "instance" and r.get("status") == 200 and r["answer"].get("success"))


def _guard(world, inst: int) -> dict:
    path = world.node_run(inst) / "cluster" / "guard.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_with_the_laptop_gone_the_nodes_destroy_themselves_after_training(world):
    """--detach, and nobody comes back: once training ends, each node's guard (armed at `up`) waits the
    grace period for a fetch, then destroys its own instance with the key vast.ai scopes to it. A later
    `down` finds nothing left and says so."""
    world.env["GRACE_MINUTES"] = "0.02"
    proc = world.driver(*world.args("--detach", steps=8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    world.wait_for(lambda: all("destroyed" in _guard(world, i) for i in (5001, 5002)), timeout=60,
                   what="the guards to destroy their nodes")
    assert _destroys_by_own_key(world) == [5001, 5002] and world.api.alive() == []
    for inst in (5001, 5002):
        guard = _guard(world, inst)
        assert (guard["event"], guard["fetch"], guard["destroyed"]) == ("ended", "not fetched", True), guard
    down = world.driver("down", "--run", world.run_name)
    assert down.returncode == 0 and "every instance of run" in down.stderr, down.stderr[-2000:]
    world.assert_clean(proc.stdout + down.stderr)


def test_at_the_cap_with_the_laptop_gone_the_nodes_save_then_destroy_themselves(world):
    """--max-usd reached while detached: the guards have the ranks save, wait the grace period, then
    destroy (not stop: a stopped instance bills its disk)."""
    world.env["GRACE_MINUTES"] = "0.02"
    proc = world.driver(*world.args("--detach", "--max-usd", "0.06", steps=100000))  # $21/h: ~10 s after renting
    assert proc.returncode == 0, proc.stderr[-3000:]
    world.wait_for(lambda: all("destroyed" in _guard(world, i) for i in (5001, 5002)), timeout=90,
                   what="the guards to destroy their nodes")
    assert _destroys_by_own_key(world) == [5001, 5002] and world.api.alive() == []
    assert world.api.calls("PUT", r"/api/v0/instances/\d+/") == []   # never a stop
    for inst in (5001, 5002):
        guard = _guard(world, inst)
        assert guard["event"] == "cap" and guard["destroyed"] and guard["checkpoint"], guard
        assert (world.node_run(inst) / "checkpoints" / "latest").read_text() == guard["checkpoint"]
    down = world.driver("down", "--run", world.run_name)   # the overlay is the account's to delete
    assert down.returncode == 0, down.stderr[-2000:]
    world.assert_clean(proc.stdout + down.stderr)


def test_at_the_cap_with_the_laptop_attached_the_run_is_fetched_then_destroyed(world):
    """--max-usd reached during `run`: the ranks save, the laptop fetches that checkpoint and the run
    files, then everything is destroyed; the log says the cap was the reason, and names it."""
    proc = world.driver(*world.args("--max-usd", "0.06", steps=100000), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "at the budget cap (12 h or $0.06)" in out
    tag = (world.run_dir / "checkpoints" / "latest").read_text()
    assert 0 < int(tag[4:]) < 100000 and (world.run_dir / "metrics.jsonl").exists()
    world.assert_clean(out)


@pytest.mark.no_nodes
def test_a_destroy_answered_200_success_false_is_not_a_destroy(world):
    """DELETE answered HTTP 200 {"success": false}: the instance lives on and bills. The run exits 3
    naming it and the command that destroys it; once the provider complies, `down` finishes."""
    world.api.soft_failures[("DELETE", r"/api/v0/instances/5001/")] = True
    world.env["DESTROY_RETRY_S"] = "2"
    world.api.loading_listings = 10 ** 6   # the run fails at the wait for its instances: no node is reached
    world.env["WAIT_TIMEOUT"] = "1"
    proc = world.driver(*world.args(steps=4))
    err = proc.stderr
    assert proc.returncode == 3, err[-3000:]
    verdict = [line for line in err.splitlines() if "STILL BILLING" in line]
    assert len(verdict) == 1 and "instance 5001" in verdict[0] and "5002" not in verdict[0]
    assert f"bash launch/vast_cluster.sh down --run {world.run_name}" in verdict[0]
    assert "destroyed instance 5001" not in err and world.api.alive() == [5001]
    world.api.soft_failures.clear()
    down = world.driver("down", "--run", world.run_name)
    assert down.returncode == 0, down.stderr[-2000:]
    world.assert_clean(err + down.stderr)


def test_one_failed_status_poll_while_node0_reads_offline_is_not_the_end(world):
    """node0's status over ssh fails once while the provider lists it `offline` for a poll: one odd poll
    is not a dead node and not a budget cap; training goes on to its end."""
    world.api.node_faults[1] = {"fail": "node.py status", "times": 1}
    world.api.status_sequences[1] = ["running", "running", "running", "offline", "running"]
    proc = world.driver(*world.args(steps=12))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "budget cap (" not in out and "a node's instance is gone" not in out
    assert (world.run_dir / "checkpoints" / "latest").read_text() == "step00000012"
    world.assert_clean(out)


def test_training_that_vanishes_without_an_exit_code_is_a_failure(world):
    """A container restart (here: every process of the training on node0 killed with -9, the wrapper
    that records the exit code included): `exit: None` is not success. The run fetches what exists,
    destroys, and exits 1 saying so. Meanwhile a `fetch` from a second terminal is refused by the run's
    lock, and the run is not disturbed."""
    proc = world.start(*world.args(steps=100000))
    world.wait_for(lambda: world.api.created() and (world.node_run(world.api.created()[0]) / "checkpoints"
                                                    / "latest").exists(), timeout=60, what="a checkpoint")
    second = world.driver("fetch", "--run", world.run_name)
    assert second.returncode == 1 and "is driven by pid" in second.stderr, second.stderr[-2000:]
    node0 = world.node(world.api.created()[0])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if os.readlink(f"/proc/{pid}/cwd") == str(node0) and b"train" in command:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "left no exit code" in err, err[-3000:]
    assert (world.run_dir / "checkpoints" / "latest").exists()
    world.assert_clean(out + err)


def test_a_failed_final_fetch_keeps_the_nodes_names_them_and_the_guards_end_them(world):
    """A file where outputs/RUN/checkpoints must go (this laptop's disk refuses): the fetch fails, which
    never aborts the teardown: the nodes are kept (their work is not here), named with the commands,
    exit 4; their guards destroy them once the grace period is over."""
    world.env["GRACE_MINUTES"] = "0.05"
    world.run_dir.mkdir(parents=True, exist_ok=True)
    (world.run_dir / "checkpoints").write_text("in the way")
    proc = world.driver(*world.args(steps=4))
    err = proc.stderr
    assert proc.returncode == 4, err[-3000:]
    assert "NOT destroying instances [5001, 5002]" in err and f"fetch --run {world.run_name}" in err
    world.wait_for(lambda: world.api.alive() == [], timeout=60, what="the guards")
    assert _destroys_by_own_key(world) == [5001, 5002]
    (world.run_dir / "checkpoints").unlink()
    down = world.driver("down", "--run", world.run_name)
    assert down.returncode == 0, down.stderr[-2000:]
    world.assert_clean(err + down.stderr)


@pytest.mark.parametrize("argv, message", [
    (["--run", "4242"], "--run '4242'"),
    (["--run", "abc\n"], "--run 'abc\\n'"),
    (["--remote-dir", "~/x"], "--remote-dir '~/x'"),
    (["--max-hours", "0"], "--max-hours must be"),
])
@pytest.mark.no_nodes
def test_local_checks_come_before_any_request(world, argv, message):
    args = world.args(*argv)
    if "--run" in argv:   # the later --run wins in argparse: drop the harness's own
        i = args.index("--run")
        del args[i:i + 2]
        args[1:1] = argv
    proc = world.driver(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
    assert world.api.requests == []


@pytest.mark.no_nodes
def test_no_ssh_client_is_refused_before_renting(world):
    world.env["SSH"] = str(ROOT / "no-such-ssh")
    proc = world.driver(*world.args())
    assert proc.returncode == 2 and "is not on PATH" in proc.stderr and world.api.requests == []


def test_a_second_signal_shortens_the_waits_but_never_destroys_unfetched_work(world):
    """Two Ctrl-Cs while node1's fetch keeps failing: the waits end, but the nodes are kept (exit 4) and
    named: giving their work up takes `down --force`."""
    world.api.node_faults[2] = {"fail": "tar -cf", "times": -1}
    world.env["GRACE_MINUTES"] = "5"
    proc = world.start(*world.args(steps=100000))
    world.wait_for(lambda: len(world.api.created()) == 2 and world.metrics_step(world.api.created()[0]) >= 5,
                   timeout=60, what="training")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-3000:]
    assert "NOT destroying instances [5001, 5002]" in err and world.api.alive() == [5001, 5002]
    forced = world.driver("down", "--run", world.run_name, "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    world.assert_clean(out + err + forced.stderr)
