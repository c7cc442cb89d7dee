"""Weights & Biases beside TensorBoard: the real wandb package, offline (no network), read back from
the run files it wrote; a wandb server that cannot be reached is a closed port on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, debug_overrides, free_port, read_metrics, subprocess_env, train_command

from wandb_records import config, history

KEY = "k" * 8 + "SENTINEL-API-KEY-NEVER-WRITTEN" + "0" * 2  # 40 characters, as wandb's keys are


def _train(overrides, ranks=1, env=None, **popen):
    return subprocess.Popen(train_command(overrides, ranks, free_port()), cwd=ROOT,
                            env={**subprocess_env(), "WANDB_API_KEY": KEY, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)


def _runs(run_dir: Path) -> list[Path]:
    """Each attempt's wandb run file, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _tagged(entry: dict) -> dict:
    from trainer.trackers import TAGS

    return {TAGS[k]: v for k, v in entry.items() if k in TAGS and v is not None}


def _assert_no_key_anywhere(run_dir: Path, *outputs: str):
    for text in outputs:
        assert KEY not in text
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.processes
def test_offline_wandb_holds_every_logged_scalar_the_config_and_samples(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    proc = _train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=12", "train.eval_every=6",
                                  "train.ckpt_every=0", "train.cost_per_hour=2.5", "tracking.wandb=true",
                                  "tracking.mode=offline", "tracking.tags=[cpu,test]"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    runs = _runs(run_dir)
    assert len(runs) == 1
    logged = history(runs[0])
    for entry in read_metrics(run_dir):  # point for point, under TensorBoard's names
        row = logged[entry["step"]]
        for tag, value in _tagged(entry).items():
            assert row[tag] == pytest.approx(value, rel=1e-12), (entry["step"], tag)
    assert sorted(logged) == list(range(1, 13))
    assert {"cost/usd_per_hour", "cost/tokens_per_usd", "cost/usd_spent", "val/bpc"} <= set(logged[12])
    assert 0 < logged[12]["cost/usd_spent"] < 2.5 * 300 / 3600
    assert logged[12]["samples/_type"] == "table-file" and logged[12]["samples/nrows"] == 2  # steps 6 and 12
    facts = config(runs[0])
    assert facts["world_size"] == 1 and facts["parameters"] > 0 and facts["mfu_peak_flops_per_device"] > 0
    assert facts["config"]["model"]["n_layer"] == 2 and facts["config"]["tracking"]["tags"] == ["cpu", "test"]
    assert json.loads((run_dir / "wandb_run.json").read_text())["id"] in runs[0].name
    _assert_no_key_anywhere(run_dir, out, err)


@pytest.mark.processes
def test_kill_9_then_resume_continues_one_wandb_curve_from_the_checkpoint_with_one_writer(tmp_path, shakespeare_dir):
    """2 ranks, a checkpoint every 40 steps; kill -9 of the whole job once wandb's file holds points
    past the newest checkpoint (wandb writes its file in 32 KiB blocks). resume=auto rewinds the same
    wandb run to the checkpoint (resume_from), so those points never join the curve."""
    run_dir = tmp_path / "run"
    args = debug_overrides(shakespeare_dir, run_dir, "train.max_steps=400", "train.ckpt_every=40",
                           "train.eval_every=0", "train.sample_tokens=0", "tracking.wandb=true",
                           "tracking.mode=offline")
    first = _train(args, ranks=2)

    def past_the_checkpoint() -> int | None:
        latest = run_dir / "checkpoints" / "latest"
        runs = _runs(run_dir)
        if not (latest.exists() and runs):
            return None
        logged = max(history(runs[0]), default=0)  # first (reading it takes a while), then `latest`: the
        ckpt = int(latest.read_text()[4:])  # kill follows at once, before a step can save the next one
        return ckpt if logged > ckpt else None

    deadline = time.time() + 300
    while (ckpt := past_the_checkpoint()) is None:
        assert time.time() < deadline and first.poll() is None, "wandb never wrote past a checkpoint"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole job: ranks, launcher and wandb's own process
    first.communicate()
    stale = max(history(_runs(run_dir)[0]))
    second = _train([*args, f"train.max_steps={ckpt + 10}"], ranks=2)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, out[-2000:] + err[-3000:]
    assert f"resumed at step {ckpt}" in out

    attempts = _runs(run_dir)
    assert len(attempts) == 2  # rank 0 alone writes: one wandb run file per attempt, not one per rank
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    assert all(a.name == f"run-{run_id}.wandb" for a in attempts)  # the same run, continued
    before, after = history(attempts[0]), history(attempts[1])
    assert stale > ckpt and min(after) == ckpt + 1
    assert config(attempts[1])["_wandb"]["branch_point"] == {"run_id": run_id, "step": ckpt}
    curve = {**{s: r for s, r in before.items() if s <= ckpt}, **after}  # what the rewound run shows
    jsonl = [e for e in read_metrics(run_dir) if "loss" in e]
    assert sorted(curve) == [e["step"] for e in jsonl] == list(range(1, ckpt + 11))
    for entry in jsonl:
        assert curve[entry["step"]]["train/loss"] == pytest.approx(entry["loss"], rel=1e-12)


def test_without_the_package_the_config_error_names_the_extra(monkeypatch):
    from trainer.config import ConfigError, to_config

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees where it is not installed
    with pytest.raises(ConfigError) as error:
        to_config({"tracking": {"wandb": True}})
    assert str(error.value) == "tracking.wandb=true, but the wandb package is not installed: pip install -e '.[wandb]'"


@pytest.mark.processes
def test_an_unreachable_wandb_server_is_a_warning_and_training_finishes(tmp_path, shakespeare_dir):
    run_dir = tmp_path / "run"
    proc = _train(debug_overrides(shakespeare_dir, run_dir, "train.max_steps=6", "train.eval_every=0",
                                  "train.ckpt_every=0", "train.sample_tokens=0", "tracking.wandb=true",
                                  "tracking.mode=online", "tracking.init_timeout_s=8"),
                  env={"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"})  # nothing listens there
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "warning: wandb did not start" in err and "logging offline" in err
    assert [e["step"] for e in read_metrics(run_dir) if "loss" in e] == list(range(1, 7))
    assert sorted(history(_runs(run_dir)[0])) == list(range(1, 7))
    _assert_no_key_anywhere(run_dir, out, err)
