"""English Wikipedia as the `wikimedia/wikipedia` dataset's parquet files (columns id, url, title, text).

Read from a local folder (every *.parquet under it, in name order), streamed a record batch at a
time; when the folder holds none and `huggingface_hub` is installed (`pip install -e '.[wiki]'`),
the subset's files are downloaded into it first (only as many as `max_documents` needs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .sources import Document

REPO = "wikimedia/wikipedia"
DOWNLOAD_RECORD = "download.json"  # written by download(): the subset's full file list
BATCH_ROWS = 256


def _need(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{why} needs the `{module.split('.')[0]}` package: pip install -e '.[wiki]'") from None


def parquet_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def download(path: Path, subset: str, max_documents: int | None) -> None:
    """Fetch the subset's parquet files from the Hugging Face Hub into `path` (resumes a partial one)."""
    hub = _need("huggingface_hub", f"data.path={path} holds no *.parquet files; downloading {REPO} into it")
    pq = _need("pyarrow.parquet", "data.source=wikipedia")
    record = path / DOWNLOAD_RECORD
    if record.is_file():
        remote = json.loads(record.read_text())["files"]
    else:
        remote = sorted(f for f in hub.HfApi().list_repo_files(REPO, repo_type="dataset")
                        if f.startswith(f"{subset}/") and f.endswith(".parquet"))
        if not remote:
            raise FileNotFoundError(f"data.subset={subset!r}: {REPO} has no parquet files under {subset}/")
        path.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"repo": REPO, "subset": subset, "files": remote}, indent=1))
    rows = 0
    for i, name in enumerate(remote):
        local = path / name
        if not local.is_file():
            print(f"downloading {REPO}/{name} ({i + 1}/{len(remote)}) into {path}", flush=True)
            hub.hf_hub_download(REPO, name, repo_type="dataset", local_dir=str(path))
        rows += pq.ParquetFile(local).metadata.num_rows
        if max_documents is not None and rows >= max_documents:
            return


class WikipediaSource:
    """Articles in file order; document name = article id (the train/val split hashes it)."""

    unit = "articles"

    def __init__(self, path: str | Path, subset: str, max_documents: int | None = None):
        self.pq = _need("pyarrow.parquet", "data.source=wikipedia")
        self.path = Path(path)
        record = self.path / DOWNLOAD_RECORD
        if not parquet_files(self.path) or record.is_file():  # nothing yet, or a download to finish
            download(self.path, subset, max_documents)
        self.files = parquet_files(self.path)
        if not self.files:
            raise FileNotFoundError(f"data.path: no *.parquet files under {self.path}")
        self.rows = []  # per file, per row group
        for f in self.files:
            try:
                meta = self.pq.ParquetFile(f).metadata
            except Exception as e:
                raise ValueError(f"{f}: not a readable parquet file ({e})") from None
            names = set(meta.schema.names)
            missing = {"id", "title", "text"} - names
            if missing:
                raise ValueError(f"{f}: lacks column(s) {sorted(missing)} (expected the {REPO} schema)")
            self.rows.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        total = sum(map(sum, self.rows))
        self.count = total if max_documents is None else min(total, max_documents)
        self.names = None  # too many to list up front: the split hashes each id alone

    def documents(self, skip: int = 0) -> Iterator[Document]:
        """Articles from the `skip`-th on; whole files and row groups before it are never decoded."""
        left = self.count - skip
        for f, groups in zip(self.files, self.rows):
            if left <= 0:
                return
            if skip >= sum(groups):
                skip -= sum(groups)
                continue
            first = 0
            while skip >= groups[first]:
                skip -= groups[first]
                first += 1
            parquet = self.pq.ParquetFile(f)
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=range(first, len(groups)),
                                              columns=["id", "title", "text"]):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                cols = batch.slice(skip, left).to_pydict()
                skip = 0
                for id_, title, text in zip(cols["id"], cols["title"], cols["text"]):
                    yield Document(str(id_), f"{title}\n\n{text}")
                left -= len(cols["id"])
                if left <= 0:
                    return
