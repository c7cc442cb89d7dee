"""Token shards: uint8 ids in independent zstd frames of a fixed token count, plus a JSON manifest.

Layout of a prepared data dir:
    manifest.json          vocab, tokenizer options, frame size, and per split: shards, frames, checksums
    train_00000.zst ...    concatenated zstd frames; frame i holds tokens [i*F, (i+1)*F) of the shard
    val_00000.zst ...
Any window inside a frame is read by decompressing that frame alone.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

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


class Splitter:
    """Train or val, by document: decided by the sha1 of its name, never by its content.

    Sources listed up front (names given) send exactly round(f * N) documents, those hashing lowest,
    to val; a streamed source (Wikipedia: names=None) sends each document whose hash falls in the
    lowest fraction f of the hash range, which needs no list. A single document is split by position
    instead: its last fraction f is val.
    """

    def __init__(self, val_fraction: float, names: list[str] | None):
        self.fraction = val_fraction
        self.by_position = names is not None and len(names) == 1 and val_fraction > 0
        self.val_names = None if names is None else choose_val_documents(names, val_fraction)

    def is_val(self, name: str) -> bool:
        if self.val_names is not None:
            return name in self.val_names
        return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16) < self.fraction * 16 ** 15

    def split(self, name: str, text: str) -> tuple[str, str]:
        """(train part, val part) of one normalized document."""
        if self.by_position:
            cut = int(len(text) * (1 - self.fraction))
            return text[:cut], text[cut:]
        return ("", text) if self.is_val(name) else (text, "")


def _read_prefix_hash(path: Path, nbytes: int):
    """sha256 of a file's first nbytes (a whole shard, or what an interrupted prepare had written)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = nbytes
        while left:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h


class SplitWriter:
    """One split's shard files: tokens cut into frames of `frame_tokens`, shards of `shard_frames`
    frames. A shard is written as NAME.tmp and renamed when complete; state() is what resuming needs."""

    def __init__(self, out_dir: Path, split: str, frame_tokens: int, shard_frames: int, level: int):
        self.out_dir, self.split = out_dir, split
        self.frame_tokens, self.shard_frames = frame_tokens, shard_frames
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.pending = bytearray()
        self.shards: list[dict] = []
        self.documents = 0
        self.closed_shards = 0  # since the last state(): tells the caller a checkpoint is worth saving
        self._file = None
        self._hash = None

    def add(self, ids: bytes, documents: int = 1) -> None:
        self.documents += documents
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
        self.closed_shards += 1

    def state(self) -> dict:
        """Everything written so far (flushed to the files first), to resume from with restore()."""
        self.closed_shards = 0
        partial = None
        if self._file is not None:
            self._file.flush()
            partial = self._hash.hexdigest()
        return {"shards": self.shards, "partial_sha256": partial, "documents": self.documents,
                "pending": base64.b64encode(bytes(self.pending)).decode()}

    def restore(self, state: dict) -> None:
        """Continue from state(): finished shards must match their sha256 and the unfinished one its
        prefix's (it is cut back to what the state recorded); raises ShardError if not."""
        self.shards = state["shards"]
        self.documents = state["documents"]
        self.pending = bytearray(base64.b64decode(state["pending"]))
        finished = self.shards[:-1] if state["partial_sha256"] else self.shards
        for shard in finished:
            path = self.out_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"] or \
                    _read_prefix_hash(path, shard["bytes"]).hexdigest() != shard["sha256"]:
                raise ShardError(f"{path}: missing or not the shard the interrupted run wrote")
        if state["partial_sha256"]:
            shard = self.shards[-1]
            tmp, done = self.out_dir / (shard["file"] + ".tmp"), self.out_dir / shard["file"]
            if not tmp.is_file() and done.is_file():  # stopped between the rename and the state's update
                os.replace(done, tmp)
            if not tmp.is_file() or tmp.stat().st_size < shard["bytes"]:
                raise ShardError(f"{tmp}: shorter than the interrupted run recorded")
            h = _read_prefix_hash(tmp, shard["bytes"])
            if h.hexdigest() != state["partial_sha256"]:
                raise ShardError(f"{tmp}: its first {shard['bytes']} bytes differ from what was recorded")
            self._file = open(tmp, "r+b")
            self._file.truncate(shard["bytes"])
            self._file.seek(shard["bytes"])
            self._hash = h
        keep = {s["file"] for s in self.shards} | {s["file"] + ".tmp" for s in self.shards}
        for stale in self.out_dir.glob(f"{self.split}_*.zst*"):
            if stale.name not in keep:  # written after the recorded state: will be written again
                stale.unlink()

    def finish(self) -> dict:
        if self.pending:
            self._write_frame(bytes(self.pending))
            self.pending.clear()
        if self._file is not None:
            self._close_shard()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Last, atomically: a data dir with a manifest is complete."""
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)


# --- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameRef:
    shard: int
    offset: int
    nbytes: int
    tokens: int
    crc32: int


class FrameTable:
    """The frames of a split as an array; indexing gives a FrameRef."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> FrameRef:
        return FrameRef(*map(int, self.table[index]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def tokens(self) -> np.ndarray:
        return self.table[:, 3]


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
        # one int64 row per frame (shard, offset, nbytes, tokens, crc32): ~40 bytes a frame, not the
        # ~400 of Python lists, and the manifest's lists are dropped (Wikipedia: ~300k frames)
        self.frames = FrameTable(np.array([(i, *f) for i, s in enumerate(info["shards"]) for f in s.pop("frames")],
                                          dtype=np.int64).reshape(-1, 5))
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
            if _read_prefix_hash(path, path.stat().st_size).hexdigest() != shard["sha256"]:
                raise ShardError(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")

    def read_frame(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """A frame's tokens (read-only), or a copy of them at the start of `out` (uint8, long enough)
        when given: a caller that reuses one buffer saves the page faults of fresh allocations."""
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
        tokens = np.frombuffer(self._dctx.decompress(blob, max_output_size=ref.tokens), dtype=np.uint8)
        if len(tokens) != ref.tokens:
            raise ShardError(f"{self.files[ref.shard]}: frame at byte {ref.offset} has the wrong length")
        if out is None:
            return tokens
        out[:ref.tokens] = tokens
        return out[:ref.tokens]

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
