"""data.source=wikipedia: parquet files of the wikimedia/wikipedia schema (written here with pyarrow),
the parallel, resumable prepare, the split by article, and the presets' commands."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, losses, run_train, subprocess_env

from data.config import DataConfig
from data.prepare import STATE, prepare
from data.shards import ShardReader
from data.synthetic import write_wikipedia_parquet
from data.wikipedia import WikipediaSource


@pytest.fixture(scope="module")
def wiki_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wikipedia")
    write_wikipedia_parquet(folder, articles=300, files=3, mean_words=300, row_group_rows=32)
    return folder


def _cfg(wiki_dir, out, **kw) -> DataConfig:
    base = dict(source="wikipedia", path=str(wiki_dir), dir=str(out), val_fraction=0.1, frame_tokens=4096,
                shard_tokens=4096 * 8, workers=0)
    return DataConfig(**{**base, **kw})


def _hash_below(name: str, fraction: float) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16) < fraction * 16 ** 15


def _shard_hashes(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s: [x["sha256"] for x in info["shards"]] for s, info in manifest["splits"].items()}


def test_skipping_documents_starts_at_the_same_article_as_reading_through(wiki_dir):
    source = WikipediaSource(wiki_dir, "unused")
    every = [d.name for d in source.documents()]
    assert len(every) == source.count == 300 and len(set(every)) == 300
    for skip in (1, 31, 32, 33, 99, 100, 101, 250, 299, 300):  # row-group and file boundaries
        assert [d.name for d in source.documents(skip)] == every[skip:], skip
    first = WikipediaSource(wiki_dir, "unused", max_documents=120)
    assert [d.name for d in first.documents(90)] == every[90:120]


def test_prepare_splits_by_article_id_and_workers_do_not_change_the_output(wiki_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("data.prepare.CHUNK_CHARS", 20_000)  # ~30 chunks: the pool returns them out of order
    serial = prepare(_cfg(wiki_dir, tmp_path / "serial"), show_progress=False)
    prepare(_cfg(wiki_dir, tmp_path / "pooled", workers=2), show_progress=False)
    assert _shard_hashes(tmp_path / "serial") == _shard_hashes(tmp_path / "pooled")
    assert len(serial["splits"]["train"]["shards"]) >= 3  # several shards, so resuming has units to keep

    ids = [d.name for d in WikipediaSource(wiki_dir, "unused").documents()]
    val_ids = {i for i in ids if _hash_below(i, 0.1)}
    assert 10 <= len(val_ids) <= 60 and set(serial["val_documents"]) == val_ids
    assert serial["splits"]["val"]["documents"] == len(val_ids)
    assert serial["splits"]["train"]["documents"] == 300 - len(val_ids)
    # each article's title line is in exactly the split its id hashes to
    texts = {s: ShardReader(tmp_path / "serial", s) for s in ("train", "val")}
    decoded = {s: r.tokenizer.decode(r.read_all()) for s, r in texts.items()}
    for i in ids:
        title = f"article {i} "
        in_val, in_train = f"\n\n{title}" in "\n\n" + decoded["val"], f"\n\n{title}" in "\n\n" + decoded["train"]
        assert (in_val, in_train) == ((True, False) if i in val_ids else (False, True)), i


def _prepare_cmd(wiki_dir, out) -> list[str]:
    return [sys.executable, "launch/prepare.py", "data=wikipedia", f"data.path={wiki_dir}", f"data.dir={out}",
            "data.val_fraction=0.1", "data.frame_tokens=4096", f"data.shard_tokens={4096 * 8}", "data.workers=0"]


@pytest.mark.processes
def test_an_interrupted_prepare_keeps_its_finished_shards_and_ends_identical(wiki_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_prepare_cmd(wiki_dir, whole), cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)

    # a slowed-down run (one document per chunk, 10 ms each): kill -9 once two train shards are done
    env = dict(subprocess_env(), PYTHONPATH=str(ROOT))
    slow = ("import runpy, sys, time, data.prepare as p\n"
            "p.CHUNK_CHARS = 1\n"
            "encode = p.encode_chunk\n"
            "p.encode_chunk = lambda *a: (time.sleep(0.01), encode(*a))[1]\n"
            "sys.argv = ['launch/prepare.py'] + sys.argv[1:]\n"
            "runpy.run_path('launch/prepare.py', run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, *_prepare_cmd(wiki_dir, cut)[2:]], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut / STATE
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            done = [s for s in json.loads(state.read_text())["splits"]["train"]["shards"] if s["sha256"]]
        except (OSError, ValueError):
            done = []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(done) >= 2 and not (cut / "manifest.json").exists(), "the prepare finished before it was killed"
    kept = {s["file"]: (cut / s["file"]).stat().st_ino for s in done}

    again = subprocess.run(_prepare_cmd(wiki_dir, cut), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming an interrupted prepare" in again.stderr + again.stdout
    assert _shard_hashes(cut) == _shard_hashes(whole)
    assert json.loads((cut / "manifest.json").read_text())["val_documents"] == \
        json.loads((whole / "manifest.json").read_text())["val_documents"]
    assert all((cut / f).stat().st_ino == ino for f, ino in kept.items())  # kept, not rewritten
    assert not state.exists()


class _StopsAfter:
    """The source, interrupted (as by Ctrl-C) after `after` documents."""

    def __init__(self, source, after: int):
        self.source, self.after = source, after
        self.names, self.count, self.unit = source.names, source.count, source.unit

    def documents(self, skip=0):
        for i, doc in enumerate(self.source.documents(skip)):
            if i == self.after:
                raise KeyboardInterrupt
            yield doc


@pytest.mark.processes
def test_a_damaged_finished_shard_makes_the_resume_start_over(wiki_dir, tmp_path, capsys):
    from data.prepare import write_corpus
    from data.tokenizer import CharTokenizer

    source = WikipediaSource(wiki_dir, "unused")
    kw = dict(val_fraction=0.1, frame_tokens=4096, shard_tokens=4096 * 8, chunk_chars=1)
    write_corpus(source, tmp_path / "whole", CharTokenizer(), **kw)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_corpus(_StopsAfter(source, 150), out, CharTokenizer(), **kw)
    finished = [s for s in json.loads((out / STATE).read_text())["splits"]["train"]["shards"] if s["sha256"]]
    assert finished and not (out / "manifest.json").exists()
    shard = out / finished[0]["file"]
    blob = bytearray(shard.read_bytes())
    blob[100] ^= 1
    shard.write_bytes(bytes(blob))
    write_corpus(source, out, CharTokenizer(), **kw)
    assert "cannot resume the interrupted prepare" in capsys.readouterr().out
    assert _shard_hashes(out) == _shard_hashes(tmp_path / "whole")


@pytest.mark.processes
def test_wiki_full_on_a_few_hundred_articles_stops_at_prepare_saying_val_is_empty(wiki_dir, tmp_path):
    """conf=wiki_full holds out 0.0005 of the articles: none of these 300; prepare says so, naming the knob,
    instead of training failing later; the share it suggests then gives val its articles."""
    ids = [d.name for d in WikipediaSource(wiki_dir, "unused").documents()]
    assert not any(_hash_below(i, 0.0005) for i in ids)
    out = tmp_path / "shards"
    done = subprocess.run([sys.executable, "launch/prepare.py", "conf=wiki_full", f"data.path={wiki_dir}",
                           f"data.dir={out}", "data.workers=0"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}: the val split is empty: none of the 300 documents went to val at "
                           "data.val_fraction=0.0005; raise data.val_fraction (e.g. data.val_fraction="), last
    assert not (out / "manifest.json").exists() and not list(out.glob("*.zst*"))
    hint = float(last.split("(e.g. data.val_fraction=")[1].split(")")[0])
    manifest = prepare(_cfg(wiki_dir, out, val_fraction=hint), show_progress=False)
    assert manifest["splits"]["val"]["documents"] == sum(_hash_below(i, hint) for i in ids) > 0


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImportError, match=r"huggingface_hub.*pip install -e '\.\[wiki\]'"):
        WikipediaSource(empty, "20231101.en")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"data.source=wikipedia needs the `pyarrow` package"):
        WikipediaSource(empty, "20231101.en")


def test_a_parquet_file_without_the_text_column_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["1"], "title": ["t"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: lacks column\(s\) \['text'\]"):
        WikipediaSource(tmp_path, "x")


@pytest.mark.processes
def test_wiki_100_says_how_to_prepare_then_trains_on_what_that_prepared(wiki_dir, tmp_path):
    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    args = ["conf=wiki_100", f"data.path={wiki_dir}", f"data.dir={shards}", f"run_dir={run_dir}",
            "train.max_steps=20", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
            "train.sample_tokens=0", "train.log_every=1"]
    first = run_train(args, check=False)
    assert first.returncode == 1 and not run_dir.exists()
    command = first.stderr.strip().splitlines()[-1].strip()
    assert command == (f"python launch/prepare.py conf=wiki_100 data.source=wikipedia data.path={wiki_dir} "
                       f"data.dir={shards} data.max_documents=100")
    done = subprocess.run([sys.executable, *command.split()[1:]], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 100
    run_train(args)
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 21)) and curve[20] < curve[1] - 0.5

