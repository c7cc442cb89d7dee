"""Process-group set-up that works under the deepspeed launcher and in one plain process."""
from __future__ import annotations

import os
import socket

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from packaging.version import Version

MIN_DEEPSPEED = "0.19.6"  # as in setup.py: older releases halve a gradient accumulated over micro-batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_deepspeed(version: str | None = None) -> None:
    """Refuse a DeepSpeed too old for this trainer (an environment that skipped `pip install -e .`)."""
    version = version or deepspeed.__version__
    if Version(version) < Version(MIN_DEEPSPEED):
        raise RunError(f"DeepSpeed {version} is installed; this trainer needs {MIN_DEEPSPEED} or newer, since "
                       "older releases halve a gradient accumulated over micro-batches: "
                       f"pip install 'deepspeed>={MIN_DEEPSPEED}'")


def bind_device(local_rank: int) -> None:
    """Make this rank's own GPU (LOCAL_RANK) the current device before the first collective. Torch
    runs object collectives on the current device, which is GPU 0 for every rank of a node until
    DeepSpeed's engine sets it: the start-up checks would put all of a node's ranks on one GPU. CPU
    ranks are processes and have nothing to bind."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return
    count = accelerator.device_count()
    if not 0 <= local_rank < count:
        raise RunError(f"LOCAL_RANK={local_rank}, but this node shows {count} {accelerator.device_name()} "
                       f"device(s): start at most {count} ranks on it (deepspeed --num_gpus, or the hostfile's "
                       "slots=)")
    accelerator.set_device(local_rank)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); without the launcher this process becomes a world of one."""
    check_deepspeed()
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" in os.environ:  # else (MPI discovery) DeepSpeed's engine binds it later
        bind_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed()
    _unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def _unlink_shm_buffer() -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce buffer once every rank has opened it.

    DeepSpeed 0.19's shm op (CPU ranks on one node) creates /dev/shm/deepspeed_allreduce_buffer_*,
    ~69 MB per rank, and never unlinks it: every run would leave its buffers behind until /dev/shm
    fills up. After the barrier, every rank has mapped every peer's buffer, so the names can go; the
    memory stays valid while the ranks live and is freed when they exit, even by kill -9.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    if dist.get_world_size() > 1:
        dist.barrier()  # on every rank alike, whether or not the op made a buffer (multi-node: none)
        if os.path.exists(name):
            os.unlink(name)


class RunError(RuntimeError):
    """A problem found before training starts (bad data, missing files), reported alike on every rank."""


def broadcast_error(message: str | None) -> None:
    """Raise the same error on every rank when any rank hit one (so no peer waits forever)."""
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    first = next((m for m in messages if m), None)
    if first:
        raise RunError(first)


def shutdown() -> None:
    """A barrier before tearing down, so no rank's gloo peer vanishes while it still talks."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
