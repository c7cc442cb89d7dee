"""Checkpoints that come back from other machines: every file is checked against meta.json's sha256
list before torch or DeepSpeed opens it, so a changed, truncated, swapped or booby-trapped file is
refused, naming it, and a pickled payload never runs. The checkpoint is a real one, written by a
real 1-rank ZeRO-1 run; the checks run in-process over a real (one-rank, gloo) process group."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, debug_overrides, run_train, subprocess_env

from trainer import checksums
from trainer.checkpoint import Checkpoint, load_for_inference, plan_resume
from trainer.deepspeed_compat import end_process_group
from trainer.distributed import Node, RunError
from trainer.errors import CheckpointError

pytestmark = pytest.mark.processes   # every test here starts processes

SEED_COUNT = 200  # mutations of the whole checkpoint, each on a fresh copy


class Payload:
    """Unpickling this runs a command: what a hostile host would put in a checkpoint file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shakespeare_dir):
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    run_train(debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero1", "train.max_steps=4",
                              "train.ckpt_every=4", "train.eval_every=0", "train.sample_tokens=0"))
    return run_dir / "checkpoints" / "step00000004"


@pytest.fixture(scope="module")
def world_of_one():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    end_process_group()


def _copy(saved: Path, tmp_path: Path) -> Path:
    tag_dir = tmp_path / "checkpoints" / saved.name
    shutil.copytree(saved, tag_dir)
    (tag_dir.parent / "latest").write_text(saved.name)
    return tag_dir


def _resume(tag_dir: Path):
    """What every rank does before DeepSpeed loads a checkpoint (the model and vocab it was saved with)."""
    from model import GPTConfig

    meta = json.loads((tag_dir / "meta.json").read_text())
    return plan_resume(str(tag_dir), "unused", meta["vocab"], GPTConfig(**meta["model_config"]), 1,
                       Node(index=0, count=1, leader=True), writer=True)


def test_both_entry_points_load_an_untouched_checkpoint(saved, tmp_path, world_of_one):
    tag_dir = _copy(saved, tmp_path)
    ckpt, meta = _resume(tag_dir)
    assert ckpt == Checkpoint(tag_dir.parent, tag_dir.name) and meta["step"] == 4
    assert sorted(meta["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    model, client = load_for_inference(tag_dir)
    assert client["step"] == 4 and sum(p.numel() for p in model.parameters()) > 0


def _mutate(tag_dir: Path, rng: random.Random, sentinel: Path) -> tuple[str, str]:
    """One random change to one file; returns (kind, the file's name)."""
    names = sorted(checksums.read_meta(tag_dir)["files"])
    name = rng.choice(names)
    path = tag_dir / name
    kind = rng.choice(["flip", "truncate", "swap", "payload", "delete", "append", "plant", "link"])
    data = bytearray(path.read_bytes())
    if kind == "flip":
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[:rng.randrange(len(data))]))
    elif kind == "append":
        path.write_bytes(bytes(data) + b"\0")
    elif kind == "swap":
        other = tag_dir / next(n for n in names if n != name)
        tmp = path.with_suffix(".swap")
        os.replace(path, tmp), os.replace(other, path), os.replace(tmp, other)
    elif kind == "payload":
        torch.save({"module": Payload(sentinel)}, path)
    elif kind == "plant":  # a file DeepSpeed's patterns would pick up beside the listed ones
        name = rng.choice(["mp_rank_01_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
        torch.save({"module": Payload(sentinel)}, tag_dir / name)
    elif kind == "link":  # a listed file replaced by a link to one outside the checkpoint
        outside = tag_dir.parent.parent / "outside.pt"
        outside.write_bytes(bytes(data))
        path.unlink()
        path.symlink_to(outside)
    else:
        path.unlink()
    return kind, name


def test_random_damage_to_any_file_is_refused_naming_it_and_no_payload_runs(saved, tmp_path, world_of_one):
    rng, sentinel = random.Random(1234), tmp_path / "PAYLOAD_RAN"
    kinds = {}
    for seed in range(SEED_COUNT):
        tag_dir = _copy(saved, tmp_path / str(seed))
        names = sorted(checksums.read_meta(tag_dir)["files"])
        kind, name = _mutate(tag_dir, rng, sentinel)
        kinds[kind] = kinds.get(kind, 0) + 1
        with pytest.raises(RunError) as resumed:
            _resume(tag_dir)
        with pytest.raises(CheckpointError) as sampled:
            load_for_inference(tag_dir)
        for error in (resumed.value, sampled.value):
            message = str(error)
            assert "\n" not in message
            # the file named is the one changed (a swap changes both files: either may be named)
            assert name in message or kind == "swap" and any(n in message for n in names), (kind, name, message)
        assert not sentinel.exists(), (kind, name)
    print(f"checkpoint mutations: {SEED_COUNT} tried, {SEED_COUNT} refused, by kind {kinds}")
    assert set(kinds) == {"flip", "truncate", "swap", "payload", "delete", "append", "plant", "link"}


def test_a_payload_whose_sums_were_rewritten_still_never_runs_in_sampling(saved, tmp_path):
    """The sums are only as good as the meta.json they come from: with both forged, sampling's
    weights-only unpickler still refuses the payload, in one line naming the file and what it holds
    (trainer/test_checkpoint_unpickling.py does the same for every file kind and every entry point)."""
    tag_dir, sentinel = _copy(saved, tmp_path), tmp_path / "PAYLOAD_RAN"
    torch.save({"module": Payload(sentinel)}, tag_dir / "mp_rank_00_model_states.pt")
    meta = json.loads((tag_dir / "meta.json").read_text())
    meta["files"] = checksums.merge([checksums.hash_files(tag_dir)])
    (tag_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as refused:
        load_for_inference(tag_dir)
    assert str(refused.value).startswith(f"{tag_dir / 'mp_rank_00_model_states.pt'}: holds posix.system, which")
    assert not sentinel.exists()


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("files"), "no `files` list of sha256 sums"),
    (lambda meta: meta["files"].update({"../../evil.pt": meta["files"]["mp_rank_00_model_states.pt"]}),
     "files['../../evil.pt'] is not a checkpoint file name"),
    (lambda meta: meta["files"]["mp_rank_00_model_states.pt"][0].update(sha256="0" * 63), "list of sha256 sums"),
    (lambda meta: meta["files"]["mp_rank_00_model_states.pt"][0].update(bytes=True), "list of sha256 sums"),
    (lambda meta: meta.pop("train_optimizer"), "no train_optimizer (not a checkpoint of this trainer's format)"),
    (lambda meta: meta["model_config"].pop("n_head"), "its model_config does not hold this trainer's model settings"),
    (lambda meta: meta.update(vocab=5), "vocab is '5'"),
    (lambda meta: meta.update(step="x"), "step is 'x'"),
    (lambda meta: meta.update(world_size=True), "world_size is 'True'"),
    (lambda meta: meta["model_config"].update(n_layer="4"), "model_config: "),
    (lambda meta: meta["model_config"].update(d_model=1 << 20), "parameters, more than its"),
])
def test_a_meta_json_without_sums_or_fields_of_this_format_is_refused(saved, tmp_path, world_of_one, change, message):
    tag_dir = _copy(saved, tmp_path)
    meta = json.loads((tag_dir / "meta.json").read_text())
    change(meta)
    (tag_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="meta.json") as resumed:
        _resume(tag_dir)
    assert message in str(resumed.value)
    with pytest.raises(CheckpointError, match="meta.json"):
        load_for_inference(tag_dir)


def test_latest_naming_a_path_outside_the_checkpoints_is_refused(saved, tmp_path):
    tag_dir = _copy(saved, tmp_path)
    (tag_dir.parent / "latest").write_text("../../../etc")
    with pytest.raises(CheckpointError, match=r"latest: names '../../../etc', which is not a checkpoint"):
        load_for_inference(tmp_path)


def test_sample_py_refuses_a_changed_optimizer_file_it_would_not_even_read(saved, tmp_path):
    tag_dir = _copy(saved, tmp_path)
    with open(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.seek(100)
        f.write(b"X")
    done = subprocess.run([sys.executable, "launch/sample.py", f"run_dir={tmp_path}", "max_new_tokens=5"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"sample.py: run_dir: {tag_dir}/zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 differs from meta.json "
        "(changed in transit or on the host that held it): refusing to load it")
