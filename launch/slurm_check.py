"""The Slurm job's check before any rank starts (launch/slurm.sbatch runs it once, on the job's first
node): the config must load at the job's world size, and a job given GPUs must see them. A problem is
one line in the job's output and exit 1, where ranks would otherwise start, and wait for each other in
a collective or train on CPUs unnoticed.

    python launch/slurm_check.py NODES RANKS_PER_NODE key=value ...
"""
from __future__ import annotations

import os
import sys

from launch.cli import CONF_DIR, set_environment
from launch.train import load_config
from trainer.config import register_presets


def gpu_error(ranks_per_node: int) -> str | None:
    """The job asked for GPUs (--gpus-per-node: SLURM_GPUS_PER_NODE, TYPE:N or N), but torch sees fewer
    than the ranks a node runs."""
    given = int((os.environ.get("SLURM_GPUS_PER_NODE") or "0").rsplit(":", 1)[-1])
    if not given:
        return None
    import torch

    seen = torch.cuda.device_count()
    if seen >= ranks_per_node:
        return None
    why = ("this torch is a CPU-only build" if torch.version.cuda is None else
           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}; check the node's driver")
    return (f"error: the job asked for {given} GPU(s) a node, but torch sees {seen} CUDA device(s) on "
            f"{os.uname().nodename} ({why}): submit to GPU nodes, or without --gpus-per-node to train on CPUs")


def main(argv: list[str]) -> None:
    nodes, ranks_per_node, overrides = int(argv[0]), int(argv[1]), argv[2:]
    set_environment()
    register_presets(CONF_DIR)
    load_config(overrides, nodes * ranks_per_node)  # exits with one `config error:` line
    error = gpu_error(ranks_per_node)
    if error:
        sys.exit(error)


if __name__ == "__main__":
    main(sys.argv[1:])
