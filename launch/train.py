"""Train: `python launch/train.py conf=debug` (one process) or `deepspeed launch/train.py conf=...`."""
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.cli import CONF_DIR, exit_on_config_error, set_environment, strip_launcher_args
from trainer.config import ConfigError, register_presets, to_config


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    world = os.environ.get("WORLD_SIZE")  # set by the launcher: the global batch is checked before any work
    try:
        config = to_config(OmegaConf.to_container(cfg, resolve=True), int(world) if world else 1)
    except ConfigError as e:
        exit_on_config_error(e)
    from data.prepare import missing_shards_error

    missing = missing_shards_error(config.data, config.preset)  # before any process group or model
    if missing:
        sys.exit(f"error: {missing}")
    from data.shards import ShardError
    from trainer.checkpoint import CheckpointError
    from trainer.distributed import RunError
    from trainer.loop import train  # imports DeepSpeed: only once the config is known to be good

    try:
        train(config)
    except (RunError, ShardError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    set_environment()
    register_presets(CONF_DIR)
    sys.argv = strip_launcher_args(sys.argv)
    main()
