"""Slurm, for real (`make test-slurm`): the distribution's slurmctld, slurmd and munge on the rehearsal's
hosts (tests/lab/slurm.py), one slurmd per host with its own hostname, jobs submitted with
`sbatch launch/slurm.sbatch` from a checkout on the hosts' shared folder (an owned cluster's NFS home,
set up there with `make setup-node` from the lab's wheelhouse). The ranks are CPU ranks, gloo over the
lab's bridge; the nodes share /mnt/shared and nothing else (/workspace and /tmp are each node's own).

The only fake: each node declares 2 GPUs to Slurm (gres/gpu over device files that are not GPUs), so
that a job can be given GPUs where torch sees none."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, losses, read_metrics

from lab.hosts import Lab  # noqa: E402
from lab.slurm import SHARED, Cluster, why_not  # noqa: E402

REASON = why_not()
pytestmark = [pytest.mark.slurm, pytest.mark.processes,
              pytest.mark.skipif(REASON is not None, reason=f"no Slurm cluster: {REASON}")]

CHECKOUT = f"{SHARED}/shakespeare"   # the checkout, as the nodes see it
ENV = {"OMP_NUM_THREADS": "1"}       # the lab's two "nodes" share this machine's cores
DEBUG = "conf=debug deepspeed=zero1 train.eval_every=0 train.sample_tokens=0 train.progress=false"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, user_key):
    """Two hosts, a Slurm over them, and the project checked out on their shared folder, set up."""
    base = tmp_path_factory.mktemp("slurm")
    shared = base / "shared"
    shared.mkdir()
    started = time.time()
    with Lab(base / "lab") as lab:
        key = Path(f"{user_key}.pub").read_text()
        hosts = [lab.boot(key, {}, shared=shared, etc_hosts=lab.hosts_file(2)) for _ in range(2)]
        cluster = Cluster(shared, hosts)
        cluster.start()
        check_out(shared / "shakespeare")
        setup = cluster.shell("make setup-node", cwd=CHECKOUT, timeout=600, PIP_CONFIG_FILE="/dev/null",
                              PIP_NO_INDEX="1", PIP_FIND_LINKS="/opt/wheels", PIP_DISABLE_PIP_VERSION_CHECK="1")
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        cluster.checkout = shared / "shakespeare"
        print(f"slurm: cluster up and the checkout set up in {time.time() - started:.0f} s")
        yield cluster


def check_out(target: Path) -> None:
    """The project's files as a clone has them (tracked, and new files not ignored)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in names:
        source = ROOT / name
        if name and not name.startswith((".venv", ".cache")) and source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def finished(fields: dict) -> bool:
    return fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def output(slurm: Cluster, job: int) -> str:
    path = slurm.checkout / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def host_dir(slurm: Cluster, index: int, path: str) -> Path:
    """A node's own folder (its /workspace), as this machine sees it."""
    assert path.startswith("/workspace/")
    return slurm.hosts[index].disk / path[1:]


def test_a_two_node_job_trains_and_its_checkpoint_resumes_here(slurm, tmp_path):
    """Scenario 1: `sbatch --nodes 2 launch/slurm.sbatch conf=debug ...`: one rank on each node, the
    rendezvous on the first node from Slurm's node list, data on the shared folder, run_dir on each
    node's own disk (every node keeps its own ranks' files). The nodes' files, put together here, resume
    in one process and train on."""
    steps, run_dir = 12, "/workspace/runs/two"
    job = slurm.submit(f"--nodes 2 launch/slurm.sbatch {DEBUG} train.max_steps={steps} train.ckpt_every=6 "
                       f"run_dir={run_dir}", cwd=CHECKOUT, **ENV)
    submitted = time.time()
    fields = slurm.wait_for(job, finished, 300, "end")
    print(f"job {job}: {fields['JobState']} in {time.time() - submitted:.0f} s")
    out = output(slurm, job)
    assert fields["JobState"] == "COMPLETED", out[-4000:]
    assert "rendezvous node-0:" in out and "2 node(s) x 1 rank(s)" in out, out[-3000:]
    assert re.search(r"^1: ", out, re.M) is not None or "ranks: 2" in out, out[-3000:]
    tag = f"step{steps:08d}"
    node0, node1 = host_dir(slurm, 0, run_dir), host_dir(slurm, 1, run_dir)
    assert (node0 / "checkpoints" / "latest").read_text().strip() == tag
    assert [p.name for p in (node0 / "checkpoints" / tag).glob("zero_pp_rank_*optim*")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert [p.name for p in (node1 / "checkpoints" / tag).glob("zero_pp_rank_*optim*")] == [
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert sorted(losses(node0)) == list(range(1, steps + 1))
    here = tmp_path / "run"
    shutil.copytree(node1, here)                         # as a user gathers them (rsync from each node)
    shutil.copytree(node0, here, dirs_exist_ok=True)     # rank 0's node last: its `latest` and meta win
    local = subprocess.run([sys.executable, "launch/train.py", *DEBUG.split(), f"run_dir={here}",
                            f"data.dir={slurm.checkout / 'shards' / 'shakespeare'}", f"train.max_steps={steps + 2}",
                            "train.ckpt_every=6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert f"resumed at step {steps}" in local.stdout + local.stderr
    assert sorted(losses(here)) == list(range(1, steps + 3))
