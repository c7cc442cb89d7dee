"""Wikipedia-shaped parquet files (id, url, title, text) of made-up articles, for tests and benches
that must not touch the network: same schema, row groups and mix of ASCII and non-ASCII text."""
from __future__ import annotations

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
