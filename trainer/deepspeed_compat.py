"""Every place this trainer relies on DeepSpeed's internals, rather than its documented API.

Each function says which DeepSpeed behaviour it works around, and which test fails when a DeepSpeed
release changes that behaviour. setup.py pins DeepSpeed to [MIN_DEEPSPEED, BELOW_DEEPSPEED): raise
the upper bound only once the suite passes with the new release (tests/test_train_distributed.py
and tests/test_reliability.py hold every test named here).
"""
from __future__ import annotations

import os
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from packaging.version import Version

from .errors import RunError

MIN_DEEPSPEED = "0.19.6"  # older releases halve a gradient accumulated over micro-batches at ZeRO-0
BELOW_DEEPSPEED = "0.20"  # the first release the suite has not passed with


def check_deepspeed(version: str | None = None) -> None:
    """Refuse a DeepSpeed too old for this trainer (an environment that skipped `pip install -e .`).

    Caught by: test_a_deepspeed_older_than_setup_py_allows_is_refused_saying_what_to_install, and the
    halving itself by test_one_rank_accumulating_two_micro_batches_matches_two_ranks.
    """
    version = version or deepspeed.__version__
    if Version(version) < Version(MIN_DEEPSPEED):
        raise RunError(f"DeepSpeed {version} is installed; this trainer needs {MIN_DEEPSPEED} or newer, since "
                       "older releases halve a gradient accumulated over micro-batches: "
                       f"pip install 'deepspeed>={MIN_DEEPSPEED}'")


def clip_and_record_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip (when max_norm > 0) in torch, and record the global gradient norm, before every update.

    Works around: at ZeRO-0, DeepSpeed clips with per-tensor norms and an all-reduce of the total, and
    get_global_grad_norm() is only filled by its own clip. Relies on: the engine copying the private
    `optimizer._global_grad_norm` into its own after optimizer.step(), so engine.get_global_grad_norm()
    means the same for every stage and precision.
    Caught by: test_one_rank_accumulating_two_micro_batches_matches_two_ranks (norms compared) and
    test_two_rank_run_learns_logs_and_checkpoints (grad_norm > 0 in metrics.jsonl).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(opt, args, kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            opt._global_grad_norm = norm

    optimizer.register_step_pre_hook(clip)


def zero_grad_from_a_list(engine, model: torch.nn.Module) -> None:
    """Replace engine.zero_grad (ZeRO-0 only; ZeRO 1-3 clear their own flat buffers).

    Works around: DeepSpeed's ZeRO-0 step ends in engine.zero_grad(), which walks the whole module tree
    through named_parameters() to set each gradient to None, the largest part of the engine's host time
    per step for a small model (bench/engine_overhead.py measures it). A list built once does the same.
    Caught by: test_zero0_engine_steps_never_wait_for_the_device_nor_walk_the_model_nor_add_ops (no
    module walk in a step, every gradient None after it).
    """
    params = list(model.parameters())

    def zero_grad():
        for p in params:
            p.grad = None

    engine.zero_grad = zero_grad


def skip_one_rank_allreduce(engine) -> None:
    """Turn off the gradient all-reduce of a one-rank ZeRO-0 engine.

    Works around: DeepSpeed averages gradients even over one rank, copying them into buckets and back
    (a few % of a small model's step, and per-tensor ops). Relies on the engine's
    `enable_backward_allreduce` attribute, checked here so a rename fails loudly instead of silently.
    Caught by: test_zero0_engine_steps_never_wait_for_the_device_nor_walk_the_model_nor_add_ops (no op
    per parameter tensor) and test_one_rank_accumulating_two_micro_batches_matches_two_ranks.
    """
    if not hasattr(engine, "enable_backward_allreduce"):
        raise RuntimeError("this DeepSpeed's engine has no enable_backward_allreduce: update "
                           "trainer/deepspeed_compat.py for it (setup.py pins the releases it was tested with)")
    engine.enable_backward_allreduce = False


def shm_buffer_name(rank: int) -> str:
    """The file DeepSpeed's CPU all-reduce op (CPU ranks on one node) maps for `rank`, as 0.19 names it."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")


def unlink_shm_buffer() -> None:
    """Collective. Remove this rank's name for DeepSpeed's CPU all-reduce buffer once every rank has
    opened it.

    Works around: DeepSpeed's shm op creates /dev/shm/deepspeed_allreduce_buffer_*, ~69 MB per rank, and
    never unlinks it, so every run would leave its buffers behind until /dev/shm fills up. After the
    barrier every rank has mapped every peer's buffer, so the names can go; the memory stays valid while
    the ranks live and is freed when they exit, even by kill -9.
    Caught by: test_two_rank_run_learns_logs_and_checkpoints and
    test_kill_9_then_resume_is_bit_identical_and_sees_the_same_windows (no buffer left in /dev/shm).
    """
    if dist.get_world_size() > 1:
        dist.barrier()  # on every rank alike, whether or not the op made a buffer (multi-node: none)
        name = shm_buffer_name(dist.get_rank())
        if os.path.exists(name):
            os.unlink(name)


def timeout_every_group(timeout: timedelta) -> None:
    """Give every process group DeepSpeed creates the world group's timeout.

    DeepSpeed makes its data-parallel groups with `torch.distributed.new_group(ranks)`, which takes
    torch's module default (30 minutes for gloo, 10 for NCCL), not the timeout the world group was
    given: a gradient all-reduce would wait that long for a frozen node. Torch reads those defaults
    from module globals when a group is made, so they are set before DeepSpeed makes any.

    Caught by: tests/test_multinode_disks.py::test_a_collective_one_rank_never_joins_fails_the_job_within_the_timeout
    (the frozen node's peer waits in the gradient all-reduce of DeepSpeed's group).
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
