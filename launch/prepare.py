"""Prepare shards: `python launch/prepare.py data.source=text data.path=book.txt data.dir=shards/book`.

Takes the same overrides as train.py (e.g. conf=wiki_full data.path=..., conf=enwik8 data.path=enwik8.zip).
Training prepares missing Shakespeare or text shards itself; Wikipedia, enwik8 and text8 are prepared here
first. Interrupted, it resumes when run again (enwik8 and text8, seconds long, start over).
"""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.cli import CONF_DIR, exit_on_config_error
from trainer.config import ConfigError, register_presets, to_config


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    from data.prepare import prepare, split_size_error
    from data.shards import ShardError

    try:
        config = to_config(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as e:
        exit_on_config_error(e)
    data = config.data
    try:
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
    register_presets(CONF_DIR)
    main()
