"""Export a checkpoint for Hugging Face `transformers`:
`python launch/export.py run_dir=outputs/baby out=hf/baby [step=N]`.

Writes model.safetensors, config.json, the tokenizer files and a model card (README.md) into `out`,
after loading that folder back through transformers and comparing its logits with ours (see
trainer/export.py). Any ZeRO stage and world size: ZeRO-3 shards are consolidated as sample.py does.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.cli import load_checkpoint_or_exit, parse_args
from trainer import rundir


@dataclass
class ExportArgs:
    run_dir: str = "outputs/baby"
    """A run dir (its latest checkpoint), its checkpoints dir, or one checkpoint dir."""
    out: str = ""
    """The folder to write (required); it must not exist, or be empty."""
    step: int = 0
    """The checkpoint of this step; 0: the latest."""


def training_command(config_yaml: Path, world_size: int) -> str:
    """The train command line that gives the run's resolved config.yaml: its preset plus every key that
    differs from that preset in this checkout (the data's vocab_size is set by the data, not the user)."""
    import shlex

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from launch.cli import CONF_DIR, compose
    from trainer.config import Config, ConfigError, register_presets

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    saved = OmegaConf.to_container(OmegaConf.load(config_yaml), resolve=True)
    preset = saved.get("preset") or "baby"
    register_presets(CONF_DIR)
    try:
        base = dict(leaves(OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(Config),
                                                                  compose([f"conf={preset}"])), resolve=True)))
    except (ConfigError, OmegaConfBaseException):  # a preset gone from this checkout: list every key
        base = {}
    overrides = [f"conf={preset}"] + [
        f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
        for key, value in leaves(saved) if key not in ("preset", "model.vocab_size") and base.get(key) != value]
    launcher = "python launch/train.py" if world_size == 1 else f"deepspeed --num_gpus {world_size} launch/train.py"
    return f"{launcher} {' '.join(shlex.quote(o) for o in overrides)}"


def main(argv: list[str]) -> None:
    args = parse_args(ExportArgs, argv, "launch/export.py")  # before torch loads: a mistake is told at once
    from trainer.checkpoint import locate, read_meta
    from trainer.export import ExportError, export, refuse_taken, run_facts

    if not args.out:
        sys.exit("export.py: out= is required: the folder to write, e.g. out=hf/baby")
    out, source = Path(args.out), Path(args.run_dir)
    try:
        refuse_taken(out)  # before the checkpoint loads
    except ExportError as e:
        sys.exit(f"export.py: {e}")
    if args.step:
        source = rundir.checkpoints(rundir.run_root(source)) / rundir.step_tag(args.step)
        if not source.is_dir():
            found = rundir.tags(source.parent)
            sys.exit(f"export.py: step={args.step}: no checkpoint {source} (found: {', '.join(found) or 'none'})")
    model, client = load_checkpoint_or_exit(str(source), "export.py")
    if client["tokenizer"] not in (None, "char"):  # the folder's tokenizer is built for the char vocabulary
        sys.exit(f"export.py: {source}: trained with data.tokenizer={client['tokenizer']}; export writes the char "
                 "tokenizer only")
    root = rundir.run_root(source)
    ckpt = locate(source)
    facts = run_facts(root, client["step"]) | {
        "step": client["step"], "zero_stage": client["zero_stage"], "name": root.name,
        "world_size": read_meta(ckpt)["world_size"]}
    if rundir.config_path(root).is_file():
        facts["command"] = training_command(rundir.config_path(root), facts["world_size"])
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        diff = export(model, client["vocab"], client["lowercase"], out, facts)
    except ExportError as e:
        sys.exit(f"export.py: {e}")
    print(f"{out}: step {client['step']} of {root}, largest |logit difference| from our model {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
