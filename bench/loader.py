"""Data loader throughput beside raw zstd decompression of the same frames, and the loader's share
of a training step of the debug model. Each reader covers one epoch of the split (at least 3000
batches, or --batches); the rounds are interleaved and the table shows medians, since this machine
is noisy.

    python bench/loader.py [--data-dir shards/shakespeare] [--rounds 3] [--batches N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import zstandard

from data.loader import RankLoader
from data.shards import ShardReader
from model import GPT, GPTConfig

WORKERS = (0, 1, 2)


def raw_zstd(reader: ShardReader) -> tuple[float, int]:
    """Seconds to read and decompress every frame once, and the tokens they hold."""
    dctx = zstandard.ZstdDecompressor()
    start, tokens = time.perf_counter(), 0
    handles = [open(f, "rb") for f in reader.files]
    for ref in reader.frames:
        handles[ref.shard].seek(ref.offset)
        tokens += len(dctx.decompress(handles[ref.shard].read(ref.nbytes), max_output_size=ref.tokens))
    for h in handles:
        h.close()
    return time.perf_counter() - start, tokens


def loader_rate(data_dir, block_size: int, micro: int, workers: int, batches: int | None) -> float:
    """Tokens/s the loader delivers to the training loop (windows x block_size, through
    next_windows()), after its workers have started."""
    loader = RankLoader(data_dir, "train", block_size, micro, num_workers=workers)
    batches = batches or max(loader.windows_per_epoch // micro - 1, 3000)
    loader.next_windows()
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_windows()
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * micro * block_size / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="shards/shakespeare")
    parser.add_argument("--batches", type=int, default=None, help="per measurement; default one epoch, at least 3000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=64)
    args = parser.parse_args()
    reader = ShardReader(args.data_dir, "train")
    raw, rates = [], {w: [] for w in WORKERS}
    for _ in range(args.rounds):
        seconds, tokens = raw_zstd(reader)
        raw.append(tokens / seconds)
        for workers in WORKERS:
            rates[workers].append(loader_rate(args.data_dir, args.block_size, args.micro_batch, workers, args.batches))
    compressed = sum(s["bytes"] for s in reader.manifest["splits"]["train"]["shards"])
    print(f"\n{args.data_dir}: {tokens:,} train tokens in {len(reader.frames)} frames, compression "
          f"{tokens / compressed:.2f}x; windows of {args.block_size + 1}, micro-batch {args.micro_batch}; "
          f"medians of {args.rounds} rounds\n")
    print("| reader | tokens/s | MB/s of text | vs raw zstd |\n|---|---:|---:|---:|")
    print(f"| raw zstd, every frame once | {statistics.median(raw):,.0f} | {statistics.median(raw) / 1e6:.1f} | 1.00 |")
    for workers in WORKERS:
        rate = statistics.median(rates[workers])
        ratio = statistics.median(r / base for r, base in zip(rates[workers], raw))
        print(f"| RankLoader, {workers} workers | {rate:,.0f} | {rate / 1e6:.1f} | {ratio:.2f} |")

    # the loader's share of a debug-model step: time to take one batch vs one forward + backward
    cfg = GPTConfig(vocab_size=len(reader.manifest["vocab"]), n_layer=2, n_head=2, d_model=32, block_size=32)
    model = GPT(cfg)
    loader = RankLoader(args.data_dir, "train", cfg.block_size, 8, num_workers=1)
    loader.next_windows()
    fetch = compute = 0.0
    for _ in range(200):
        t0 = time.perf_counter()
        windows = loader.next_windows()
        t1 = time.perf_counter()
        windows = windows.long()
        _, loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        t2 = time.perf_counter()
        fetch, compute = fetch + t1 - t0, compute + t2 - t1
    loader.close()
    print(f"\ndebug model (2/2/32, ctx 32, batch 8), 1 worker: taking a batch is {fetch / (fetch + compute):.1%} "
          f"of a step ({fetch / 200 * 1e6:.0f} us of {(fetch + compute) / 200 * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
