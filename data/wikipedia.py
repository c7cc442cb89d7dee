"""English Wikipedia as the `wikimedia/wikipedia` dataset's parquet files (columns id, url, title, text).

Read from a local folder (every *.parquet under it, in name order), streamed a record batch at a
time; when the folder holds none and `huggingface_hub` is installed (`pip install -e '.[wiki]'`),
the subset's files are downloaded into it first (only as many as `max_documents` needs), at the
dataset commit `data.revision` pins. `download.json` records that commit and each file's size and
sha256 as the Hub announced them; every file is checked against them before it is read.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from .documents import Document
from .files import atomic_write

REPO = "wikimedia/wikipedia"
REVISION = "b04c8d1ceb2f5cd4588862100d08de323dccfbaa"  # the dataset's commit with the 20231101 dumps
DOWNLOAD_RECORD = "download.json"  # written by download(): the pinned commit and the subset's files
BATCH_ROWS = 256
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _need(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{why} needs the `{module.split('.')[0]}` package: pip install -e '.[wiki]'") from None


def parquet_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.parquet") if p.is_file())


def _check_entry(where: str, subset: str, entry) -> dict:
    """One file of the record (or of the Hub's listing): a parquet file inside the subset's folder, with
    a size and a sha256; raises ValueError naming `where` otherwise."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not re.fullmatch(re.escape(subset) + r"/[A-Za-z0-9_.-]+\.parquet", name) \
            or ".." in name.split("/"):
        raise ValueError(f"{where}: file {name!r} is not a parquet file inside {subset}/")
    if type(entry.get("size")) is not int or entry["size"] < 0 or \
            not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        raise ValueError(f"{where}: file {name}: size {entry.get('size')!r} and sha256 {entry.get('sha256')!r} "
                         "are not a size and a sha256")
    return {"name": name, "size": entry["size"], "sha256": entry["sha256"]}


def _read_record(record: Path, subset: str, revision: str) -> dict:
    """download.json, checked: the same subset and revision as asked, a commit, and its files."""
    try:
        doc = json.loads(record.read_text())
        files, commit = doc["files"], doc["commit"]
        asked = (doc["subset"], doc["revision"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record}: not a download record of this version ({type(e).__name__}: {e}); delete it "
                         "to list the files again (downloaded files are kept if their sha256 matches)") from None
    if asked != (subset, revision):
        raise ValueError(f"{record}: {record.parent} holds data.subset={asked[0]} at data.revision={asked[1]}, "
                         f"not data.subset={subset} at data.revision={revision}; use another data.path, or "
                         "the record's subset and revision")
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit) or not isinstance(files, list):
        raise ValueError(f"{record}: commit {commit!r} or files are not a commit and a list")
    return {"repo": REPO, "subset": subset, "revision": revision, "commit": commit,
            "files": [_check_entry(str(record), subset, f) for f in files]}


def _list_remote(hub, subset: str, revision: str) -> dict:
    """The record of what the Hub holds at `revision`: its commit, and the subset's files with the size
    and sha256 (LFS) it announces for each."""
    api, repo_file = hub.HfApi(), _need("huggingface_hub.hf_api", "listing the Hub's files").RepoFile
    commit = api.dataset_info(REPO, revision=revision).sha
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit) or \
            (_COMMIT.fullmatch(revision) and commit != revision):
        raise ValueError(f"{REPO}: the Hub resolved data.revision={revision} to {commit!r}, not that commit")
    files = []
    for item in api.list_repo_tree(REPO, path_in_repo=subset, revision=commit, repo_type="dataset", recursive=True):
        if isinstance(item, repo_file) and item.path.endswith(".parquet"):
            lfs = item.lfs
            entry = {"name": item.path, "size": item.size, "sha256": lfs.sha256 if lfs is not None else None}
            files.append(_check_entry(f"{REPO} at {commit}", subset, entry))
    if not files:
        raise FileNotFoundError(f"data.subset={subset!r}: {REPO} has no parquet files under {subset}/ "
                                f"at data.revision={revision}")
    return {"repo": REPO, "subset": subset, "revision": revision, "commit": commit,
            "files": sorted(files, key=lambda f: f["name"])}


def _differs(local: Path, entry: dict) -> str | None:
    """How a local file differs from what the Hub announced (size first, then sha256); None if it does not."""
    size = local.stat().st_size
    if size != entry["size"]:
        return f"size {size} bytes, the Hub announced {entry['size']}"
    h = hashlib.sha256()
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != entry["sha256"]:
        return f"sha256 {h.hexdigest()}, the Hub announced {entry['sha256']}"
    return None


def download(path: Path, subset: str, revision: str, max_documents: int | None) -> None:
    """Fetch the subset's parquet files at `revision` from the Hugging Face Hub into `path` (continues a
    partial download at the commit its record pinned). Every file used, fetched now or before, is
    checked against the size and sha256 the Hub announced; a file that differs is fetched again, and
    one that still differs is removed and raises ValueError."""
    hub = _need("huggingface_hub", f"data.path={path} holds no *.parquet files; downloading {REPO} into it")
    pq = _need("pyarrow.parquet", "data.source=wikipedia")
    record_path = path / DOWNLOAD_RECORD
    if record_path.is_file():
        record = _read_record(record_path, subset, revision)
    else:
        record = _list_remote(hub, subset, revision)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(record_path, json.dumps(record, indent=1))
    rows = 0
    for i, entry in enumerate(record["files"]):
        local = path / entry["name"]
        if not local.is_file() or _differs(local, entry):
            local.unlink(missing_ok=True)
            print(f"downloading {REPO}/{entry['name']} at {record['commit'][:12]} ({i + 1}/{len(record['files'])}) "
                  f"into {path}", flush=True)
            hub.hf_hub_download(REPO, entry["name"], repo_type="dataset", revision=record["commit"],
                                local_dir=str(path))
            problem = _differs(local, entry)
            if problem:
                local.unlink()
                raise ValueError(f"{local}: {problem} ({REPO} at {record['commit']}); removed, run again to retry")
        rows += pq.ParquetFile(local).metadata.num_rows
        if max_documents is not None and rows >= max_documents:
            return


class WikipediaSource:
    """Articles in file order; document name = article id (the train/val split hashes it)."""

    unit = "articles"

    def __init__(self, path: str | Path, subset: str, max_documents: int | None = None, revision: str = REVISION):
        self.pq = _need("pyarrow.parquet", "data.source=wikipedia")
        self.path = Path(path)
        record = self.path / DOWNLOAD_RECORD
        if not parquet_files(self.path) or record.is_file():  # nothing yet, or a download to finish
            download(self.path, subset, revision, max_documents)
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
