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

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from harness import SECRET, World  # noqa: E402

from trainer.checksums import verify  # noqa: E402

pytestmark = pytest.mark.skipif(__import__("shutil").which("ssh-keygen") is None,
                                reason="ssh-keygen missing (`make test` installs openssh-client)")


@pytest.fixture(scope="module")
def user_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("user") / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
def world(tmp_path, user_key, request):
    with World(tmp_path, user_key, request.node.name) as w:
        yield w


def _local_checkpoint(world: World) -> tuple[str, dict]:
    checkpoints = world.run_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    return tag, verify(checkpoints / tag)


def test_happy_path_two_nodes(world):
    """Rents the two cheapest machines of one cluster, trains, fetches every checkpoint, destroys all."""
    proc = world.driver(*world.args(overrides=["tracking.tags=[a,b]", "data.workers=0"]))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "total cost: $21.0000/h for 2 nodes (4 GPUs)" in proc.stdout
    api = world.api
    assert [r["path"] for r in api.calls("PUT", r"/api/v0/asks/\d+/")] == ["/api/v0/asks/101/", "/api/v0/asks/102/"]
    created = api.created()
    assert sorted(api.destroyed()) == sorted(created) == [5001, 5002]
    body = api.calls("PUT", r"/api/v0/asks/\d+/")[0]["body"]
    assert body["label"] == world.run_name and body["env"] == {f"-n {world.run_name}": "1"}
    assert body["image"] == "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel"
    query = api.calls("POST", "/api/v0/bundles/")[0]["body"]
    assert query["num_gpus"] == {"eq": "2"} and query["gpu_name"] == {"eq": "H100 SXM"}
    assert [c["body"] for c in api.calls("POST", "/api/v0/overlay/")] == [{"cluster_id": 7, "name": world.run_name}]
    assert [c["body"] for c in api.calls("DELETE", "/api/v0/overlay/")] == [{"overlay_name": world.run_name}]
    # the newest checkpoint (max_steps 12, every 4) is here, complete: every rank's files from both nodes
    tag, meta = _local_checkpoint(world)
    assert tag == "step00000012" and meta["world_size"] == 4
    # overrides reached both nodes' "ranks" intact, through node0's shell and pdsh's remote shell
    for inst in created:
        argv = json.loads((world.node_run(inst) / f"argv.node{created.index(inst)}.json").read_text())
        assert argv[-3:] == ["train.ckpt_every=4", "tracking.tags=[a,b]", "data.workers=0"], argv
        assert f"run_dir=outputs/{world.run_name}" in argv and "resume=auto" in argv
    # only git-tracked files went to the nodes
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    shipped = {str(p.relative_to(world.node(5001))) for p in world.node(5001).rglob("*")
               if p.is_file() and not str(p.relative_to(world.node(5001))).startswith((".venv", "outputs",
                                                                                         "hostfile", ".deepspeed_env"))}
    assert shipped and shipped <= tracked, shipped - tracked
    # a per-run known_hosts file on every ssh from the laptop; the per-run key is gone afterwards
    laptop = [c for c in world.ssh_calls() if c["from"] == world.env["HOME"]]
    assert laptop and {c["known_hosts"] for c in laptop} == {str(world.run_dir / "cluster" / "known_hosts")}
    assert not (world.run_dir / "cluster" / f"{world.run_name}_key").exists()
    state = world.state()
    assert state["phase"] == "down" and all(i["destroyed"] for i in state["instances"])
    assert "every instance of run" in (world.run_dir / "cluster" / "driver.log").read_text()
    world.assert_clean(out)
