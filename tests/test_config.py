"""Presets and config errors, through the real entry point (no process group is started)."""
import math
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, subprocess_env
from trainer.config import Config, ConfigError, to_config
from trainer.schedule import accum_at, lr_at, planned_tokens


def _train_py(*args):
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def _resolved(*args) -> dict:
    proc = _train_py(*args, "--cfg", "job", "--resolve")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_baby_preset_is_the_documented_cpu_recipe():
    cfg = _resolved("conf=baby")
    assert {k: cfg["model"][k] for k in ("n_layer", "n_head", "d_model", "block_size", "dropout")} == \
        {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 64, "dropout": 0.0}
    t = cfg["train"]
    assert (t["micro_batch"], t["max_steps"], t["lr"], t["min_lr"]) == (12, 2000, 1e-3, 1e-4)
    assert cfg["run_dir"] == "outputs/baby" and cfg["deepspeed"]["stage"] == 0


def test_shakespeare_preset_and_command_line_overrides():
    cfg = _resolved("conf=shakespeare", "deepspeed=zero3", "precision=bf16", "model.n_layer=8")
    assert (cfg["model"]["n_layer"], cfg["model"]["n_head"], cfg["model"]["d_model"]) == (8, 6, 384)
    assert (cfg["model"]["block_size"], cfg["model"]["dropout"], cfg["train"]["micro_batch"]) == (256, 0.2, 64)
    assert cfg["train"]["max_steps"] == 5000
    assert cfg["deepspeed"]["stage"] == 3 and cfg["precision"] == "bf16"
    to_config(cfg)  # valid


@pytest.mark.parametrize("args, message", [
    (["model.n_head=3"], "model.d_model=32 is not divisible by model.n_head=3"),
    (["model.n_kv_head=3", "model.n_head=4", "model.d_model=32"],
     "model.n_head=4 is not divisible by model.n_kv_head=3"),
    (["precision=fp16"], "precision='fp16': choose fp32 or bf16"),
    (["train.micro_batch=0"], "train.micro_batch must be >= 1"),
    (["data.source=web"], "data.source='web'"),
])
def test_bad_values_are_one_line_errors_naming_the_key(args, message):
    proc = _train_py("conf=debug", *args)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: ") and message in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["conf=nope"], "Could not find 'conf/nope'"),
    (["model.n_layr=2"], "n_layr"),
    (["train.max_steps=many"], "train.max_steps"),
])
def test_unknown_presets_keys_and_wrong_types_are_rejected(args, message):
    proc = _train_py(*args)
    assert proc.returncode == 1 and message in proc.stderr


def test_typed_schema_rejects_wrong_types_in_code():
    with pytest.raises(ConfigError, match="train.lr"):
        to_config({"train": {"lr": "fast"}})
    assert isinstance(to_config({}), Config)


def test_lr_schedule_in_tokens_is_linear_warmup_then_cosine_to_min_then_flat():
    t = to_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_tokens": 1000, "decay_tokens": 11000}}).train
    assert lr_at(0, t, 99) == pytest.approx(1 / 1000) and lr_at(999, t, 99) == pytest.approx(1.0)
    assert lr_at(1000, t, 99) == pytest.approx(1.0)
    assert lr_at(6000, t, 99) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(8500, t, 99) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(11000, t, 99) == pytest.approx(0.1) and lr_at(10**9, t, 99) == pytest.approx(0.1)
    default_end = to_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_tokens": 1000}}).train
    assert lr_at(6000, default_end, total_tokens=11000) == pytest.approx(0.55)  # decays to the run's end


def test_schedule_does_not_depend_on_world_size_or_micro_batch():
    ramp = to_config({"train": {"grad_accum": 8, "batch_ramp_tokens": 10_000, "batch_start_tokens": 1000}}).train
    assert accum_at(0, ramp, 1000) == 1 and accum_at(10_000, ramp, 1000) == 8
    # the same global batch in tokens whether a micro-step is 1000 tokens (1 rank) or 2000 (2 ranks)
    ramp2 = to_config({"train": {"grad_accum": 4, "batch_ramp_tokens": 10_000, "batch_start_tokens": 1000}}).train
    for tokens in (0, 2500, 5000, 7500, 10_000):
        assert abs(accum_at(tokens, ramp, 1000) * 1000 - accum_at(tokens, ramp2, 2000) * 2000) <= 1000


def test_batch_ramp_grows_linearly_then_stays_full():
    t = to_config({"train": {"grad_accum": 8, "batch_ramp_tokens": 70_000, "batch_start_tokens": 1000}}).train
    micro = 1000  # tokens of one micro-step on all ranks
    for tokens in range(0, 80_000, 5000):
        target = 1000 + (8000 - 1000) * tokens / 70_000 if tokens < 70_000 else 8000
        assert accum_at(tokens, t, micro) == max(1, min(8, round(target / micro)))
    flat = to_config({"train": {"grad_accum": 8, "max_steps": 10}}).train
    assert planned_tokens(flat, micro) == 80_000
    # by hand: targets 1000, 1750, 3250 tokens -> 1, 2, 3 micro-steps, then the full 4 twice
    small = to_config({"train": {"grad_accum": 4, "max_steps": 5, "batch_ramp_tokens": 4000,
                                 "batch_start_tokens": 1000}}).train
    assert planned_tokens(small, micro) == 1000 + 2000 + 3000 + 4000 + 4000


def test_text_source_needs_a_path():
    proc = _train_py("conf=debug", "data=text")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "config error: data.path is required for data.source=text (a file or a folder)")
