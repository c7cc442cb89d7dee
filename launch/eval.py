"""Evaluate a checkpoint: `python launch/eval.py run_dir=outputs/baby split=val` prints one JSON object."""
import json
import sys
from dataclasses import dataclass

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class EvalArgs:
    run_dir: str = "outputs/baby"   # a run dir, its checkpoints dir, or one checkpoint dir
    split: str = "val"              # val | train
    data_dir: str = ""              # default: data.dir from run_dir/config.yaml
    batch_size: int = 32
    max_batches: int = 0            # 0 = every window of the split once
    device: str = "auto"            # auto | cpu | cuda


def parse(argv: list[str]) -> EvalArgs:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalArgs), OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as e:
        sys.exit(f"eval.py: {e.msg} (key: {e.full_key})")
    return OmegaConf.to_object(merged)


def main(argv: list[str]) -> None:
    from pathlib import Path

    import torch

    from data.loader import RankLoader
    from data.shards import ShardError
    from trainer.checkpoint import CheckpointError, load_for_inference
    from trainer.evaluate import evaluate, summarize

    args = parse(argv)
    try:
        model, client = load_for_inference(args.run_dir)
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"eval.py: run_dir: {e}")
    data_dir = args.data_dir
    if not data_dir:
        config = Path(args.run_dir) / "config.yaml"
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
    stats = evaluate(model, loader, device)
    print(json.dumps({"split": args.split, "step": client["step"], **summarize(stats)}))


if __name__ == "__main__":
    main(sys.argv[1:])
