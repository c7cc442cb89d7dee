"""`--interruptible`: rented at a bid, and a node stopped by the provider (outbid) is recovered from by
the driver alone: fetch what exists, destroy every node, rent replacements (fewer, down to
--nodes-min, when fewer are offered), resume from the newest checkpoint verified here. The world of
tests/fakes/harness.py: the real `vastai` SDK against the stand-in API, nodes as folders through the
fake ssh; a preemption is the stand-in stopping the instance and its processes killed (no SIGTERM
reaches an outbid container)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from trainer.checksums import verify  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.cluster,
              pytest.mark.skipif(__import__("shutil").which("ssh-keygen") is None,
                                 reason="ssh-keygen missing (`make test-cluster` installs openssh-client)")]


def _kill_node(world, inst: int) -> None:
    """What the host does to an outbid container's processes: they stop, with no signal to save on."""
    disk = str(world.api.node_dir(inst)) + "/"
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (os.readlink(proc / "cwd") + "/").startswith(disk):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass


def test_a_preempted_node_is_replaced_and_training_resumes_from_the_last_checkpoint(world):
    for offer in world.api.offers:
        offer["min_bid"] = round(offer["dph_total"] * 0.45, 4)
    bids = {o["id"]: round(o["min_bid"] * 1.2, 4) for o in world.api.offers}   # min_bid + 20%: the default
    world.env["FAKE_STEP_S"] = "0.1"
    proc = world.start(*world.args("--interruptible", "--nodes-min", "1", steps=40))
    checkpoints = world.run_dir / "checkpoints"
    world.wait_for(lambda: len(world.api.created()) == 2 and (checkpoints / "latest").exists()
                   and world.metrics_step(world.api.created()[0]) >= 10, timeout=90, what="a fetched checkpoint")
    world.api.offers = [o for o in world.api.offers if o["id"] not in (102, 103)]   # one machine per cluster now
    fetched_before = int((checkpoints / "latest").read_text()[4:])
    _kill_node(world, 5002)
    world.api.preempt(5002)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    api, state = world.api, world.state()
    creates = api.calls("PUT", r"/api/v0/asks/\d+/")
    assert [c["path"] for c in creates] == ["/api/v0/asks/101/", "/api/v0/asks/102/", "/api/v0/asks/201/"]
    assert [c["body"]["price"] for c in creates] == [bids[101], bids[102], bids[201]]   # every create carries its bid
    # resumed on the one new node from the newest checkpoint fetched before the preemption, to the end
    (event,) = state["preemptions"]
    assert event["resumed_from"] % 4 == 0 and fetched_before <= event["resumed_from"] <= event["step"] < 40
    assert event["lost_steps"] == event["step"] - event["resumed_from"] and event["nodes_after"] == 1
    new = api.created()[2]
    train_log = (world.node_run(new) / "cluster" / "train.log").read_text()
    assert f"node 0: resumed from step{event['resumed_from']:08d} (written by 4 ranks, now 2)" in train_log
    tag = (checkpoints / "latest").read_text()
    assert tag == "step00000040" and verify(checkpoints / tag)["world_size"] == 2
    # the preemption in metrics.jsonl (kept by the resumed trainer) and in TensorBoard
    lines = [json.loads(line) for line in (world.run_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [m for m in lines if m.get("event") == "preemption"]
    assert record["preempted_step"] == event["step"] and record["recovery_usd"] == pytest.approx(event["recovery_usd"])
    assert [m["step"] for m in lines if "loss" in m][-1] == 40
    assert list((world.run_dir / "tensorboard").glob("*.preemptions"))
    # the cost account follows the stand-in's billing (each instance's rate, stopped: its disk only)
    billed = api.billed_usd()
    from launch.vast.state import RunState
    spent = RunState.load(world.run_name).spent_usd()
    # the account sees the stop at its next listing (a status over ssh and a listing: under 2 s here), so
    # it may bill the stopped node's GPU that much longer, at its rate; it never bills less than the stand-in
    # beyond the create's answer time
    stopped_rate = next(i.usd_per_hour for i in RunState.load(world.run_name).instances if i.id == 5002)
    assert -0.0005 <= spent - billed <= stopped_rate * 2 / 3600, (spent, billed)
    assert "preemption 1: at" in out and "recovered on 1 nodes" in out
    print(f"\npreemption at step {event['step']}, resumed from {event['resumed_from']}: {event['lost_steps']} steps "
          f"lost ({event['lost_s']:.2f} s of work), recovery {event['recovery_s']:.1f} s, "
          f"${event['recovery_usd']:.4f}; account ${spent:.4f} vs billed ${billed:.4f}")
    world.assert_clean(out + err)


def test_watch_recovers_a_detached_run_and_tears_it_down(world):
    """`run --detach --interruptible`, then `watch --run NAME` from another invocation: the same recovery
    (here onto 2 new nodes), training to its end, then the teardown."""
    for offer in world.api.offers:
        offer["min_bid"] = round(offer["dph_total"] * 0.45, 4)
    world.env["FAKE_STEP_S"] = "0.1"
    proc = world.driver(*world.args("--interruptible", "--detach", steps=30))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"watch --run {world.run_name}" in proc.stdout
    watcher = world.start("watch", "--run", world.run_name)
    world.wait_for(lambda: (world.run_dir / "checkpoints" / "latest").exists() and world.metrics_step(5001) >= 6,
                   timeout=90, what="a fetched checkpoint")
    _kill_node(world, 5001)   # node0 this time: its status over ssh fails too
    world.api.preempt(5001, "exited")
    out, err = watcher.communicate(timeout=240)
    assert watcher.returncode == 0, err[-4000:]
    creates = world.api.calls("PUT", r"/api/v0/asks/\d+/")   # the cheapest two again, free once destroyed
    assert [c["path"] for c in creates][2:] == ["/api/v0/asks/101/", "/api/v0/asks/102/"]
    assert all(c["body"]["price"] is not None for c in creates)
    state = world.state()
    assert len(state["preemptions"]) == 1 and state["preemptions"][0]["nodes_after"] == 2
    assert (world.run_dir / "checkpoints" / "latest").read_text() == "step00000030"
    world.assert_clean(out + err)
