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
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, last_step, losses, read_metrics, run_train
from lab.hosts import Lab  # noqa: E402
from lab.slurm import SHARED, Cluster, why_not  # noqa: E402

from data.loader import RankLoader
from trainer.loop import window_hash

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
    here (two local ranks) and train on."""
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
    resumed = time.time()
    # two ranks here, as on the nodes: ZeRO-1's partitions load as saved (no universal conversion)
    local = run_train([*DEBUG.split(), f"run_dir={here}", f"data.dir={slurm.checkout / 'shards' / 'shakespeare'}",
                       f"train.max_steps={steps + 2}", "train.ckpt_every=6"], ranks=2)
    print(f"resumed here in {time.time() - resumed:.0f} s")
    assert f"resumed at step {steps}" in local.stdout + local.stderr
    assert sorted(losses(here)) == list(range(1, steps + 3))


def test_scancel_saves_the_step_it_reached(slurm):
    """Scenario 3: plain `scancel JOB` while it trains: Slurm sends SIGTERM to the ranks (and to the batch
    shell, which keeps waiting for them); each rank trains to the next logging step, saves and exits,
    well within KillWait (30 s), so nothing trained is lost. Measured: the seconds from scancel to the
    job's end, and the steps between the last logged step before scancel and the saved one."""
    run_dir = slurm.checkout / "runs" / "cancel"
    job = slurm.submit(f"--nodes 2 launch/slurm.sbatch {DEBUG} train.max_steps=100000 train.ckpt_every=100000 "
                       "run_dir=runs/cancel", cwd=CHECKOUT, **ENV)
    slurm.wait_for(job, lambda f: finished(f) or last_step(run_dir) >= 20, 300, "20 steps")
    before = last_step(run_dir)
    cancelled = time.time()
    assert slurm.shell(f"scancel {job}").returncode == 0
    fields = slurm.wait_for(job, finished, 120, "end")
    took = time.time() - cancelled
    out = output(slurm, job)
    assert fields["JobState"] == "CANCELLED", out[-3000:]
    saved = re.search(r"saved the checkpoint of step (\d+)", out)
    assert saved, out[-3000:]
    step = int(saved.group(1))
    print(f"scancel at step >= {before}: saved step {step}, job ended {took:.1f} s after scancel")
    assert step >= before and step == last_step(run_dir), (before, step, last_step(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    assert took < 30, took   # inside KillWait: no SIGKILL


def one_line_failure(slurm: Cluster, args: str) -> str:
    """Submit, wait for the end; the job failed before any step started, its output one line."""
    job = slurm.submit(f"--nodes 2 {args}", cwd=CHECKOUT, **ENV)
    fields = slurm.wait_for(job, finished, 120, "end")
    out = output(slurm, job)
    assert fields["JobState"] == "FAILED", (fields, out)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    steps = (slurm.shared / "slurm" / "log" / "slurmd-node-1.log").read_text()
    assert f"StepId={job}.0" not in steps, "a rank was started"
    return lines[0]


def test_a_misconfigured_job_fails_fast_in_one_line(slurm):
    """Scenario 4: GPUs asked where torch sees none (the fake gres), and an unknown preset: the job fails
    before srun starts any rank, with one line in its output."""
    started = time.time()
    gpus = one_line_failure(slurm, f"--gpus-per-node 2 launch/slurm.sbatch {DEBUG}")
    assert re.match(r"error: the job asked for 2 GPU\(s\) a node, but torch sees 0 CUDA device\(s\) on node-0", gpus)
    preset = one_line_failure(slurm, "launch/slurm.sbatch conf=no_such_preset")
    assert preset.startswith("config error: conf=no_such_preset: no such option"), preset
    print(f"two misconfigured jobs failed in {time.time() - started:.0f} s")
    assert time.time() - started < 90


def uninterrupted_windows(shards: Path, run_dir: Path, rank: int, steps: int) -> list[list[str]]:
    """The windows' hashes that `rank` of 2 trains at each step of a run that is never stopped: the
    loader's own order, from the run's config (one micro-batch a step). Content hashes repeat where
    the text does, so a set of them cannot say whether a window was trained twice; the order can."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    loader = RankLoader(shards, "train", cfg["model"]["block_size"], cfg["train"]["micro_batch"], rank=rank,
                        world_size=2, seed=cfg["train"]["seed"], num_workers=0)
    assert cfg["train"]["grad_accum"] == 1
    return [[window_hash(w) for w in loader.next_windows()] for _ in range(steps)]


def batch_log(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (run_dir / f"batches_rank{rank}.txt").read_text().splitlines()
    return [(int(line.split()[0]), line.split()[1:]) for line in lines]


def steps_per_second(slurm: Cluster) -> float:
    """The debug preset's training rate on two of the lab's nodes, from a short job's step times (the
    job also prepares the shards on each node's disk for the job that follows)."""
    run_dir = slurm.checkout / "runs" / "rate"
    job = slurm.submit(f"--nodes 2 launch/slurm.sbatch {DEBUG} train.max_steps=200 train.ckpt_every=100000 "
                       "data.dir=/workspace/shards run_dir=runs/rate", cwd=CHECKOUT, **ENV)
    fields = slurm.wait_for(job, finished, 300, "end")
    assert fields["JobState"] == "COMPLETED", output(slurm, job)[-3000:]
    times = sorted(m["step_time_s"] for m in read_metrics(run_dir) if "step_time_s" in m and m["step"] > 10)
    rate = 1 / times[len(times) // 2]
    print(f"the debug preset on two lab nodes: {rate:.0f} steps/s")
    return rate


def test_a_job_at_its_time_limit_saves_requeues_and_finishes(slurm):
    """Scenario 2: `--time 1 --signal B:USR1@5` (the script's own is USR1@120): Slurm warns the batch
    shell, which has the ranks save (SIGTERM) and requeues the job; the requeued job resumes from the
    shared run_dir with resume=auto and trains to max_steps. Data on each node's own disk, prepared by
    each node. Every step is trained once, in order, on the windows an uninterrupted run trains (train.record_batches).
    Once requeued, the test raises the job's time limit (`scontrol update`, as an admin can), so that
    the second start finishes instead of being warned again. The steps are this machine's rate times
    110 s, measured first, so that the first start (under 55 s of training) ends with at least half of
    them left to the second, however fast the machine."""
    steps, run_dir = round(110 * steps_per_second(slurm)), slurm.checkout / "runs" / "limit"
    job = slurm.submit(f"--nodes 2 --time 1 --signal B:USR1@5 launch/slurm.sbatch {DEBUG} "
                       f"train.max_steps={steps} train.ckpt_every=100000 train.record_batches=true "
                       "data.dir=/workspace/shards run_dir=runs/limit", cwd=CHECKOUT, **ENV)
    submitted = time.time()
    slurm.wait_for(job, lambda f: finished(f) or int(f.get("Restarts", 0)) >= 1, 200, "a requeue")
    requeued = time.time() - submitted
    assert slurm.shell(f"scontrol update JobId={job} TimeLimit=10").returncode == 0
    fields = slurm.wait_for(job, finished, 400, "end")
    out = output(slurm, job)
    print(f"requeued after {requeued:.0f} s, finished after {time.time() - submitted:.0f} s")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", (fields, out[-4000:])
    assert "time limit near (SIGUSR1)" in out and "requeueing job" in out, out[-4000:]
    saved = int(re.search(r"saved the checkpoint of step (\d+)", out).group(1))
    assert 0 < saved < steps and f"resumed at step {saved}" in out, out[-4000:]
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    for rank in (0, 1):   # rank r ran on node r, from that node's own shards
        log = batch_log(run_dir, rank)
        assert [step for step, _ in log] == list(range(1, steps + 1)), f"rank {rank}: a step repeated or skipped"
        expected = uninterrupted_windows(host_dir(slurm, rank, "/workspace/shards"), run_dir, rank, steps)
        wrong = next((step for (step, got), want in zip(log, expected) if got != want), None)
        assert wrong is None, f"rank {rank}: step {wrong} trained other windows than an uninterrupted run"
    loss = losses(run_dir)
    assert loss[saved + 1] < loss[1] - 0.5, (loss[1], loss[saved + 1])   # the weights came back
    print(f"saved at step {saved} of {steps}; {out.count('resumed at step')} resume")
