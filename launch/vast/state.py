"""The record of one rented run: outputs/RUN/cluster/state.json, saved atomically after every change,
so that any command, from any terminal and after a `kill -9` of another, knows what exists and what it
must destroy. A lock per run keeps two commands from driving (and staging into) the same run."""
from __future__ import annotations

import dataclasses
import enum
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.vast.checks import check_run_name
from trainer.rundir import atomic_write

ROOT = Path(__file__).resolve().parents[2]


class DriverError(RuntimeError):
    """A step failed; the message says which and what to do."""


class Phase(str, enum.Enum):
    NEW = "new"               # checked locally; nothing paid yet
    RENTING = "renting"       # paid calls under way: creates, waits
    SETTING_UP = "setting_up"  # nodes answer ssh; code, guard, set-up, data
    UP = "up"                 # ready to train
    TRAINING = "training"     # started detached on node0
    ENDED = "ended"           # training ended on the nodes (success or not); nodes still alive
    DOWN = "down"             # the teardown ran; `instances` says what it confirmed


@dataclass
class Instance:
    id: int
    offer: int | None = None
    destroyed: bool = False   # true only once a complete listing no longer shows it
    by_label: bool = False    # found by the run's label: a create whose answer never came
    generation: int = 0       # which renting of the run: a recovery from preemption rents the next one
    usd_per_hour: float = 0.0   # what it bills while it exists (dph_total, or the bid plus the disk)
    created: float | None = None   # when its create was answered
    gone_at: float | None = None   # when a listing first no longer showed it
    stopped_at: float | None = None   # when it was seen stopped (preempted): from then on only its disk bills
    disk_usd_per_hour: float = 0.0
    status: str | None = None   # the actual_status the last listing showed


@dataclass
class RunState:
    run: str
    conf: str = "debug"
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus: int = 1
    gpu_name: str = ""
    image: str = ""
    disk: int = 100
    remote_dir: str = ""
    ssh_key: str = ""
    net_dev: str = "eth0"
    max_hours: float | None = None
    max_usd: float | None = None
    grace_minutes: float = 30.0
    resume: str | None = None            # the tag uploaded to the fresh nodes
    model: dict = field(default_factory=dict)   # the run's model config, composed here: bounds each fetch
    precision: str = "fp32"
    zero_stage: int | None = None
    phase: Phase = Phase.NEW
    created_at: float = field(default_factory=time.time)
    paid: bool = False                   # a paid call was sent: teardown also sweeps by label
    cluster_id: int | None = None
    total_dph: float = 0.0
    offers: list[int] = field(default_factory=list)
    overlay: str | None = None           # its name, once the provider confirmed it
    overlay_deleted: bool = False
    creating: list[int] = field(default_factory=list)   # offers whose create got no clear answer
    instances: list[Instance] = field(default_factory=list)
    master_addr: str | None = None
    train_started: float | None = None
    log_offset: int = 0
    seen_latest: str | None = None       # newest checkpoint a node reported
    fetched: str | None = None           # newest checkpoint here, verified
    fetch_failed: str | None = None
    lost_work: dict | None = None   # nodes whose machine went with their share: {"nodes", "newest", "last_good"}
    outcome: str | None = None           # how training ended: succeeded, failed (exit N), lost, stopped
    interruptible: bool = False          # rented at a bid; a preempted node is replaced (launch/vast/recover.py)
    bids: list[float] = field(default_factory=list)   # the bid per offer in `offers` ($/h per machine)
    rates: list[float] = field(default_factory=list)  # what each offer in `offers` bills per hour
    disk_rates: list[float] = field(default_factory=list)   # the share of it its disk bills, alone when stopped
    nodes_min: int = 1                   # the fewest nodes a recovery may rent
    generation: int = 0                  # renting number: 0, then one more per recovery
    generation_started: float | None = None   # when the current renting's first create was sent
    plan: dict = field(default_factory=dict)   # the plan the user accepted (launch/vast/plan.py)
    preemptions: list[dict] = field(default_factory=list)   # when, at which step, work lost, recovery cost
    ended_at: float | None = None        # when the teardown confirmed every instance destroyed

    # --- the record on disk ---------------------------------------------------------------------------
    @staticmethod
    def path_for(run: str) -> Path:
        return ROOT / "outputs" / check_run_name(run) / "cluster" / "state.json"

    @property
    def work(self) -> Path:
        return ROOT / "outputs" / self.run / "cluster"

    @property
    def run_dir(self) -> Path:
        return ROOT / "outputs" / self.run

    def save(self) -> None:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        self.work.mkdir(parents=True, exist_ok=True)
        atomic_write(self.work / "state.json", json.dumps(data, indent=1))

    @classmethod
    def load(cls, run: str) -> RunState:
        path = cls.path_for(run)
        if not path.exists():
            raise DriverError(f"{path}: no such run (start one with `bash launch/vast_cluster.sh run`)")
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            data = {k: v for k, v in data.items() if k in known}
            data["instances"] = [Instance(**i) for i in data.get("instances", [])]
            data["phase"] = Phase(data.get("phase", "new"))
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise DriverError(f"{path}: not a run state this driver wrote ({e})") from None

    # --- what exists --------------------------------------------------------------------------------------
    def live_ids(self) -> list[int]:
        return [i.id for i in self.instances if not i.destroyed]

    def node_ids(self) -> list[int]:
        """The current renting's nodes, node0 first (earlier rentings were destroyed by a recovery)."""
        return [i.id for i in self.instances if not i.by_label and i.generation == self.generation]

    def spent_usd(self, now: float | None = None) -> float:
        """The instances' bills as recorded here: each one's $/h from its create to its destroy (or now)."""
        now = now or time.time()
        total = 0.0
        for i in self.instances:
            if i.created is None:
                continue
            end = min(i.gone_at or now, now)
            running_end = min(end, i.stopped_at or end)
            total += (i.usd_per_hour * max(0.0, running_end - i.created)
                      + i.disk_usd_per_hour * max(0.0, end - running_end)) / 3600
        return total

    def hours_left(self, now: float | None = None) -> float | None:
        """Hours the cap still allows at the current $/h: what a new renting's guards are armed with."""
        now = now or time.time()
        limits = [self.max_hours - (now - self.created_at) / 3600] if self.max_hours else []
        if self.max_usd and self.total_dph > 0:
            limits.append((self.max_usd - self.spent_usd(now)) / self.total_dph)
        return max(0.0, min(limits)) if limits else None

    def instance(self, inst: int) -> Instance | None:
        return next((i for i in self.instances if i.id == inst), None)

    def cap_hours(self) -> float | None:
        """Hours from renting to the budget cap: the smaller of --max-hours and --max-usd at $/h."""
        limits = [self.max_hours] if self.max_hours else []
        if self.max_usd and self.total_dph > 0:
            limits.append(self.max_usd / self.total_dph)
        return min(limits) if limits else None

    def cap_reached(self, now: float | None = None) -> bool:
        if self.generation:   # after a recovery the $/h changed: the recorded bills count
            left = self.hours_left(now)
            return left is not None and left <= 0
        limit = self.cap_hours()
        return limit is not None and ((now or time.time()) - self.created_at) / 3600 >= limit

    def cap_text(self) -> str:
        parts = [f"{self.max_hours:g} h" if self.max_hours else None, f"${self.max_usd:g}" if self.max_usd else None]
        return " or ".join(p for p in parts if p) or "none"


class RunLock:
    """One command drives a run at a time (`status` and `logs` only read, and need none). flock: the
    kernel drops it when the holder dies, even by kill -9, so a stale lock never blocks `down`."""

    def __init__(self, work: Path):
        self.path = work / "lock"
        self.file = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise DriverError(f"run {self.path.parent.parent.name} is driven by {holder} right now (it fetches "
                              "the checkpoints itself); wait for it, or stop it with Ctrl-C") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
