"""Prepare throughput on a generated Wikipedia-shaped corpus, and where the time goes.

    python bench/prepare.py [--mb 200] [--workers 0 1 2] [--corpus .cache/bench_wikipedia]
                            [--out shards/bench_wikipedia]

Writes (once, then reuses) parquet files of made-up articles with the wikimedia/wikipedia schema,
then times in one run: each stage alone (parquet -> Python strings, normalize + tokenize, zstd
frames) and the whole `prepare` with 0 (in-process), 1 and 2 tokenizer processes. Prints MB/s of
source text and the shards' compression ratio. The last prepare's shards stay in --out (for
bench/loader.py and bench/rank_memory.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import zstandard

from data.config import DataConfig
from data.prepare import prepare
from data.synthetic import write_wikipedia_parquet
from data.tokenizer import CharTokenizer
from data.wikipedia import WikipediaSource

ROOT = Path(__file__).resolve().parents[1]


def corpus(folder: Path, mb: int) -> Path:
    """The generated corpus of ~mb MB in folder, written unless a finished one of that size is there."""
    marker = folder / f"{mb}MB.done"
    if not marker.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating ~{mb} MB of articles in {folder} ...", flush=True)
        articles = mb * 1_000_000 // 2_400  # ~2.45 kB of text an article at mean_words=400
        write_wikipedia_parquet(folder, articles, files=max(2, mb // 50), mean_words=400, row_group_rows=1000)
        marker.write_text("")
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the generated corpus (MB of text)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpus", default=str(ROOT / ".cache" / "bench_wikipedia"))
    parser.add_argument("--out", default=str(ROOT / "shards" / "bench_wikipedia"))
    args = parser.parse_args()
    folder = corpus(Path(args.corpus), args.mb)
    source = WikipediaSource(folder, "unused")
    rows = []

    start = time.perf_counter()
    texts = [d.text for d in source.documents()]
    read_s = time.perf_counter() - start
    text_mb = sum(map(len, texts)) / 1e6
    rows.append(("read parquet -> str (main process)", read_s))
    tok = CharTokenizer()
    start = time.perf_counter()
    ids = [tok.encode(tok.normalize(t)) for t in texts]
    rows.append(("normalize + tokenize (one process)", time.perf_counter() - start))
    del texts
    blob = b"".join(ids)
    del ids
    cctx = zstandard.ZstdCompressor(level=3)
    start = time.perf_counter()
    compressed = sum(len(cctx.compress(blob[i:i + 65536])) for i in range(0, len(blob), 65536))
    rows.append(("zstd level 3, 64 KiB frames", time.perf_counter() - start))
    del blob

    for workers in args.workers:
        shutil.rmtree(args.out, ignore_errors=True)
        cfg = DataConfig(source="wikipedia", path=str(folder), dir=args.out, val_fraction=0.0005, workers=workers)
        start = time.perf_counter()
        manifest = prepare(cfg, show_progress=False)
        label = "in-process" if workers == 0 else f"{workers} tokenizer process" + "es" * (workers > 1)
        rows.append((f"prepare, data.workers={workers} ({label})", time.perf_counter() - start))
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    size = sum(s["bytes"] for info in manifest["splits"].values() for s in info["shards"])

    print(f"\n{source.count:,} articles, {text_mb:.0f} MB of text in {len(source.files)} parquet files, "
          f"{os.cpu_count()} CPUs\n")
    print("| stage | seconds | MB/s of text |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {text_mb / seconds:.1f} |")
    print(f"\nshards: {tokens:,} tokens in {size / 1e6:.1f} MB: compression {tokens / size:.2f}x "
          f"(frames alone: {tokens / compressed:.2f}x)")


if __name__ == "__main__":
    main()
