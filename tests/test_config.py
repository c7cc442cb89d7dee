"""Presets and config errors, through the real entry point (no process group is started)."""
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, subprocess_env
from trainer.config import Config, ConfigError, to_config
from trainer.schedule import lr_at


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
    (["model.n_kv_head=3", "model.n_head=4", "model.d_model=32"], "model.n_head=4 is not divisible by model.n_kv_head=3"),
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


def test_lr_schedule_is_linear_warmup_then_cosine_to_min_then_flat():
    t = to_config({"train": {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "max_steps": 110}}).train
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)
