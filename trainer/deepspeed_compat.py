"""Every place this trainer relies on DeepSpeed's internals, rather than its documented API.

Each function says which DeepSpeed behaviour it works around, and which test fails when a DeepSpeed
release changes that behaviour. setup.py pins DeepSpeed to [MIN_DEEPSPEED, BELOW_DEEPSPEED): raise
the upper bound only once the suite passes with the new release (tests/trainer/test_train_distributed.py,
tests/scenarios/test_reliability.py and tests/trainer/test_checkpoint_unpickling.py hold every test named here).
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import os
import pickle
import re
import sys
from datetime import timedelta
from importlib.metadata import version as installed_version
from pathlib import Path

import torch
import torch.distributed as dist
from packaging.version import Version

from .errors import CheckpointError, RunError

MIN_DEEPSPEED = "0.19.6"  # older releases halve a gradient accumulated over micro-batches at ZeRO-0
BELOW_DEEPSPEED = "0.20"  # the first release the suite has not passed with


def check_deepspeed(version: str | None = None) -> None:
    """Refuse a DeepSpeed too old for this trainer (an environment that skipped `pip install -e .`).

    Caught by: test_a_deepspeed_older_than_setup_py_allows_is_refused_saying_what_to_install, and the
    halving itself by test_one_rank_accumulating_two_micro_batches_matches_two_ranks.
    """
    version = version or installed_version("deepspeed")  # without importing it: sampling never does
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

    Caught by: tests/scenarios/test_multinode_disks.py::
    test_a_collective_one_rank_never_joins_fails_the_job_within_the_timeout
    (the frozen node's peer waits in the gradient all-reduce of DeepSpeed's group).
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def end_process_group() -> None:
    """Destroy this process's group and DeepSpeed's cached clone of the world group.

    DeepSpeed keeps a clone of the world group in `deepspeed.utils.groups._WORLD_GROUP` and reuses it
    for every engine: after the group is destroyed, a new process group in the same process (tests
    that train in-process, one module after another) would meet that dead clone ("Group ... is not
    registered"). Caught by: tests/trainer/test_checkpoint_unpickling.py's in-process world followed, on one
    pytest worker, by tests/trainer/test_train_distributed.py's in-process engine test
    (test_zero0_engine_steps_never_wait_for_the_device_nor_walk_the_model_nor_add_ops).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None


def deepspeed_checkpoint_types() -> list[type]:
    """The only types beside tensors, numbers, strings, lists, tuples and dicts that DeepSpeed 0.19
    pickles into our checkpoints: in ZeRO 1-3 optimizer partitions (fp32 and bf16) and in their
    universal conversions. None runs code when unpickled: the loss scaler's attributes are restored
    as they are, the enum is looked up by value, and fragment_address is a dataclass of two ints.
    Caught by: tests/trainer/test_checkpoint_unpickling.py::
    test_no_checkpoint_of_any_preset_at_any_zero_stage_is_refused
    (every file of every preset at every stage, and their universal conversions, loads)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def checkpoint_files_are_data():
    """While open, every torch.load in this process (ours and every one of DeepSpeed's: its checkpoint
    engine, zero_to_fp32, ds_to_universal, the universal loaders) unpickles with torch's weights-only
    unpickler, allowing deepspeed_checkpoint_types() and nothing else, so a file from a hostile host
    can hold no code that runs. A refusal is a CheckpointError of one line naming the file and the type.

    Works around: DeepSpeed 0.19 passes weights_only=False to every torch.load it makes, and loads
    its files in a dozen functions of its own (no single hook to give it a safer loader): torch.load
    itself is wrapped for the time of a load. Relies on DeepSpeed calling `torch.load` through the
    torch module (not a name imported from it).
    Caught by: tests/trainer/test_checkpoint_unpickling.py (a planted payload in each file kind, through each entry
    point: it must be refused and never run).
    """
    # DeepSpeed's types can only be in files DeepSpeed reads: sampling a ZeRO 0-2 checkpoint reads its
    # model states itself, without importing DeepSpeed (1.5 s), and those hold none
    allowed = deepspeed_checkpoint_types() if "deepspeed" in sys.modules else []
    enums = [t for t in allowed if isinstance(t, type) and issubclass(t, enum.Enum)]
    guarded = [t for t in allowed if t not in enums] + _enum_guards(enums)
    load = torch.load

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True  # overrides DeepSpeed's explicit weights_only=False
        with torch.serialization.safe_globals(guarded):
            try:
                return load(f, *args, **kwargs)
            except pickle.UnpicklingError as e:
                kinds = ", ".join(["tensors", "numbers, strings and containers", *(t.__name__ for t in allowed)])
                raise CheckpointError(f"{f}: holds {_refused_type(f, e)}, which a checkpoint file may not hold "
                                      f"(only {kinds}): refusing to load it, as it could run code") from None

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = load


def _enum_guards(enums: list[type]) -> list[tuple]:
    """What an allowed enum's names resolve to while a checkpoint unpickles: the enum's own name to a
    lookup by value, never the class itself (torch would then let the file's BUILD rewrite a member's
    attributes, for the whole process); and `builtins.getattr`, which CPython 3.11.0-3.11.4 (Debian 12's
    python3, and images built on it) write for a member, to a lookup by name of those enums only."""
    stand_ins = []
    for cls in enums:
        def by_value(value, cls=cls):
            try:
                return cls(value)
            except (ValueError, TypeError):
                raise pickle.UnpicklingError(f"{value!r} is not a value of {cls.__name__}") from None
        stand_ins.append((by_value, cls))

    def enum_member(*args):
        cls = next((c for f, c in stand_ins if len(args) == 2 and f is args[0]), None)
        if cls is None or not isinstance(args[1], str) or args[1] not in cls.__members__:
            raise pickle.UnpicklingError("getattr of something else than an allowed enum's member")
        return cls[args[1]]

    guards = [(f, f"{c.__module__}.{c.__qualname__}") for f, c in stand_ins]
    return [*guards, (enum_member, "builtins.getattr")] if guards else []


def _refused_type(f, error: Exception) -> str:
    """The global(s) a refused file names, read from its pickle without running it (torch's scan), or
    else from torch's message."""
    if isinstance(f, (str, os.PathLike)):
        with contextlib.suppress(Exception):  # not a zip: a legacy or damaged file
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
            if names:
                return " and ".join(names[:3])
    found = re.search(r"GLOBAL (\S+)", str(error))
    return found.group(1) if found else "a pickle instruction the weights-only unpickler refuses"


def ds_to_universal(source: Path, out: Path) -> None:
    """DeepSpeed's ds_to_universal conversion of the checkpoint in `source` into `out`, in this process,
    with every file it reads unpickled as data (checkpoint_files_are_data).

    Relies on: its command line's main(args) and the names of its arguments (one worker each, so it
    starts no process pool, which would not inherit the guard on platforms that spawn).
    Caught by: tests/scenarios/test_reliability.py::
    test_a_zero_checkpoint_resumes_at_another_world_size_through_a_universal_conversion
    (a conversion that resumes) and tests/trainer/test_checkpoint_unpickling.py (a payload it must refuse).
    """
    from deepspeed.checkpoint import ds_to_universal as conversion

    args = argparse.Namespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with checkpoint_files_are_data():
        conversion.main(args)


if __name__ == "__main__":  # python -m trainer.deepspeed_compat SOURCE OUT: what checkpoint.to_universal runs
    try:
        ds_to_universal(Path(sys.argv[1]), Path(sys.argv[2]))
    except CheckpointError as e:
        sys.exit(f"refused: {e}")
