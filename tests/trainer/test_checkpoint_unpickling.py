"""A checkpoint from a rented host is data, never code. Its meta.json comes from the same host as its
files, so a payload whose real sha256 and size are written into meta.json passes every sum: only the
unpickler stands between it and the laptop (sampling, evaluation, export) or the next nodes (resume,
and the universal conversion for another world size). Every file is loaded with torch's weights-only
unpickler and three DeepSpeed types allowed; each payload must be refused, naming the file and the
type, and never run (its marker file never appears).

The checkpoints are real ones, written by the trainer in this process (a world of one rank, gloo) for
every preset at every ZeRO stage. The whole table of payloads x file kinds x loaders runs in-process;
each entry point's command runs once per file kind it reads, with one representative payload."""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, free_port, run_train, subprocess_env

from trainer import checksums
from trainer.deepspeed_compat import end_process_group

PRESETS = ("debug", "baby", "shakespeare", "wiki_100", "wiki_full")
SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=null", "model.block_size=16",
         "train.micro_batch=2", "train.grad_accum=1", "train.eval_every=0", "train.sample_tokens=0",
         "data=shakespeare", "data.workers=0", "data.verify=false"]  # each preset's recipe and precision, tiny


class Call:
    """Unpickling this calls func(*args): what a hostile host would put in a checkpoint file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Rebuilt(Call):
    """Unpickling this calls func(*args), then sets `state` on what it returned (pickle's BUILD)."""

    def __init__(self, func, args, state):
        super().__init__(func, args)
        self.state = state

    def __reduce__(self):
        return self.func, self.args, self.state


def _nested(marker: Path):
    """A payload inside a type the allowlist lets through (DeepSpeed's loss scaler)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    scaler = LossScaler(1.0)
    scaler.cur_scale = Call(os.system, (f"touch {marker}",))
    return scaler


PAYLOADS = {
    "os.system": lambda marker: Call(os.system, (f"touch {marker}",)),
    "eval": lambda marker: Call(eval, (f"open({str(marker)!r}, 'w').close()",)),
    "builtins.exec": lambda marker: Call(exec, (f"open({str(marker)!r}, 'w').close()",)),
    "subprocess.Popen": lambda marker: Call(subprocess.Popen, (["touch", str(marker)],)),
    "nested in an allowed type": _nested,
    # what CPython 3.11.0-3.11.4 write for an enum member, pointed at something else
    "getattr beyond an enum's members": lambda marker: Call(getattr, (_loss_scaler(), "__init__")),
}


def _loss_scaler():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    return LossScaler


def test_an_enum_pickled_by_name_as_python_3_11_2_writes_it_loads(tmp_path):
    """Debian 12's python3 (3.11.2, under many GPU images) pickles ZeroStageEnum.optimizer_states as
    getattr(ZeroStageEnum, "optimizer_states"): a node's ZeRO checkpoint holds that, and must load here;
    the same getattr of anything but an allowed enum's member is refused."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from trainer.deepspeed_compat import checkpoint_files_are_data
    from trainer.errors import CheckpointError

    torch.save({"zero_stage": Call(getattr, (ZeroStageEnum, "optimizer_states"))}, tmp_path / "by_name.pt")
    torch.save({"x": Call(getattr, (ZeroStageEnum, "__class__"))}, tmp_path / "other.pt")
    torch.save({"x": Call(getattr, (ZeroStageEnum, "weights", None))}, tmp_path / "three.pt")
    # a member with state: torch's BUILD would set it on the process's one ZeroStageEnum.optimizer_states
    torch.save({"x": Rebuilt(ZeroStageEnum, (1,), {"_value_": 3, "_name_": "weights"})}, tmp_path / "build.pt")
    with checkpoint_files_are_data():
        assert torch.load(tmp_path / "by_name.pt")["zero_stage"] is ZeroStageEnum.optimizer_states
        for name in ("other.pt", "three.pt", "build.pt"):
            with pytest.raises(CheckpointError, match=f"{name}: holds"):
                torch.load(tmp_path / name)
    assert (ZeroStageEnum(1).name, ZeroStageEnum.optimizer_states.value) == ("optimizer_states", 1)


def overrides(preset: str, stage: int, run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """The command line of `preset` at ZeRO `stage`, with AdamW where the preset's Muon runs at ZeRO-0 only
    (what the config error says to do)."""
    muon_refused = stage and preset in ("baby", "shakespeare", "wiki_full")
    return [f"conf={preset}", f"deepspeed=zero{stage}", f"run_dir={run_dir}", f"data.dir={data_dir}", *SMALL,
            *(["train.optimizer=adamw"] if muon_refused else []), *extra]


@functools.cache
def _composed(preset: str, data_dir: Path):
    from launch.cli import CONF_DIR
    from launch.train import load_config
    from trainer.config import register_presets

    register_presets(CONF_DIR)
    return load_config(overrides(preset, 0, Path("unused"), data_dir))


def _config(preset: str, stage: int, run_dir: Path, data_dir: Path, max_steps: int = 1, resume: str = "never"):
    """The preset's config as launch/train.py composes it (once per preset: Hydra takes 0.5 s), at `stage`."""
    cfg = copy.deepcopy(_composed(preset, data_dir))
    cfg.deepspeed.stage, cfg.run_dir, cfg.resume, cfg.train.max_steps = stage, str(run_dir), resume, max_steps
    if stage:
        cfg.train.optimizer = "adamw"
    cfg.validate(1)
    return cfg


@pytest.fixture(scope="module")
def world_of_one():
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               TORCH_EXTENSIONS_DIR=subprocess_env()["TORCH_EXTENSIONS_DIR"])
    saved, threads = {k: os.environ.get(k) for k in env}, torch.get_num_threads()
    os.environ.update(env)
    torch.set_num_threads(1)  # as subprocess_env gives every rank: 2 threads spin against the other worker
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    end_process_group()
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, shakespeare_dir, world_of_one) -> dict[tuple[str, int], Path]:
    """{(preset, stage): its step-1 checkpoint}, written by the trainer in this process: one training
    step and the checkpointer's save, as fit() does at a checkpoint step."""
    from trainer.loop import Trainer

    root, made = tmp_path_factory.mktemp("presets"), {}
    for preset in PRESETS:
        for stage in range(4):
            run_dir = root / f"{preset}-zero{stage}"
            trainer = Trainer(_config(preset, stage, run_dir, shakespeare_dir), 0, 1)
            trainer.train_step()
            made[preset, stage] = trainer.checkpointer.save(1, trainer.loader.state_dict())
            trainer.loader.close()
            trainer.writer.close()
    return made


def _copy(tag_dir: Path, into: Path) -> Path:
    """The checkpoint as the only one of a run dir `into` (with the run's config.yaml, which eval.py reads)."""
    copied = into / "checkpoints" / tag_dir.name
    shutil.copytree(tag_dir, copied)
    (copied.parent / "latest").write_text(tag_dir.name)
    shutil.copy(tag_dir.parent.parent / "config.yaml", into / "config.yaml")
    return copied


def _plant(path: Path, where: tuple, payload) -> None:
    """Put `payload` at key path `where` inside the pickled file (the whole file when `where` is empty),
    then write the file's real sha256 and size into meta.json, as the host that sent it would."""
    if where:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file
        inner = state
        for key in where[:-1]:
            inner = inner[key] if key != "*" else next(iter(inner.values()))
        last = where[-1] if where[-1] != "*" else next(iter(inner))
        inner[last] = payload
    else:
        state = {"param": payload}
    torch.save(state, path)
    meta_path = path.parent / checksums.META
    if meta_path.is_file() and path.name in json.loads(meta_path.read_text())["files"]:
        meta = json.loads(meta_path.read_text())
        meta["files"][path.name] = [{"sha256": checksums.sha256_file(path), "bytes": path.stat().st_size}]
        meta_path.write_text(json.dumps(meta))


def _model_states(stage: int) -> str:
    return "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"


def _optim(stage: int, tag_dir: Path) -> str:
    return next(p.name for p in tag_dir.glob("*optim_states.pt"))


# where each file kind's payload goes: (file, key path); "*" is the first key
def file_kinds(stage: int, optimizer: str, tag_dir: Path) -> dict[str, tuple[str, tuple]]:
    states = _model_states(stage)
    kinds = {"client state (rng)": (states, ("rng",)), "loader state": (states, ("loader", "consumed"))}
    if stage < 3:
        kinds["model states (weights)"] = (states, ("module", "*"))
    if stage == 0:
        moment = "momentum_buffer" if optimizer == "muon" else "exp_avg"  # the first tensor's: Muon's is a matrix
        kinds[f"{optimizer} state"] = (states, ("optimizer", "state", "*", moment))
    else:
        kinds["ZeRO optimizer partition"] = (_optim(stage, tag_dir), ("optimizer_state_dict", "*"))
    return kinds


def universal_kinds(stage: int) -> dict[str, tuple[str, tuple]]:
    """The files load_universal reads from the conversion in `universal/`."""
    return {"universal fragment": ("universal/zero/blocks.0.attn.q.weight/exp_avg.pt", ()),
            "universal optimizer state": ("universal/zero/optimizer_state.pt", ("*",)),
            "universal model states": (f"universal/{_model_states(stage)}", ("rng",))}


def test_no_checkpoint_of_any_preset_at_any_zero_stage_is_refused(checkpoints, tmp_path):
    """Every file of every preset's checkpoint at every stage, and of each ZeRO 1-3 checkpoint's universal
    conversion, loads through the weights-only unpickler with the allowlist, and every checkpoint loads
    for sampling; the fetch bound holds each file, and not one twice its size. (DeepSpeed's own loads of
    these files go through the same unpickler: the fuzz test below resumes untouched checkpoints.)"""
    from trainer.checkpoint import load_for_inference
    from trainer.checksums import size_bounds
    from trainer.deepspeed_compat import checkpoint_files_are_data, ds_to_universal

    loaded, sizes = 0, []
    for (preset, stage), source in checkpoints.items():
        tag_dir = _copy(source, tmp_path / f"{preset}-zero{stage}")
        meta = checksums.read_meta(tag_dir)
        bounds = size_bounds(meta["model_config"], meta["world_size"], meta["zero_stage"], len(meta["vocab"]),
                             meta["precision"])
        for name in meta["files"]:
            size = (tag_dir / name).stat().st_size
            assert size <= bounds.of(name) < 2 * size, (preset, stage, name, size, bounds)
            sizes.append(bounds.of(name) / size)
        assert (tag_dir / checksums.META).stat().st_size <= bounds.meta
        assert sum((tag_dir / n).stat().st_size for n in [*meta["files"], checksums.META]) <= bounds.total
        if stage:
            ds_to_universal(tag_dir, tag_dir / "universal")
        with checkpoint_files_are_data():
            for path in sorted(tag_dir.rglob("*.pt")):
                torch.load(path, map_location="cpu")
                loaded += 1
        load_for_inference(tag_dir)
    print(f"our checkpoints: {len(checkpoints)} (5 presets x 4 stages), {loaded} files loaded, 0 refused; "
          f"fetch bounds {min(sizes):.2f}-{max(sizes):.2f} x the file")


def _engine(preset: str, stage: int, run_dir: Path, data_dir: Path, load_universal: bool = False):
    """The engine a resumed run loads into (the trainer's own, for a run of the same config)."""
    from model import GPT
    from trainer.engine import build_engine

    cfg = _config(preset, stage, run_dir, data_dir)
    cfg.model.vocab_size = len(json.loads((data_dir / "manifest.json").read_text())["vocab"])
    torch.manual_seed(cfg.train.seed)
    return build_engine(GPT(cfg.model), cfg, 1, load_universal=load_universal)


def _loaders(checkpoints, data_dir: Path, tmp_path: Path) -> list[tuple[str, Path, dict, object]]:
    """(entry point, checkpoint, the file kinds it reads there, its loader) for the debug preset at each
    stage, Muon (baby, ZeRO-0) and bf16 (wiki_full, ZeRO-2); each loader loads the untouched checkpoint."""
    from trainer.checkpoint import Checkpoint, load, load_for_inference
    from trainer.deepspeed_compat import ds_to_universal

    cases = []
    sources = [("debug", 0), ("debug", 1), ("debug", 2), ("debug", 3), ("baby", 0), ("wiki_full", 2)]
    for preset, stage in sources:
        source, optimizer = checkpoints[preset, stage], "muon" if (preset, stage) == ("baby", 0) else "adamw"
        label = f"{preset} ZeRO-{stage} {optimizer}"
        kinds = file_kinds(stage, optimizer, source)
        engine = _engine(preset, stage, tmp_path / "runs" / label, data_dir)
        cases.append((f"resume, {label}", source, kinds,
                      lambda tag_dir, engine=engine: load(engine, Checkpoint(tag_dir.parent, tag_dir.name))))
        cases.append((f"sample/eval/export, {label}", source,
                      {k: v for k, v in kinds.items() if stage == 3 or "optimizer partition" not in k},
                      load_for_inference))
        if stage:
            cases.append((f"universal conversion, {label}", source, kinds,
                          lambda tag_dir: ds_to_universal(tag_dir, tag_dir / "universal")))
            converted = _copy(source, tmp_path / "converted" / label)
            ds_to_universal(converted, converted / "universal")
            engine = _engine(preset, stage, tmp_path / "runs" / f"{label} universal", data_dir, load_universal=True)
            cases.append((f"load_universal, {label}", converted,
                          universal_kinds(stage),
                          lambda tag_dir, engine=engine: load(engine, Checkpoint(tag_dir, "universal"))))
    for label, source, _, loader in cases:
        loader(_copy(source, tmp_path / "untouched" / label))  # ours load: the allowlist is enough
    return cases


def test_every_payload_in_every_file_kind_is_refused_by_every_loader_and_none_runs(checkpoints, shakespeare_dir,
                                                                                  tmp_path):
    """The fuzz table, in-process: payload kinds x file kinds x the loaders each entry point uses
    (resume's DeepSpeed load at ZeRO 0-3, the universal conversion, the universal load, and the
    inference load that sample.py, eval.py and export.py share)."""
    from trainer.errors import CheckpointError

    tried, ran, wrong, kinds = 0, [], [], set()
    for label, source, file_kinds_read, loader in _loaders(checkpoints, shakespeare_dir, tmp_path):
        for kind, (name, where) in file_kinds_read.items():
            kinds.add(kind)
            for payload_name, make in PAYLOADS.items():
                trial = tmp_path / "trials" / str(tried)
                tag_dir, marker = _copy(source, trial), trial / "PAYLOAD_RAN"
                _plant(tag_dir / name, where, make(marker))
                checksums.verify(tag_dir)  # the sums pass: only the unpickler can refuse it
                try:
                    loader(tag_dir)
                    message = "loaded"
                except CheckpointError as refused:
                    message = str(refused)
                tried += 1
                if marker.exists():
                    ran.append((label, kind, payload_name))
                if "\n" in message or Path(name).name not in message or " holds " not in message:
                    wrong.append((label, kind, payload_name, message[:300]))
    print(f"payloads tried: {tried} ({len(PAYLOADS)} payloads x {len(kinds)} file kinds x the loaders reading "
          f"each), refused: {tried - len(wrong)}, ran: {len(ran)}")
    assert ran == [] and wrong == []
    assert tried >= 300


# --- each entry point's command, once per file kind it reads, with a representative payload ---

def _refused_one_line(done: subprocess.CompletedProcess, name: str, marker: Path) -> None:
    assert not marker.exists(), f"the payload ran:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.returncode != 0, done.stdout[-2000:]
    refusals = [line for line in done.stderr.splitlines() if "refusing to load it" in line]
    assert refusals, done.stderr[-3000:]
    assert name in refusals[0] and "holds posix.system" in refusals[0], refusals[0]


def _planted_copy(checkpoints, stage: int, kind: str, tmp_path: Path) -> tuple[Path, str, Path]:
    source = checkpoints["debug", stage]
    tag_dir, marker = _copy(source, tmp_path), tmp_path / "PAYLOAD_RAN"
    name, where = file_kinds(stage, "adamw", source)[kind]
    _plant(tag_dir / name, where, PAYLOADS["os.system"](marker))
    return tag_dir, name, marker


@pytest.mark.processes
@pytest.mark.parametrize("stage, kind", [  # ZeRO-3's per-rank model states: export.py below, and the table
    (0, "loader state"), (2, "ZeRO optimizer partition"), (3, "ZeRO optimizer partition")])
def test_resume_refuses_a_payload_in_each_file_it_reads(checkpoints, shakespeare_dir, tmp_path, stage, kind):
    """launch/train.py resume=PATH at the checkpoint's world size: DeepSpeed's own load reads the file."""
    tag_dir, name, marker = _planted_copy(checkpoints, stage, kind, tmp_path)
    done = run_train(overrides("debug", stage, tmp_path / "resumed", shakespeare_dir, "train.max_steps=2",
                               f"resume={tag_dir}"), check=False)
    _refused_one_line(done, name, marker)


@pytest.mark.processes
def test_resume_at_another_world_size_refuses_a_payload_in_the_conversion(checkpoints, shakespeare_dir, tmp_path):
    """A 1-rank ZeRO-2 checkpoint resumed by 2 ranks: ds_to_universal reads the planted file first."""
    tag_dir, name, marker = _planted_copy(checkpoints, 2, "ZeRO optimizer partition", tmp_path)
    done = run_train(overrides("debug", 2, tmp_path / "resumed", shakespeare_dir, "train.max_steps=2",
                               f"resume={tag_dir}"), ranks=2, check=False)
    _refused_one_line(done, name, marker)
    assert not (tag_dir / "universal").exists()


@pytest.mark.processes
@pytest.mark.parametrize("command, stage, kind", [  # one loader: each reads one kind of file here
    ("sample.py", 3, "ZeRO optimizer partition"), ("eval.py", 0, "model states (weights)"),
    ("export.py", 3, "client state (rng)")])
def test_sample_eval_and_export_refuse_a_payload_in_each_file_they_read(checkpoints, tmp_path, command, stage, kind):
    """The three commands share one loader (load_for_inference, zero_to_fp32 at ZeRO-3): each command
    meets a payload in another kind of file."""
    tag_dir, name, marker = _planted_copy(checkpoints, stage, kind, tmp_path)
    args = [f"run_dir={tag_dir.parent.parent}", *({"sample.py": ["max_new_tokens=5"], "eval.py": ["max_batches=1"],
                                                    "export.py": [f"out={tmp_path / 'hf'}"]}[command])]
    done = subprocess.run([sys.executable, f"launch/{command}", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    _refused_one_line(done, name, marker)
