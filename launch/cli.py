"""Shared command-line set-up for the entry points: the conf/ folder, launcher arguments, environment."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def set_environment() -> None:
    """One JIT-extension cache and one ninja for every way of running (make, the venv's python,
    an activated venv), so DeepSpeed's CPU op is built once per checkout: ninja rebuilds everything
    that another version of ninja built. The Makefile sets the same two."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CONF_DIR.parent / ".cache" / "torch_extensions"))
    scripts = os.path.dirname(sys.executable)  # the venv's bin/, whose ninja came with DeepSpeed
    if os.path.isfile(os.path.join(scripts, "ninja")):
        os.environ["PATH"] = os.pathsep.join([scripts, *(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                          if p != scripts)])


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (Hydra rejects unknown arguments).

    LOCAL_RANK is read from the environment, which the launcher also sets.
    """
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg == "--local_rank":
            skip = True
        else:
            out.append(arg)
    return out


def exit_on_config_error(error: Exception) -> None:
    """One line naming the key, instead of a traceback (OmegaConf's messages go on with full_key and
    object_type lines: the first line and the key are kept)."""
    lines = str(error).splitlines() or [""]
    key = re.search(r"\(key: [^)]*\)$", lines[-1]) if len(lines) > 1 else None
    sys.exit(f"config error: {lines[0]}{f' {key.group()}' if key else ''}")


def compose(overrides: list[str]):
    """conf/train.yaml composed with `key=value` overrides (trainer.config.compose)."""
    from trainer.config import compose as compose_config

    return compose_config(CONF_DIR, overrides)


def parse_dotlist(schema, argv: list[str], prog: str):
    """`key=value` arguments into the dataclass `schema`; an unknown key or bad value exits naming it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as e:
        sys.exit(f"{prog}: {e.msg} (key: {e.full_key})")
    return OmegaConf.to_object(merged)


def load_checkpoint_or_exit(run_dir: str, prog: str):
    """(model, client state) of the newest checkpoint under run_dir, or exit with one line saying why."""
    from trainer.checkpoint import CheckpointError, load_for_inference

    try:
        return load_for_inference(run_dir)
    except (FileNotFoundError, CheckpointError) as e:
        sys.exit(f"{prog}: run_dir: {e}")
