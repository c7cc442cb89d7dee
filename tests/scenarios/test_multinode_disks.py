"""Two nodes that share no disk, as rented nodes are: two real DeepSpeed launchers (`--no_ssh`,
node ranks 0 and 1) on this machine, each started in its own directory with relative `run_dir` and
`data.dir`, so each node reads and writes only its own "disk". Faults are real: kill -9, SIGTERM,
SIGSTOP, deleted files. Nothing is mocked."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, STEPS, debug_overrides, free_port, last_step, losses, subprocess_env, wait_for

from data.config import DataConfig
from data.prepare import prepare
from data.synthetic import text8_bytes, write_archive

pytestmark = pytest.mark.processes   # every test here starts processes

RUN, DATA = Path("outputs/x"), Path("shards/s")  # relative: each node resolves them on its own disk


def _nodes(tmp_path: Path, shakespeare_dir: Path, name: str = "") -> list[Path]:
    """Two node directories, each with its own copy of the shards (as each rented node prepares)."""
    dirs = []
    for index in (0, 1):
        node = tmp_path / f"{name}node{index}"
        shutil.copytree(shakespeare_dir, node / DATA)
        dirs.append(node)
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    return dirs


def _launch(nodes: list[Path], overrides: list[str]) -> list[subprocess.Popen]:
    """One launcher per node, each in its own process group and its own directory."""
    port, hostfile = free_port(), nodes[0].parent / "hostfile"
    return [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                              "--no_ssh", "--node_rank", str(k), "--master_addr", "127.0.0.1",
                              "--master_port", str(port), str(ROOT / "launch" / "train.py"), *overrides],
                             cwd=node, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
            for k, node in enumerate(nodes)]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    outs = []
    for proc in procs:
        try:
            out = proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out = proc.communicate()[0] + "\n[killed by the test: timed out]"
        outs.append((proc.returncode, out))
    return outs


def _run(nodes, overrides, expect_ok=True) -> list[tuple[int, str]]:
    outs = _finish(_launch(nodes, overrides))
    if expect_ok:
        assert [rc for rc, _ in outs] == [0, 0], outs[0][1][-3000:] + "\n----- node1 -----\n" + outs[1][1][-3000:]
    return outs


def _overrides(*extra) -> list[str]:
    return debug_overrides(DATA, RUN, "train.sample_tokens=0", "train.eval_every=0", *extra)


def _ckpts(node: Path) -> Path:
    return node / RUN / "checkpoints"


def _assert_follows(node0: Path, reference: Path, first: int, rel=1e-5):
    ours, whole = losses(node0 / RUN), losses(reference)
    assert sorted(s for s in ours if s >= first) == list(range(first, STEPS + 1))
    for step in range(first, STEPS + 1):
        assert ours[step] == pytest.approx(whole[step], rel=rel, abs=rel), step


@pytest.fixture(scope="module")
def zero2_nodes(tmp_path_factory, shakespeare_dir):
    """2 nodes, ZeRO-2, 20 of the reference's 30 steps, a checkpoint every 10, keeping 1."""
    tmp = tmp_path_factory.mktemp("zero2_nodes")
    nodes = _nodes(tmp, shakespeare_dir)
    outs = _run(nodes, _overrides("deepspeed=zero2", "train.max_steps=20", "train.ckpt_every=10",
                                  "train.keep_ckpts=1"))
    return nodes, outs


def test_every_node_keeps_its_own_files_latest_and_meta_and_prunes_its_own_disk(zero2_nodes):
    nodes, _ = zero2_nodes
    metas = []
    for index, node in enumerate(nodes):
        ckpts = _ckpts(node)
        assert (ckpts / "latest").read_text() == "step00000020"
        assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step00000020"]  # step 10 pruned here too
        tag_dir = ckpts / "step00000020"
        held = sorted(p.name for p in tag_dir.iterdir() if p.name != "meta.json")
        # its own rank's optimizer partition, and its own copy of the model states
        assert held == ["mp_rank_00_model_states.pt", f"zero_pp_rank_{index}_mp_rank_00_optim_states.pt"]
        metas.append(json.loads((tag_dir / "meta.json").read_text()))
    assert metas[0] == metas[1]  # the same list of every file of the checkpoint, on every node
    assert len(metas[0]["files"]["mp_rank_00_model_states.pt"]) == 2  # each node's own copy
    assert sorted(metas[0]["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    from trainer.checksums import verify

    for index, node in enumerate(nodes):  # each node's share matches the sums
        verify(_ckpts(node) / "step00000020", [n for n in metas[0]["files"] if f"rank_{1 - index}_" not in n])


def test_resume_auto_on_separate_disks_continues_like_an_uninterrupted_run(zero2_nodes, zero0_run, tmp_path):
    nodes = [tmp_path / n.name for n in zero2_nodes[0]]
    for src, dst in zip(zero2_nodes[0], nodes):
        shutil.copytree(src, dst)
    shutil.copy(zero2_nodes[0][0].parent / "hostfile", tmp_path / "hostfile")
    outs = _run(nodes, _overrides("deepspeed=zero2", "train.ckpt_every=10", "train.keep_ckpts=1"))
    assert "resumed at step 20" in outs[0][1]
    _assert_follows(nodes[0], zero0_run[0], 21)


def test_a_checkpoint_missing_one_nodes_shard_is_refused_on_every_rank_naming_it(zero2_nodes, tmp_path):
    nodes = [tmp_path / n.name for n in zero2_nodes[0]]
    for src, dst in zip(zero2_nodes[0], nodes):
        shutil.copytree(src, dst)
    shutil.copy(zero2_nodes[0][0].parent / "hostfile", tmp_path / "hostfile")
    missing = _ckpts(nodes[1]) / "step00000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    missing.unlink()
    started = time.time()
    outs = _run(nodes, _overrides("deepspeed=zero2", "train.max_steps=30"), expect_ok=False)
    elapsed = time.time() - started
    for rc, out in outs:  # every node stops, each saying which node, rank and file
        assert rc != 0
        missing = f"{RUN}/checkpoints/step00000020/zero_pp_rank_1_mp_rank_00_optim_states.pt: missing"
        assert f"node 1, rank 1: {missing}" in out
    assert "step 21" not in outs[0][1] and last_step(nodes[0] / RUN) == 20  # nothing trained
    assert elapsed < 120


def test_a_two_node_zero2_checkpoint_resumes_on_one_node_once_its_files_are_gathered(zero2_nodes, zero0_run,
                                                                                     tmp_path):
    node = tmp_path / "node0"
    shutil.copytree(zero2_nodes[0][0], node)
    one_rank = _overrides("deepspeed=zero2", "train.grad_accum=2")  # the same global batch
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *one_rank]
    refused = subprocess.run(cmd, cwd=node, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing" in refused.stderr.splitlines()[-1]
    assert not (_ckpts(node) / "step00000020" / "universal").exists()
    # gather node1's share (what the cluster driver's fetch does), then the conversion can run
    other = _ckpts(zero2_nodes[0][1]) / "step00000020" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(other, _ckpts(node) / "step00000020")
    done = subprocess.run(cmd, cwd=node, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "converting to a universal checkpoint" in done.stdout and "resumed at step 20" in done.stdout
    _assert_follows(node, zero0_run[0], 21, rel=2e-3)


def test_kill_9_of_one_node_then_sigterm_to_both_then_resume(zero0_run, tmp_path, shakespeare_dir):
    """ZeRO-0 (every node holds the whole model states). node1 dies by kill -9 mid-run: node0 fails
    instead of hanging, and both disks keep the same last checkpoint. The resumed job is preempted
    (SIGTERM to both nodes): both save. The last resume ends like an uninterrupted run."""
    nodes = _nodes(tmp_path, shakespeare_dir)
    args = _overrides("deepspeed=zero0", "train.ckpt_every=10", "train.log_every=1")
    endless = [*args, "train.max_steps=1000"]  # decay_tokens fixes the lr schedule: the reference's steps
    procs = _launch(nodes, endless)
    wait_for(lambda: last_step(nodes[0] / RUN) >= 11, procs, poll=0.005)  # past the checkpoint of step 10
    os.killpg(procs[1].pid, signal.SIGKILL)
    (rc0, out0), _ = _finish(procs, timeout=120)
    assert rc0 != 0 and "[killed by the test" not in out0, out0[-3000:]  # it failed, not hung
    saved = {(_ckpts(n) / "latest").read_text() for n in nodes}
    # a busy machine may train on past the checkpoint of step 20 before the kill lands (~15 ms a step)
    assert len(saved) == 1 and saved <= {"step00000010", "step00000020"}, saved
    base = int(saved.pop()[4:])

    (nodes[0] / RUN / "metrics.jsonl").unlink()  # so that the steps waited for are the resumed run's
    procs = _launch(nodes, endless)
    wait_for(lambda: last_step(nodes[0] / RUN) >= base + 4, procs, poll=0.005)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole node is preempted: launcher and rank alike
    outs = _finish(procs, timeout=120)
    assert f"resumed at step {base}" in outs[0][1]
    stopped = (_ckpts(nodes[0]) / "latest").read_text()
    assert "stop requested (SIGTERM)" in outs[0][1], outs[0][1][-3000:]
    assert base + 3 < int(stopped[4:]) < STEPS and (_ckpts(nodes[1]) / "latest").read_text() == stopped

    outs = _run(nodes, args)
    assert f"resumed at step {int(stopped[4:])}" in outs[0][1]
    _assert_follows(nodes[0], zero0_run[0], int(stopped[4:]) + 1, rel=1e-6)


def test_a_collective_one_rank_never_joins_fails_the_job_within_the_timeout(tmp_path, shakespeare_dir):
    """node1 freezes (SIGSTOP: a hung host). node0's next all-reduce gives up after
    train.collective_timeout_s and the job exits non-zero, naming the rank and the step."""
    nodes = _nodes(tmp_path, shakespeare_dir)
    procs = _launch(nodes, _overrides("deepspeed=zero0", "train.max_steps=1000", "train.ckpt_every=0",
                                      "train.log_every=1", "train.collective_timeout_s=8"))
    try:
        wait_for(lambda: last_step(nodes[0] / RUN) >= 3, procs)
        os.killpg(procs[1].pid, signal.SIGSTOP)
        stopped_at = time.time()
        (rc0, out0), = _finish(procs[:1], timeout=150)
        waited = time.time() - stopped_at
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert rc0 != 0
    assert "rank 0: a collective waited longer than train.collective_timeout_s=8 at step " in out0, out0[-3000:]
    assert 6 < waited < 30  # the timeout, then the launcher ending the job


def test_each_node_prepares_its_own_disk_and_nodes_with_other_shards_are_refused(tmp_path):
    """data.path is relative, so each node reads its own corpus.txt: node 1's differs by one line, as
    if it had downloaded another revision. Each node's leader prepares its own shards; the manifests
    are compared before the first step and the job stops naming node 1."""
    text = "".join(f"line {i}: to be, or not to be, that is the question.\n" for i in range(4000))
    nodes = []
    for index in (0, 1):
        node = tmp_path / f"node{index}"
        node.mkdir()
        (node / "corpus.txt").write_text(text + ("an extra line on node 1\n" if index else ""))
        nodes.append(node)
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    outs = _run(nodes, ["conf=debug", "data.source=text", "data.path=corpus.txt", "data.dir=shards/t",
                        f"run_dir={RUN}", "train.progress=false"], expect_ok=False)
    for rc, out in outs:
        assert rc != 0
        assert ("the shards in data.dir=shards/t differ between nodes: node 1's manifest.json is not node 0's"
                in out), out[-3000:]
    tokens = [json.loads((n / "shards/t/manifest.json").read_text())["splits"]["train"]["tokens"]
              + json.loads((n / "shards/t/manifest.json").read_text())["splits"]["val"]["tokens"] for n in nodes]
    assert tokens[1] == tokens[0] + len("an extra line on node 1\n")  # each prepared from its own corpus
    assert not (nodes[0] / RUN / "metrics.jsonl").exists()


def test_a_node_without_shards_stops_every_rank_of_both_nodes_naming_it(tmp_path):
    """text8 (prepared beforehand, never by train) is ready on node 0's disk and absent from node 1's.
    Node 1 finds that before any process group and says so through the group's first collective:
    every rank stops at once with node 1's line, instead of node 0 waiting for node 1 to join."""
    archive = write_archive(tmp_path / "text8.zip", "text8", text8_bytes(60_000))
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    prepare(DataConfig(source="text8", path=str(archive), dir=str(nodes[0] / "shards/t8"), tokenizer="bytes",
                       split=[0.9, 0.05, 0.05], expect_bytes=60_000))
    nodes[1].mkdir()
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    outs = _run(nodes, ["conf=debug", "data=text8", f"data.path={archive}", "data.expect_bytes=60000",
                        "data.dir=shards/t8", f"run_dir={RUN}", "train.progress=false",
                        "train.collective_timeout_s=120"], expect_ok=False)
    for rc, out in outs:
        assert rc != 0
        assert "error: node 1: no prepared shards in data.dir=shards/t8; data.source=text8" in out, out[-3000:]
        assert "python launch/prepare.py conf=debug data.source=text8" in out
    assert not (nodes[0] / RUN).exists() and not (nodes[1] / "shards").exists()
