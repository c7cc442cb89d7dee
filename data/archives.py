"""The character-level benchmarks as distributed: enwik8.zip and text8.zip, each a zip holding one
file of 10^8 bytes, modelled as raw bytes and cut at byte offsets into train, val and test.

An archive is untrusted input from the internet: `read_archive` checks it whole (a zip, its one
member by name and size, the member's CRC32, text8's alphabet) before prepare writes anything, and
refuses it with one line naming the file and what was expected.
"""
from __future__ import annotations

import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Archive:
    member: str              # the one file in the zip
    size: int                # its bytes, as distributed
    url: str
    alphabet: str            # the bytes it may hold, as a regex class body ("": any byte)
    described: str           # for messages: what the alphabet means


ARCHIVES = {
    "enwik8": Archive("enwik8", 10**8, "http://mattmahoney.net/dc/enwik8.zip", "", "any byte"),
    "text8": Archive("text8", 10**8, "http://mattmahoney.net/dc/text8.zip", "a-z ", "only a-z and space"),
}


class ArchiveError(ValueError):
    """An archive that is not the one its source expects (truncated, another file, another size)."""


def split_offsets(n: int, shares) -> list[int]:
    """[0, end of train, end of val, n] for a file of n bytes: each cut at round(n x the cumulative
    share), so 10^8 bytes at [0.9, 0.05, 0.05] give exactly 90M/5M/5M, and a small file the same
    proportions."""
    return [0, *(round(n * math.fsum(shares[:i + 1])) for i in range(len(shares) - 1)), n]


def read_archive(path: str | Path, source: str, expect_bytes: int | None = None) -> bytes:
    """The bytes of `source`'s one file in the zip at `path`, every check passed; expect_bytes: its
    size, when not the distributed file's."""
    spec, path = ARCHIVES[source], Path(path)
    size = expect_bytes or spec.size
    expected = f"expected {spec.member}.zip as distributed ({spec.url}): a zip holding one file {spec.member}"
    if not path.is_file():
        raise ArchiveError(f"{path}: no such file; {expected} (download it, then point data.path at it)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if names != [spec.member]:
                shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
                raise ArchiveError(f"{path}: holds {len(names)} file(s) ({shown or 'none'}); {expected}")
            info = archive.getinfo(spec.member)
            if info.file_size != size:  # checked before reading: the read allocates this much
                raise ArchiveError(f"{path}: {spec.member} is {info.file_size:,} bytes, {expected} of {size:,} "
                                   "bytes (data.expect_bytes=N reads a smaller file in this format)")
            data = archive.read(info)  # checks the member's CRC32
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise ArchiveError(f"{path}: not a whole zip archive ({e}); {expected} of {size:,} bytes") from None
    if len(data) != size:
        raise ArchiveError(f"{path}: {spec.member} gave {len(data):,} bytes, {expected} of {size:,} bytes")
    stray = re.search(f"[^{spec.alphabet}]".encode(), data) if spec.alphabet else None
    if stray:
        raise ArchiveError(f"{path}: {spec.member} holds byte {stray.group()!r} at offset {stray.start():,}; "
                           f"{expected} of {spec.described}")
    return data
