"""Process-group set-up that works under the deepspeed launcher and in one plain process."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .deepspeed_compat import check_deepspeed, end_process_group, timeout_every_group, unlink_shm_buffer
from .errors import RunError

# The wait while one rank per disk converts a checkpoint (checkpoint.to_universal: long for a large
# model) goes through a gloo group this patient; every other collective has train.collective_timeout_s.
# Data is made ready before the process group exists (launch/train.py), so it needs no such wait.
PATIENT_TIMEOUT = timedelta(hours=24)
_patient_group = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_device(local_rank: int) -> None:
    """Make this rank's own GPU (LOCAL_RANK) the current device before the first collective. Torch
    runs object collectives on the current device, which is GPU 0 for every rank of a node until
    DeepSpeed's engine sets it: the start-up checks would put all of a node's ranks on one GPU. CPU
    ranks have no device: they share the node's cores instead."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        share_cores()
        return
    count = accelerator.device_count()
    if not 0 <= local_rank < count:
        raise RunError(f"LOCAL_RANK={local_rank}, but this node shows {count} {accelerator.device_name()} "
                       f"device(s): start at most {count} ranks on it (deepspeed --num_gpus, or the hostfile's "
                       "slots=)")
    accelerator.set_device(local_rank)


def share_cores() -> None:
    """Split the node's cores between its CPU ranks (LOCAL_SIZE from the deepspeed launcher,
    LOCAL_WORLD_SIZE from torchrun). Torch gives every process one thread per core, so N ranks would
    run N threads on each core: 4x slower at 2 ranks on 2 cores. OMP_NUM_THREADS, when set, decides."""
    ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks))


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """(rank, world size); without the launcher this process becomes a world of one.

    timeout_s: how long any collective may wait for a peer before the job fails (gloo raises; NCCL's
    watchdog ends the process), so a stuck or vanished node never leaves the others waiting forever.
    """
    global _patient_group
    check_deepspeed()
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" in os.environ:  # else (MPI discovery) DeepSpeed's engine binds it later
        bind_device(int(os.environ["LOCAL_RANK"]))
    if timeout_s:
        timeout_every_group(timedelta(seconds=timeout_s))
    if get_accelerator().device_name() == "cpu" and os.environ.get("LOCAL_RANK", "0") == "0":
        announce_op_build()
    deepspeed.init_distributed(**({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
    _patient_group = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT) if dist.get_world_size() > 1 else None
    unlink_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def announce_op_build(op: str = "deepspeed_shm_comm") -> None:
    """Say so when DeepSpeed is about to JIT-build its CPU communication op (it builds in silence):
    when its build dir has no library yet, or ninja finds work to do there."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    if installed_ops.get(op):   # built into the install (DS_BUILD_SHM_COMM=1): loaded, never built here
        return
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / op
    if (build / f"{op}.so").is_file() and shutil.which("ninja"):
        dry_run = subprocess.run(["ninja", "-n", "-C", str(build)], capture_output=True, text=True)
        if dry_run.returncode == 0 and "no work to do" in dry_run.stdout:
            return
    print(f"building DeepSpeed's CPU communication op {op} in {build} (once: 30-90 s)", flush=True)


@dataclass(frozen=True)
class Node:
    """Where this rank sits: nodes share no disk, so one rank per node (its leader, local rank 0)
    does the node's file work (`latest`, meta.json, pruning) for the ranks beside it; its data is made
    ready before the process group exists (data/ready.py)."""
    index: int      # 0 .. nodes-1, in rank order
    count: int
    leader: bool    # local rank 0: writes and checks this node's files

    def writes(self, shared: bool) -> bool:
        """Whether this rank writes the node's files in a folder that is `shared` between the nodes
        or not: each node's leader, or node 0's alone when they all see the same folder."""
        return self.leader and (not shared or self.index == 0)


def node_of_this_rank() -> Node:
    """Collective. Ranks of one node are consecutive (as every launcher numbers them)."""
    local_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(local_ranks, int(os.environ.get("LOCAL_RANK", 0)))
    leaders = [r for r, local in enumerate(local_ranks) if local == 0]
    rank = dist.get_rank()
    return Node(index=sum(1 for r in leaders if r <= rank) - 1, count=len(leaders), leader=rank in leaders)


def shared_between_nodes(path, node: Node) -> bool:
    """Collective. Whether every node sees the same `path` (a shared filesystem, or "nodes" that are
    one machine, as in tests): each node's leader leaves a probe file of its own there and looks for
    the others'. The same answer on every rank."""
    if node.count == 1:
        return False
    path, probe = Path(path), None
    if node.leader:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".node-probe-{uuid.uuid4().hex}"
        probe.touch()
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, probe.name if probe else None)
    seen = sum((path / n).exists() for n in names if n and n != probe.name) if probe is not None else None
    answers = [None] * dist.get_world_size()
    dist.all_gather_object(answers, seen)  # also: every leader has looked before any probe goes
    if probe is not None:
        probe.unlink(missing_ok=True)
    counts = [a for a in answers if a is not None]
    if set(counts) not in ({0}, {node.count - 1}):  # some nodes share the folder and others do not
        raise RunError(f"{path}: some nodes see the same folder and others do not (each node's leader saw "
                       f"{counts} of the other nodes' probe files): give every node its own disk, or all one")
    return counts[0] > 0


def broadcast_error(message: str | None, patient: bool = False) -> None:
    """Raise the same error on every rank when any rank hit one (so no peer waits forever).

    patient: some rank may arrive hours late (it converted a checkpoint).
    """
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_patient_group if patient else None)
    first = next((m for m in messages if m), None)
    if first:
        raise RunError(first)


def shutdown() -> None:
    """A barrier before tearing down, so no rank's gloo peer vanishes while it still talks."""
    if dist.is_initialized():
        dist.barrier()
    end_process_group()
