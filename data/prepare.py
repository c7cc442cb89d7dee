"""Source text -> shards, with a progress bar; the one function both prepare.py and train call."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .config import DataConfig
from .shards import MANIFEST, load_manifest, write_shards
from .sources import iter_documents
from .tokenizer import CharTokenizer


def is_prepared(cfg: DataConfig) -> bool:
    return (Path(cfg.dir) / MANIFEST).is_file()


def prepare(cfg: DataConfig, show_progress: bool = True) -> dict:
    tok = CharTokenizer(lowercase=cfg.lowercase)
    docs = iter_documents(cfg.source, cfg.path)
    with tqdm(desc=f"prepare {cfg.source}", unit="B", unit_scale=True, disable=not show_progress) as bar:
        manifest = write_shards(
            docs, cfg.dir, tok, val_fraction=cfg.val_fraction, frame_tokens=cfg.frame_tokens,
            source={"source": cfg.source, "path": str(cfg.path)}, progress=bar.update,
        )
    return manifest


def check_matches(cfg: DataConfig) -> dict:
    """The manifest of cfg.dir, after checking it was written from the same kind of source with the
    same tokenizer options (so a forgotten data.dir never trains on the wrong text)."""
    manifest = load_manifest(cfg.dir)
    prepared_from = manifest.get("source", {}).get("source")
    if prepared_from and prepared_from != cfg.source:
        raise ValueError(
            f"{Path(cfg.dir) / MANIFEST}: prepared from data.source={prepared_from} "
            f"(data.path={manifest['source'].get('path')}), but data.source={cfg.source}; "
            "use another data.dir (e.g. data=text sets shards/text)"
        )
    if manifest["tokenizer"]["lowercase"] != cfg.lowercase:
        raise ValueError(
            f"{Path(cfg.dir) / MANIFEST}: prepared with lowercase={manifest['tokenizer']['lowercase']}, "
            f"but data.lowercase={cfg.lowercase}; use another data.dir or re-prepare"
        )
    return manifest
