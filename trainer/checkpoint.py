"""Checkpoints saved by every rank through DeepSpeed, with what resuming exactly needs beside them.

Nodes share no disk. Each node keeps its own ranks' files (and, at ZeRO 0-2, its own copy of the
model states: DeepSpeed's `use_node_local_storage`), and its own `latest` and meta.json. meta.json
is the same on every node: it lists every file of the whole checkpoint with its sha256, so a rank
checks its files before DeepSpeed unpickles them, and a machine that gathered every node's files
can tell the checkpoint is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data.tokenizer import TOKENIZERS
from model import GPT, GPTConfig

from . import checksums, rundir
from .checksums import META, ChecksumError
from .deepspeed_compat import checkpoint_files_are_data
from .errors import CheckpointError, RunError

UNIVERSAL = "universal"  # inside a checkpoint: its conversion for resuming at another world size
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# what every meta.json of this trainer holds (checked before anything is read from the rest)
REQUIRED_META = ("model_config", "vocab", "tokenizer", "lowercase", "zero_stage", "train_optimizer", "precision",
                 "world_size", "step")
RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")  # a file of one data-parallel rank's partition


@dataclass(frozen=True)
class Checkpoint:
    directory: Path  # the checkpoints dir, holding `latest`
    tag: str         # e.g. step00000500

    @property
    def path(self) -> Path:
        return self.directory / self.tag


def rng_state() -> dict:
    """This rank's generators: the CPU's and, on a GPU, its own device's (not every visible GPU's,
    which a node showing fewer GPUs could not restore)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(directory: Path) -> str | None:
    try:
        return rundir.read_latest(directory)
    except rundir.RunDirError as e:
        raise CheckpointError(str(e)) from None


def _prune(directory: Path, keep: int, current: str) -> None:
    """Delete checkpoints older than the newest `keep` (only ever called once `current` is complete
    on every node)."""
    if keep <= 0:
        return
    for old in [tag for tag in rundir.tags(directory) if tag <= current][:-keep]:
        shutil.rmtree(directory / old, ignore_errors=True)


def _all_ranks(value) -> list:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _first_error(results: list, what: str) -> None:
    for rank, error in enumerate(results):
        if error:
            raise CheckpointError(f"{what}: rank {rank}: {error}")


class Checkpointer:
    """Built once per run: saves at train.ckpt_every and at the last step, keeping train.keep_ckpts.

    writes_files: this rank writes its disk's meta.json and `latest`, and prunes (one rank per disk).
    """

    def __init__(self, engine, run_dir, cfg, tokenizer, writes_files: bool, identity: dict | None = None):
        self.engine, self.directory, self.writes_files = engine, rundir.checkpoints(run_dir), writes_files
        self.every, self.keep, self.max_steps = cfg.train.ckpt_every, cfg.train.keep_ckpts, cfg.train.max_steps
        # client state: its keys share DeepSpeed's dict in the model states file (not "optimizer")
        self.about = {"model_config": asdict(cfg.model), "vocab": tokenizer.vocab, "tokenizer": tokenizer.kind,
                      "lowercase": tokenizer.lowercase,
                      "zero_stage": cfg.deepspeed.stage, "train_optimizer": cfg.train.optimizer,
                      "precision": cfg.precision, **(identity or {})}  # precision: for checksums.size_bounds

    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == self.max_steps

    def latest(self) -> str | None:
        return latest_tag(self.directory)

    def save(self, step: int, loader_state: dict) -> Path:
        """Collective: call on every rank. Each node's `latest` moves only after every rank of every
        node has written its files, and old checkpoints go only once every node's `latest` has moved.
        Each rank's RNG state travels in the client state of the model-states files."""
        directory, tag = self.directory, rundir.step_tag(step)
        client = {"step": step, "loader": loader_state, "rng": _all_ranks(rng_state()),
                  "world_size": dist.get_world_size(), **self.about}
        share, error, previous = None, None, None
        try:  # a full disk, a quota, a vanished mount
            previous = latest_tag(directory)
            self.engine.save_checkpoint(str(directory), tag=tag, client_state=client, save_latest=False)
            if self.writes_files:
                share = checksums.hash_files(directory / tag)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        what = (f"saving checkpoint {directory / tag} failed at step {step} (`latest` still names "
                f"{previous or 'no checkpoint'})")
        results = _all_ranks((share, error))  # also the barrier: every rank's files are written
        _first_error([e for _, e in results], what)
        try:
            files = checksums.merge([s for s, _ in results if s is not None])
        except ChecksumError as e:
            raise CheckpointError(f"{what}: {e}") from None
        error = None
        if self.writes_files:
            meta = {k: v for k, v in client.items() if k not in ("rng", "loader")} | {"files": files}
            try:
                rundir.atomic_write(directory / tag / META, json.dumps(meta, indent=1))
                rundir.atomic_write(directory / rundir.LATEST, tag)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        _first_error(_all_ranks(error), what)  # every node's `latest` has moved
        if self.writes_files:
            _prune(directory, self.keep, tag)
        return directory / tag


def resolve(resume: str, run_dir) -> Checkpoint | None:
    """The checkpoint to resume from: `auto` = run_dir's latest if any, `never`, or a PATH.

    PATH is a checkpoints dir holding `latest`, or one tag dir inside it (e.g. .../step00000500).
    """
    if resume == "never":
        return None
    if resume == "auto":
        tag = latest_tag(rundir.checkpoints(run_dir))
        return Checkpoint(rundir.checkpoints(run_dir), tag) if tag else None
    path = Path(resume)
    if (path / rundir.LATEST).is_file():
        return Checkpoint(path, latest_tag(path))
    if (path / META).is_file():
        return Checkpoint(path.parent, path.name)
    raise FileNotFoundError(f"resume={resume}: neither a checkpoints dir with `latest` nor a checkpoint")


def locate(path) -> Checkpoint | None:
    """The checkpoint a user names by a run dir (its latest), a checkpoints dir or one checkpoint dir."""
    path = Path(path)
    try:
        return resolve("auto", path) if rundir.checkpoints(path).is_dir() else resolve(str(path), path)
    except FileNotFoundError:
        return None


def read_meta(ckpt: Checkpoint) -> dict:
    """The checkpoint's meta.json, refused unless it holds every field this trainer writes (one format:
    no defaults stand in for a field a checkpoint lacks)."""
    try:
        meta = checksums.read_meta(ckpt.path)
    except ChecksumError as e:
        raise CheckpointError(str(e)) from None
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"{ckpt.path / META}: no {', '.join(missing)} (not a checkpoint of this trainer's "
                              "format); resume=never starts over, in a new run_dir")
    wrong = _wrong_meta_field(meta)
    if wrong:
        raise CheckpointError(f"{ckpt.path / META}: {wrong} (not a checkpoint this trainer wrote); nothing was loaded")
    return meta


def _wrong_meta_field(meta: dict) -> str | None:
    """What is wrong with meta.json's own fields (they come from another machine), or None: each of the
    type this trainer writes, and a model_config whose parameters its files could hold."""
    def counted(value, low: int, high: int | None = None) -> bool:
        return type(value) is int and value >= low and (high is None or value <= high)

    checks = {"vocab": isinstance(meta["vocab"], str) and meta["vocab"] != "",
              "tokenizer": meta["tokenizer"] in TOKENIZERS, "lowercase": type(meta["lowercase"]) is bool,
              "zero_stage": counted(meta["zero_stage"], 0, 3), "world_size": counted(meta["world_size"], 1),
              "step": counted(meta["step"], 0), "train_optimizer": meta["train_optimizer"] in ("adamw", "muon"),
              "precision": isinstance(meta["precision"], str)}
    bad = next((key for key, ok in checks.items() if not ok), None)
    if bad:
        return f"{bad} is {str(meta[bad])[:60]!r}"
    model = meta["model_config"]
    if not isinstance(model, dict) or model.keys() != asdict(GPTConfig()).keys():
        return "its model_config does not hold this trainer's model settings"
    try:
        GPTConfig(**model).validate()
        elements = checksums._parameters(model, len(meta["vocab"]))[0]
    except (TypeError, ValueError) as e:
        return f"model_config: {str(e)[:200]}"
    stored = sum(copy["bytes"] for copies in meta["files"].values() for copy in copies)
    if elements * 2 > stored:  # at least 2 bytes a weight (bf16), whatever the stage and world size
        return f"model_config describes {elements:,} parameters, more than its {stored:,} bytes of files hold"
    return None


def _another_run(ckpt: Checkpoint, differs: str, weights_fit: bool = True) -> CheckpointError:
    """A checkpoint of another run: one line saying what differs and the ways on."""
    run = ckpt.directory.parent
    ways = (f"train in a new run_dir, or start from its weights on this data with run_dir=NEW init_from={run}"
            if weights_fit else "train in a new run_dir")
    return CheckpointError(f"{run} holds another run ({differs}); nothing was written: {ways}")


def check_compatible(ckpt: Checkpoint, vocab: str, model_cfg: GPTConfig, zero_stage: int,
                     optimizer: str = "adamw", identity: dict | None = None) -> dict:
    """The checkpoint's meta.json, after checking it belongs to this run (identity: the data's
    manifest digest and the preset, when the checkpoint records them) and fits its model and ZeRO
    stage (before any weights load). Another world size is fine: see needs_universal."""
    meta = read_meta(ckpt)
    for key, what in (("data_digest", "data"), ("preset", "preset")):
        if identity and meta.get(key) != identity[key]:
            shown = "data_dir" if key == "data_digest" else key
            raise _another_run(ckpt, f"{what} differs: checkpoint {shown}={meta.get(shown)}, this run "
                                     f"{shown}={identity[shown]}")
    if meta["zero_stage"] != zero_stage:
        raise CheckpointError(f"{ckpt.path}: saved with ZeRO-{meta['zero_stage']}, this run uses "
                              f"deepspeed=zero{zero_stage}; resume with deepspeed=zero{meta['zero_stage']}")
    saved_with = meta["train_optimizer"]
    if saved_with != optimizer:
        raise CheckpointError(f"{ckpt.path}: saved with train.optimizer={saved_with}, this run uses "
                              f"train.optimizer={optimizer}; resume with train.optimizer={saved_with}")
    if meta["vocab"] != vocab:
        raise _another_run(ckpt, f"vocabulary differs: checkpoint {len(meta['vocab'])} chars, this run's "
                                 f"data {len(vocab)}", weights_fit=False)
    ours, theirs = asdict(model_cfg), meta["model_config"]
    differ = [f"model.{k}: checkpoint {v!r}, config {ours.get(k)!r}" for k, v in theirs.items()
              if ours.get(k) != v and k not in ("dropout", "attn")]
    if differ:
        raise _another_run(ckpt, f"the model differs: {'; '.join(differ)}", weights_fit=False)
    return meta


def needs_universal(meta: dict, world_size: int) -> bool:
    """ZeRO-1/2/3 optimizer state is partitioned by rank: at another world size it is loaded from a
    universal (per-parameter) conversion instead. ZeRO-0 state is whole on every rank."""
    return meta["zero_stage"] > 0 and meta["world_size"] != world_size


def files_for_rank(meta: dict, rank: int) -> list[str]:
    """The files of the checkpoint that `rank` reads at the same world size: the shared model states
    and its own partition's files."""
    return [name for name in meta["files"]
            if (m := RANK_FILE.search(name)) is None or int(m.group(1)) == rank]


def plan_resume(resume: str, run_dir, vocab: str, model_cfg: GPTConfig, zero_stage: int, node, writer: bool,
                optimizer: str = "adamw", identity: dict | None = None) -> tuple[Checkpoint, dict] | None:
    """Collective. Rank 0 alone decides what to resume (nodes' disks may disagree) and checks that it
    fits this run; every rank then checks its own files of that checkpoint against rank 0's meta.json
    on its own disk, and all agree before anything is loaded. Returns (checkpoint, meta) or None.
    writer: this rank converts its disk's copy for another world size, so it needs every file."""
    decision = [None]
    if dist.get_rank() == 0:
        try:
            ckpt = resolve(resume, run_dir)
            decision = [(str(ckpt.directory), ckpt.tag, check_compatible(ckpt, vocab, model_cfg, zero_stage, optimizer,
                                                                            identity))
                        if ckpt else None]
        except Exception as e:  # a bad file must fail every rank, not leave the others waiting
            decision = [str(e) if isinstance(e, (CheckpointError, FileNotFoundError))
                        else f"resume={resume}: {type(e).__name__}: {str(e)[:300]}"]
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        raise RunError(decision[0])
    if decision[0] is None:
        return None
    directory, tag, meta = decision[0]
    ckpt, rank = Checkpoint(Path(directory), tag), dist.get_rank()
    # the files shared by a disk's ranks (the model states) are checked once, by its writer
    if not needs_universal(meta, dist.get_world_size()):
        names = [n for n in files_for_rank(meta, rank) if writer or RANK_FILE.search(n)]
    else:  # the writer converts this disk's copy: it needs every file of every rank
        names = None if writer else []
    error = None
    try:
        checksums.verify(ckpt.path, names, meta)
    except (ChecksumError, OSError) as e:
        error = f"node {node.index}, rank {rank}: {e}"
    from .distributed import broadcast_error  # DeepSpeed: not for sample.py and eval.py

    broadcast_error(error)
    return ckpt, meta


def to_universal(ckpt: Checkpoint, writer: bool) -> Checkpoint:
    """Collective. One rank per disk (`writer`) converts its copy of the checkpoint (every rank's files,
    checked, must be on that disk) with DeepSpeed's ds_to_universal into the `universal` folder inside
    it, while the others wait; returns where to load from. A conversion found there is never reused:
    its files have no sums, and DeepSpeed unpickles them."""
    out, error = ckpt.path / UNIVERSAL, None
    if writer:
        try:
            _remove(out)
            tmp = Path(tempfile.mkdtemp(prefix=f"{UNIVERSAL}.tmp", dir=ckpt.path))  # a fresh, private name
            # DeepSpeed's conversion, every file it reads unpickled as data (the sums only say the files
            # are those meta.json lists, and meta.json came from the same host)
            cmd = [sys.executable, "-m", "trainer.deepspeed_compat", str(ckpt.path), str(tmp)]
            print(f"{ckpt.path}: saved at another world size; converting to a universal checkpoint in {out}",
                  flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env=_this_checkout_first())
            if done.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                last = (done.stderr.strip().splitlines() or [""])[-1]
                error = (last.removeprefix("refused: ") if last.startswith("refused: ") else  # one line: file, type
                         f"{ckpt.path}: conversion to a universal checkpoint failed: {done.stderr.strip()[-800:]}")
            else:
                os.replace(tmp, out)  # complete or absent, never half-written
        except Exception as e:  # reported on every rank, not left for the others to wait on
            error = f"{ckpt.path}: conversion to a universal checkpoint failed: {type(e).__name__}: {e}"
    from .distributed import broadcast_error

    broadcast_error(error, patient=True)
    return Checkpoint(ckpt.path, UNIVERSAL)


def _this_checkout_first() -> dict:
    """The environment with this checkout first on PYTHONPATH: `-m trainer...` then runs this trainer,
    whatever the working directory or another editable install."""
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def load(engine, ckpt: Checkpoint) -> dict:
    """Collective: restore engine state and this rank's RNG; returns the client state."""
    try:
        with checkpoint_files_are_data():  # DeepSpeed's loads too: the sums are only as good as meta.json
            path, client = engine.load_checkpoint(str(ckpt.directory), tag=ckpt.tag)
    except KeyError as e:   # a state this version's DeepSpeed engine does not hold: not resumable here
        raise CheckpointError(f"{ckpt.path}: its engine state has no {e} that this run's engine needs "
                              "(another precision, optimizer or DeepSpeed version wrote it, or a bug: report it "
                              "if this trainer wrote it as it is now); resume=never starts over, in a new "
                              "run_dir") from None
    if path is None:
        raise CheckpointError(f"{ckpt.path}: DeepSpeed found no checkpoint to load")
    if client.get("world_size") == dist.get_world_size():
        set_rng_state(client["rng"][dist.get_rank()])
    else:  # another world size: fresh, but still deterministic, per-rank streams
        torch.manual_seed(1_000_003 * client["step"] + dist.get_rank())
    return client


def load_for_inference(path) -> tuple[GPT, dict]:
    """A plain fp32 GPT (and the client state) from a run dir, a checkpoints dir or one checkpoint.

    Every file of the checkpoint is first checked against its meta.json (a checkpoint is whole or
    refused); every file loads with torch's weights-only unpickler, so it can hold no code."""
    ckpt = locate(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no checkpoint found (expected {rundir.checkpoints(path)}/latest)")
    meta = read_meta(ckpt)
    client = {k: meta[k] for k in ("model_config", "vocab", "tokenizer", "lowercase", "zero_stage", "step")}
    zero3 = client["zero_stage"] == 3  # its parameters live in every rank's partitioned files
    states = next((n for n in MODEL_STATES if n in meta["files"]), None)
    if states is None:
        raise CheckpointError(f"{ckpt.path / META}: lists no {' or '.join(MODEL_STATES)}")
    try:
        checksums.verify(ckpt.path, None, meta)
    except ChecksumError as e:
        raise CheckpointError(str(e)) from None
    if zero3:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's chatter: keep stdout for results
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with checkpoint_files_are_data():
                weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.directory), tag=ckpt.tag)
    else:
        with checkpoint_files_are_data():
            weights = torch.load(ckpt.path / states, map_location="cpu")["module"]
    model = GPT(GPTConfig(**client["model_config"]))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    missing = set(model.state_dict()) - set(weights) - {"head.weight"}
    if missing:
        raise CheckpointError(f"{ckpt.path}: checkpoint lacks weights {sorted(missing)[:5]}")
    return model.eval(), client
