"""Shared command-line set-up for the entry points: the conf/ folder, launcher arguments, environment."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def set_environment() -> None:
    """One JIT-extension cache for every entry point, so DeepSpeed's CPU op is built once per checkout."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CONF_DIR.parent / ".cache" / "torch_extensions"))


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


def _one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line that names the key or the option."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name}: no such option; choose one of {', '.join(error.options)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(line for line in lines[:2] if not line.startswith("See http"))


def compose(overrides: list[str]):
    """conf/train.yaml composed with `key=value` overrides as @hydra.main composes it, `${hydra:...}`
    resolvable, the `hydra` node removed. Any Hydra or OmegaConf error (an unknown key, preset or
    option, a wrong type, bad syntax) is raised as a ConfigError of one line naming the key."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import ConfigError

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None


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
