"""Train: `python launch/train.py conf=debug` (one process) or `deepspeed launch/train.py conf=...`."""
import os
import sys

from launch.cli import load_config, run_with_config, set_environment
from trainer.config import Config

__all__ = ["load_config", "run"]


def _world_size() -> int:
    """The launcher's WORLD_SIZE: the global batch is checked against it before any work."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else 1


def run(config: Config) -> None:
    from data.ready import node_data_error

    # each node's local rank 0 prepares and checks its shards before any process group or model
    world = _world_size()
    data_error = node_data_error(config.data, config.preset, config.model.block_size, config.train.micro_batch,
                                 world)
    if data_error and world == 1:
        sys.exit(f"error: {data_error}")
    if data_error:  # said here at once: the other ranks stop with it only once every rank has joined
        print(f"this node's data.dir is not ready: {data_error}", file=sys.stderr, flush=True)
    from data.shards import ShardError
    from trainer.errors import CheckpointError, RunError
    from trainer.loop import train  # imports DeepSpeed: only once the config is known to be good

    try:
        train(config, data_error)  # several ranks: every rank stops with a node's data error
    except (RunError, ShardError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    set_environment()
    run_with_config("launch/train.py", run, _world_size())
