"""Train: `python launch/train.py conf=debug` (one process) or `deepspeed launch/train.py conf=...`."""
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.cli import CONF_DIR, compose, exit_on_config_error, set_environment, strip_launcher_args
from trainer.config import Config, ConfigError, register_presets, to_config


def _world_size() -> int:
    """The launcher's WORLD_SIZE: the global batch is checked against it before any work."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else 1


def load_config(overrides: list[str], world_size: int = 1) -> Config:
    """The run's typed config from `key=value` overrides; any config error, Hydra's own included,
    exits with one line starting with `config error:`."""
    try:
        return to_config(OmegaConf.to_container(compose(overrides), resolve=True), world_size)
    except ConfigError as e:
        exit_on_config_error(e)


def run(config: Config) -> None:
    from data.prepare import missing_shards_error

    missing = missing_shards_error(config.data, config.preset)  # before any process group or model
    if missing:
        sys.exit(f"error: {missing}")
    from data.shards import ShardError
    from trainer.errors import CheckpointError, RunError
    from trainer.loop import train  # imports DeepSpeed: only once the config is known to be good

    try:
        train(config)
    except (RunError, ShardError, CheckpointError) as e:
        sys.exit(f"error: {e}")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    """Only for Hydra's own flags (--cfg job, --help, --info, -m)."""
    try:
        config = to_config(OmegaConf.to_container(cfg, resolve=True), _world_size())
    except ConfigError as e:
        exit_on_config_error(e)
    run(config)


if __name__ == "__main__":
    set_environment()
    register_presets(CONF_DIR)
    sys.argv = strip_launcher_args(sys.argv)
    if any(arg.startswith("-") for arg in sys.argv[1:]):
        hydra_main()
    else:
        run(load_config(sys.argv[1:], _world_size()))
