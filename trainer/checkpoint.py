"""Checkpoints saved by every rank through DeepSpeed, with what resuming exactly needs beside them."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from model import GPT, GPTConfig

# Rank 0's model-states file (it carries the client state): ZeRO-3 names it per partition.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, run_dir, step: int, loader_state: dict, model_cfg: GPTConfig, vocab: str,
         lowercase: bool, zero_stage: int) -> Path:
    """Collective: call on every rank. Each rank's RNG state travels in rank 0's client state."""
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    client = {"step": step, "loader": loader_state, "rng": rngs, "world_size": dist.get_world_size(),
              "model_config": asdict(model_cfg), "vocab": vocab, "lowercase": lowercase,
              "zero_stage": zero_stage}
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, client_state=client)
    return checkpoint_dir(run_dir) / tag


def resolve(resume: str, run_dir) -> tuple[Path, str] | None:
    """(checkpoints dir, tag) to resume from: `auto` = run_dir's latest if any, `never`, or a PATH.

    PATH is a checkpoints dir holding `latest`, or one tag dir inside it (e.g. .../step00000500).
    """
    if resume == "never":
        return None
    if resume == "auto":
        latest = checkpoint_dir(run_dir) / "latest"
        return (latest.parent, latest.read_text().strip()) if latest.is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if _model_states(path) is not None:
        return path.parent, path.name
    raise FileNotFoundError(f"resume={resume}: neither a checkpoints dir with `latest` nor a checkpoint")


def load(engine, where: tuple[Path, str]) -> dict:
    """Collective: restore engine state and this rank's RNG; returns the client state."""
    directory, tag = where
    path, client = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{directory / tag}: DeepSpeed found no checkpoint to load")
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
