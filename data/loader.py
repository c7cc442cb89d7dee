"""Per-rank training windows whose global order is a pure function of (seed, epoch, sample index).

A window is block_size + 1 consecutive tokens inside one frame. Frame f holds
n_f = (len_f - T) // (T + 1) windows starting at s_e + j * (T + 1), where the shift s_e in [0, T]
changes with the epoch so the model sees new alignments. The epoch order shuffles frames, groups
them into buckets of `bucket_frames`, and shuffles the windows within each bucket: documents mix
across the corpus while a reader touches only a bucket's frames at a time.

Samples are numbered by one global counter k over all epochs (epoch = k // N, i = k % N).
Rank r of W takes k = start + t * W + r, so the loader's whole state is (seed, consumed samples):
resume at any world size or micro-batch continues the epoch with nothing repeated or skipped.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import OrderedDict, deque
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardError, ShardReader


class Bucket(NamedTuple):
    """One epoch's bucket: its member frames and, for each of its slots in shuffled order, which
    member holds the window, where the window starts in that frame, and where it starts in the
    members' tokens laid end to end."""
    key: tuple[int, int]
    members: np.ndarray
    member: np.ndarray
    starts: np.ndarray
    offsets: np.ndarray


def _spans(values: np.ndarray):
    """(lo, hi) of each run of equal adjacent values."""
    edges = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]
    return zip(edges[:-1], edges[1:])


class WindowOrder:
    def __init__(self, frame_tokens: list[int], block_size: int, seed: int, shuffle: bool = True,
                 bucket_frames: int = 8):
        self.T = block_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_frames = bucket_frames
        self.frame_tokens = np.asarray(frame_tokens, dtype=np.int64)
        self.per_frame = np.maximum(0, (self.frame_tokens - block_size) // (block_size + 1))
        self.windows_per_epoch = int(self.per_frame.sum())
        self._epoch_cache: OrderedDict[int, tuple] = OrderedDict()
        self._bucket = lru_cache(maxsize=4)(self._make_bucket)

    def _epoch(self, epoch: int):
        """(frame order, cumulative window counts per bucket, shift) for one epoch."""
        if epoch not in self._epoch_cache:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                frames = rng.permutation(len(self.per_frame))
                shift = int(rng.integers(0, self.T + 1))
            else:
                frames, shift = np.arange(len(self.per_frame)), 0
            counts = self.per_frame[frames]
            per_bucket = np.add.reduceat(counts, np.arange(0, len(counts), self.bucket_frames))
            cum = np.concatenate([[0], np.cumsum(per_bucket)])
            self._epoch_cache[epoch] = (frames, cum, shift)
            while len(self._epoch_cache) > 2:
                self._epoch_cache.popitem(last=False)
        return self._epoch_cache[epoch]

    def _make_bucket(self, epoch: int, bucket: int) -> Bucket:
        frames, _, shift = self._epoch(epoch)
        members = frames[bucket * self.bucket_frames:(bucket + 1) * self.bucket_frames]
        counts = self.per_frame[members]
        member = np.repeat(np.arange(len(members)), counts)
        within = np.arange(len(member)) - np.repeat(np.cumsum(counts) - counts, counts)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, bucket]).permutation(len(member))
            member, within = member[perm], within[perm]
        starts = shift + within * (self.T + 1)
        lengths = self.frame_tokens[members]
        return Bucket((epoch, bucket), members, member, starts, (np.cumsum(lengths) - lengths)[member] + starts)

    def runs(self, ks):
        """Ascending global samples ks split by (epoch, bucket): yields (bucket, the run's slice of ks,
        slots in the bucket). A rank's consecutive batches give one run or a few."""
        if self.windows_per_epoch == 0:
            raise ValueError("no windows: every frame is shorter than 2 * block_size + 1 tokens")
        ks = np.asarray(ks, dtype=np.int64)
        if np.any(ks[1:] < ks[:-1]):
            raise ValueError("sample indices must be in ascending order")
        epochs, within_epoch = np.divmod(ks, self.windows_per_epoch)
        for lo, hi in _spans(epochs):
            epoch = int(epochs[lo])
            _, cum, _ = self._epoch(epoch)
            buckets = np.searchsorted(cum, within_epoch[lo:hi], side="right") - 1
            for b_lo, b_hi in _spans(buckets):
                bucket = int(buckets[b_lo])
                run = slice(lo + b_lo, lo + b_hi)
                yield self._bucket(epoch, bucket), run, within_epoch[run] - cum[bucket]

    def windows(self, ks) -> tuple[np.ndarray, np.ndarray]:
        """(frame ids, start tokens in frame) of global samples ks."""
        frames, starts = np.empty(len(ks), dtype=np.int64), np.empty(len(ks), dtype=np.int64)
        for bucket, sel, slots in self.runs(ks):
            frames[sel] = bucket.members[bucket.member[slots]]
            starts[sel] = bucket.starts[slots]
        return frames, starts

    def window(self, k: int) -> tuple[int, int]:
        """(frame id, start token in frame) of global sample k."""
        frames, starts = self.windows([k])
        return int(frames[0]), int(starts[0])


PREFETCH = 2  # groups each DataLoader worker may have ready ahead of the rank


class GroupRing:
    """Where workers put their groups: per worker, `slots` buffers in shared memory that the rank
    maps once, before the workers start. A hand-off is then (worker, group number, batches), a few
    bytes, instead of a megabyte through a pipe or a fresh shared segment (each cost more than the
    decompression). A worker reuses a buffer only after the rank has marked the group in it done.

    Slots: a worker's prefetched groups, the rank's current group and the one before it (a caller
    may still hold its last batch). DataLoader's own prefetch limit then means no worker ever waits,
    and the rank's own process (num_workers=0) never does; the per-worker count of free slots, a
    semaphore the forked workers share, makes the ring correct whatever that limit is. A worker
    fills its groups in order, taking one count each; the rank releases them in order."""

    slots = PREFETCH + 3
    wait_s = 1.0  # how often a waiting worker checks that the training process is still there

    def __init__(self, workers: int, group: int, micro_batch: int, window: int):
        self.buffers = torch.empty((max(1, workers), self.slots, group, micro_batch, window), dtype=torch.uint8)
        self.free = [multiprocessing.Semaphore(self.slots) for _ in range(max(1, workers))]
        self.owner = os.getpid()  # the rank: the workers are its children
        if workers:
            self.buffers.share_memory_()

    def slot(self, worker: int, seq: int) -> torch.Tensor:
        """Worker side: the buffer for group seq, once the group that last used it is done."""
        parent = os.getppid()  # the rank, or a forkserver: whoever it is, its exit changes this
        while not self.free[worker].acquire(timeout=self.wait_s):
            if os.getpid() != self.owner and os.getppid() != parent:
                raise RuntimeError("data loader worker: the training process is gone")
        return self.buffers[worker, seq % self.slots]

    def group(self, worker: int, seq: int, batches: int) -> torch.Tensor:
        """Rank side: group seq of a worker."""
        return self.buffers[worker, seq % self.slots, :batches]

    def release(self, worker: int) -> None:
        """Rank side: the oldest group of this worker not yet released is done with."""
        self.free[worker].release()


class RankWindows(IterableDataset):
    """Fills groups of `group` consecutive micro-batches of rank `rank`, each a
    (batches, micro_batch, block_size + 1) uint8 block of a GroupRing, and yields (worker, group
    number, batches). The model's caller widens the ids, on the device. DataLoader workers take
    groups round-robin; a group is one hand-off between processes instead of `group`.

    Windows are cut from a bucket's frames laid end to end in one array, built once per bucket and
    kept for the `cache_buckets` most recently used: a group is then one gather per bucket it spans."""

    def __init__(self, reader: ShardReader, order: WindowOrder, micro_batch: int, rank: int,
                 world_size: int, start: int, ring: GroupRing, num_batches: int | None = None,
                 cache_buckets: int = 4):
        self.reader, self.order, self.ring = reader, order, ring
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.start, self.num_batches, self.cache_buckets = start, num_batches, cache_buckets
        self.group = ring.buffers.shape[2]

    def sample_indices(self, batch: int) -> list[int]:
        return self.group_indices(batch, batch + 1).tolist()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cache: OrderedDict[tuple, tuple] = OrderedDict()  # key: (buffer, tokens)
        window = self.order.T + 1
        first, seq = worker * self.group, 0
        while self.num_batches is None or first < self.num_batches:
            n = self.group if self.num_batches is None else min(self.group, self.num_batches - first)
            rows = self.ring.slot(worker, seq)[:n].view(-1, window)
            for bucket, run, slots in self.order.runs(self.group_indices(first, first + n)):
                tokens = self._tokens(bucket, cache)
                # every window of the bucket as a strided view; index_select gathers 4x faster than numpy here
                windows = tokens.as_strided((len(tokens) - window + 1, window), (1, 1))
                torch.index_select(windows, 0, torch.from_numpy(bucket.offsets[slots]), out=rows[run])
            yield worker, seq, n
            first, seq = first + workers * self.group, seq + 1

    def group_indices(self, first: int, last: int) -> np.ndarray:
        """The global sample indices of batches first..last-1 of this rank, in order."""
        batches = np.arange(first, last, dtype=np.int64)[:, None]
        within = np.arange(self.micro_batch, dtype=np.int64)[None, :]
        return (self.start + batches * self.micro_batch * self.world_size + within * self.world_size
                + self.rank).ravel()

    def _tokens(self, bucket: Bucket, cache: OrderedDict) -> torch.Tensor:
        """A bucket's frames end to end, from this worker's cache; a new bucket is decompressed into
        the buffer of the one it evicts (fresh megabytes cost page faults)."""
        if bucket.key in cache:
            cache.move_to_end(bucket.key)
            return cache[bucket.key][1]
        if len(cache) < self.cache_buckets:
            buffer = np.empty(self.order.bucket_frames * int(self.order.frame_tokens.max()), dtype=np.uint8)
        else:
            buffer = cache.popitem(last=False)[1][0]
        end = 0
        for frame in bucket.members:
            end += len(self.reader.read_frame(int(frame), out=buffer[end:]))
        cache[bucket.key] = buffer, torch.from_numpy(buffer[:end])
        return cache[bucket.key][1]


def _worker_signals(worker_id: int) -> None:
    """Ctrl-C and a scheduler's SIGTERM reach the whole process group. Workers leave stopping to
    their parent, which may still want a batch or two while it finishes the step and saves, and then
    shuts them down (RankLoader.close); should it never do so, a SIGTERM'd worker leaves after 2 min."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_later)


def _exit_later(signum, frame) -> None:
    timer = threading.Timer(120, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def _as_is(batch):
    return batch


def _unwrap_worker_error(error: ShardError) -> ShardError:
    """DataLoader re-raises a worker's error with the worker's traceback as its text: keep the message."""
    last = str(error).strip().splitlines()[-1]
    prefix = f"{ShardError.__module__}.{ShardError.__name__}: "
    return ShardError(last[len(prefix):] if last.startswith(prefix) else last)


class RankLoader:
    """This rank's micro-batches, taken one at a time with next_windows(); its state is (seed,
    consumed samples). A batch is its windows, (micro_batch, block_size + 1): x and y are its slices
    [:, :-1] and [:, 1:]. Evaluation takes a fixed number of them the same way.

    Batches are views into buffers that workers reuse: each stays valid until the group after its
    own has been taken (at least `group` more batches). Copy what you keep longer; the training loop
    and evaluation copy every batch to the model's device and dtype at once."""

    def __init__(self, data_dir, split: str, block_size: int, micro_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, num_workers: int = 1,
                 num_batches: int | None = None, bucket_frames: int = 8, pin_memory: bool = False):
        self.reader = ShardReader(data_dir, split)
        self.order = WindowOrder(self.reader.frames.tokens, block_size, seed, shuffle, bucket_frames)
        if self.order.windows_per_epoch < micro_batch * world_size:
            raise ShardError(
                f"{data_dir}: split {split!r} has {self.reader.num_tokens} tokens, giving "
                f"{self.order.windows_per_epoch} windows of model.block_size+1={block_size + 1}, fewer "
                f"than one global micro-batch ({micro_batch} x {world_size} ranks); use a smaller "
                "model.block_size or more data"
            )
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.num_batches = num_batches  # workers fill no more (evaluation's count); None: endless
        self.pin_memory = pin_memory  # page-locked batches, so copies to a GPU can overlap compute
        self.consumed = 0
        self._it = None
        self._ready: list[tuple] = []  # batches of the current group not yet taken
        self._held: deque[tuple[int, int]] = deque()  # (worker, group number) of the groups taken last
        self._ring_in_use: GroupRing | None = None

    @property
    def windows_per_epoch(self) -> int:
        return self.order.windows_per_epoch

    @property
    def epoch(self) -> float:
        return self.consumed / self.order.windows_per_epoch

    def dataset(self, ring: GroupRing | None = None) -> RankWindows:
        return RankWindows(self.reader, self.order, self.micro_batch, self.rank, self.world_size,
                           self.consumed, ring or self._ring(), self.num_batches)

    def _ring(self) -> GroupRing:
        # groups of ~1 MiB (at most 64 batches): the per-hand-off cost is spread thin, memory stays small
        group = max(1, min(64, (1 << 20) // (self.micro_batch * (self.order.T + 1))))
        return GroupRing(self.num_workers, group, self.micro_batch, self.order.T + 1)

    def _dataloader(self) -> DataLoader:
        self._ring_in_use, self._held = self._ring(), deque()
        return DataLoader(self.dataset(self._ring_in_use), batch_size=None, collate_fn=_as_is,
                          num_workers=self.num_workers, persistent_workers=False, pin_memory=False,
                          prefetch_factor=PREFETCH if self.num_workers else None,
                          worker_init_fn=_worker_signals if self.num_workers else None)

    def _batches(self, item: tuple[int, int, int]) -> list[torch.Tensor]:
        """A group's window blocks, as views. The group two before this one goes back to its worker:
        a caller may still hold the previous group's last batch."""
        ring = self._ring_in_use
        group = ring.group(*item)
        self._held.append(item[:2])
        if len(self._held) > 2:
            ring.release(self._held.popleft()[0])
        if self.pin_memory:
            group = group.pin_memory()  # once per group; each block of it stays page-locked
        return list(group.unbind(0))

    def next_windows(self) -> torch.Tensor:
        """The next micro-batch as its windows of block_size + 1 tokens, (micro_batch, block_size + 1):
        one contiguous block, page-locked with pin_memory, so it goes to a GPU in one asynchronous
        copy (x and y, its slices, are not contiguous: each would be copied through pageable memory).
        The one way to take a batch. From one long-lived iterator: workers keep prefetching between
        calls; after close() or load_state_dict() the next call starts new workers at `consumed`.
        With num_batches, StopIteration once that many have been taken since then."""
        if not self._ready:
            if self._it is None:
                self._it = iter(self._dataloader())
            try:
                self._ready = self._batches(next(self._it))[::-1]
            except ShardError as e:
                raise _unwrap_worker_error(e) from None
        self.consumed += self.micro_batch * self.world_size
        return self._ready.pop()

    def close(self) -> None:
        """Stop the worker processes now rather than whenever the iterator is collected."""
        self._ready = []
        if self._it is not None:
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._it = None

    def state_dict(self) -> dict:
        return {"seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state has seed {state['seed']}, this run uses train.seed={self.seed}")
        self.consumed = int(state["consumed"])
        self.close()
