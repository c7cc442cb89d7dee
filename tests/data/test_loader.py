import contextlib
import multiprocessing
import os
import random
import signal
import time
from collections import deque

import pytest
import torch

from data.loader import GroupRing, RankLoader, WindowOrder
from data.prepare import write_shards
from data.shards import ShardError
from data.sources import Document
from data.tokenizer import CharTokenizer

T = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = random.Random(0)
    docs = [Document(f"d{i}", "".join(rng.choice("abcdefghij \n") for _ in range(rng.randint(200, 3000))))
            for i in range(30)]
    out = tmp_path_factory.mktemp("loader")
    write_shards(docs, out, CharTokenizer(), val_fraction=0.1, frame_tokens=300, shard_frames=5)
    return out


def _windows(loader: RankLoader, n_batches: int) -> list[bytes]:
    """The windows of the next n batches, in order."""
    return [bytes(row.tolist()) for _ in range(n_batches) for row in loader.next_windows()]


def _order_windows(loader: RankLoader, ks) -> list[bytes]:
    """The windows of global samples ks, read from the frames the order names."""
    return [loader.reader.read_frame(f)[s:s + T + 1].tobytes() for f, s in map(loader.order.window, ks)]


@pytest.mark.parametrize("workers", [0, 1])
def test_next_windows_is_one_contiguous_block_of_the_orders_windows(data_dir, workers):
    """The training loop copies next_windows() to the device in one go (page-locked on a GPU): a
    contiguous (micro_batch, T + 1) block, x and y its slices, holding the order's next windows."""
    loader = RankLoader(data_dir, "train", T, 4, seed=3, num_workers=workers)
    expected = _order_windows(loader, range(150 * 4))
    for b in range(150):  # past two group boundaries (64 batches a group here)
        windows = loader.next_windows()
        assert windows.shape == (4, T + 1) and windows.is_contiguous() and windows.dtype == torch.uint8
        assert [bytes(row.tolist()) for row in windows] == expected[b * 4:(b + 1) * 4]
    assert loader.consumed == 150 * 4
    loader.close()


def test_num_batches_ends_next_windows_until_the_loader_is_rewound(data_dir):
    """Evaluation takes num_batches batches, then rewinds with load_state_dict and takes the same ones."""
    loader = RankLoader(data_dir, "val", T, 2, shuffle=False, num_workers=0, num_batches=3)
    first = _windows(loader, 3)
    with pytest.raises(StopIteration):
        loader.next_windows()
    loader.load_state_dict({"seed": 0, "consumed": 0})
    assert _windows(loader, 3) == first == _order_windows(loader, range(6))


def test_order_is_a_permutation_per_epoch_and_changes_with_epoch(data_dir):
    loader = RankLoader(data_dir, "train", T, 4)
    order = loader.order
    n = order.windows_per_epoch
    epoch0 = [order.window(k) for k in range(n)]
    epoch1 = [order.window(k) for k in range(n, 2 * n)]
    assert len(set(epoch0)) == n == len(set(epoch1))
    assert epoch0 != epoch1
    rebuilt = WindowOrder([f.tokens for f in loader.reader.frames], T, seed=0)
    assert [rebuilt.window(k) for k in range(0, 3 * n, 7)] == [order.window(k) for k in range(0, 3 * n, 7)]
    other_seed = WindowOrder([f.tokens for f in loader.reader.frames], T, seed=1)
    assert [other_seed.window(k) for k in range(50)] != epoch0[:50]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_rank_shares_are_disjoint_and_their_union_is_the_one_rank_order(data_dir, world, workers):
    micro, steps = 3, 7
    reference = RankLoader(data_dir, "train", T, micro, seed=5)
    single = [reference.order.window(k) for k in range(micro * world * steps)]
    shares = []
    for rank in range(world):
        loader = RankLoader(data_dir, "train", T, micro, rank, world, seed=5, num_workers=workers)
        ds = loader.dataset()
        shares.append([loader.order.window(k) for b in range(steps) for k in ds.sample_indices(b)])
        # the batches the DataLoader workers actually yield are those windows
        got = _windows(loader, steps)
        frames = [loader.reader.read_frame(f)[s:s + T + 1].tobytes() for f, s in shares[-1]]
        assert got == frames
    flat = [w for share in shares for w in share]
    assert len(set(flat)) == len(flat)
    assert sorted(flat) == sorted(single)


def test_state_dict_resumes_at_the_exact_next_window(data_dir):
    whole = RankLoader(data_dir, "train", T, 4, seed=3, num_workers=2)
    expected = _windows(whole, 12)
    first = RankLoader(data_dir, "train", T, 4, seed=3, num_workers=2)
    head = _windows(first, 5)
    state = first.state_dict()
    assert state == {"seed": 3, "consumed": 20}
    resumed = RankLoader(data_dir, "train", T, 4, seed=3, num_workers=1)
    resumed.load_state_dict(state)
    assert head + _windows(resumed, 7) == expected


def test_a_batch_crossing_the_epoch_boundary_finishes_one_epoch_and_starts_the_next(data_dir):
    loader = RankLoader(data_dir, "train", T, 8, seed=2)
    n, order = loader.windows_per_epoch, loader.order
    loader.load_state_dict({"seed": 2, "consumed": n - 12})
    seen = _windows(loader, 3)
    expected = [loader.reader.read_frame(f)[s:s + T + 1].tobytes()
                for f, s in (order.window(k) for k in range(n - 12, n + 12))]
    assert seen == expected
    tail_of_epoch0 = {order.window(k) for k in range(n - 12, n)}
    head_of_epoch1 = {order.window(k) for k in range(n, n + 12)}
    assert len(tail_of_epoch0) == 12 and len(head_of_epoch1) == 12
    assert loader.epoch == pytest.approx((n + 12) / n)


def test_too_large_block_size_is_a_clear_error(data_dir):
    with pytest.raises(ShardError, match="model.block_size"):
        RankLoader(data_dir, "val", 299, 4)


def test_resuming_at_other_world_sizes_and_micro_batches_sees_every_window_once(data_dir):
    """2 ranks, then 1, then 3, each with its own micro-batch, from the saved sample count alone."""
    seen, consumed = [], 0
    for world, micro, steps in [(2, 3, 5), (1, 4, 6), (3, 2, 7)]:
        for rank in range(world):
            loader = RankLoader(data_dir, "train", T, micro, rank, world, seed=9, num_workers=1)
            loader.load_state_dict({"seed": 9, "consumed": consumed})
            seen += _windows(loader, steps)
        consumed += world * micro * steps
    order = RankLoader(data_dir, "train", T, 1, seed=9)
    expected = [order.reader.read_frame(f)[s:s + T + 1].tobytes() for f, s in map(order.order.window, range(consumed))]
    assert consumed < order.windows_per_epoch and len(seen) == consumed
    assert sorted(seen) == sorted(expected) and len(set(seen)) == consumed


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_stay_intact_while_workers_go_round_their_buffers_many_times(data_dir, workers):
    """Each worker fills a ring of shared buffers over and over: every batch holds the order's
    windows, and still holds them a whole group of batches later (what the loader promises)."""
    micro = 4
    loader = RankLoader(data_dir, "train", T, micro, seed=1, num_workers=workers)
    group = loader.dataset().group
    n = workers * 3 * GroupRing.slots * group  # each worker three times round its ring
    expected = _order_windows(loader, range(n * micro))
    held = deque()
    for b in range(n):
        held.append((b, loader.next_windows()))
        if len(held) > group:
            first, windows = held.popleft()
            got = [bytes(row.tolist()) for row in windows]
            assert got == expected[first * micro:(first + 1) * micro], f"batch {first}"
    loader.close()


def _fill_ring(ring: GroupRing, groups: int) -> None:
    """A worker's part: fill groups 0..groups-1 in order, each with its number plus one."""
    for seq in range(groups):
        ring.slot(0, seq).fill_(seq + 1)


@pytest.mark.processes
def test_a_worker_waits_for_the_rank_to_finish_with_a_buffer_before_reusing_it():
    """A forked worker with every slot full blocks until the rank releases its oldest group, and then
    wakes at once."""
    ring = GroupRing(workers=1, group=2, micro_batch=3, window=5)
    worker = multiprocessing.get_context("fork").Process(target=_fill_ring, args=(ring, ring.slots + 1), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while int(ring.group(0, ring.slots - 1, 2).max()) != ring.slots and time.monotonic() < deadline:
            time.sleep(0.01)
        worker.join(0.5)
        assert worker.is_alive()  # the ring is full
        assert int(ring.group(0, 0, 2).max()) == 1  # group 0 is still the rank's
        released = time.monotonic()
        ring.release(0)
        worker.join(5)
        assert worker.exitcode == 0 and time.monotonic() - released < ring.wait_s
        assert int(ring.group(0, ring.slots, 2).min()) == ring.slots + 1
    finally:
        worker.kill()


def _rank_that_dies(report) -> None:
    """A training process that starts a worker, lets it fill its ring, and dies without releasing.
    The worker reports its pid, then its error."""
    ring = GroupRing(workers=1, group=1, micro_batch=1, window=2)

    def worker():
        report.send(os.getpid())
        try:
            _fill_ring(ring, ring.slots + 1)
        except RuntimeError as e:
            report.send(str(e))

    multiprocessing.get_context("fork").Process(target=worker).start()
    deadline = time.monotonic() + 10
    while int(ring.group(0, ring.slots - 1, 1).max()) != ring.slots and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(0)


@pytest.mark.processes
def test_a_waiting_worker_whose_training_process_is_gone_exits_with_a_clear_error():
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    rank = multiprocessing.get_context("fork").Process(target=_rank_that_dies, args=(send,))
    rank.start()
    assert receive.poll(10)
    worker = receive.recv()
    try:
        rank.join(10)
        assert rank.exitcode == 0
        assert receive.poll(3 * GroupRing.wait_s)
        assert receive.recv() == "data loader worker: the training process is gone"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_windows_are_asked_for_in_ascending_order(data_dir):
    order = RankLoader(data_dir, "train", T, 4).order
    with pytest.raises(ValueError, match="ascending"):
        list(order.runs([5, 3]))
