"""Token shards: uint8 ids in independent zstd frames of a fixed token count, plus a JSON manifest.

Layout of a prepared data dir:
    manifest.json          vocab, tokenizer options, frame size, and per split: shards, frames, checksums
    train_00000.zst ...    concatenated zstd frames; frame i holds tokens [i*F, (i+1)*F) of the shard
    val_00000.zst ...
    test_00000.zst ...     only where the source has a test split (enwik8, text8)
shard_writer.py writes them. Any window inside a frame is read by decompressing that frame alone.
A manifest (and prepare's state) may come from another machine: every field is checked when it is
read, before any file it names is opened (JsonFields), and a frame's header must declare the size
the manifest gives before it is decompressed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from .tokenizer import TOKENIZERS, from_vocab, make_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")  # what training reads: every data dir has them
ALL_SPLITS = (*SPLITS, "test")  # test: the benchmarks' held-out split (enwik8, text8), for eval.py alone
SHARD_NAME = re.compile(r"(train|val|test)_\d{5}\.zst")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_FRAME_TOKENS = 1 << 24  # tokens a frame may hold: what one read of a frame may allocate
MAX_VOCAB = 256             # ids are uint8
MAX_JSON_BYTES = 1 << 30    # a manifest or prepare state larger than this is not one we wrote
_MAX_INT = (1 << 63) - 1    # what the frame table's int64 holds


class ShardError(RuntimeError):
    """A prepared data dir is missing, damaged, or does not match what the run expects."""


# --- checking what a data dir's JSON files say, before any file they name is opened -----------------

class JsonFields:
    """One JSON file of a data dir (manifest.json, prepare_state.json), read field by field with each
    field's type and range checked. A field that is missing, of another type or out of range raises
    one ShardError naming the file, the field and the value. Booleans are not integers here."""

    KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false",
             type(None): "null"}

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        """The file's top-level object (its size checked before it is read)."""
        size = regular_file_size(self.path)
        if size is None:
            raise ShardError(f"{self.path}: missing")
        if size > MAX_JSON_BYTES:
            raise ShardError(f"{self.path}: {size} bytes, more than any file this code writes ({MAX_JSON_BYTES})")
        try:
            doc = json.loads(self.path.read_bytes())
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8; RecursionError: deep nesting
            raise ShardError(f"{self.path}: not valid JSON ({type(e).__name__}: {e})") from None
        return self.check("(top level)", doc, dict)

    def error(self, field: str, value, expected: str) -> ShardError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return ShardError(f"{self.path}: {field} = {shown}, expected {expected}")

    def check(self, field: str, value, kind: type | tuple[type, ...]):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if type(value) not in kinds:
            raise self.error(field, value, " or ".join(self.KINDS[k] for k in kinds))
        return value

    def get(self, obj: dict, where: str, key: str, kind: type | tuple[type, ...]):
        """obj[key] (obj being the field `where`), of JSON type kind (or one of the kinds)."""
        field = f"{where}.{key}" if where else key
        if key not in obj:
            raise ShardError(f"{self.path}: {field} is missing")
        return self.check(field, obj[key], kind)

    def integer(self, obj: dict, where: str, key: str, lo: int, hi: int = _MAX_INT) -> int:
        value = self.get(obj, where, key, int)
        if not lo <= value <= hi:
            raise self.error(f"{where}.{key}" if where else key, value, f"an integer in [{lo}, {hi}]")
        return value

    def string(self, obj: dict, where: str, key: str, pattern: re.Pattern | None = None,
               expected: str = "") -> str:
        value = self.get(obj, where, key, str)
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(f"{where}.{key}" if where else key, value, expected or f"to match {pattern.pattern}")
        return value

    def strings(self, obj: dict, where: str, key: str) -> list[str]:
        values = self.get(obj, where, key, list)
        for i, value in enumerate(values):
            self.check(f"{where}.{key}[{i}]" if where else f"{key}[{i}]", value, str)
        return values

    def splits(self, doc: dict) -> list[tuple[str, str, dict]]:
        """(split, its field name, its entry) of doc["splits"], which holds one object per split: train
        and val, and test where the source has one."""
        splits = self.get(doc, "", "splits", dict)
        if sorted(splits) != sorted(ALL_SPLITS):
            self.equal("splits (keys)", sorted(splits), sorted(SPLITS), f"one entry per split (and {ALL_SPLITS[-1]})")
        return [(split, f"splits.{split}", self.get(splits, "splits", split, dict)) for split in ALL_SPLITS
                if split in splits]

    def equal(self, field: str, value, expected_value, why: str) -> None:
        if type(value) is not type(expected_value) or value != expected_value:
            raise self.error(field, value, f"{expected_value!r} ({why})")

    def shard(self, shard, where: str, split: str, index: int, frame_tokens: int, frames: tuple[int, int],
              short_last: bool, finished: bool) -> int:
        """One shard entry {file, tokens, bytes, sha256, frames} at position `index` of `split`: its name
        is the one the writer gives it, it has frames[0] to frames[1] frames, which lie end to end from
        byte 0 and hold frame_tokens tokens each (the last one 1 to frame_tokens if short_last), and its
        totals are their sums. Returns its token count."""
        self.check(where, shard, dict)
        name = self.string(shard, where, "file", SHARD_NAME, f"a name matching {SHARD_NAME.pattern}")
        self.equal(f"{where}.file", name, f"{split}_{index:05d}.zst", f"shard {index} of split {split}")
        sha256 = self.get(shard, where, "sha256", str)
        if not (SHA256.fullmatch(sha256) if finished else sha256 == ""):
            raise self.error(f"{where}.sha256", sha256,
                             "64 lowercase hex digits" if finished else "'' (the shard is unfinished)")
        table = self.get(shard, where, "frames", list)
        if not frames[0] <= len(table) <= frames[1]:
            raise self.error(f"{where}.frames (count)", len(table), f"{frames[0]} to {frames[1]} frames")
        offset = tokens = 0
        for j, frame in enumerate(table):
            field = f"{where}.frames[{j}]"
            if type(frame) is not list or len(frame) != 4 or any(type(x) is not int for x in frame):
                raise self.error(field, frame, "[offset, nbytes, tokens, crc32], four integers")
            at, nbytes, count, crc = frame
            if at != offset:
                raise self.error(field, frame, f"offset {offset} (frames lie end to end from byte 0)")
            if not 1 <= nbytes <= _MAX_INT - offset:
                raise self.error(field, frame, "nbytes >= 1")
            if not 0 < count <= frame_tokens:
                raise self.error(field, frame, f"0 < tokens <= frame_tokens={frame_tokens}")
            if count != frame_tokens and not (short_last and j == len(table) - 1):
                raise self.error(field, frame, f"tokens = frame_tokens={frame_tokens} (only a split's last "
                                               "frame holds fewer)")
            if not 0 <= crc < 1 << 32:
                raise self.error(field, frame, "a crc32 in [0, 2**32)")
            offset, tokens = offset + nbytes, tokens + count
        self.equal(f"{where}.bytes", self.integer(shard, where, "bytes", 0), offset, "the sum of its frames' nbytes")
        self.equal(f"{where}.tokens", self.integer(shard, where, "tokens", 0), tokens,
                   "the sum of its frames' tokens")
        return tokens


def check_manifest(fields: JsonFields, manifest: dict) -> dict:
    """Every field of a manifest that a reader uses, checked (see JsonFields); returns it."""
    fields.equal("format", manifest.get("format"), FORMAT_VERSION, "the format this code reads")
    tokenizer = fields.get(manifest, "", "tokenizer", dict)
    fields.equal("tokenizer (keys)", sorted(tokenizer), ["kind", "lowercase"], "the tokenizer's settings")
    kind = fields.get(tokenizer, "tokenizer", "kind", str)
    if kind not in TOKENIZERS:
        raise fields.error("tokenizer.kind", kind, " or ".join(TOKENIZERS))
    lowercase = fields.get(tokenizer, "tokenizer", "lowercase", bool)
    if kind != "char":
        fields.equal("tokenizer.lowercase", lowercase, False, f"the {kind} tokenizer never lowercases")
    vocab = fields.get(manifest, "", "vocab", str)
    if not 1 <= len(vocab) <= MAX_VOCAB or len(set(vocab)) != len(vocab):
        raise fields.error("vocab", vocab, f"1 to {MAX_VOCAB} distinct characters")
    fields.equal("vocab", vocab, make_tokenizer(kind, lowercase).vocab,
                 f"the {kind} tokenizer's vocabulary" + (f" with lowercase={lowercase}" if kind == "char" else ""))
    frame_tokens = fields.integer(manifest, "", "frame_tokens", 1, MAX_FRAME_TOKENS)
    shard_tokens = fields.integer(manifest, "", "shard_tokens", frame_tokens)
    if shard_tokens % frame_tokens:
        raise fields.error("shard_tokens", shard_tokens, f"a multiple of frame_tokens={frame_tokens}")
    source = fields.get(manifest, "", "source", dict)
    for key, value in source.items():
        if value is not None and type(value) not in (str, int):
            raise fields.error(f"source.{key}", value, "a string, an integer or null")
    val_documents = fields.strings(manifest, "", "val_documents")
    for split, where, info in fields.splits(manifest):
        shards = fields.get(info, where, "shards", list)
        tokens, shard_frames = 0, shard_tokens // frame_tokens
        for i, shard in enumerate(shards):
            last = i == len(shards) - 1  # only the last shard and its last frame may be short
            tokens += fields.shard(shard, f"{where}.shards[{i}]", split, i, frame_tokens,
                                   (1 if last else shard_frames, shard_frames), short_last=last, finished=True)
        fields.equal(f"{where}.tokens", fields.integer(info, where, "tokens", 0), tokens,
                     "the sum of its shards' tokens")
        documents = fields.integer(info, where, "documents", 0)
        if (documents == 0) != (tokens == 0):
            raise fields.error(f"{where}.documents", documents, f"0 exactly when the split has no tokens ({tokens})")
        if split == "val":
            fields.equal(f"{where}.documents", documents, len(val_documents), "one per name in val_documents")
    return manifest


# --- frames: what writing and reading both check -----------------------------------------

def _declared_tokens(blob: bytes) -> int | None:
    """The size a zstd frame's header declares (what decompressing it would allocate); None if none."""
    try:
        return zstandard.frame_content_size(blob)
    except zstandard.ZstdError:
        return None


def hash_frames(path: Path, frames) -> tuple[hashlib._Hash, str | None]:
    """(sha256, first problem or None) of a shard file's frames: (offset, nbytes, tokens, crc32) rows
    lying end to end from byte 0 (a whole shard, or what an interrupted prepare had written). Each
    frame's crc32 and the token count its header declares are checked in the same pass."""
    h, problem = hashlib.sha256(), None
    with open(path, "rb") as f:
        for offset, nbytes, tokens, crc in frames:
            blob = f.read(nbytes)
            h.update(blob)
            if problem is None and (len(blob) != nbytes or zlib.crc32(blob) != crc):
                problem = f"{path}: frame at byte {offset} fails its checksum"
            elif problem is None and _declared_tokens(blob) != tokens:
                problem = (f"{path}: frame at byte {offset} declares {_declared_tokens(blob)} tokens, "
                           f"the manifest {tokens}")
    return h, problem


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
        if split not in ALL_SPLITS:
            raise ShardError(f"{self.data_dir / MANIFEST}: has no split {split!r} (choose {', '.join(ALL_SPLITS)})")
        if split not in self.manifest["splits"]:
            raise ShardError(f"{self.data_dir / MANIFEST}: has no {split} split, only {' and '.join(SPLITS)} (the "
                             f"enwik8 and text8 presets prepare a {split} split)")
        info = self.manifest["splits"][split]
        self.files = [self.data_dir / s["file"] for s in info["shards"]]
        for shard, path in zip(info["shards"], self.files):
            size = regular_file_size(path)
            if size is None:
                raise ShardError(f"{path}: shard listed in the manifest is missing")
            if size != shard["bytes"]:
                raise ShardError(f"{path}: size {size} bytes, manifest says {shard['bytes']} (truncated?)")
        # one int64 row per frame (shard, offset, nbytes, tokens, crc32): ~40 bytes a frame, not the
        # ~400 of Python lists, and the manifest's lists are dropped (Wikipedia: ~300k frames)
        self.frames = FrameTable(np.array([(i, *f) for i, s in enumerate(info["shards"]) for f in s.pop("frames")],
                                          dtype=np.int64).reshape(-1, 5))
        self.num_tokens = info["tokens"]
        self.vocab_size = len(self.manifest["vocab"])
        self._handles: dict[int, object] = {}
        self._pid = None
        self._dctx = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_handles={}, _pid=None, _dctx=None)
        return state

    @property
    def tokenizer(self):
        return tokenizer_of(self.manifest)

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest (and every frame's crc32 and size)."""
        for i, (shard, path) in enumerate(zip(self.manifest["splits"][self.split]["shards"], self.files)):
            frames = self.frames.table[self.frames.table[:, 0] == i, 1:].tolist()
            h, problem = hash_frames(path, frames)
            if h.hexdigest() != shard["sha256"]:
                raise ShardError(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")
            if problem:
                raise ShardError(problem)

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
        where = f"{self.files[ref.shard]}: frame at byte {ref.offset}"
        if len(blob) != ref.nbytes or zlib.crc32(blob) != ref.crc32:
            raise ShardError(f"{where} fails its checksum")
        if _declared_tokens(blob) != ref.tokens:  # what decompress() would allocate
            raise ShardError(f"{where} declares {_declared_tokens(blob)} tokens, the manifest {ref.tokens}")
        try:
            tokens = np.frombuffer(self._dctx.decompress(blob, max_output_size=ref.tokens), dtype=np.uint8)
        except zstandard.ZstdError as e:
            raise ShardError(f"{where} does not decompress ({e})") from None
        if len(tokens) != ref.tokens:
            raise ShardError(f"{where} has the wrong length")
        if tokens.max() >= self.vocab_size:  # ids index the model's embedding
            raise ShardError(f"{where} holds token id {tokens.max()}, beyond the vocabulary of {self.vocab_size}")
        if out is None:
            return tokens
        out[:ref.tokens] = tokens
        return out[:ref.tokens]

    def read_all(self) -> np.ndarray:
        return np.concatenate([self.read_frame(i) for i in range(len(self.frames))])


def regular_file_size(path: Path) -> int | None:
    """The size of a file of the data dir (a shard, the manifest, the state), before anything opens it;
    None if it is absent. A link or a folder in its place is an error: a data dir holds plain files."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise ShardError(f"{path}: not a regular file (a link or a folder); a data dir holds plain files")
    return info.st_size


def tokenizer_of(manifest: dict):
    """The tokenizer a (checked) manifest was written with."""
    return from_vocab(manifest["tokenizer"]["kind"], manifest["vocab"], manifest["tokenizer"]["lowercase"])


def load_manifest(data_dir: str | Path) -> dict:
    """The data dir's manifest, every field checked (check_manifest) before any shard is opened."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: no manifest; prepare the data first (python launch/prepare.py ...)")
    fields = JsonFields(path)
    return check_manifest(fields, fields.load())
