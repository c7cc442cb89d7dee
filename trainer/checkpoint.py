"""Checkpoints saved by every rank through DeepSpeed, with what resuming exactly needs beside them."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from model import GPT, GPTConfig

# Rank 0's model-states file (it carries the client state): ZeRO-3 names it per partition.
META = "meta.json"  # step, vocab, model config, world size, ZeRO stage: readable without loading weights
UNIVERSAL = "universal"  # inside a checkpoint: its conversion for resuming at another world size
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    """This rank's generators: the CPU's and, on a GPU, its own device's. (Every visible GPU's, as
    before, could not be restored on a node that shows fewer GPUs.)"""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # written before 2026-11-26: one state per visible GPU
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; `latest` still names the last complete one."""


def latest_tag(directory: Path) -> str | None:
    path = Path(directory) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag or not (Path(directory) / tag).is_dir():
        raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint in {directory}")
    return tag


def _write_latest(directory: Path, tag: str) -> None:
    """Atomically: a crash leaves either the old or the new name, never a half-written file."""
    tmp = directory / f"latest.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "latest")


def _prune(directory: Path, keep: int, current: str) -> None:
    """Delete checkpoints older than the newest `keep` (only ever called once `current` is complete)."""
    if keep <= 0:
        return
    tags = sorted(p.name for p in directory.glob("step*") if p.is_dir() and p.name <= current)
    for old in tags[:-keep]:
        shutil.rmtree(directory / old, ignore_errors=True)


def save(engine, run_dir, step: int, loader_state: dict, model_cfg: GPTConfig, vocab: str,
         lowercase: bool, zero_stage: int, keep: int = 0) -> Path:
    """Collective: call on every rank. `latest` moves only after every rank has written its files.

    Each rank's RNG state travels in rank 0's client state.
    """
    directory = checkpoint_dir(run_dir)
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    client = {"step": step, "loader": loader_state, "rng": rngs, "world_size": dist.get_world_size(),
              "model_config": asdict(model_cfg), "vocab": vocab, "lowercase": lowercase,
              "zero_stage": zero_stage}
    tag = f"step{step:08d}"
    try:
        # ends with a barrier: when it returns, every rank's files are on disk
        engine.save_checkpoint(str(directory), tag=tag, client_state=client, save_latest=False)
        if dist.get_rank() == 0:
            meta = {k: v for k, v in client.items() if k not in ("rng", "loader")}
            (directory / tag / META).write_text(json.dumps(meta, indent=1))
            _write_latest(directory, tag)
            _prune(directory, keep, tag)
    except Exception as e:  # a full disk, a quota, a vanished mount
        previous = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
        raise CheckpointError(
            f"saving checkpoint {directory / tag} failed at step {step}: {type(e).__name__}: {e}; "
            f"`latest` still names {previous or 'no checkpoint'}"
        ) from e
    dist.barrier()
    return directory / tag


def resolve(resume: str, run_dir) -> tuple[Path, str] | None:
    """(checkpoints dir, tag) to resume from: `auto` = run_dir's latest if any, `never`, or a PATH.

    PATH is a checkpoints dir holding `latest`, or one tag dir inside it (e.g. .../step00000500).
    """
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(checkpoint_dir(run_dir))
        return (checkpoint_dir(run_dir), tag) if tag else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, latest_tag(path)
    if _model_states(path) is not None:
        return path.parent, path.name
    raise FileNotFoundError(f"resume={resume}: neither a checkpoints dir with `latest` nor a checkpoint")


def read_meta(where: tuple[Path, str]) -> dict:
    path = where[0] / where[1] / META
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a checkpoint written by this trainer, or incomplete)")
    return json.loads(path.read_text())


def check_compatible(where: tuple[Path, str], vocab: str, model_cfg: GPTConfig, zero_stage: int) -> dict:
    """The checkpoint's meta.json, after checking it fits this run's data, model and ZeRO stage
    (before any weights load). Another world size is fine: see needs_universal."""
    meta = read_meta(where)
    if meta["zero_stage"] != zero_stage:
        raise CheckpointError(f"{where[0] / where[1]}: saved with ZeRO-{meta['zero_stage']}, this run uses "
                              f"deepspeed=zero{zero_stage}; resume with deepspeed=zero{meta['zero_stage']}")
    if meta["vocab"] != vocab:
        raise CheckpointError(f"{where[0] / where[1]}: the checkpoint's vocabulary ({len(meta['vocab'])} chars) "
                              f"differs from the data's manifest.json ({len(vocab)} chars)")
    ours = asdict(model_cfg)
    differ = [f"model.{k}: checkpoint {v!r}, config {ours.get(k)!r}" for k, v in meta["model_config"].items()
              if ours.get(k) != v and k not in ("dropout", "attn")]
    if differ:
        raise CheckpointError(f"{where[0] / where[1]}: the model differs: {'; '.join(differ)}")
    return meta


def needs_universal(meta: dict, world_size: int) -> bool:
    """ZeRO-1/2/3 optimizer state is partitioned by rank: at another world size it is loaded from a
    universal (per-parameter) conversion instead. ZeRO-0 state is whole on every rank."""
    return meta["zero_stage"] > 0 and meta["world_size"] != world_size


def to_universal(where: tuple[Path, str]) -> tuple[Path, str]:
    """Collective. Rank 0 converts the checkpoint with DeepSpeed's ds_to_universal into the `universal`
    folder inside it (once: later resumes reuse it) while the others wait; returns where to load from."""
    tag_dir = where[0] / where[1]
    out, error = tag_dir / UNIVERSAL, None
    if dist.get_rank() == 0 and not out.is_dir():
        tmp = tag_dir / (UNIVERSAL + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        print(f"{tag_dir}: saved by other ranks; converting to a universal checkpoint in {out}", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(tmp, out)  # complete or absent, never half-written
        else:
            error = f"{tag_dir}: conversion to a universal checkpoint failed: {done.stderr.strip()[-800:]}"
    from .distributed import broadcast_error  # here: sample.py and eval.py load checkpoints without DeepSpeed

    broadcast_error(error)
    return tag_dir, UNIVERSAL


def load(engine, where: tuple[Path, str]) -> dict:
    """Collective: restore engine state and this rank's RNG; returns the client state."""
    directory, tag = where
    try:
        path, client = engine.load_checkpoint(str(directory), tag=tag)
    except KeyError as e:
        if engine.zero_optimization_stage() == 0 and e.args == ("param_groups",):
            raise CheckpointError(
                f"{directory / tag}: its optimizer state is that of DeepSpeed's bf16 wrapper, which ZeRO-0 runs "
                "used before precision=bf16 became torch autocast over fp32 weights; this version cannot resume "
                "it. The weights still load for sampling and evaluation; resume=never starts over") from None
        raise
    if path is None:
        raise CheckpointError(f"{directory / tag}: DeepSpeed found no checkpoint to load")
    if client.get("world_size") == dist.get_world_size():
        set_rng_state(client["rng"][dist.get_rank()])
    else:  # another world size: fresh, but still deterministic, per-rank streams
        torch.manual_seed(1_000_003 * client["step"] + dist.get_rank())
    return client


def _model_states(tag_dir: Path) -> Path | None:
    return next((tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()), None)


def load_for_inference(path) -> tuple[GPT, dict]:
    """A plain fp32 GPT (and the client state) from a run dir, a checkpoints dir or one checkpoint."""
    path = Path(path)
    try:
        where = resolve("auto", path) if (path / "checkpoints").is_dir() else resolve(str(path), path)
    except FileNotFoundError:
        where = None
    if where is None:
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {checkpoint_dir(path)}/latest)")
    tag_dir = where[0] / where[1]
    states_file = _model_states(tag_dir)
    if states_file is None:
        raise FileNotFoundError(f"{tag_dir}: no {' or '.join(MODEL_STATES)} (incomplete checkpoint?)")
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    client = {k: states[k] for k in ("model_config", "vocab", "lowercase", "zero_stage", "step")}
    if client["zero_stage"] == 3:  # parameters live in the partitioned optimizer files
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's chatter: keep stdout for results
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            weights = get_fp32_state_dict_from_zero_checkpoint(str(where[0]), tag=where[1])
    else:
        weights = states["module"]
    model = GPT(GPTConfig(**client["model_config"]))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    missing = set(model.state_dict()) - set(weights) - {"head.weight"}
    if missing:
        raise RuntimeError(f"{tag_dir}: checkpoint lacks weights {sorted(missing)[:5]}")
    return model.eval(), client
