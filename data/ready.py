"""Shards ready to train on, before any process group exists (launch/train.py calls `node_data_error`
on every rank). One rank per node, local rank 0, prepares missing shards, checks that they match the
config and give every rank a batch, and verifies their checksums; the node's other ranks read them
only once the process group says that every node is ready.

Two preparers of one folder (nodes that share data.dir, or ranks started without LOCAL_RANK) take
turns through an exclusive flock on a lock file beside data.dir: the first prepares, the next finds
the manifest. flock works across nodes where the filesystem forwards it (NFSv4, bind mounts)."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import DataConfig
from .prepare import check_matches, is_prepared, missing_shards_error, prepare, split_size_error
from .shards import ShardReader, load_manifest


class NotReady(Exception):
    """data.dir cannot be trained on as it is; the message says what to run or change."""


def node_data_error(cfg: DataConfig, preset: str, block_size: int, micro_batch: int,
                    world_size: int) -> str | None:
    """On the rank that does its node's data work, `make_ready`; what stopped it, in one line, or None
    (always None on the node's other ranks)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    try:
        make_ready(cfg, preset, block_size, micro_batch, world_size)
    except NotReady as e:
        return str(e)
    except Exception as e:  # the trainer reports it on every rank, so no peer waits for this one
        return f"{type(e).__name__}: {e}"
    return None


def make_ready(cfg: DataConfig, preset: str, block_size: int, micro_batch: int, world_size: int) -> None:
    """Prepare cfg.dir when it has no manifest (sources small enough for train), check it was prepared
    from this config and gives `micro_batch` windows to each of `world_size` ranks, and verify every
    shard's sha256 when cfg.verify."""
    missing = missing_shards_error(cfg, preset)  # a source too large for train: prepared beforehand
    if missing:
        raise NotReady(missing)
    if not is_prepared(cfg):
        with locked(cfg.dir):
            if not is_prepared(cfg):  # else a peer prepared it while this rank waited for the lock
                print(f"no shards in {cfg.dir}: preparing them from data.source={cfg.source}", flush=True)
                prepare(cfg)
    check_matches(cfg)
    too_small = split_size_error(cfg.dir, block_size, micro_batch, world_size, preset, cfg.val_fraction)
    if too_small:
        raise NotReady(too_small)
    if cfg.verify:
        for split in load_manifest(cfg.dir)["splits"]:
            ShardReader(cfg.dir, split).verify()


def lock_path(data_dir: str | Path) -> Path:
    """Beside data.dir, not in it: a prepare starts by emptying the folder of old shards."""
    data_dir = Path(data_dir).resolve()
    return data_dir.parent / f".{data_dir.name}.lock"


@contextmanager
def locked(data_dir: str | Path) -> Iterator[None]:
    """Hold data.dir's lock while preparing it. The file stays: deleting it would let a waiter lock a
    name no one else uses. Where no lock can be had (a parent folder this user cannot write, a file
    system without flock) preparing goes on unlocked, saying so: two preparers of one folder are then
    the user's to avoid, as before this lock existed."""
    path = lock_path(data_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(path)
    except OSError as e:
        print(f"note: no lock for {data_dir} ({e.strerror or e}): preparing it unlocked", flush=True)
        yield
        return
    try:
        _wait_for_lock(fd, path)
        yield
    finally:
        os.close(fd)  # releases the lock; the kernel does too if this process dies


def _open_lock(path: Path) -> int:
    """The lock file, opened without following a link or blocking on a FIFO someone planted there; it
    must be a regular file of this user's (a shared parent such as /tmp is anyone's to write)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} is not a regular file of this user's")
    return fd


def _wait_for_lock(fd: int, path: Path) -> None:
    """flock, saying once that this process waits and for what (another preparer holds it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        print(f"waiting for {path}: another process is preparing this data.dir", flush=True)
    except OSError as e:  # flock unsupported here (ENOSYS, ENOLCK: e.g. Lustre without flock)
        print(f"note: cannot lock {path} ({e.strerror}): preparing unlocked", flush=True)
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
