"""What a rented run will cost and take, before anything is rented: the machines and their $/h, the
run's tokens, the expected tokens/s per GPU and where that figure comes from, the wall time with
set-up and data preparation, and the dollars (GPU time, disk, and bandwidth where the offer prices
it). After a run, its measured tokens/s per GPU joins a local table that later plans read first.

The price model is vast.ai's as the tests' stand-in bills it (tests/fakes/vast_api.py): an on-demand
machine bills its offer's `dph_total` (GPU and disk) from create to destroy; an interruptible one its
bid plus its disk (`storage_cost` $/GB/month x GB / 720 h); bandwidth is $/GB (`inet_up_cost`,
`inet_down_cost`), counted only where the offer gives a price.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer import rundir
from trainer.peaks import gpu_peak

DATA = Path(__file__).with_name("throughput.json")
HOURS_PER_MONTH = 30 * 24   # vast.ai prices disk per GB and month
BID_MARGIN = 0.2            # default bid: the offer's min_bid plus 20% (docs/clusters.md says why)
ALIASES = {"H100 80GB HBM3": "H100 SXM"}   # torch's name of the SXM part -> vast.ai's


def local_table() -> Path:
    """The measured figures of runs on this machine: beside trainer/mfu.py's peak cache."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "shakespeare_transformer" / "measured_throughput.jsonl"


def same_gpu(a: str, b: str) -> bool:
    def norm(name: str) -> str:
        name = re.sub(r"\s+", " ", name.replace("_", " ")).strip()
        return ALIASES.get(name, name).lower()
    return norm(a) == norm(b)


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    d_model: int
    block_size: int

    @property
    def params(self) -> int:
        """Non-embedding parameters, 12·L·d² (attention 4d², a 4x MLP 8d² per layer)."""
        return 12 * self.n_layer * self.d_model ** 2

    @property
    def flops_per_token(self) -> float:
        """6N + 12·L·H·Q·T (trainer/mfu.py's count, with N = 12·L·d² and H·Q = d)."""
        return 6 * self.params + 12 * self.n_layer * self.d_model * self.block_size

    def text(self) -> str:
        return f"{self.n_layer}/{self.n_head}/{self.d_model}, ctx {self.block_size}"


@dataclass
class Measured:
    gpu: str
    shape: Shape
    precision: str
    tokens_per_s_per_gpu: float
    source: str
    compile: bool = False
    micro_batch: int = 0
    world_size: int = 1
    local: bool = False

    @classmethod
    def from_dict(cls, row: dict, local: bool) -> Measured:
        return cls(gpu=str(row["gpu"]), shape=Shape(**{k: int(v) for k, v in row["model"].items()}),
                   precision=str(row["precision"]), tokens_per_s_per_gpu=float(row["tokens_per_s_per_gpu"]),
                   source=str(row["source"]), compile=bool(row.get("compile")),
                   micro_batch=int(row.get("micro_batch") or 0), world_size=int(row.get("world_size") or 1),
                   local=local)

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["model"] = row.pop("shape")
        row.pop("local")
        return row


@dataclass
class Estimate:
    per_gpu: float       # tokens/s per GPU
    source: str          # the measured row, in words
    assumption: str      # how it was carried over to this run ("" when measured as is)


def assumptions() -> dict:
    return json.loads(DATA.read_text())["assumptions"]


def measured_rows() -> list[Measured]:
    """The local table first (newest last), then the repo's; a damaged local line is skipped."""
    rows = []
    path = local_table()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(Measured.from_dict(json.loads(line), local=True))
            except (ValueError, KeyError, TypeError):
                continue
    rows += [Measured.from_dict(r, local=False) for r in json.loads(DATA.read_text())["measured"]]
    return rows


def estimate(rows: list[Measured], gpu: str, shape: Shape, precision: str, compiled: bool, micro_batch: int,
             world: int) -> Estimate:
    """The closest measured row, carried over to this run: same GPU and shape first, measured here
    first, then the same world size, compile setting and micro-batch. Another shape is scaled by
    FLOPs per token, another GPU by its peak FLOP/s: both assume the same MFU."""
    peak = gpu_peak(gpu.replace("_", " "), precision)
    usable = [r for r in rows if (same_gpu(r.gpu, gpu) and r.precision == precision)
              or (peak and gpu_peak(r.gpu, r.precision))]
    if not usable:
        raise ValueError(f"no measured tokens/s for {gpu} in {precision}, and its peak FLOP/s is not in "
                         "trainer/peaks.py: add a row to launch/vast/throughput.json")

    def rank(r: Measured):
        return (same_gpu(r.gpu, gpu), r.precision == precision, r.shape == shape, r.local, r.world_size == world,
                r.compile == compiled, -abs(math.log(r.shape.flops_per_token / shape.flops_per_token)),
                -abs(r.micro_batch - micro_batch))
    best = max(usable, key=rank)
    per_gpu, notes = best.tokens_per_s_per_gpu, []
    if best.shape != shape:
        per_gpu *= best.shape.flops_per_token / shape.flops_per_token
        notes.append(f"scaled from model {best.shape.text()} by FLOPs per token "
                     f"({best.shape.flops_per_token / 1e6:.1f}M -> {shape.flops_per_token / 1e6:.1f}M)")
    if not (same_gpu(best.gpu, gpu) and best.precision == precision):
        theirs = gpu_peak(best.gpu, best.precision)
        per_gpu *= peak / theirs
        notes.append(f"scaled from {best.gpu} {best.precision} by peak FLOP/s ({theirs / 1e12:.0f} -> "
                     f"{peak / 1e12:.0f} TFLOP/s in {precision})")
    if notes:
        notes.append("assuming the same MFU")
    if best.compile != compiled:
        notes.append(f"measured {'with' if best.compile else 'without'} train.compile")
    if best.world_size != world:
        notes.append(f"measured at {best.world_size} GPU{'s' if best.world_size > 1 else ''}, assumed to hold at "
                     f"{world} (no slow-down from the network between nodes)")
    where = "measured here" if best.local else "measured"
    return Estimate(per_gpu, f"{where} on {best.gpu}: {best.tokens_per_s_per_gpu:,.0f} tokens/s per GPU "
                             f"({best.source})", "; ".join(notes))


def record(row: Measured) -> Path:
    """Append one run's measured figure to the local table (one JSON line; the run's name in source)."""
    path = local_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row.to_dict()) + "\n")
    return path


def measured_per_gpu(run_dir: Path, world: int) -> float | None:
    """The median tokens/s per GPU over the second half of a run's logged steps (the first half holds
    the compile, the warm-up and the data loader's start); None without enough of them."""
    rates = [float(entry["tokens_per_s"]) for entry in rundir.read_metrics(run_dir)
             if isinstance(entry.get("tokens_per_s"), (int, float))]
    if len(rates) < 2:
        return None
    return statistics.median(rates[len(rates) // 2:]) / world


@dataclass
class Machine:
    offer: int
    machine_id: int | None
    usd_per_hour: float          # what it bills while it runs: dph_total, or the bid plus the disk
    disk_usd_per_hour: float     # its disk's share of that
    bid: float | None = None     # interruptible: the bid in $/h
    inet_down: float | None = None   # $/GB into the machine, where priced
    inet_up: float | None = None     # $/GB out of it


def _price(offer: dict, key: str) -> float | None:
    value = offer.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def default_bid(offer: dict) -> float:
    """min_bid plus BID_MARGIN, never above the on-demand price (bidding more buys nothing)."""
    floor = _price(offer, "min_bid")
    if floor is None:
        raise ValueError(f"offer {offer.get('id')} gives no min_bid: pass --bid")
    ceiling = _price(offer, "dph_total")
    bid = floor * (1 + BID_MARGIN)
    return round(min(bid, ceiling) if ceiling else bid, 4)


def machines(picked: list[dict], disk: int, interruptible: bool, bid: float | None) -> list[Machine]:
    out = []
    for offer in picked:
        disk_hour = (_price(offer, "storage_cost") or 0.0) * disk / HOURS_PER_MONTH
        if interruptible:
            price = bid if bid is not None else default_bid(offer)
            rate = price + disk_hour
        else:
            price, rate = None, _price(offer, "dph_total") or 0.0
        machine = offer.get("machine_id")
        out.append(Machine(offer=int(offer["id"]), machine_id=machine if isinstance(machine, int) else None,
                           usd_per_hour=rate,
                           disk_usd_per_hour=disk_hour, bid=price, inet_down=_price(offer, "inet_down_cost"),
                           inet_up=_price(offer, "inet_up_cost")))
    return out


@dataclass
class Workload:
    """What the composed config asks of the machines."""
    steps: int                  # steps still to train (after a resumed checkpoint's)
    tokens_per_step: int
    sequences_per_step: int
    eval_tokens: int            # tokens evaluated over the run (forward only)
    checkpoints: int
    shape: Shape
    precision: str
    compiled: bool
    micro_batch: int
    world: int
    text_gb: float | None       # text to download and prepare on each node (None: unknown)
    resume: bool = False

    @classmethod
    def from_config(cls, config, world: int, done_steps: int = 0, resume: bool = False) -> Workload:
        train, model, data = config.train, config.model, config.data
        steps = max(0, train.max_steps - done_steps)
        sequences = train.micro_batch * train.grad_accum * world
        evals = steps // train.eval_every if train.eval_every else 0
        text = assumptions()["text_gb"].get(data.source)
        if data.source == "wikipedia" and getattr(data, "max_documents", None):
            text = text * min(1.0, data.max_documents / assumptions()["wikipedia_articles"])
        return cls(steps=steps, tokens_per_step=sequences * model.block_size, sequences_per_step=sequences,
                   eval_tokens=evals * train.eval_steps * train.micro_batch * model.block_size * world,
                   checkpoints=(steps // train.ckpt_every if train.ckpt_every else 0) + 1,
                   shape=Shape(model.n_layer, model.n_head, model.d_model, model.block_size),
                   precision=config.precision, compiled=bool(train.compile), micro_batch=train.micro_batch,
                   world=world, text_gb=text, resume=resume)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def checkpoint_gb(self) -> float:
        return self.shape.params * assumptions()["checkpoint_bytes_per_param"] / 1e9


@dataclass
class Plan:
    nodes: int
    gpus: int
    gpu_name: str
    interruptible: bool
    machines: list[Machine]
    workload: Workload
    estimate: Estimate
    minutes: dict[str, float] = field(default_factory=dict)   # stage -> expected minutes
    bandwidth_usd: float | None = None   # None: no offer prices bandwidth
    made_at: float = field(default_factory=time.time)

    @property
    def hours(self) -> float:
        return sum(self.minutes.values()) / 60

    @property
    def usd_per_hour(self) -> float:
        return sum(m.usd_per_hour for m in self.machines)

    @property
    def machine_usd(self) -> float:
        """What the machines bill over the planned hours: the stand-in's billed_usd for that span."""
        return self.usd_per_hour * self.hours

    @property
    def total_usd(self) -> float:
        return self.machine_usd + (self.bandwidth_usd or 0.0)

    @property
    def step_seconds(self) -> float:
        return self.workload.tokens_per_step / (self.estimate.per_gpu * self.workload.world)

    def summary(self) -> dict:
        """What the run state keeps to set the outcome against."""
        return {"hours": self.hours, "usd": self.total_usd, "usd_per_hour": self.usd_per_hour,
                "tokens_per_s_per_gpu": self.estimate.per_gpu, "step_seconds": self.step_seconds,
                "minutes": dict(self.minutes), "machine_usd": self.machine_usd, "bandwidth_usd": self.bandwidth_usd,
                "tokens": self.workload.tokens, "made_at": self.made_at}


def make_plan(picked: list[dict], nodes: int, gpus: int, gpu_name: str, disk: int, workload: Workload,
              interruptible: bool = False, bid: float | None = None) -> Plan:
    rows = measured_rows()
    est = estimate(rows, gpu_name, workload.shape, workload.precision, workload.compiled, workload.micro_batch,
                   workload.world)
    plan = Plan(nodes=nodes, gpus=gpus, gpu_name=gpu_name, interruptible=interruptible,
                machines=machines(picked, disk, interruptible, bid), workload=workload, estimate=est)
    a = assumptions()
    text_mb = (workload.text_gb or 0.0) * 1000
    world_tokens_s = est.per_gpu * workload.world
    plan.minutes = {
        "boot": a["boot_minutes"],
        "set-up": a["setup_minutes"] + (workload.checkpoint_gb * 1000 / a["transfer_mb_per_s"] / 60
                                        if workload.resume else 0.0),
        "data": text_mb / a["download_mb_per_s"] / 60 + text_mb / a["prepare_mb_per_s"] / 60,
        "training": workload.tokens / world_tokens_s / 60,
        "evaluation": workload.eval_tokens / (3 * world_tokens_s) / 60,   # forward only: a third of a step's work
        "fetch and teardown": workload.checkpoint_gb * 1000 / a["transfer_mb_per_s"] / 60 + a["teardown_minutes"],
    }
    plan.bandwidth_usd = bandwidth(plan, a)
    return plan


def bandwidth(plan: Plan, a: dict) -> float | None:
    """Each node downloads the image and the text (and a resumed checkpoint); the nodes together upload
    every checkpoint the laptop fetches, each its own share."""
    w = plan.workload
    if all(m.inet_down is None and m.inet_up is None for m in plan.machines):
        return None
    down_gb = a["image_gb"] + (w.text_gb or 0.0) + (w.checkpoint_gb if w.resume else 0.0)
    up_gb = w.checkpoints * w.checkpoint_gb / max(1, len(plan.machines))
    return sum(down_gb * (m.inet_down or 0.0) + up_gb * (m.inet_up or 0.0) for m in plan.machines)


def lines(plan: Plan) -> list[str]:
    """The plan in words, as `plan`, `run` and `up` print it."""
    w, est = plan.workload, plan.estimate
    kind = "interruptible (bid)" if plan.interruptible else "on demand"
    out = [f"plan: {plan.nodes} x {plan.gpus} {plan.gpu_name.replace('_', ' ')} ({plan.nodes * plan.gpus} GPUs), "
           f"{kind}"]
    for k, m in enumerate(plan.machines):
        price = (f"bid ${m.bid:.4f}/h + disk ${m.disk_usd_per_hour:.4f}/h" if m.bid is not None
                 else f"dph_total, its disk ${m.disk_usd_per_hour:.4f}/h included")
        out.append(f"  node{k}: offer {m.offer} (machine {m.machine_id}): ${m.usd_per_hour:.4f}/h ({price})")
    out.append(f"  tokens: {w.steps:,} steps x {w.tokens_per_step:,} tokens ({w.sequences_per_step:,} sequences "
               f"of {w.shape.block_size}) = {w.tokens:,}")
    out.append(f"  tokens/s per GPU: {est.per_gpu:,.0f}; {est.source}")
    if est.assumption:
        out.append(f"    assumption: {est.assumption}")
    out.append(f"  step time: {plan.step_seconds:.3f} s at {w.world} GPUs")
    stages = ", ".join(f"{name} {minutes:.1f} min" for name, minutes in plan.minutes.items())
    out.append(f"  wall time: {plan.hours:.2f} h ({stages}); set-up and data figures are assumptions "
               f"(launch/vast/throughput.json)")
    money = f"  cost: ${plan.usd_per_hour:.4f}/h x {plan.hours:.2f} h = ${plan.machine_usd:.2f} (GPU and disk)"
    if plan.bandwidth_usd is None:
        money += "; bandwidth not priced by these offers"
    else:
        money += f" + bandwidth ${plan.bandwidth_usd:.2f}"
    out.append(money + f"; total ${plan.total_usd:.2f}")
    return out


def ckpt_every(plan_step_seconds: float, minutes: float) -> int:
    """train.ckpt_every for a checkpoint about every `minutes` minutes at the expected step time."""
    return max(1, round(minutes * 60 / plan_step_seconds))
