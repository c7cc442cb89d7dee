"""conf=enwik8 and conf=text8 end to end, as a user runs them from a fresh clone, on small files in
the real format (a zip holding one file of raw bytes): train says how to prepare, that command
prepares, then train, eval split=test and sample; and a resumed run repeats the uninterrupted one.
The preset's model is shrunk to the tiny one, so that a CPU runs it in seconds."""
import json
import subprocess
import sys

import pytest
from helpers import ROOT, losses, run_train, subprocess_env

from data.archives import split_offsets
from data.shards import ShardReader
from data.synthetic import enwik8_bytes, text8_bytes, write_archive

pytestmark = pytest.mark.processes   # every test here starts processes

# big enough for the preset's own size check at prepare (a val split of 64 windows of 513 bytes)
SIZE = 700_000
MAKE = {"enwik8": enwik8_bytes, "text8": text8_bytes}
PROMPT = {"enwik8": "<title>Zürich", "text8": "anarchism"}


def _small_run(source: str, archive, data_dir, run_dir, *extra) -> list[str]:
    """The preset with the tiny model and a few steps (everything else as the preset sets it)."""
    return [f"conf={source}", f"data.path={archive}", f"data.expect_bytes={SIZE}", f"data.dir={data_dir}",
            f"run_dir={run_dir}", "model=tiny", "precision=fp32", "train.micro_batch=8", "train.max_steps=30",
            "train.warmup_tokens=1280", "train.eval_every=15", "train.eval_steps=4", "train.ckpt_every=15",
            "train.log_every=1", "train.sample_tokens=60", "train.progress=false", *extra]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("source", ["enwik8", "text8"])
def test_prepare_train_eval_test_and_sample_from_the_distributed_zip(tmp_path, source):
    raw = MAKE[source](SIZE, seed=2)
    archive = write_archive(tmp_path / f"{source}.zip", source, raw)
    data_dir, run_dir = tmp_path / "shards", tmp_path / "run"
    overrides = _small_run(source, archive, data_dir, run_dir)

    untrained = run_train(overrides, check=False)  # no shards yet: one message, with the command
    assert untrained.returncode == 1
    command = untrained.stderr.strip().splitlines()[-1].strip()
    assert command == (f"python launch/prepare.py conf={source} data.source={source} data.path={archive} "
                       f"data.dir={data_dir} data.expect_bytes={SIZE}")
    prepared = _run(*command.split()[1:])
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert f"wrote {data_dir}/manifest.json (vocab of 256 byte values)" in prepared.stdout
    cuts = split_offsets(SIZE, [0.9, 0.05, 0.05])
    assert bytes(ShardReader(data_dir, "test").read_all()) == raw[cuts[2]:]

    trained = run_train(overrides)
    assert "step 30: val loss" in trained.stdout
    assert "bits/byte" in trained.stdout and "ZeRO-0 fp32 muon" in trained.stdout  # the preset's recipe

    evaluated = _run("launch/eval.py", f"run_dir={run_dir}", "split=test")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(evaluated.stdout)
    assert result["split"] == "test" and result["step"] == 30 and result["bpc_unit"] == "bits per byte"
    windows = (cuts[3] - cuts[2] - 32) // 33  # of block_size + 1 = 33 bytes in the test split's one frame
    assert result["tokens"] == windows // 32 * 32 * 32  # whole batches of 32 windows, 32 targets each
    assert result["bpc"] < 8.0  # uniform over 256 bytes is 8 bits: it learned something

    sampled = _run("launch/sample.py", f"run_dir={run_dir}", f"prompt={PROMPT[source]}", "max_new_tokens=80")
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.startswith(PROMPT[source])  # bytes printed as UTF-8 (a stray byte as U+FFFD)
    assert len(sampled.stdout.rstrip("\n")) > len(PROMPT[source])


def test_a_resumed_run_repeats_the_uninterrupted_one_on_the_same_windows(tmp_path):
    archive = write_archive(tmp_path / "enwik8.zip", "enwik8", enwik8_bytes(SIZE, seed=3))
    data_dir, whole, resumed = tmp_path / "shards", tmp_path / "whole", tmp_path / "resumed"
    prepared = _run("launch/prepare.py", "conf=enwik8", f"data.path={archive}", f"data.expect_bytes={SIZE}",
                    f"data.dir={data_dir}")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    run_train(_small_run("enwik8", archive, data_dir, whole, "train.record_batches=true"))
    checkpoint = whole / "checkpoints" / "step00000015"
    proc = run_train(_small_run("enwik8", archive, data_dir, resumed, "train.record_batches=true",
                                f"resume={checkpoint}"))
    assert "| resumed at step 15" in proc.stdout
    later = [line for line in (whole / "batches_rank0.txt").read_text().splitlines() if int(line.split()[0]) > 15]
    assert (resumed / "batches_rank0.txt").read_text().splitlines() == later
    expected = {step: loss for step, loss in losses(whole).items() if step > 15}
    assert losses(resumed) == expected and len(expected) == 15
