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

import os
import signal
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardError, ShardReader


class WindowOrder:
    def __init__(self, frame_tokens: list[int], block_size: int, seed: int, shuffle: bool = True,
                 bucket_frames: int = 8):
        self.T = block_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_frames = bucket_frames
        self.per_frame = np.maximum(0, (np.asarray(frame_tokens, dtype=np.int64) - block_size) // (block_size + 1))
        self.windows_per_epoch = int(self.per_frame.sum())
        self._epoch_cache: OrderedDict[int, tuple] = OrderedDict()
        self._bucket = lru_cache(maxsize=4)(self._bucket_permutation)

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

    def _bucket_permutation(self, epoch: int, bucket: int):
        """(frame id, window index in frame) of each slot in the bucket, in shuffled order."""
        frames, cum, _ = self._epoch(epoch)
        members = frames[bucket * self.bucket_frames:(bucket + 1) * self.bucket_frames]
        frame_ids = np.repeat(members, self.per_frame[members])
        within = np.concatenate([np.arange(self.per_frame[f]) for f in members])
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, bucket]).permutation(len(frame_ids))
            frame_ids, within = frame_ids[perm], within[perm]
        return frame_ids, within

    def windows(self, ks) -> tuple[np.ndarray, np.ndarray]:
        """(frame ids, start tokens in frame) of global samples ks, vectorized per epoch and bucket."""
        if self.windows_per_epoch == 0:
            raise ValueError("no windows: every frame is shorter than 2 * block_size + 1 tokens")
        epochs, within_epoch = np.divmod(np.asarray(ks, dtype=np.int64), self.windows_per_epoch)
        frames = np.empty(len(epochs), dtype=np.int64)
        starts = np.empty(len(epochs), dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = np.flatnonzero(epochs == epoch)
            _, cum, shift = self._epoch(int(epoch))
            buckets = np.searchsorted(cum, within_epoch[in_epoch], side="right") - 1
            for bucket in np.unique(buckets):
                sel = in_epoch[buckets == bucket]
                frame_ids, within = self._bucket(int(epoch), int(bucket))
                slots = within_epoch[sel] - cum[bucket]
                frames[sel] = frame_ids[slots]
                starts[sel] = shift + within[slots] * (self.T + 1)
        return frames, starts

    def window(self, k: int) -> tuple[int, int]:
        """(frame id, start token in frame) of global sample k."""
        frames, starts = self.windows([k])
        return int(frames[0]), int(starts[0])


class RankWindows(IterableDataset):
    """Yields groups of `group` consecutive micro-batches of rank `rank`, as one
    (batches, micro_batch, block_size + 1) uint8 array (the model's caller widens the ids, on the
    device). DataLoader workers take groups round-robin; a group is one hand-off between processes
    instead of `group`, which is most of what a batch costs."""

    def __init__(self, reader: ShardReader, order: WindowOrder, micro_batch: int, rank: int,
                 world_size: int, start: int, num_batches: int | None = None, cache_frames: int = 32,
                 group: int = 8):
        self.reader, self.order = reader, order
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.start, self.num_batches, self.cache_frames, self.group = start, num_batches, cache_frames, group

    def sample_indices(self, batch: int) -> list[int]:
        return self.group_indices(batch, batch + 1).tolist()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        cache: OrderedDict[int, np.ndarray] = OrderedDict()
        T = self.order.T
        first = worker * self.group
        while self.num_batches is None or first < self.num_batches:
            last = first + self.group if self.num_batches is None else min(first + self.group, self.num_batches)
            frames, starts = self.order.windows(self.group_indices(first, last))
            # one gather for the whole group: the frames it touches, end to end, indexed by window
            needed, slot = np.unique(frames, return_inverse=True)
            parts = [self._frame(int(f), cache) for f in needed]
            where = np.concatenate([[0], np.cumsum([len(p) for p in parts])[:-1]])
            rows = np.lib.stride_tricks.sliding_window_view(np.concatenate(parts), T + 1)[where[slot] + starts]
            # uint8; a small pickle is the cheapest thing to pass between processes
            yield rows.reshape(last - first, self.micro_batch, T + 1)
            first += workers * self.group

    def group_indices(self, first: int, last: int) -> np.ndarray:
        """The global sample indices of batches first..last-1 of this rank, in order."""
        batches = np.arange(first, last, dtype=np.int64)[:, None]
        within = np.arange(self.micro_batch, dtype=np.int64)[None, :]
        return (self.start + batches * self.micro_batch * self.world_size + within * self.world_size
                + self.rank).ravel()

    def _frame(self, frame: int, cache: OrderedDict) -> np.ndarray:
        """A frame's tokens, from this worker's cache of the most recently used `cache_frames`."""
        tokens = cache.get(frame)
        if tokens is None:
            tokens = cache[frame] = self.reader.read_frame(frame)
            if len(cache) > self.cache_frames:
                cache.popitem(last=False)
        else:
            cache.move_to_end(frame)
        return tokens


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
    """Iterator of this rank's (x, y) micro-batches; its state is (seed, consumed samples)."""

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
        self.seed, self.num_workers, self.num_batches = seed, num_workers, num_batches
        self.pin_memory = pin_memory  # page-locked batches, so copies to a GPU can overlap compute
        self.consumed = 0
        self._it = None
        self._ready: list[torch.Tensor] = []  # batches of the current group not yet taken

    @property
    def windows_per_epoch(self) -> int:
        return self.order.windows_per_epoch

    @property
    def epoch(self) -> float:
        return self.consumed / self.order.windows_per_epoch

    def dataset(self) -> RankWindows:
        # groups of ~1 MiB (at most 64 batches): the per-hand-off cost is spread thin, memory stays small
        group = max(1, min(64, (1 << 20) // (self.micro_batch * (self.order.T + 1))))
        return RankWindows(self.reader, self.order, self.micro_batch, self.rank, self.world_size,
                           self.consumed, self.num_batches, group=group)

    def _dataloader(self) -> DataLoader:
        return DataLoader(self.dataset(), batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=False, prefetch_factor=2 if self.num_workers else None,
                          worker_init_fn=_worker_signals if self.num_workers else None)

    def _batches(self, group: np.ndarray) -> list[torch.Tensor]:
        group = torch.from_numpy(group)
        if self.pin_memory:
            group = group.pin_memory()  # once per group; its slices stay page-locked
        return list(group.unbind(0))

    def _split(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.consumed += self.micro_batch * self.world_size
        return block[:, :-1], block[:, 1:]

    def __iter__(self):
        """The batches from the current position; the loader's position advances as they are taken."""
        for group in self._dataloader():
            for block in self._batches(group):
                yield self._split(block)

    def next(self):
        """The next batch, from one long-lived iterator (workers keep prefetching between calls)."""
        if not self._ready:
            if self._it is None:
                self._it = iter(self._dataloader())
            try:
                self._ready = self._batches(next(self._it))[::-1]
            except ShardError as e:
                raise _unwrap_worker_error(e) from None
        return self._split(self._ready.pop())

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
