"""Token shards: uint8 ids in independent zstd frames of a fixed token count, plus a JSON manifest.

Layout of a prepared data dir:
    manifest.json          vocab, tokenizer options, frame size, and per split: shards, frames, checksums
    train_00000.zst ...    concatenated zstd frames; frame i holds tokens [i*F, (i+1)*F) of the shard
    val_00000.zst ...
Any window inside a frame is read by decompressing that frame alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import zstandard

from .sources import Document
from .tokenizer import CharTokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A prepared data dir is missing, damaged, or does not match what the run expects."""


# --- writing --------------------------------------------------------------------------------------

def choose_val_documents(names: list[str], val_fraction: float) -> set[str]:
    """A fixed, content-independent choice: the documents whose name hashes lowest."""
    if len(names) < 2 or val_fraction <= 0:
        return set()
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    ranked = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    return set(ranked[:n_val])


class _SplitWriter:
    def __init__(self, out_dir: Path, split: str, frame_tokens: int, shard_frames: int, level: int):
        self.out_dir, self.split = out_dir, split
        self.frame_tokens, self.shard_frames = frame_tokens, shard_frames
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.pending = bytearray()
        self.shards: list[dict] = []
        self.documents = 0
        self._file = None

    def add(self, ids: bytes) -> None:
        self.documents += 1
        self.pending += ids
        while len(self.pending) >= self.frame_tokens:
            self._write_frame(bytes(self.pending[: self.frame_tokens]))
            del self.pending[: self.frame_tokens]

    def _write_frame(self, tokens: bytes) -> None:
        if self._file is None:
            name = f"{self.split}_{len(self.shards):05d}.zst"
            self._file = open(self.out_dir / (name + ".tmp"), "wb")
            self._hash = hashlib.sha256()
            self.shards.append({"file": name, "tokens": 0, "bytes": 0, "sha256": "", "frames": []})
        shard = self.shards[-1]
        blob = self.cctx.compress(tokens)
        shard["frames"].append([shard["bytes"], len(blob), len(tokens), zlib.crc32(blob)])
        shard["bytes"] += len(blob)
        shard["tokens"] += len(tokens)
        self._file.write(blob)
        self._hash.update(blob)
        if len(shard["frames"]) >= self.shard_frames:
            self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        shard = self.shards[-1]
        shard["sha256"] = self._hash.hexdigest()
        os.replace(self.out_dir / (shard["file"] + ".tmp"), self.out_dir / shard["file"])
        self._file = None

    def finish(self) -> dict:
        if self.pending:
            self._write_frame(bytes(self.pending))
            self.pending.clear()
        if self._file is not None:
            self._close_shard()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def write_shards(
    docs: Iterable[Document],
    out_dir: str | Path,
    tokenizer: CharTokenizer,
    val_fraction: float = 0.1,
    frame_tokens: int = 1 << 16,
    shard_frames: int = 4096,
    level: int = 3,
    source: dict | None = None,
    progress=None,
) -> dict:
    """Tokenize documents into train/val shards (split by document) and write the manifest last.

    A source with a single document is split by position instead: its last `val_fraction` is val.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a dir without a manifest is "not prepared"
    docs = list(docs)
    if not docs or not any(d.text.strip() for d in docs):
        raise ShardError(f"empty corpus: the source gave no text to write into {out_dir}")
    writers = {s: _SplitWriter(out_dir, s, frame_tokens, shard_frames, level) for s in ("train", "val")}
    val_names = choose_val_documents([d.name for d in docs], val_fraction)
    for doc in docs:
        text = tokenizer.normalize(doc.text).strip("\n") + "\n\n"
        if len(docs) == 1 and val_fraction > 0:
            cut = int(len(text) * (1 - val_fraction))
            writers["train"].add(tokenizer.encode(text[:cut]))
            writers["val"].add(tokenizer.encode(text[cut:]))
        else:
            writers["val" if doc.name in val_names else "train"].add(tokenizer.encode(text))
        if progress is not None:
            progress(len(doc.text))
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer": {"kind": "char", "lowercase": tokenizer.lowercase},
        "vocab": tokenizer.vocab,
        "frame_tokens": frame_tokens,
        "source": source or {},
        "val_documents": sorted(val_names),
        "splits": {s: w.finish() for s, w in writers.items()},
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


# --- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameRef:
    shard: int
    offset: int
    nbytes: int
    tokens: int
    crc32: int


class ShardReader:
    """Reads frames of one split; opens files lazily so it can be handed to DataLoader workers."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.data_dir / MANIFEST}: has no split {split!r}")
        info = self.manifest["splits"][split]
        self.files = [self.data_dir / s["file"] for s in info["shards"]]
        self.frames = [FrameRef(i, *f) for i, s in enumerate(info["shards"]) for f in s["frames"]]
        self.num_tokens = info["tokens"]
        for shard, path in zip(info["shards"], self.files):
            if not path.is_file():
                raise ShardError(f"{path}: shard listed in the manifest is missing")
            if path.stat().st_size != shard["bytes"]:
                raise ShardError(
                    f"{path}: size {path.stat().st_size} bytes, manifest says {shard['bytes']} (truncated?)"
                )
        self._handles: dict[int, object] = {}
        self._pid = None
        self._dctx = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_handles={}, _pid=None, _dctx=None)
        return state

    @property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer.from_vocab(self.manifest["vocab"], self.manifest["tokenizer"]["lowercase"])

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest."""
        for shard, path in zip(self.manifest["splits"][self.split]["shards"], self.files):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != shard["sha256"]:
                raise ShardError(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")

    def read_frame(self, index: int) -> np.ndarray:
        ref = self.frames[index]
        if self._pid != os.getpid():  # fresh handles after a fork
            self._handles, self._pid = {}, os.getpid()
            self._dctx = zstandard.ZstdDecompressor()
        f = self._handles.get(ref.shard)
        if f is None:
            f = self._handles[ref.shard] = open(self.files[ref.shard], "rb")
        f.seek(ref.offset)
        blob = f.read(ref.nbytes)
        if len(blob) != ref.nbytes or zlib.crc32(blob) != ref.crc32:
            raise ShardError(f"{self.files[ref.shard]}: frame at byte {ref.offset} fails its checksum")
        tokens = self._dctx.decompress(blob, max_output_size=ref.tokens)
        if len(tokens) != ref.tokens:
            raise ShardError(f"{self.files[ref.shard]}: frame at byte {ref.offset} has the wrong length")
        return np.frombuffer(tokens, dtype=np.uint8)

    def read_all(self) -> np.ndarray:
        return np.concatenate([self.read_frame(i) for i in range(len(self.frames))])


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; prepare the data first (python launch/prepare.py ...)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}")
    return manifest
