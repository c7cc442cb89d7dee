"""Writing a data dir's shards (the layout is in shards.py): documents to train or val by the hash of
their name, tokens into zstd frames and shard files whose frame table and checksum the manifest keeps,
and the manifest itself, last."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from pathlib import Path

import zstandard

from .files import atomic_write
from .shards import MANIFEST, ShardError, hash_frames, regular_file_size


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
        """Continue from state() (as checked by prepare's read_state): finished shards must match their
        sha256 and the unfinished one its prefix's (it is cut back to what the state recorded); raises
        ShardError if not."""
        self.shards = state["shards"]
        self.documents = state["documents"]
        self.pending = bytearray(base64.b64decode(state["pending"]))
        finished = self.shards[:-1] if state["partial_sha256"] else self.shards
        for shard in finished:
            path = self.out_dir / shard["file"]
            if regular_file_size(path) != shard["bytes"]:
                raise ShardError(f"{path}: missing or not the size the interrupted run recorded")
            h, problem = hash_frames(path, shard["frames"])
            if problem or h.hexdigest() != shard["sha256"]:
                raise ShardError(problem or f"{path}: not the shard the interrupted run wrote (sha256 differs)")
        if state["partial_sha256"]:
            shard = self.shards[-1]
            tmp, done = self.out_dir / (shard["file"] + ".tmp"), self.out_dir / shard["file"]
            if regular_file_size(tmp) is None and regular_file_size(done) is not None:
                os.replace(done, tmp)  # stopped between the rename and the state's update
            size = regular_file_size(tmp)
            if size is None or size < shard["bytes"]:
                raise ShardError(f"{tmp}: shorter than the interrupted run recorded")
            h, problem = hash_frames(tmp, shard["frames"])
            if problem or h.hexdigest() != state["partial_sha256"]:
                raise ShardError(problem or f"{tmp}: its first {shard['bytes']} bytes differ from what was recorded")
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
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1))
