"""Source text -> shards: streamed, tokenized by a pool of processes, resumable, with a progress bar.

The main process reads documents in order and hands chunks of them to `data.workers` processes
(0: it does everything itself), which normalize, tokenize and split them; it then writes their
tokens, in the source's order, to zstd frames. Output is the same for any number of workers.
Whenever a shard completes (and every `SAVE_EVERY_S` seconds) the position and the writers' state
go to prepare_state.json, so an interrupted prepare continues from there: finished shards are
checked by sha256 and kept.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import multiprocessing
import signal
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .archives import ARCHIVES, read_archive, split_offsets
from .config import AUTO_PREPARED, DataConfig
from .documents import Document
from .files import atomic_write
from .shard_writer import Splitter, SplitWriter, write_manifest
from .shards import (
    ALL_SPLITS,
    FORMAT_VERSION,
    MANIFEST,
    SHA256,
    SPLITS,
    JsonFields,
    ShardError,
    ShardReader,
    load_manifest,
)
from .sources import open_source
from .tokenizer import NON_ASCII, CharTokenizer, Tokenizer, make_tokenizer

STATE = "prepare_state.json"
SAVE_EVERY_S = 30.0
CHUNK_CHARS = 1 << 22  # text per task handed to a worker (~4 MB)


def is_prepared(cfg: DataConfig) -> bool:
    return (Path(cfg.dir) / MANIFEST).is_file()


def prepare_command(cfg: DataConfig, preset: str) -> str:
    """The command that prepares cfg's shards (for error messages)."""
    args = [f"conf={preset}"] if preset else []
    args += [f"data.source={cfg.source}", f"data.path={cfg.path}", f"data.dir={cfg.dir}"]
    if cfg.max_documents is not None:
        args.append(f"data.max_documents={cfg.max_documents}")
    if cfg.source in ARCHIVES:
        args += [f"data.{key}={getattr(cfg, key)}" for key, default in (("fraction", 1.0), ("expect_bytes", None))
                 if getattr(cfg, key) != default]
    return "python launch/prepare.py " + " ".join(args)


def missing_shards_error(cfg: DataConfig, preset: str) -> str | None:
    """For sources too large for train to prepare on the fly: what to run, when shards are absent."""
    if cfg.source in AUTO_PREPARED or is_prepared(cfg):
        return None
    partly = " (an earlier prepare was interrupted: running it again resumes it)" \
        if (Path(cfg.dir) / STATE).is_file() else ""
    return (f"no prepared shards in data.dir={cfg.dir}{partly}; data.source={cfg.source} is prepared "
            f"beforehand, with:\n  {prepare_command(cfg, preset)}")


def prepare(cfg: DataConfig, show_progress: bool = True) -> dict:
    if cfg.source in ARCHIVES:
        return prepare_archive(cfg)
    tokenizer = make_tokenizer(cfg.tokenizer, cfg.lowercase)
    source = open_source(cfg.source, cfg.path, cfg.subset, cfg.max_documents, cfg.revision)
    return write_corpus(source, cfg.dir, tokenizer, val_fraction=cfg.val_fraction, frame_tokens=cfg.frame_tokens,
                        shard_tokens=cfg.shard_tokens, workers=cfg.workers, show_progress=show_progress,
                        source_info={"source": cfg.source, "path": str(cfg.path), "subset": cfg.subset,
                                     "max_documents": cfg.max_documents})


def check_matches(cfg: DataConfig) -> dict:
    """The manifest of cfg.dir, after checking it was written from the same kind of source with the
    same tokenizer options (so a forgotten data.dir never trains on the wrong text)."""
    manifest = load_manifest(cfg.dir)
    prepared_from = manifest.get("source", {}).get("source")
    if prepared_from and prepared_from != cfg.source:
        raise ValueError(
            f"{Path(cfg.dir) / MANIFEST}: prepared from data.source={prepared_from} "
            f"(data.path={manifest['source'].get('path')}), but data.source={cfg.source}; "
            "use another data.dir (data=text sets shards/NAME for data.path=NAME.txt)"
        )
    prepared_path = manifest.get("source", {}).get("path")
    if cfg.source == "text" and prepared_path and Path(prepared_path).resolve() != Path(cfg.path).resolve():
        raise ValueError(f"{Path(cfg.dir) / MANIFEST}: prepared from data.path={prepared_path}, but data.path="
                         f"{cfg.path}; use another data.dir for this text")
    if manifest["tokenizer"]["kind"] != cfg.tokenizer:
        raise ValueError(f"{Path(cfg.dir) / MANIFEST}: prepared with data.tokenizer={manifest['tokenizer']['kind']}, "
                         f"but data.tokenizer={cfg.tokenizer}; use another data.dir or re-prepare")
    if cfg.source in ARCHIVES and manifest["source"].get("cuts") != _cuts(cfg, manifest["source"].get("bytes")):
        raise ValueError(f"{Path(cfg.dir) / MANIFEST}: cut at byte offsets {manifest['source'].get('cuts')}, but "
                         f"data.split={list(cfg.split)} and data.fraction={cfg.fraction} cut at "
                         f"{_cuts(cfg, manifest['source'].get('bytes'))}; use another data.dir or re-prepare")
    if cfg.tokenizer == "char" and manifest["tokenizer"]["lowercase"] != cfg.lowercase:
        raise ValueError(
            f"{Path(cfg.dir) / MANIFEST}: prepared with lowercase={manifest['tokenizer']['lowercase']}, "
            f"but data.lowercase={cfg.lowercase}; use another data.dir or re-prepare"
        )
    return manifest


def normalization_report(non_ascii: Counter, tokenizer: CharTokenizer) -> str:
    """One line: how many non-ASCII characters became ASCII and how many were dropped, with the
    commonest of each."""
    spelled = {char: tokenizer.normalize(char) for char in non_ascii}
    kept = [(char, n) for char, n in non_ascii.most_common() if spelled[char]]
    dropped = [(char, n) for char, n in non_ascii.most_common() if not spelled[char]]
    examples = ", ".join(f"{char!r}->{spelled[char]!r}" for char, _ in kept[:4])
    return (f"normalized to ASCII: {sum(n for _, n in kept):,} non-ASCII characters transliterated"
            + (f" (e.g. {examples})" if kept else "") + f", {sum(n for _, n in dropped):,} dropped"
            + (f" (e.g. {', '.join(repr(char) for char, _ in dropped[:4])})" if dropped else "")
            + "; the tokenizer keeps printable ASCII (data/tokenizer.py)")


def split_size_error(data_dir, block_size: int, micro_batch: int, world_size: int, preset: str,
                     val_fraction: float) -> str | None:
    """One line when a prepared split gives fewer training windows than one global micro-batch,
    naming the smallest text that would do (train would otherwise fail after loading the model)."""
    needed = micro_batch * world_size
    for split in SPLITS:
        frames = ShardReader(data_dir, split).frames.tokens
        windows = sum(max(0, (int(n) - block_size) // (block_size + 1)) for n in frames)
        if windows < needed:
            tokens = needed * (block_size + 1) + block_size  # in one frame
            share = val_fraction if split == "val" else 1 - val_fraction
            return (f"data.dir={data_dir}: the {split} split gives {windows} windows of model.block_size+1="
                    f"{block_size + 1} tokens; {f'conf={preset}' if preset else 'this run'} needs {needed} "
                    f"(train.micro_batch x ranks): at least {tokens:,} characters in {split}, about "
                    f"{tokens / share / 1e3:,.1f} KB of text at data.val_fraction={val_fraction} (or lower "
                    "train.micro_batch or model.block_size)")
    return None


# --- the pipeline -----------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One chunk of documents, normalized and tokenized, per split."""
    documents: int
    chars: int
    train: bytes
    val: bytes
    train_documents: int
    val_names: list[str]
    has_text: bool  # anything but whitespace
    non_ascii: Counter  # the characters normalization transliterated or dropped, for the report


def encode_chunk(docs: list[Document], tokenizer: Tokenizer, splitter: Splitter) -> Encoded:
    train, val, n_train, val_names = [], [], 0, []
    for doc in docs:
        text = tokenizer.normalize(doc.text).strip("\n") + "\n\n"
        train_part, val_part = splitter.split(doc.name, text)
        if train_part:
            train.append(train_part)
            n_train += 1
        if val_part:
            val.append(val_part)
            val_names.append(doc.name)
    non_ascii = Counter("".join(run for doc in docs for run in NON_ASCII.findall(doc.text)))
    return Encoded(len(docs), sum(len(d.text) for d in docs), tokenizer.encode("".join(train)),
                   tokenizer.encode("".join(val)), n_train, val_names,
                   any(d.text.strip() for d in docs), non_ascii)


def _chunks(docs: Iterable[Document], chunk_chars: int) -> Iterator[list[Document]]:
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the main process, which stops them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_in_order(chunks: Iterator[list[Document]], tokenizer, splitter, workers: int) -> Iterator[Encoded]:
    """encode_chunk over the chunks, in their order: in this process (workers=0) or in a pool, with
    at most 2 tasks per worker in flight so the reader never runs ahead of the writer (bounded memory)."""
    if workers <= 0:
        for chunk in chunks:
            yield encode_chunk(chunk, tokenizer, splitter)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
        in_flight = deque()
        for chunk in chunks:
            in_flight.append(pool.apply_async(encode_chunk, (chunk, tokenizer, splitter)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def _clear(out_dir: Path) -> None:
    for path in [*(p for split in ALL_SPLITS for p in out_dir.glob(f"{split}_*.zst*")), out_dir / STATE]:
        path.unlink(missing_ok=True)


def _save_state(out_dir: Path, settings: dict, position: int, writers: dict, val_names: list[str]) -> None:
    state = {"settings": settings, "position": position, "val_names": val_names,
             "splits": {s: w.state() for s, w in writers.items()}}
    atomic_write(out_dir / STATE, json.dumps(state))


def read_state(out_dir: Path, settings: dict, by_position: bool) -> dict:
    """The interrupted prepare's state, every field checked against what state() writes (JsonFields:
    shard names, frames, sums) before any file it names is opened; its settings must be `settings`.
    by_position: the source is one document, cut into both splits (Splitter)."""
    fields = JsonFields(out_dir / STATE)
    state = fields.load()
    if fields.get(state, "", "settings", dict) != settings:
        raise ShardError(f"{fields.path}: the interrupted prepare had other settings")
    frame_tokens, shard_frames = settings["frame_tokens"], settings["shard_tokens"] // settings["frame_tokens"]
    vocab_size = make_tokenizer(settings["tokenizer"], settings["lowercase"]).vocab_size
    position = fields.integer(state, "", "position", 0)
    val_names = fields.strings(state, "", "val_names")
    splits = fields.splits(state)
    for split, where, info in splits:
        documents = fields.integer(info, where, "documents", 0, position)
        partial = fields.get(info, where, "partial_sha256", (str, type(None)))
        if partial is not None and not SHA256.fullmatch(partial):
            raise fields.error(f"{where}.partial_sha256", partial, "null or 64 lowercase hex digits")
        shards = fields.get(info, where, "shards", list)
        if partial is not None and not shards:
            raise fields.error(f"{where}.partial_sha256", partial, "null (the split has no shard yet)")
        for i, shard in enumerate(shards):
            open_shard = partial is not None and i == len(shards) - 1  # every frame of a state is full
            fields.shard(shard, f"{where}.shards[{i}]", split, i, frame_tokens,
                         (1, shard_frames - 1) if open_shard else (shard_frames, shard_frames),
                         short_last=False, finished=not open_shard)
        pending = fields.get(info, where, "pending", str)
        try:
            ids = base64.b64decode(pending, validate=True)
        except binascii.Error:
            raise fields.error(f"{where}.pending", pending, "base64 of the tokens not yet in a frame") from None
        if len(ids) >= frame_tokens or max(ids, default=0) >= vocab_size:
            raise fields.error(f"{where}.pending", pending, f"fewer than frame_tokens={frame_tokens} token ids, "
                                                            f"each below the vocabulary size {vocab_size}")
        if split == "val":
            fields.equal(f"{where}.documents", documents, len(val_names), "one per name in val_names")
    counts = [info["documents"] for _, _, info in splits]
    documents_read = max(counts) if by_position else sum(counts)  # a document goes to one split, or cut, both
    fields.equal("position", position, documents_read, "the documents the splits hold")
    return state


def _resume(out_dir: Path, settings: dict, by_position: bool, new_writers, log) -> tuple[int, list[str], dict]:
    """(source position, val names so far, writers) from an interrupted run with the same settings;
    else the start, with the folder's old shards removed."""
    if (out_dir / STATE).is_file():
        writers = new_writers()
        try:
            state = read_state(out_dir, settings, by_position)
            for split, writer in writers.items():
                writer.restore(state["splits"][split])
            log(f"{out_dir}: resuming an interrupted prepare at document {state['position']:,} "
                f"({sum(len(w.shards) for w in writers.values())} shard(s) kept)")
            return state["position"], state["val_names"], writers
        except (ShardError, OSError) as e:
            log(f"{out_dir}: cannot resume the interrupted prepare ({e}); starting over")
    _clear(out_dir)
    return 0, [], new_writers()


def empty_split_message(out_dir: Path, split: str, documents: int, val_fraction: float) -> str:
    """What to change when a split of a prepare ends up with no document (training needs both)."""
    if split == "train":
        return (f"{out_dir}: the train split is empty: all {documents:,} documents went to val at "
                f"data.val_fraction={val_fraction}; lower data.val_fraction")
    hint = min(0.5, float(f"{3 / documents:.1g}"))  # about 3 expected val documents
    return (f"{out_dir}: the val split is empty: none of the {documents:,} documents went to val at "
            f"data.val_fraction={val_fraction}; raise data.val_fraction (e.g. data.val_fraction={hint}) "
            "or prepare more documents")


def write_corpus(source, out_dir: str | Path, tokenizer: Tokenizer, val_fraction: float = 0.1,
                 frame_tokens: int = 1 << 16, shard_tokens: int = 1 << 28, level: int = 3, workers: int = 0,
                 show_progress: bool = False, source_info: dict | None = None,
                 chunk_chars: int | None = None) -> dict:
    """Every document of `source` (see data/sources.py) into train/val shards in out_dir, and the
    manifest last. Resumes an interrupted call with the same settings."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a dir without a manifest is "not prepared"
    shard_frames = shard_tokens // frame_tokens
    settings = {"format": FORMAT_VERSION, "source": source_info or {}, "tokenizer": tokenizer.kind,
                "lowercase": tokenizer.lowercase,
                "val_fraction": val_fraction, "frame_tokens": frame_tokens, "shard_tokens": shard_tokens,
                "level": level}
    splitter = Splitter(val_fraction, source.names)
    bar = tqdm(total=source.count, unit=" " + source.unit, desc=f"prepare {out_dir.name}",
               disable=not show_progress, dynamic_ncols=True, smoothing=0.05)

    def new_writers():
        return {s: SplitWriter(out_dir, s, frame_tokens, shard_frames, level) for s in ("train", "val")}

    position, val_names, writers = _resume(out_dir, settings, splitter.by_position, new_writers, bar.write)
    has_text = position > 0
    bar.update(position)
    chars, start, saved, non_ascii = 0, time.perf_counter(), time.perf_counter(), Counter()
    try:
        chunks = _chunks(source.documents(position), chunk_chars or CHUNK_CHARS)
        for enc in _encode_in_order(chunks, tokenizer, splitter, workers):
            writers["train"].add(enc.train, enc.train_documents)
            writers["val"].add(enc.val, len(enc.val_names))
            val_names += enc.val_names
            has_text = has_text or enc.has_text
            position += enc.documents
            chars += enc.chars
            non_ascii.update(enc.non_ascii)
            bar.update(enc.documents)
            bar.set_postfix_str(f"{chars / 1e6 / (time.perf_counter() - start):.1f} MB/s of text", refresh=False)
            if any(w.closed_shards for w in writers.values()) or time.perf_counter() - saved > SAVE_EVERY_S:
                _save_state(out_dir, settings, position, writers, val_names)
                saved = time.perf_counter()
    finally:
        bar.close()
    if not has_text:
        _clear(out_dir)
        raise ShardError(f"empty corpus: the source gave no text to write into {out_dir}")
    splits = {s: w.finish() for s, w in writers.items()}
    empty = [split for split in SPLITS if not splits[split]["tokens"]]
    if empty:
        _clear(out_dir)
        raise ShardError(empty_split_message(out_dir, empty[0], position, val_fraction))
    manifest = _manifest(tokenizer, frame_tokens, shard_tokens, source_info or {}, val_names, splits)
    write_manifest(out_dir, manifest)
    if show_progress and non_ascii and tokenizer.kind == "char":
        print(normalization_report(non_ascii, tokenizer), flush=True)
    (out_dir / STATE).unlink(missing_ok=True)
    return manifest


def _manifest(tokenizer: Tokenizer, frame_tokens: int, shard_tokens: int, source_info: dict,
              val_names: list[str], splits: dict) -> dict:
    return {"format": FORMAT_VERSION, "tokenizer": {"kind": tokenizer.kind, "lowercase": tokenizer.lowercase},
            "vocab": tokenizer.vocab, "frame_tokens": frame_tokens, "shard_tokens": shard_tokens,
            "source": source_info, "val_documents": sorted(val_names), "splits": splits}


class ListSource:
    """Documents already in memory (tests, small corpora) as a source."""

    unit = "docs"

    def __init__(self, docs: Iterable[Document]):
        self.docs = list(docs)
        self.names = [d.name for d in self.docs]
        self.count = len(self.docs)

    def documents(self, skip: int = 0) -> Iterator[Document]:
        return iter(self.docs[skip:])


def write_shards(docs: Iterable[Document], out_dir, tokenizer: Tokenizer, val_fraction: float = 0.1,
                 frame_tokens: int = 1 << 16, shard_frames: int = 4096, **kw) -> dict:
    """write_corpus for a list of documents, with the shard size counted in frames."""
    return write_corpus(ListSource(docs), out_dir, tokenizer, val_fraction, frame_tokens,
                        shard_frames * frame_tokens, **kw)



# --- enwik8 and text8: one file of bytes, cut at byte offsets ---------------------------------------

def _cuts(cfg: DataConfig, size: int | None) -> str | None:
    """The byte offsets (as the manifest records them) where cfg cuts a file of `size` bytes."""
    if size is None:
        return None
    return " ".join(map(str, split_offsets(round(size * cfg.fraction), cfg.split)))


def prepare_archive(cfg: DataConfig) -> dict:
    """enwik8 / text8: the zip checked whole before anything is written (a refused one leaves data.dir
    as it was), then its file's first data.fraction cut by data.split into train, val and test."""
    data = read_archive(cfg.path, cfg.source, cfg.expect_bytes)
    cuts = _cuts(cfg, len(data))
    offsets = [int(c) for c in cuts.split()]
    sizes = dict(zip(ALL_SPLITS, (hi - lo for lo, hi in itertools.pairwise(offsets))))
    if not all(sizes.values()):
        raise ShardError(f"{cfg.path}: data.split={list(cfg.split)} of {offsets[-1]:,} bytes leaves the "
                         f"{min(sizes, key=sizes.get)} split empty; use a larger file or data.fraction")
    info = {"source": cfg.source, "path": str(cfg.path), "bytes": len(data), "cuts": cuts}
    return write_byte_splits(memoryview(data), offsets, cfg.dir, info, ARCHIVES[cfg.source].member,
                             cfg.frame_tokens, cfg.shard_tokens)


def write_byte_splits(data: memoryview, cuts: list[int], out_dir: str | Path, source_info: dict, name: str,
                      frame_tokens: int, shard_tokens: int, level: int = 3) -> dict:
    """data[cuts[i]:cuts[i + 1]] as split i of train, val, test (byte ids, one document each), the
    manifest last. Quick enough to start over when interrupted: no prepare state."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a dir without a manifest is "not prepared"
    _clear(out_dir)
    splits = {}
    for split, lo, hi in zip(ALL_SPLITS, cuts, cuts[1:]):
        writer = SplitWriter(out_dir, split, frame_tokens, shard_tokens // frame_tokens, level)
        for start in range(lo, hi, CHUNK_CHARS):
            writer.add(data[start:min(start + CHUNK_CHARS, hi)], documents=int(start == lo))
        splits[split] = writer.finish()
    manifest = _manifest(make_tokenizer("bytes"), frame_tokens, shard_tokens, source_info, [name], splits)
    write_manifest(out_dir, manifest)
    return manifest
