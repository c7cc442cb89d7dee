"""Made-up corpora in the exact formats of the real ones, for tests and benches that must not touch
the network: Wikipedia-shaped parquet files (id, url, title, text; same schema, row groups and mix of
ASCII and non-ASCII text), and enwik8.zip / text8.zip as distributed (a zip holding one file of raw
bytes: XML markup with multi-byte UTF-8, or a-z and space)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

_ACCENTED = ["café", "Zürich", "naïve", "Dvořák", "São Paulo", "Ægir", "東京", "Москва", "—", "“quoted”"]


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    made_up = ["".join(rng.choice(letters, size=int(rng.integers(1, 10)))) for _ in range(n)]
    return np.array(made_up + _ACCENTED, dtype=object)


def article_text(rng: np.random.Generator, vocab: np.ndarray, n_words: int) -> str:
    words = vocab[rng.integers(0, len(vocab), size=n_words)]
    sentences = [" ".join(words[i:i + 14]).capitalize() + "." for i in range(0, n_words, 14)]
    paragraphs = [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs)


def write_wikipedia_parquet(folder: str | Path, articles: int, files: int = 2, mean_words: int = 400,
                            row_group_rows: int = 64, seed: int = 0, first_id: int = 1) -> list[Path]:
    """`articles` made-up articles over `files` parquet files; ids first_id, first_id + 1, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = _words(rng, 3000)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, per_file = [], -(-articles // files)
    for f in range(files):
        ids = list(range(first_id + f * per_file, first_id + min(articles, (f + 1) * per_file)))
        if not ids:
            break
        titles = [f"Article {i} {vocab[i % len(vocab)]}" for i in ids]
        texts = [article_text(rng, vocab, max(5, int(rng.exponential(mean_words)))) for _ in ids]
        table = pa.table({"id": [str(i) for i in ids], "url": [f"https://en.wikipedia.org/wiki?curid={i}" for i in ids],
                          "title": titles, "text": texts})
        path = folder / f"train-{f:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def enwik8_bytes(size: int, seed: int = 0) -> bytes:
    """`size` bytes shaped like enwik8: a MediaWiki XML dump's start (pages with titles, ids and wiki
    markup, entities, multi-byte UTF-8), cut at exactly `size` bytes, as the real file is, even
    inside a character."""
    rng = np.random.default_rng(seed)
    vocab = _words(rng, 500)
    parts = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/" version="0.3">\n']
    length, page = len(parts[0]), 0
    while length < size:
        page += 1
        title = " ".join(vocab[rng.integers(0, len(vocab), size=2)]).title()
        body = article_text(rng, vocab, int(rng.integers(20, 200))).replace(". ", f". [[{title}]] &amp; ")
        part = (f"  <page>\n    <title>{title}</title>\n    <id>{page}</id>\n    <revision>\n"
                f"      <text xml:space=\"preserve\">''{title}'' {body} {{{{cite|café — 東京 😀}}}}</text>\n"
                "    </revision>\n  </page>\n")
        parts.append(part)
        length += len(part.encode("utf-8"))
    return "".join(parts).encode("utf-8")[:size]


def text8_bytes(size: int, seed: int = 0) -> bytes:
    """`size` bytes shaped like text8: lowercase words of a-z, one space between, starting with one."""
    rng = np.random.default_rng(seed)
    vocab = [w for w in _words(rng, 500) if w.isascii() and w.isalpha()]
    words = np.array(vocab)[rng.integers(0, len(vocab), size=size // 3 + 1)]
    return (" " + " ".join(words)).encode("ascii")[:size]


def write_archive(path: str | Path, member: str, data: bytes) -> Path:
    """A zip holding one file, `member`, as enwik8.zip and text8.zip are distributed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return path
