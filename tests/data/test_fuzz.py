"""Seeded random mutations of a real manifest.json and prepare_state.json (the files a data dir copied
from another machine brings): each one is refused with a ShardError naming a file of the data dir, or
reads (resumes) into a valid data dir; no other exception escapes, and no file outside the data dir is
opened, renamed, replaced, removed or changed (an audit hook, and the outside folder's listing)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

from data.loader import RankLoader
from data.prepare import STATE, ListSource, write_corpus
from data.shards import MANIFEST, SPLITS, ShardError, ShardReader
from data.sources import Document
from data.tokenizer import CharTokenizer

MUTATIONS = 400  # of each file
WRITE = dict(val_fraction=0.25, frame_tokens=256, shard_tokens=256 * 2, chunk_chars=1)

# --- who touches which file: one audit hook for the process, recording only while a run is watched ---

_watched: list[tuple[str, str]] | None = None
_EVENTS = {"open": 1, "os.rename": 2, "os.replace": 2, "os.remove": 1, "os.truncate": 1, "os.rmdir": 1,
           "os.chmod": 1, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1, "shutil.copyfile": 2}


def _audit(event, args):
    if _watched is not None and event in _EVENTS:
        for path in args[:_EVENTS[event]]:
            if isinstance(path, (str, bytes, os.PathLike)):
                _watched.append((event, os.path.abspath(os.fsdecode(path))))


sys.addaudithook(_audit)


@contextlib.contextmanager
def _watch():
    global _watched
    _watched = events = []
    try:
        yield events
    finally:
        _watched = None


# --- the real files ------------------------------------------------------------------------------

def _docs() -> list[Document]:
    rng = random.Random(0)
    words = ["thou", "art", "king", "night", "speak", "o", "my", "lord", "be", "not"]
    return [Document(f"doc{i}", " ".join(rng.choice(words) for _ in range(rng.randint(30, 90))) + ".\n")
            for i in range(12)]


class _StopsAfter(ListSource):
    """The documents, interrupted (as by Ctrl-C) after `after` of them."""

    def __init__(self, docs, after: int):
        super().__init__(docs)
        self.after = after

    def documents(self, skip: int = 0):
        for i, doc in enumerate(super().documents(skip)):
            if i == self.after:
                raise KeyboardInterrupt
            yield doc


def _prepare(out: Path, source) -> str:
    """write_corpus's log (what it says about resuming)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        write_corpus(source, out, CharTokenizer(), **WRITE)
    return log.getvalue()


def _summary(data_dir: Path) -> dict:
    manifest = json.loads((data_dir / MANIFEST).read_text())
    return {"val_documents": manifest["val_documents"],
            **{s: [x["sha256"] for x in info["shards"]] for s, info in manifest["splits"].items()}}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real")
    _prepare(root / "whole", ListSource(_docs()))
    with pytest.raises(KeyboardInterrupt):
        _prepare(root / "cut", _StopsAfter(_docs(), 9))
    state = json.loads((root / "cut" / STATE).read_text())
    train = state["splits"]["train"]
    assert len(train["shards"]) >= 2 and train["partial_sha256"], "the state should hold finished and open shards"
    assert state["splits"]["val"]["shards"] and state["val_names"]
    assert len(json.loads((root / "whole" / MANIFEST).read_text())["splits"]["train"]["shards"]) >= 3
    return {"manifest_dir": root / "whole", "state_dir": root / "cut", "clean": _summary(root / "whole")}


# --- mutations -------------------------------------------------------------------------------------

def _nodes(doc, path=()):
    """Every (path, value) in a JSON tree, the root included."""
    yield path, doc
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from _nodes(value, (*path, key))


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _names(outside: Path) -> list:
    """Shard names that reach past the data dir, or name another shard, or are not names at all."""
    return ["../outside/sentinel.txt", str(outside / "sentinel.txt"), "/etc/hostname", "../outside/victim.zst",
            str(outside / "victim.zst"), "train_00000.zst/../../outside/victim.zst", "..", ".", "", "/",
            "train_00000.zst\x00", "train_0000a.zst", "val_00000.zst", "train_00001.zst", "train_99999.zst",
            "TRAIN_00000.ZST", "train_00000.zst.tmp", "train_00000.zst ", "subdir/train_00000.zst", 0, None]


def _other_values(rng: random.Random, value, outside: Path):
    """A value of another type, or a neighbour of a number, or a string reaching elsewhere."""
    if type(value) is int:
        return rng.choice([value + 1, value - 1, 0, -1, -value, value * 2, 10 ** 15, 2 ** 63, 2 ** 64,
                           float(value), str(value), True, False, None, float("nan"), float("inf")])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], "", "../" + value, "/" + value, value.upper(), value * 50,
                           "\u00e9" + value, 1, None, [value], *_names(outside)])
    if isinstance(value, bool):
        return rng.choice([not value, 0, 1, "true", None])
    return rng.choice([None, True, 0, -1, 1.5, "x", [], {}, [[0, 0, 0, 0]], {"file": "../outside/victim.zst"}])


def mutate(rng: random.Random, doc: dict, text: str, outside: Path) -> tuple[str, str]:
    """(what was done, the file's new text): one random change of the JSON or of its text (never none)."""
    while True:
        what, new = _mutate_once(rng, copy.deepcopy(doc), text, outside)
        if new not in (text, json.dumps(doc)):
            return what, new


def _mutate_once(rng: random.Random, doc: dict, text: str, outside: Path) -> tuple[str, str]:
    nodes = list(_nodes(doc))
    kind = rng.choice(["number", "number", "type", "delete", "add", "string", "name", "name", "swap",
                       "duplicate", "truncate", "text"])
    if kind == "truncate":
        cut = rng.randrange(len(text))
        return f"truncate at {cut}/{len(text)}", text[:cut]
    if kind == "text":
        new = rng.choice(["", "null", "[]", '"x"', "1", "{}", "[" * 100_000, "\ud800", "{\"format\": 1}",
                          text.replace("1", "NaN", 1), text.replace("0", "1e400", 1), "\x00" * 64])
        return f"text {new[:20]!r}", new
    if kind == "name":
        files = [(p, v) for p, v in nodes if p and p[-1] == "file"]
        path, _ = rng.choice(files)
        new = rng.choice(_names(outside))
        return f"name {path} = {new!r}", json.dumps(_set(doc, path, new))
    if kind == "number":
        candidates = [(p, v) for p, v in nodes if type(v) is int]
    elif kind == "string":
        candidates = [(p, v) for p, v in nodes if isinstance(v, str)]
    elif kind in ("delete", "swap", "duplicate", "add"):
        candidates = [(p, v) for p, v in nodes if isinstance(v, (dict, list)) and v]
    else:
        candidates = [(p, v) for p, v in nodes if p]
    path, value = rng.choice(candidates)
    if kind in ("number", "string", "type"):
        new = _other_values(rng, value, outside)
        return f"{kind} {path} = {new!r:.60}", json.dumps(_set(doc, path, new))
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = rng.choice(keys)
    if kind == "delete":
        del value[key]
    elif kind == "add":
        extra = rng.choice(_names(outside) + [{"file": "../outside/victim.zst", "bytes": 3}])
        if isinstance(value, dict):
            key = rng.choice(["file", "extra", "frames", "shards", "../x"])
            value[key] = extra
        else:
            key = rng.randrange(len(value) + 1)
            value.insert(key, extra)
    elif kind == "swap":
        other = rng.choice(keys)
        value[key], value[other] = value[other], value[key]
        key = (key, other)
    else:
        other = rng.choice(keys)
        value[other] = copy.deepcopy(value[key])
        key = (key, other)
    return f"{kind} {path} {key!r}", json.dumps(doc)


# --- one run per mutation --------------------------------------------------------------------------

def _outside_listing(outside: Path) -> dict:
    return {str(p.relative_to(outside)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(outside.rglob("*"))}


def _read_everything(data_dir: Path) -> None:
    """Every check and frame of both splits, as a run would read them."""
    for split in SPLITS:
        reader = ShardReader(data_dir, split)
        reader.verify()
        assert len(reader.read_all()) == reader.num_tokens
        assert reader.tokenizer.vocab == reader.manifest["vocab"]


def _train_batch(data_dir: Path) -> None:
    loader = RankLoader(data_dir, "train", block_size=32, micro_batch=4, num_workers=0)
    assert loader.next_windows().shape == (4, 33)


def _run_manifest(data_dir: Path, clean: dict) -> str:
    """'accepted' when the data dir reads whole and gives a training batch; a refusal is a ShardError."""
    _read_everything(data_dir)
    _train_batch(data_dir)
    return "accepted"


def _run_state(data_dir: Path, clean: dict) -> str:
    """The prepare resumes from the state or refuses it (saying why, naming a file of the data dir) and
    starts over; either way it ends in a data dir that reads whole (any exception is an escape)."""
    log = _prepare(data_dir, ListSource(_docs()))
    try:
        _read_everything(data_dir)
    except ShardError as e:
        raise AssertionError(f"the prepare ended in a data dir that does not read: {e}") from None
    if "cannot resume" not in log:
        assert "resuming an interrupted prepare" in log, log
        _train_batch(data_dir)
        return "accepted"
    message = log.split("cannot resume the interrupted prepare (", 1)[1]
    if str(data_dir) not in message:
        raise AssertionError(f"the refusal names no file of the data dir: {message}")
    if _summary(data_dir) != clean:
        raise AssertionError("started over, but the result differs from an uninterrupted prepare")
    return "refused"


@pytest.mark.parametrize("target", [MANIFEST, STATE])
def test_mutated_manifests_and_states_are_refused_or_read_and_never_reach_outside(real, tmp_path, target):
    base = real["manifest_dir"] if target == MANIFEST else real["state_dir"]
    run = _run_manifest if target == MANIFEST else _run_state
    text = (base / target).read_text()
    doc = json.loads(text)
    outside, data_dir = tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    for name in ("sentinel.txt", "victim.zst", "victim.zst.tmp"):
        (outside / name).write_bytes(os.urandom(1000))
    before = _outside_listing(outside)
    with _watch() as events:  # the hook sees a read outside (the checks below would catch one)
        (outside / "sentinel.txt").read_bytes()
    assert ("open", str(outside / "sentinel.txt")) in events
    rng = random.Random(f"fuzz {target}")
    counts = {"tried": 0, "refused": 0, "accepted": 0}
    escaped = []
    for i in range(MUTATIONS):
        what, new_text = mutate(rng, doc, text, outside)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(base, data_dir)
        (data_dir / target).write_text(new_text, errors="surrogatepass")
        counts["tried"] += 1
        with _watch() as events:
            try:
                outcome = run(data_dir, real["clean"])
            except ShardError as e:
                assert str(data_dir) in str(e), f"{what}: the error names no file of the data dir: {e}"
                outcome = "refused"
            except Exception as e:  # noqa: BLE001 - an escape is what this test looks for
                escaped.append(f"#{i} {what}: {type(e).__name__}: {e}")
                continue
        counts[outcome] += 1
        reached = [(event, path) for event, path in events
                   if not path.startswith(str(data_dir) + os.sep) and
                   (path.startswith(str(tmp_path)) or path.startswith("/etc"))]
        assert not reached, f"#{i} {what}: touched files outside the data dir: {reached}"
    print(f"\n{target}: {counts['tried']} mutations tried, {counts['refused']} refused with a ShardError, "
          f"{counts['accepted']} read as a valid data dir, {len(escaped)} escaped")
    assert not escaped, "\n".join(escaped[:20])
    assert _outside_listing(outside) == before and sorted(p.name for p in tmp_path.iterdir()) == ["data", "outside"]
    assert counts["refused"] > MUTATIONS // 2 and counts["accepted"] > 0  # both ends are reached
