"""Evaluate a checkpoint: `python launch/eval.py run_dir=outputs/baby split=val` prints one JSON object.

`split=test` is the benchmarks' number (conf=enwik8, conf=text8). With data.tokenizer=bytes a token is
a byte, so `bpc` is bits per byte (`bpc_unit` says which): for text8, whose bytes are all characters,
the same thing; for enwik8, bits per byte, as the published enwik8 figures are.
"""
import json
import sys
from dataclasses import dataclass

from launch.cli import load_checkpoint_or_exit, parse_args


@dataclass
class EvalArgs:
    run_dir: str = "outputs/baby"
    """A run dir (its latest checkpoint), its checkpoints dir, or one checkpoint dir."""
    split: str = "val"
    """val | test (enwik8, text8) | train."""
    data_dir: str = ""
    """The prepared data; "": data.dir from run_dir's config.yaml."""
    batch_size: int = 32
    """Windows per batch."""
    max_batches: int = 0
    """Batches evaluated; 0: every window of the split once."""
    device: str = "auto"
    """auto (cuda when there is one) | cpu | cuda."""


def main(argv: list[str]) -> None:
    args = parse_args(EvalArgs, argv, "launch/eval.py")  # before torch loads: a mistake is told at once
    import torch
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from data.loader import RankLoader
    from data.shards import ShardError
    from trainer import rundir
    from trainer.evaluate import evaluate, summarize

    model, client = load_checkpoint_or_exit(args.run_dir, "eval.py")
    data_dir = args.data_dir
    if not data_dir:
        config = rundir.config_path(rundir.run_root(args.run_dir))
        if not config.is_file():
            sys.exit(f"eval.py: {config} not found; pass data_dir=")
        data_dir = OmegaConf.load(config).data.dir
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model.to(device)
    try:
        loader = RankLoader(data_dir, args.split, model.cfg.block_size, args.batch_size, shuffle=False,
                            num_workers=0)
    except ShardError as e:
        sys.exit(f"eval.py: {e}")
    if loader.reader.manifest["vocab"] != client["vocab"]:
        sys.exit(f"eval.py: {data_dir}/manifest.json: vocab differs from the checkpoint's")
    batches = loader.windows_per_epoch // args.batch_size
    loader.num_batches = min(batches, args.max_batches) if args.max_batches else batches
    bar = tqdm((loader.next_windows() for _ in range(loader.num_batches)), total=loader.num_batches,
               desc=f"eval {args.split}", unit=" batch", file=sys.stderr,
               disable=None)  # on a terminal only; stdout stays one JSON object
    stats = evaluate(model, bar, device)
    unit = "bits per byte" if client["tokenizer"] == "bytes" else "bits per character"
    print(json.dumps({"split": args.split, "step": client["step"], **summarize(stats), "bpc_unit": unit}))


if __name__ == "__main__":
    main(sys.argv[1:])
