"""launch/vast/state.py, checks.py and the signal rules of commands.py: the run's record, its lock and
its phases, with no cluster, provider or ssh at all."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from launch.vast.checks import UnsafeInput, check_remote_dir, check_tag, printable
from launch.vast.commands import Driver, Interrupted, Signals
from launch.vast.state import DriverError, Instance, Phase, RunLock, RunState


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setattr("launch.vast.state.ROOT", tmp_path)
    return RunState(run="t-state", nodes=2, total_dph=10.0, max_hours=2.0)


def test_the_state_round_trips_through_its_file_with_its_phase(state, tmp_path):
    state.instances = [Instance(id=5001, offer=101), Instance(id=5002, offer=102, destroyed=True)]
    state.phase, state.paid, state.creating = Phase.TRAINING, True, [103]
    state.save()
    raw = json.loads((tmp_path / "outputs" / "t-state" / "cluster" / "state.json").read_text())
    kept = {k: raw["instances"][1][k] for k in ("id", "offer", "destroyed", "by_label", "generation")}
    assert raw["phase"] == "training" and kept == {"id": 5002, "offer": 102, "destroyed": True, "by_label": False,
                                                   "generation": 0}
    again = RunState.load("t-state")
    assert again == state and again.phase is Phase.TRAINING
    assert again.live_ids() == [5001] and again.node_ids() == [5001, 5002]
    assert not list((tmp_path / "outputs" / "t-state" / "cluster").glob("*.tmp*"))   # written atomically


def test_a_state_file_that_is_not_ours_is_one_line_naming_it(state, tmp_path):
    path = tmp_path / "outputs" / "t-state" / "cluster" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"run": "t-state", "phase": "flying"}))
    with pytest.raises(DriverError, match="state.json: not a run state"):
        RunState.load("t-state")
    with pytest.raises(DriverError, match="no such run"):
        RunState.load("t-other")


def test_the_cap_is_the_nearer_of_hours_and_dollars(state):
    assert state.cap_hours() == 2.0 and state.cap_text() == "2 h"
    state.max_usd = 5.0   # $10/h: half an hour
    assert state.cap_hours() == 0.5 and state.cap_text() == "2 h or $5"
    assert not state.cap_reached(state.created_at + 0.49 * 3600) and state.cap_reached(state.created_at + 1800)
    state.max_hours = state.max_usd = None
    assert state.cap_hours() is None and not state.cap_reached(time.time() + 10 ** 9)


@pytest.mark.processes
def test_one_command_drives_a_run_and_a_dead_holder_frees_it(state):
    """A second process cannot take the run's lock while the first holds it; once the first is killed
    with -9, the kernel frees it (no stale lock blocks `down`)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from launch.vast.state import RunLock; lock = RunLock(Path(sys.argv[2])).__enter__(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(state.work)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DriverError, match=f"driven by pid {holder.pid}"):
            RunLock(state.work).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(state.work):
        pass


def test_signals_unwind_only_inside_interruptible_steps():
    """Inside `interruptible()` the first signal raises; elsewhere signals are counted and the waits
    read the count (the second one hurries them)."""
    with Signals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.count == 1 and not signals.hurry()
        with pytest.raises(Interrupted):   # one already arrived: the next interruptible step unwinds at once
            with signals.interruptible():
                pass
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.hurry() and signals.exit_code == 143
    fresh = Signals()
    with fresh:
        with pytest.raises(Interrupted):
            with fresh.interruptible():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)
        assert fresh.exit_code == 129 and not fresh.raising


@pytest.mark.parametrize("path, ok", [("/workspace/shakespeare", True), ("shakespeare", True), ("~/x", False),
                                      ("/a b", False), ("../x", False), ("/x/../y", False), ("-x", False),
                                      ("/x\n", False), ("$(id)", False)])
def test_remote_dirs_are_plain_paths(path, ok):
    if ok:
        assert check_remote_dir(path) == path
    else:
        with pytest.raises(UnsafeInput, match="--remote-dir"):
            check_remote_dir(path)


def test_tags_and_printed_text_from_nodes_are_checked_whole():
    assert check_tag("step00000012") == "step00000012"
    for bad in ("step00000012\n", "step0000001", "../step00000012"):
        with pytest.raises(UnsafeInput):
            check_tag(bad)
    assert printable("loss 1.2\x1b]0;pwned\x07 done\r") == "loss 1.2\\x1b]0;pwned\\x07 done\\x0d"
    assert printable("tab\tstays") == "tab\tstays"


@pytest.mark.parametrize("last, signals, code, outcome", [
    ({"state": "succeeded", "exit": 0}, 0, 0, "succeeded"),
    ({"state": "failed", "exit": 1}, 0, 1, "failed (exit 1)"),
    ({"state": "lost", "exit": None}, 0, 1, "lost"),   # a container restart: no exit code is no success
    ({"state": "gone", "statuses": {5001: ("offline", 3)}}, 0, 1, "gone: {5001: ('offline', 3)}"),
    ({"state": "succeeded", "exit": 0, "guard": {"event": "cap"}}, 0, 0, "stopped at the budget cap"),
    ({"state": "succeeded", "exit": 0}, 1, 130, "succeeded"),
])
def test_how_training_ended_decides_the_exit_code_and_phase(state, last, signals, code, outcome):
    """The phase after following training, and the exit code it deserves, with no cluster at all."""
    state.created_at -= 3 * 3600   # past the 2 h cap: a guard's cap event is believed only then
    driver = Driver(argparse.Namespace(), state, Signals())
    driver.signals.count, driver.signals.first = signals, signal.SIGINT if signals else None
    assert driver.outcome(last) == code
    assert state.phase is Phase.ENDED and state.outcome == outcome
    assert RunState.load(state.run).outcome == outcome   # saved


def test_a_guards_cap_event_before_the_cap_is_not_the_cap_path(state):
    """A node claiming the cap while the run's own clock says otherwise: a failure to look into, not a
    budget stop (a cap path is taken only when a cap was set and reached)."""
    driver = Driver(argparse.Namespace(), state, Signals())
    assert driver.outcome({"state": "failed", "exit": 143, "guard": {"event": "cap"}}) == 1
    assert state.outcome == "failed (exit 143)"


def test_the_cost_account_bills_a_stopped_node_its_disk_and_a_recovery_counts_only_its_own_nodes(state):
    """spent_usd: each instance's $/h from its create to its destroy, only its disk once stopped;
    node_ids: the current renting's nodes only, after a recovery rented the next one."""
    t = state.created_at
    state.instances = [Instance(id=1, usd_per_hour=10.0, disk_usd_per_hour=0.5, created=t, stopped_at=t + 3600,
                                gone_at=t + 7200, destroyed=True),
                       Instance(id=2, usd_per_hour=4.0, created=t, gone_at=t + 3600, destroyed=True),
                       Instance(id=3, usd_per_hour=2.0, created=t + 7200, generation=1)]
    state.generation = 1
    assert state.spent_usd(t + 3 * 3600) == pytest.approx(10.0 + 0.5 + 4.0 + 2.0)
    assert state.node_ids() == [3] and state.live_ids() == [3]
    state.max_usd, state.total_dph = 20.0, 2.0   # max_hours 2: spent by now
    assert state.hours_left(t + 3 * 3600) == 0 and state.cap_reached(t + 3 * 3600)
    state.max_hours = None   # $20 - $16.50 at the new $2/h
    assert state.hours_left(t + 3 * 3600) == pytest.approx(1.75) and not state.cap_reached(t + 3 * 3600)
