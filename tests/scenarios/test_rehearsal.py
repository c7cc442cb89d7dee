"""The dress rehearsal: `bash launch/vast_cluster.sh` against real hosts (tests/lab), with real ssh,
tar, `make setup` from the hosts' wheelhouse, pdsh, the `deepspeed` multi-node launcher and the trainer
on CPU ranks, gloo over the lab's bridge. Each host has its own address, disk and processes; nothing
is shared with the laptop or another host.

What only the provider's machines can show stays a stand-in: its REST API (tests/fakes/vast_api.py,
driven by the real `vastai` SDK), GPUs and NCCL, and its billing (the stand-in's account)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, losses, read_metrics

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from harness import World  # noqa: E402
from lab.hosts import Lab, why_not  # noqa: E402

REASON = why_not()
pytestmark = [pytest.mark.cluster, pytest.mark.processes,
              pytest.mark.skipif(REASON is not None, reason=f"no real hosts: {REASON}")]

STEPS, EVERY = 8, 4


@pytest.fixture
def rehearsal(tmp_path, user_key, request):
    with Lab(tmp_path / "lab") as lab, World(tmp_path, user_key, request.node.name, gpus=1, lab=lab) as world:
        yield world
        if world.api.alive():   # a failed test: nothing may keep running on the lab
            for inst in world.api.alive():
                lab.destroy(world.api.host(inst))


def run_args(world: World, *extra, nodes=2, command="run", overrides=()):
    return [command, "--nodes", str(nodes), "--gpus", "1", "--gpu-name", "H100_SXM", "--max-dph", "20",
            "--conf", "debug", "--run", world.run_name, "--yes", *extra, "--", "deepspeed=zero1",
            f"train.max_steps={STEPS}", f"train.ckpt_every={EVERY}", "train.eval_every=0", "train.sample_tokens=0",
            *overrides]


def driver_log(world: World) -> str:
    path = world.run_dir / "cluster" / "driver.log"
    return path.read_text() if path.exists() else ""


def assert_nothing_billing(world: World):
    assert world.api.alive() == [], f"instances left: {world.api.alive()}"
    assert world.api.overlays == {}
    assert world.lab.hosts == {}, "a host of the lab still runs"


def test_happy_path_trains_on_two_hosts_fetches_everything_and_destroys(rehearsal, tmp_path):
    """Scenarios 1 and 6: rent, set up and prepare on each host, train detached over pdsh and gloo, fetch
    checkpoints during the run and the whole run dir at its end, destroy; the rendezvous address is node0's
    eth0 (no NET_DEV set). The fetched checkpoint resumes here and samples."""
    w = rehearsal
    assert "NET_DEV" not in w.env
    key = "wandb-key-0123456789abcdef0123456789abcdef"
    w.env["WANDB_API_KEY"] = key   # a secret travels in the instances' environment only
    proc = w.driver(*run_args(w, overrides=["tracking.tags=[a,b]", "data.workers=0"]), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert_nothing_billing(w)
    assert "total cost: $21.0000/h for 2 nodes (2 GPUs)" in proc.stdout
    # the cheapest two machines of one cluster, over its overlay, labelled, with the key in their env
    api = w.api
    assert [r["path"] for r in api.calls("PUT", r"/api/v0/asks/\d+/")] == ["/api/v0/asks/101/", "/api/v0/asks/102/"]
    for create in api.calls("PUT", r"/api/v0/asks/\d+/"):
        assert create["body"]["label"] == w.run_name
        assert create["body"]["env"] == {f"-n {w.run_name}": "1", "WANDB_API_KEY": key}
    assert [c["body"] for c in api.calls("POST", "/api/v0/overlay/")] == [{"cluster_id": 7, "name": w.run_name}]
    assert [c["body"] for c in api.calls("DELETE", "/api/v0/overlay/")] == [{"overlay_name": w.run_name}]
    assert key not in out and all(key.encode() not in f.read_bytes() for f in w.run_dir.rglob("*") if f.is_file())
    # the overrides reached both hosts' ranks intact, through node0's shell, pdsh and the remote shell
    config = yaml.safe_load((w.run_dir / "config.yaml").read_text())
    assert config["tracking"]["tags"] == ["a", "b"] and config["data"]["workers"] == 0, config
    # the whole run came home: metrics, config, TensorBoard, every node's own logs and guard, no run key
    assert list((w.run_dir / "tensorboard").iterdir())
    for k in (0, 1):
        guard = json.loads((w.run_dir / "cluster" / f"node{k}" / "guard.json").read_text())
        assert guard["event"] in ("armed", "ended") and guard["can_destroy"], guard
    assert not (w.run_dir / "cluster" / "node1" / "train.log").exists()   # node1 starts no training itself
    assert not (w.run_dir / "cluster" / f"{w.run_name}_key").exists()
    # ssh learned the hosts' keys into the run's own known_hosts, never the laptop's
    assert (w.run_dir / "cluster" / "known_hosts").read_text().count("10.77.0.") >= 2
    assert not (Path(w.env["HOME"]) / ".ssh" / "known_hosts").exists()
    lines = proc.stdout.splitlines()
    tear_down = next(i for i, line in enumerate(lines) if f"down --run {w.run_name}` tears it down" in line)
    assert tear_down < next(i for i, line in enumerate(lines) if "total cost" in line)   # before any create
    state = w.state()
    first = min(state["instances"], key=lambda i: i["id"])
    assert state["master_addr"] == "10.77.0.10", state["master_addr"]   # node0's eth0 on the bridge
    assert "node0's eth0" in driver_log(w)
    # both hosts trained: pdsh prefixes each host's lines, and each saved its own ranks' files
    train_log = (w.run_dir / "cluster" / "node0" / "train.log").read_text()
    assert re.search(r"^node0: ", train_log, re.M) and re.search(r"^node1: ", train_log, re.M), train_log[-3000:]
    tag = f"step{STEPS:08d}"
    ckpt = w.run_dir / "checkpoints" / tag
    assert (w.run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # a checkpoint was fetched while training still ran (before the last one existed)
    fetched_during = re.findall(r"checkpoint (step\d+) fetched from", driver_log(w))
    assert f"step{EVERY:08d}" in fetched_during, driver_log(w)[-3000:]
    assert sorted(losses(w.run_dir)) == list(range(1, STEPS + 1))
    assert first["destroyed"]
    # the fetched run resumes here, one process, and samples
    local = subprocess.run([sys.executable, "launch/train.py", "conf=debug", f"run_dir={w.run_dir}",
                            f"train.max_steps={STEPS + 2}", "train.eval_every=0", "train.sample_tokens=0",
                            "deepspeed=zero1", f"train.ckpt_every={EVERY}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert f"resumed at step {STEPS}" in local.stdout + local.stderr
    assert max(losses(w.run_dir)) == STEPS + 2
    sample = subprocess.run([sys.executable, "launch/sample.py", f"run_dir={w.run_dir}", "prompt=the ",
                             "max_new_tokens=20", "seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0 and len(sample.stdout.strip()) >= 20, sample.stdout + sample.stderr


def wait_for_phase(world: World, phase: str, timeout: float = 400):
    world.wait_for(lambda: (world.run_dir / "cluster" / "state.json").exists() and world.state().get("phase") == phase,
                   timeout=timeout, what=f"phase {phase}")


def node_metrics(world: World, inst: int) -> list[dict]:
    """metrics.jsonl on a host's own disk, read inside the host."""
    out = world.api.host(inst).run(f"cat /workspace/shakespeare/outputs/{world.run_name}/metrics.jsonl").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]


def test_detached_run_with_the_laptop_killed_is_finished_from_a_fresh_process(rehearsal):
    """Scenario 2: `--detach`, the driver killed with -9 once training has started; `status`, `logs`,
    `fetch` and `down`, each a new process, finish the job. On the way, a host plants a file far larger
    than the model allows: the fetch refuses it."""
    w = rehearsal
    driver = w.start(*run_args(w, "--detach"))
    wait_for_phase(w, "training")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    # only the checkout's tracked files went to the hosts (beside what the host made: its set-up and run)
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    made_there = (".venv/", ".cache/", "outputs/", "shards/", "build/", "hostfile", ".deepspeed_env")
    node0 = w.api.host(w.state()["instances"][0]["id"])
    listed = node0.run("cd /workspace/shakespeare && find . -type f -print0").stdout
    shipped = {f[2:] for f in listed.split("\0") if f and not f[2:].startswith(made_there)
               and "__pycache__" not in f and ".egg-info/" not in f}
    assert shipped and shipped <= tracked, sorted(shipped - tracked)[:20]
    status = w.driver("status", "--run", w.run_name, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"training (running|succeeded)", status.stdout), status.stdout
    w.wait_for(lambda: "training succeeded" in w.driver("status", "--run", w.run_name, timeout=120).stdout,
               timeout=300, what="training to end on the hosts")
    logs = w.driver("logs", "--run", w.run_name, timeout=120)
    assert logs.returncode == 0 and re.search(r"^node1: ", logs.stdout, re.M), logs.stdout[-3000:] + logs.stderr
    tag = f"step{STEPS:08d}"
    # a host that sends a file far larger than this model's checkpoint can hold (a sparse 2 GB rank
    # file beside node1's real ones): the fetch stops at its header, naming the host and the file,
    # before a byte of it lands here
    node1 = w.api.host(w.state()["instances"][1]["id"])
    planted = f"/workspace/shakespeare/outputs/{w.run_name}/checkpoints/{tag}/zero_pp_rank_3_mp_rank_00_optim_states.pt"
    assert node1.run(f"truncate -s 2G {planted}").returncode == 0
    refused = w.driver("fetch", "--run", w.run_name, timeout=300)
    stopped = [line for line in refused.stderr.splitlines() if "fetching" in line and "failed" in line]
    assert refused.returncode == 1 and len(stopped) == 1, refused.stdout + refused.stderr
    assert "node1:" in stopped[0] and f"{tag}/zero_pp_rank_3" in stopped[0] and "bound" in stopped[0], stopped
    assert not list(w.run_dir.rglob("zero_pp_rank_3*")) or all(
        f.stat().st_size == 0 for f in w.run_dir.rglob("zero_pp_rank_3*"))
    node1.run(f"rm {planted}")
    fetch = w.driver("fetch", "--run", w.run_name, timeout=300)
    assert fetch.returncode == 0, fetch.stdout + fetch.stderr
    assert (w.run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert sorted(losses(w.run_dir)) == list(range(1, STEPS + 1))
    down = w.driver("down", "--run", w.run_name, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert_nothing_billing(w)


def test_ctrl_c_during_the_hosts_set_up_tears_down_at_once(rehearsal):
    """Ctrl-C while both hosts run `make setup-node` (pip from the wheelhouse, for tens of seconds): the
    driver ends the ssh sessions and destroys everything without waiting for the set-up. The host's money
    guard is already running by then: a set-up that hangs is guarded."""
    w = rehearsal
    driver = w.start(*run_args(w))
    w.wait_for(lambda: driver_log(w).count("guard armed") == 2, timeout=120, what="both guards, then the set-up")
    first = w.state()["instances"][0]["id"]

    def during_set_up() -> list[str] | None:
        running = w.api.host(first).processes()
        return running if any("make" in p or "pip" in p for p in running) else None

    seen = w.wait_for(during_set_up, timeout=60, what="the set-up running on node0")
    assert any("node.py guard" in p for p in seen), seen   # the guard runs before the set-up does
    stopped = time.time()
    os.killpg(driver.pid, signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    took = time.time() - stopped
    assert driver.returncode == 130, (out + err)[-3000:]
    assert took < 20, took
    assert_nothing_billing(w)


def test_a_network_cut_between_hosts_fails_training_within_the_collective_timeout(rehearsal):
    """Scenario 4: traffic between the hosts is dropped on the bridge mid-run. The ranks fail within
    train.collective_timeout_s (no hang), the driver fetches what exists and destroys everything."""
    w = rehearsal
    timeout_s = 10
    driver = w.start(*run_args(w, overrides=["train.max_steps=100000", f"train.collective_timeout_s={timeout_s}"]))
    wait_for_phase(w, "training")
    first = w.state()["instances"][0]["id"]
    w.wait_for(lambda: len(node_metrics(w, first)) >= 3, timeout=300, what="training to log steps")
    hosts = [w.api.host(i["id"]) for i in w.state()["instances"]]
    w.lab.cut(*hosts)
    cut_at = time.time()
    out, err = driver.communicate(timeout=400)
    ended = time.time()
    assert driver.returncode == 1, out + err
    assert_nothing_billing(w)
    log = driver_log(w)
    assert "training failed on node0" in log, log[-3000:]
    # the ranks' own timeout ended it: well before the driver's teardown, and not a hang
    train_log = (w.run_dir / "cluster" / "node0" / "train.log").read_text()
    assert re.search(r"timed out|Timeout|timeout", train_log), train_log[-3000:]
    # bounded by the ranks' timeout, then ssh's keepalive (60 s: pdsh on node0 waits for node1's session,
    # whose end cannot cross the cut), the driver's next poll and the teardown
    assert ended - cut_at < timeout_s + 60 + 90, ended - cut_at
    assert (w.run_dir / "metrics.jsonl").exists()


def test_a_full_disk_on_a_host_is_one_clear_error_and_nothing_bills(rehearsal):
    """Scenario 5: node1's disk (a 64 MB tmpfs) fills during the set-up. The driver names the host and
    the cause, and destroys everything."""
    w = rehearsal
    w.api.host_disk_mb[2] = 64
    proc = w.driver(*run_args(w), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert_nothing_billing(w)
    assert re.search(r"node1: .*(No space left on device|Disk quota|ENOSPC)", out), out[-4000:]
    assert "node0: " not in re.findall(r"node\d: .*No space left", out)[0]


def test_a_host_preempted_mid_run_is_fetched_destroyed_and_resumed_on_three_new_hosts(rehearsal):
    """Scenario 3: node1's host dies mid-run (every process at once) and the listing says `exited`, then
    `offline`. The driver fetches what exists, destroys, and exits non-zero naming the last good
    checkpoint; `run --resume` on 3 fresh hosts continues from it, and its steps follow the steps the
    first run trained after that checkpoint (the same global batch: 2 x 6 = 3 x 4 windows)."""
    w = rehearsal
    driver = w.start(*run_args(w, overrides=["train.max_steps=100000", "train.decay_tokens=100000",
                                             "train.micro_batch=6"]))
    wait_for_phase(w, "training")
    first, second = [i["id"] for i in w.state()["instances"]]
    w.wait_for(lambda: "fetched from 2 nodes" in driver_log(w), timeout=300, what="a checkpoint fetched")
    good = w.state()["fetched"]
    good_step = int(good[4:])
    w.wait_for(lambda: any(m.get("step", 0) >= good_step + 4 for m in node_metrics(w, first)), timeout=300,
               what="4 steps past the fetched checkpoint")
    w.api.host_fails(second)
    out, err = driver.communicate(timeout=400)
    assert driver.returncode == 1, out + err
    assert_nothing_billing(w)
    last = w.state()["fetched"]
    assert last and int(last[4:]) >= good_step
    assert last in out + err, (out + err)[-3000:]   # the last good checkpoint is named
    before = {m["step"]: m["loss"] for m in read_metrics(w.run_dir) if "loss" in m}
    resumed_at = int(last[4:])
    assert max(before) >= resumed_at + 2, (max(before), resumed_at)
    again = w.driver(*run_args(w, "--resume", f"outputs/{w.run_name}", nodes=3,
                               overrides=[f"train.max_steps={resumed_at + 2}", "train.decay_tokens=100000",
                                          "train.micro_batch=4"]), timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert_nothing_billing(w)
    after = {m["step"]: m["loss"] for m in read_metrics(w.run_dir) if "loss" in m}
    print(f"resumed at {resumed_at} on 3 hosts: largest relative loss difference "
          f"{max(abs(after[k] - before[k]) / abs(before[k]) for k in (resumed_at + 1, resumed_at + 2)):.2e}")
    for step in (resumed_at + 1, resumed_at + 2):
        assert after[step] == pytest.approx(before[step], rel=1e-4), (step, after[step], before[step])


def test_an_interruptible_run_recovers_from_an_outbid_host_by_itself(rehearsal):
    """`--interruptible` on real hosts: node1's host is stopped (outbid: its processes end, the listing
    says `stopped`). The driver alone fetches what exists, destroys both, rents two new hosts, and
    resumes from the newest checkpoint verified here; the resumed steps follow the steps the first
    renting trained after that checkpoint (the same global batch), and the driver's account of the
    cost follows the stand-in's billing."""
    w = rehearsal
    for offer in w.api.offers:
        offer["min_bid"] = round(offer["dph_total"] * 0.45, 4)
    steps = 40
    driver = w.start(*run_args(w, "--interruptible", overrides=[f"train.max_steps={steps}",
                                                                 "train.decay_tokens=100000"]))
    wait_for_phase(w, "training")
    first, second = [i["id"] for i in w.state()["instances"]]
    w.wait_for(lambda: "fetched from 2 nodes" in driver_log(w), timeout=300, what="a checkpoint fetched")
    good_step = int(w.state()["fetched"][4:])
    w.wait_for(lambda: any(m.get("step", 0) >= good_step + 2 for m in node_metrics(w, first)), timeout=300,
               what="2 steps past the fetched checkpoint")
    before = {m["step"]: m["loss"] for m in node_metrics(w, first) if "loss" in m}
    w.api.preempt(second)
    out, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, (out + err)[-5000:]
    assert_nothing_billing(w)
    state = w.state()
    (event,) = state["preemptions"]
    assert event["nodes_after"] == 2 and good_step <= event["resumed_from"] <= event["step"]
    assert len(w.api.created()) == 4 and all(c["body"]["price"] for c in w.api.calls("PUT", r"/api/v0/asks/\d+/"))
    after = losses(w.run_dir)
    assert max(after) == steps
    compared = [k for k in before if k > event["resumed_from"]]
    assert compared, (sorted(before), event)
    for step in compared:
        assert after[step] == pytest.approx(before[step], rel=1e-4), (step, after[step], before[step])
    from launch.vast.state import RunState
    account, billed = RunState.load(w.run_name).spent_usd(), w.api.billed_usd()
    stopped_rate = next(i.usd_per_hour for i in RunState.load(w.run_name).instances if i.id == second)
    assert -0.0005 <= account - billed <= stopped_rate * 5 / 3600, (account, billed)   # the stop is seen at a poll
    print(f"preempted at step {event['step']}, resumed from {event['resumed_from']} on 2 new hosts: "
          f"{event['lost_steps']} steps lost, recovery {event['recovery_s']:.0f} s, ${event['recovery_usd']:.4f}; "
          f"account ${account:.4f} vs billed ${billed:.4f}")
