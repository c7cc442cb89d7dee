"""What every text source yields: Documents, and the Source interface prepare reads them through."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Document:
    name: str  # the train/val split hashes it, so it must be stable across runs
    text: str  # raw text, before the tokenizer normalizes it


class Source(Protocol):
    """A corpus that prepare streams, and resumes from the skip-th document."""

    unit: str                 # what a document is, for progress bars: "plays", "files", "articles"
    count: int                # documents to read (after data.max_documents)
    names: list[str] | None   # every document's name up front, or None when too many to list

    def documents(self, skip: int = 0) -> Iterator[Document]:
        """Documents from the skip-th on, in a fixed order."""
        ...
