"""The rented-cluster driver end to end, offline: `bash launch/vast_cluster.sh` runs for real and drives
the real `vastai` package (its Python SDK, its HTTP requests) against a stand-in of the vast.ai REST
API on 127.0.0.1 that records every request (tests/fakes/vast_api.py).

Faked, because this machine has no GPU, no sshd per node and no money: each node is a folder on this
machine reached through a fake ssh (tests/fakes/ssh: runs the command with bash in that folder, checks
the key, can refuse like ssh does), node0's `deepspeed --launcher pdsh` is a stand-in that starts one
process per node over that ssh with DeepSpeed's quoting (tests/fakes/deepspeed), and the training is
a stand-in (tests/fakes/node_train.py) that writes metrics.jsonl and checkpoints in the trainer's
layout and saves on SIGTERM. Signals, processes, bash, tar and the driver's files are real.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from harness import SECRET, World  # noqa: E402

from trainer.checksums import verify  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.cluster,
              pytest.mark.skipif(__import__("shutil").which("ssh-keygen") is None,
                                 reason="ssh-keygen missing (`make test-cluster` installs openssh-client)")]



def _local_checkpoint(world: World) -> tuple[str, dict]:
    checkpoints = world.run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    return tag, verify(checkpoints / tag)


def _fault(world: World, inst: int, fault: dict | None):
    """A fault for the fake ssh on one node (the stand-in API keeps it with the instance's row)."""
    with world.api.lock:
        world.api.instances[inst]["_fault"] = fault
    world.api._write_registry()


STAGES = {
    # stage: (how the stand-in or a node misbehaves, instances created before it fails)
    "search": (lambda api: setattr(api, "offers", [o for o in api.offers if o["cluster_id"] == 9]), 0),
    "overlay": (lambda api: api.overlays.update({"PLACEHOLDER": {}}), 0),
    "create2": (lambda api: setattr(api, "fail_create_at", 2), 1),
    "wait": (lambda api: setattr(api, "loading_listings", 10 ** 6), 2),
    "ssh": (lambda api: api.node_faults.update({2: {"hostkey": True}}), 2),
}


BEFORE_NODES = ("search", "overlay", "create2", "wait")


def _never_ready(world: World) -> None:
    """The instances stay `loading` past the driver's wait: the run fails before any node is reached,
    and the teardown is what the test is about."""
    world.api.loading_listings = 10 ** 6
    world.env["WAIT_TIMEOUT"] = "1"


@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.no_nodes) if s in BEFORE_NODES else s
                                   for s in STAGES])
def test_a_failure_at_each_stage_destroys_everything(world, stage):
    """Each step fails once, for real: the run exits non-zero, every instance it created is destroyed
    and the overlay deleted. (A set-up that fails on a host, and training that fails, are rehearsed on
    real hosts: tests/scenarios/test_rehearsal.py's full disk and network cut.)"""
    arrange, expected = STAGES[stage]
    if stage == "overlay":
        world.api.overlays[world.run_name] = {"name": world.run_name}   # the name is taken: create answers 400
    elif arrange:
        arrange(world.api)
    env_timeout = {"wait": "1", "ssh": "1"}.get(stage)
    if env_timeout:
        world.env["WAIT_TIMEOUT"] = env_timeout
    proc = world.driver(*world.args())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert len(world.api.created()) == expected
    assert sorted(world.api.destroyed()) == sorted(world.api.created())
    if stage == "overlay":
        world.api.overlays.pop(world.run_name)
    world.assert_clean(out)
    if stage == "ssh":   # a reused address with a new host key: the timeout names ssh's own error
        assert "last ssh error: @@@" in out and "REMOTE HOST IDENTIFICATION HAS CHANGED" in out


@pytest.mark.no_nodes
def test_ctrl_c_during_a_create_whose_reply_comes_late(world):
    """Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) while the provider has
    created the instance but not yet answered: the reply is lost, the instance is found by its label
    and destroyed."""
    world.api.create_delay = 3.0
    proc = world.start(*world.args())
    world.wait_for(lambda: world.api.calls("PUT", r"/api/v0/asks/\d+/"), what="the first create request")
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert world.api.created() == [] and world.api.destroyed() == [5001]   # no reply read; destroyed by label
    assert "carries this run's label but was not recorded" in err
    world.assert_clean(out + err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_during_training_saves_fetches_then_destroys(world, sig):
    """Ctrl-C, SIGTERM, or SIGHUP with the terminal gone (the pipes closed: every write to it fails):
    the ranks are asked to stop, save at the next step, the checkpoint is fetched from both nodes and
    verified here, then everything is destroyed. The driver's own log keeps the story."""
    proc = world.start(*world.args(steps=100000))
    world.wait_for(lambda: world.api.created() and world.metrics_step(world.api.created()[0]) >= 6, timeout=60,
                   what="training to pass step 6")
    if sig == signal.SIGHUP:
        proc.stdout.close()
        proc.stderr.close()
    for pid in filter(str.isdigit, os.listdir("/proc")):   # the key is on no command line (`ps`)
        try:
            assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else os.kill(proc.pid, sig)
    proc.wait(timeout=90)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}[sig]
    tag, meta = _local_checkpoint(world)
    node0 = world.node_run(world.api.created()[0])
    assert tag == (node0 / "checkpoints" / "latest").read_text()   # the final one, saved on the stop request
    assert meta["step"] >= 6 and meta["step"] % 4 != 0 or meta["step"] >= 8
    assert meta["step"] < 100000
    log = (world.run_dir / "cluster" / "driver.log").read_text()
    assert "SIGTERM to ranks" in log and f"checkpoint {tag} fetched from 2 nodes and verified" in log
    world.assert_clean(log)


def test_a_second_ctrl_c_skips_the_wait_but_still_fetches_and_destroys(world):
    """The ranks take long to act on the stop request (FAKE_STOP_DELAY=60): a second Ctrl-C ends the
    wait; the newest complete checkpoint is fetched and verified, then everything is destroyed."""
    world.env["FAKE_STOP_DELAY"] = "60"
    proc = world.start(*world.args(steps=100000))
    world.wait_for(lambda: len(world.api.created()) == 2 and (world.node_run(world.api.created()[1]) / "checkpoints"
                                                              / "latest").exists(), timeout=60, what="a checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    world.wait_for(lambda: "SIGTERM to ranks" in (world.run_dir / "cluster" / "driver.log").read_text(),
                   what="the stop request")
    started = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.time() - started < 30 and "not waiting for the final checkpoint" in err
    tag, meta = _local_checkpoint(world)
    assert meta["step"] % 4 == 0   # a periodic checkpoint: the final one was never written
    world.assert_clean(out + err)


def test_one_nodes_fetch_failing_is_retried_and_nothing_is_destroyed(world):
    """node1's tar keeps failing: it is retried with backoff, node0 is still fetched, the checkpoint is
    not complete here, so the nodes are kept (exit 4, the commands to retry or force). Once node1
    answers again, `fetch` completes it and `down` destroys."""
    world.api.node_faults[2] = {"fail": "tar -cf", "times": -1}
    proc = world.driver(*world.args(steps=4))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    assert world.api.destroyed() == [] and world.api.alive() == [5001, 5002]
    tars = [c for c in world.ssh_calls() if "tar -cf" in c["cmd"]]
    assert len([c for c in tars if c["port"] == "45002"]) >= 3 and [c for c in tars if c["port"] == "45001"]
    assert "going on with the other nodes" in out and "NOT destroying instances [5001, 5002]" in out
    assert f"bash launch/vast_cluster.sh fetch --run {world.run_name}" in out
    again = world.driver("down", "--run", world.run_name)   # `down` refuses too, while node1 cannot be read
    assert again.returncode == 4 and world.api.destroyed() == []
    _fault(world, 5002, None)
    fetch = world.driver("fetch", "--run", world.run_name)
    assert fetch.returncode == 0, fetch.stderr[-2000:]
    assert _local_checkpoint(world)[0] == "step00000004"
    down = world.driver("down", "--run", world.run_name)
    assert down.returncode == 0, down.stderr[-2000:]
    world.assert_clean(out + down.stdout + down.stderr)


@pytest.mark.no_nodes
def test_destroy_failing_exits_non_zero_listing_the_ids(world):
    """Every destroy answers 500 for the whole retry budget: exit 3 naming each id and the commands that
    destroy them; `down` later, once the provider answers, finishes the job."""
    world.api.destroy_fails = True
    world.env["DESTROY_RETRY_S"] = "1"
    _never_ready(world)
    proc = world.driver(*world.args(steps=4))
    err = proc.stderr
    assert proc.returncode == 3, err[-3000:]
    verdict = [line for line in err.splitlines() if "STILL BILLING" in line]
    assert len(verdict) == 1 and "instance 5001; instance 5002" in verdict[0]
    assert "vastai destroy instance ID -y for 5001 5002" in verdict[0]
    assert f"bash launch/vast_cluster.sh down --run {world.run_name}" in verdict[0]
    assert len(world.api.calls("DELETE", r"/api/v0/instances/5001/")) >= 2   # retried
    world.api.destroy_fails = set()
    down = world.driver("down", "--run", world.run_name)
    assert down.returncode == 0, down.stderr[-2000:]
    world.assert_clean(proc.stdout + err)


@pytest.mark.no_nodes
def test_signals_during_the_teardown_do_not_cut_it_short(world):
    """Two Ctrl-Cs while destroy is being retried (after a run that failed at its wait): logged, and the
    teardown goes on until the provider answers and every instance is destroyed."""
    world.api.destroy_fails = True
    world.env["DESTROY_RETRY_S"] = "60"
    _never_ready(world)
    proc = world.start(*world.args(steps=4))
    world.wait_for(lambda: world.api.calls("DELETE", r"/api/v0/instances/\d+/"), timeout=60, what="a destroy")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    world.api.destroy_fails = set()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-3000:]   # the run's own failure (its wait): the signals changed nothing
    assert err.count("SIGINT: noted") == 2 and "every instance of run" in err
    world.assert_clean(out + err)


@pytest.mark.no_nodes
def test_a_live_instance_with_the_run_label_is_refused(world):
    """An instance already labelled with the run name (a leftover, or someone else's): refused before
    anything is rented, and not touched."""
    world.api.instances[4999] = {"id": 4999, "label": world.run_name, "actual_status": "running", "start_date": 0,
                                 "extra_env": []}
    world.api.instance_keys[4999] = "k"
    proc = world.driver(*world.args())
    assert proc.returncode == 1
    assert "instances [4999] already carry the label" in proc.stderr
    assert world.api.calls("PUT", r"/api/v0/asks/\d+/") == [] and world.api.calls("DELETE") == []
    assert world.api.alive() == [4999]


@pytest.mark.no_nodes
def test_unsafe_strings_are_refused(world):
    """A hostname with a newline from the provider (it would add a ProxyCommand to the ssh config): the
    instance and field are named, nothing is written, everything is destroyed. An override with `;`,
    `--run ..` and a `--conf` with a space: refused before any request."""
    world.api.row_patch[1] = {"ports": {}, "ssh_host": "evil.example\n  ProxyCommand touch /tmp/pwned"}
    proc = world.driver(*world.args())
    assert proc.returncode == 1
    assert "instance 5001: ssh_host 'evil.example\\n  ProxyCommand touch /tmp/pwned' is not a hostname" in proc.stderr
    assert not (world.run_dir / "cluster" / "ssh_config").exists()
    world.assert_clean(proc.stderr)
    requests = len(world.api.requests)
    for argv, message in (
            (world.args(overrides=["train.lr=1;touch pwned"]), "override 'train.lr=1;touch pwned'"),
            (["run", "--run", "..", "--conf", "debug"], "--run '..'"),
            (["run", "--run=-x", "--conf", "debug"], "--run '-x'"),
            (["run", "--conf", "debug id", "--run", world.run_name], "--conf 'debug id'"),
            (["status", "--run", "../etc"], "--run '../etc'")):
        bad = world.driver(*argv)
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad.stderr[-1000:])
    assert len(world.api.requests) == requests and not (ROOT / "outputs" / "..").joinpath("cluster").exists()


@pytest.mark.no_nodes
def test_no_api_key_is_an_error_before_anything_is_rented(world):
    """Neither VAST_API_KEY nor the client's key file: one line saying how to set it; no request sent."""
    del world.env["VAST_API_KEY"]
    proc = world.driver(*world.args())
    assert proc.returncode == 1 and "no vast.ai API key: set VAST_API_KEY or run `vastai set api-key`" in proc.stderr
    assert world.api.requests == []


def test_detach_then_status_logs_fetch_down_from_another_invocation(world):
    """`--detach` returns while the nodes train; later invocations find the run through state.json."""
    world.env["FAKE_STEP_S"] = "0.1"
    proc = world.driver(*world.args("--detach", steps=100))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"bash launch/vast_cluster.sh status --run {world.run_name}" in proc.stdout
    assert f"bash launch/vast_cluster.sh down --run {world.run_name}" in proc.stdout
    assert world.api.alive() == [5001, 5002]
    world.wait_for(lambda: world.metrics_step(5001) >= 3, what="step 3")
    status = world.driver("status", "--run", world.run_name)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "training running" in status.stdout and "step " in status.stdout and "loss" in status.stdout
    assert "ETA" in status.stdout and "spent about $" in status.stdout
    reader = world.start("logs", "-f", "--run", world.run_name)   # Ctrl-C on a reader stops only the reader
    assert reader.stdout.readline()   # it is reading
    os.killpg(reader.pid, signal.SIGINT)
    reader_err = reader.stderr.read()
    assert reader.wait(timeout=30) == 130 and "SIGTERM to ranks" not in reader_err, reader_err
    logs = world.driver("logs", "-f", "--run", world.run_name)
    assert logs.returncode == 0 and "step 100: loss" in logs.stdout   # training went on after the reader's Ctrl-C
    fetch = world.driver("fetch", "--run", world.run_name)
    assert fetch.returncode == 0 and _local_checkpoint(world)[0] == "step00000100"
    down = world.driver("down", "--run", world.run_name)
    assert down.returncode == 0, down.stderr[-2000:]
    world.assert_clean(proc.stdout + status.stdout + down.stderr)


def test_resume_on_fresh_nodes_with_another_node_count(world):
    """A finished 2-node run resumes on 3 fresh nodes: every file of its fetched checkpoint goes to every
    node (the trainer converts it for 3 nodes there, into the checkpoint's universal/ folder, which the
    fetches of that checkpoint skip), and training continues from its step."""
    world.fetched_checkpoint(step=4, nodes=2, slots=2)   # as `run` leaves it: fetched, verified, state "down"
    world.api.offers.append({"id": 104, "cluster_id": 7, "machine_id": 5, "dph_total": 13.0, "num_gpus": 2,
                             "gpu_name": "H100 SXM"})
    second = world.driver("run", "--yes", "--nodes", "3", "--gpus", "2", "--conf", "debug", "--resume",
                          f"outputs/{world.run_name}", "--", "deepspeed=zero1", "train.max_steps=8",
                          "train.ckpt_every=4")
    assert second.returncode == 0, second.stderr[-3000:]
    new = world.api.created()
    assert len(new) == 3
    for k, inst in enumerate(new):
        old = world.node_run(inst) / "checkpoints" / "step00000004"
        assert verify(old)["world_size"] == 4   # all of the 4-rank checkpoint on each of the 3 nodes
        assert f"node {k}: resumed from step00000004" in (world.node_run(new[0]) / "cluster" / "train.log").read_text()
    tag, meta = _local_checkpoint(world)
    assert tag == "step00000008" and meta["world_size"] == 6
    assert (world.node_run(new[1]) / "checkpoints" / "step00000004" / "universal").is_dir()   # made on the node
    world.assert_clean(second.stderr)


def test_a_node_read_unknown_once_is_waited_for_and_one_gone_is_given_up(world):
    """node1 cannot be fetched. At `down`, one listing says `unknown` and the next `running`: a transient
    state, so nothing is destroyed (exit 4). When it reads `offline` in every fresh listing, its machine
    is gone with its share: everything is destroyed, the last good checkpoint named, exit 1 (never 0)."""
    world.api.node_faults[2] = {"fail": "tar -cf", "times": -1}
    proc = world.driver(*world.args(steps=4))
    assert proc.returncode == 4, (proc.stdout + proc.stderr)[-3000:]
    world.api.instances[5002]["_sequence"] = ["unknown", "running"]
    again = world.driver("down", "--run", world.run_name)
    assert again.returncode == 4 and world.api.destroyed() == [], (again.stdout + again.stderr)[-3000:]
    world.api.instances[5002]["_sequence"] = ["offline"]
    gone = world.driver("down", "--run", world.run_name)
    out = gone.stdout + gone.stderr
    assert gone.returncode == 1, out[-3000:]
    assert sorted(world.api.destroyed()) == [5001, 5002] and world.api.alive() == []
    assert "node1 (instance 5002, offline): its machine is gone" in out and "work lost with instances [5002]" in out
    assert world.state()["lost_work"]["nodes"] == [5002]
    world.assert_clean(out)
