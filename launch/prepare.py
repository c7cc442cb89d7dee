"""Prepare shards: `python launch/prepare.py data.source=text data.path=book.txt data.dir=shards/book`.

Takes the same overrides as train.py (e.g. conf=wiki_full data.path=..., conf=enwik8 data.path=enwik8.zip).
Training prepares missing Shakespeare or text shards itself; Wikipedia, enwik8 and text8 are prepared here
first. Interrupted, it resumes when run again (enwik8 and text8, seconds long, start over).
"""
import sys

from launch.cli import run_with_config
from trainer.config import Config


def main(config: Config) -> None:
    from data.prepare import prepare, split_size_error
    from data.ready import locked
    from data.shards import ShardError

    data = config.data
    try:
        with locked(data.dir):  # a training run's preparer of the same folder waits, and finds it ready
            manifest = prepare(data)
    except (ShardError, ValueError, OSError, RuntimeError, ImportError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished shards are kept in {data.dir}; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    for split, info in manifest["splits"].items():
        size = sum(s["bytes"] for s in info["shards"])
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens, {len(info['shards'])} "
              f"shard(s), {size / 1e6:.2f} MB compressed ({info['tokens'] / max(size, 1):.2f}x)")
    unit = "byte values" if manifest["tokenizer"]["kind"] == "bytes" else "characters"
    print(f"wrote {data.dir}/manifest.json (vocab of {len(manifest['vocab'])} {unit})")
    too_small = split_size_error(data.dir, config.model.block_size, config.train.micro_batch, 1, config.preset,
                                 data.val_fraction)
    if too_small:
        sys.exit(f"error: {too_small}")


if __name__ == "__main__":
    run_with_config("launch/prepare.py", main)
