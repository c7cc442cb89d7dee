"""The training run: a Trainer builds each part once, then its loop reads as a list of events (step,
guard check, log, stop, evaluate, save). Each part knows its own interval."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from data.loader import RankLoader
from data.prepare import check_matches
from data.shards import tokenizer_of
from data.tokenizer import Tokenizer
from model import GPT

from . import checkpoint, rundir
from .config import Config
from .distributed import (
    Node,
    RunError,
    broadcast_error,
    init_distributed,
    node_of_this_rank,
    shared_between_nodes,
    shutdown,
)
from .engine import build_engine, set_lr
from .evaluate import evaluate_engine, sample_text
from .metrics import MetricsWriter, Throughput, last_logged
from .mfu import flops_per_token, peak_flops
from .profile import StepProfiler
from .schedule import accum_at, lr_at, planned_tokens
from .stopping import StopRequest

_SAMPLING = {"dropout": 0.0, "attn": "sdpa"}  # settings a checkpoint's weights do not depend on


def window_hash(window: torch.Tensor) -> str:
    """Short id of one training window (block_size + 1 token ids), for train.record_batches."""
    return hashlib.sha1(window.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def check_data(cfg: Config, node: Node, data_error: str | None = None) -> dict:
    """Collective. `data_error`: what stopped this rank's node from making its shards ready
    (launch/train.py, before the process group: data/ready.py). The same error on every rank when any
    node has one; then every rank checks that its node's manifest is the same as every other node's,
    before the first step."""
    broadcast_error(data_error and f"node {node.index}: {data_error}")
    manifest = check_matches(cfg.data)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, (node.index, _manifest_digest(cfg.data.dir)))
    differ = sorted({n for n, d in digests if d != digests[0][1]})
    if differ:
        raise RunError(f"the shards in data.dir={cfg.data.dir} differ between nodes: node {differ[0]}'s "
                       "manifest.json is not node 0's (prepared from other data or settings); delete that "
                       "node's data.dir to prepare it again, or copy node 0's")
    return manifest


def _manifest_digest(data_dir) -> str:
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


def train(cfg: Config, data_error: str | None = None) -> dict:
    """The run; `data_error`: this node's data could not be made ready (check_data)."""
    rank, world = _join(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, rank, world, data_error)
        result = trainer.fit()
    except BaseException as e:
        if world > 1 and not isinstance(e, RunError):
            # A peer may be waiting in a collective this rank will never join: leave now, so the
            # launcher stops the job, instead of hanging in a teardown barrier.
            step = trainer.step if trainer is not None else None
            print(f"rank {rank}: {_describe_failure(e, cfg, step)}", file=sys.stderr, flush=True)
            os._exit(1)
        if isinstance(e, RunError):  # raised alike on every rank: a clean teardown is possible
            shutdown()
        raise
    shutdown()
    return result


def _join(cfg: Config) -> tuple[int, int]:
    """init_distributed; a rendezvous that times out says what a missing rank may be doing."""
    try:
        return init_distributed(cfg.train.collective_timeout_s)
    except (dist.DistStoreError, dist.DistNetworkError) as e:   # rank 0 waiting for clients; a client for rank 0
        raise RunError(f"the ranks did not all join within train.collective_timeout_s="
                       f"{cfg.train.collective_timeout_s:g}: a rank did not start, or its node is still making "
                       "data.dir ready (see that node's log; prepare a large text beforehand with "
                       f"launch/prepare.py, or raise train.collective_timeout_s); {type(e).__name__}: {e}") from None


def _describe_failure(e: BaseException, cfg: Config, step: int | None) -> str:
    at = f" at step {step}" if step is not None else " before the first step"
    if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
        return (f"a collective waited longer than train.collective_timeout_s={cfg.train.collective_timeout_s:g}"
                f"{at}: a peer rank is stuck or gone (see its node's log); {type(e).__name__}: {e}")
    return f"{type(e).__name__}{at}: {e}"


class Guard:
    """The stop and non-finite checks. A non-finite loss is noted on the device at every step (no host
    sync); at the loop's check steps every rank all-reduces [non-finite here, stop requested,
    -(first non-finite step)] and reads it back once, so all ranks take the same decision there and
    nothing is saved after a non-finite loss."""

    def __init__(self, device):
        self.flags = torch.zeros(3, device=device)
        self.first_bad = torch.zeros((), device=device)  # first step with a non-finite loss here; 0: none
        self.stop = StopRequest()
        self.non_finite = self.stopping = False
        self.bad_step = 0

    def note(self, step: int, step_loss: torch.Tensor) -> None:
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(step_loss), float(step), self.first_bad)

    def check(self) -> None:
        self.flags[0] = (self.first_bad > 0).float()
        self.flags[1] = float(self.stop.requested)
        self.flags[2] = torch.where(self.first_bad > 0, -self.first_bad, -1e12)
        dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        non_finite, stopping, neg_first_bad = self.flags.tolist()  # the one host read of the check
        self.non_finite, self.stopping = bool(non_finite), bool(stopping)
        self.bad_step = int(-neg_first_bad) if self.non_finite else 0

    def close(self) -> None:
        self.stop.restore()


class TrainingLog:
    """The logging steps' figures: the mean loss since the last one (summed on the device), rates,
    MFU and cost, written by rank 0's trackers."""

    def __init__(self, cfg: Config, world: int, writer: MetricsWriter, device, flops_token: float, peak: float,
                 spent_before: float):
        self.cfg, self.world, self.writer = cfg, world, writer
        self.flops_token, self.peak, self.spent_before = flops_token, peak, spent_before
        self.loss_sum = torch.zeros((), device=device)
        self.meter, self.started = Throughput(), time.time()

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return step % t.log_every == 0 or step == t.max_steps

    def add(self, step_loss: torch.Tensor, micro_steps: int, tokens: int) -> None:
        self.loss_sum += step_loss
        self.meter.add(micro_steps=micro_steps, tokens=tokens)

    def write(self, step: int, tokens: int, lr: float, batch_tokens: int, grad_norm: float | None) -> dict:
        dist.all_reduce(self.loss_sum)
        rates = self.meter.read()
        values = {"tokens": tokens, "loss": self.loss_sum.item() / (rates.pop("micro_steps") * self.world),
                  "lr": lr, "grad_norm": grad_norm, "batch_tokens": batch_tokens, **rates,
                  "mfu": rates["tokens_per_s"] * self.flops_token / (self.peak * self.world)}
        rate = self.cfg.train.cost_per_hour
        if rate:
            values.update(usd_per_hour=rate, tokens_per_usd=values["tokens_per_s"] * 3600 / rate,
                          usd_spent=self.spent_before + rate * (time.time() - self.started) / 3600)
        self.writer.log(step, values)
        self.loss_sum.zero_()
        return values


class Evaluator:
    """The same eval_steps validation batches at every evaluation (built once, rewound each time),
    and a text sample, written by rank 0's trackers."""

    def __init__(self, cfg: Config, engine, tokenizer: Tokenizer, rank: int, world: int, writer: MetricsWriter):
        t = cfg.train
        self.cfg, self.engine, self.tokenizer, self.writer = cfg, engine, tokenizer, writer
        self.loader = RankLoader(cfg.data.dir, "val", cfg.model.block_size, t.micro_batch, rank, world,
                                 seed=t.seed, num_workers=0, num_batches=t.eval_steps)

    def due(self, step: int) -> bool:
        t = self.cfg.train
        return bool(t.eval_every and step % t.eval_every == 0) or step == t.max_steps

    def run(self, step: int) -> dict:
        t = self.cfg.train
        self.loader.load_state_dict({"seed": t.seed, "consumed": 0})
        result = evaluate_engine(self.engine, (self.loader.next_windows() for _ in range(t.eval_steps)))
        text = sample_text(self.engine, self.tokenizer, "\n", 200, t.seed, self.cfg.deepspeed.stage)
        self.writer.log(step, result)
        self.writer.text("samples", text or "", step)
        return result


class Trainer:
    """Builds every part of a run once (data, resume decision, engine, loaders, checkpointer, trackers),
    then `fit` runs the loop."""

    def __init__(self, cfg: Config, rank: int, world: int, data_error: str | None = None):
        self.cfg, self.rank, self.world, self.step = cfg, rank, world, 0
        node = node_of_this_rank()
        manifest = check_data(cfg, node, data_error)
        self.tokenizer = tokenizer_of(manifest)
        cfg.model.vocab_size = self.tokenizer.vocab_size
        shared = shared_between_nodes(rundir.checkpoints(cfg.run_dir), node)
        writes_files = node.writes(shared)  # this disk's `latest`, meta.json, conversions, pruning
        # decided by rank 0, checked by every rank on its own disk, before anything is built
        self.identity = {"preset": cfg.preset, "data_dir": cfg.data.dir, "data_digest": _manifest_digest(cfg.data.dir)}
        ckpt, universal = self._plan_resume(node, writes_files)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = GPT(cfg.model)
        if ckpt is None and cfg.init_from:
            self._start_from_weights(cfg.init_from)
        self.engine = build_engine(self.model, cfg, world, load_universal=universal,
                                   node_local_checkpoints=not shared)
        torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank dropout streams
        self.loader = RankLoader(cfg.data.dir, "train", cfg.model.block_size, cfg.train.micro_batch, rank, world,
                                 seed=cfg.train.seed, num_workers=cfg.data.workers,
                                 pin_memory=self.engine.device.type == "cuda")
        if ckpt is not None:
            client = checkpoint.load(self.engine, ckpt)
            self.step = client["step"]
            self.loader.load_state_dict(client["loader"])
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = checkpoint.Checkpointer(self.engine, self.run_dir, cfg, self.tokenizer, writes_files,
                                                    self.identity)
        self._build_trackers(manifest)

    def _plan_resume(self, node: Node, writes_files: bool) -> tuple[checkpoint.Checkpoint | None, bool]:
        cfg = self.cfg
        resume = checkpoint.plan_resume(cfg.resume, cfg.run_dir, self.tokenizer.vocab, cfg.model,
                                        cfg.deepspeed.stage, node, writes_files, cfg.train.optimizer, self.identity)
        if resume is None:
            return None, False
        ckpt, meta = resume
        if not checkpoint.needs_universal(meta, self.world):
            return ckpt, False
        return checkpoint.to_universal(ckpt, writes_files), True

    def _start_from_weights(self, source: str) -> None:
        """Fine-tuning: another run's weights on this run's data, with a fresh optimizer and data order.
        Every rank reads its own disk's copy (nodes share no disk)."""
        try:
            trained, client = checkpoint.load_for_inference(source)
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            raise RunError(f"init_from={source}: {e}") from None
        same_model = asdict(trained.cfg) | _SAMPLING == asdict(self.cfg.model) | _SAMPLING
        if client["vocab"] != self.tokenizer.vocab or not same_model:
            raise RunError(f"init_from={source}: its model or vocabulary differs from this run's; use the preset and "
                           "model.* settings it was trained with (its config.yaml)")
        self.model.load_state_dict(trained.state_dict())
        if self.rank == 0:
            print(f"init_from={source}: starting from the weights of its step {client['step']}, with a fresh "
                  "optimizer and data order", flush=True)

    def _build_trackers(self, manifest: dict) -> None:
        cfg, t, rank, world = self.cfg, self.cfg.train, self.rank, self.world
        params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3 partitions
        flops_token = flops_per_token(cfg.model, params - cfg.model.embedding_params())
        peak, peak_source = peak_flops(self.engine.device, cfg.precision)
        if rank == 0:
            OmegaConf.save(OmegaConf.structured(cfg), rundir.config_path(self.run_dir))
            print(f"model: {params / 1e6:.2f}M parameters (12·L·d² + embeddings = "
                  f"{cfg.model.approx_params() / 1e6:.2f}M) | ranks: {world} | ZeRO-{cfg.deepspeed.stage} "
                  f"{cfg.precision} {cfg.train.optimizer} | data: {manifest['splits']['train']['tokens']:,} train "
                  f"tokens, {self.loader.windows_per_epoch:,} windows/epoch | run_dir: {self.run_dir}"
                  + (f" | resumed at step {self.step}" if self.step else ""), flush=True)
            print(f"MFU: {flops_token / 1e6:.2f} MFLOPs/token against {peak / 1e12:.3g} TFLOP/s per device "
                  f"({peak_source})", flush=True)
        spent = last_logged(self.run_dir, "usd_spent", self.step) if rank == 0 and self.step else 0.0
        self.writer = MetricsWriter(self.run_dir, enabled=rank == 0, resume_step=self.step, tracking=cfg.tracking)
        self.writer.describe({"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "parameters": params,
                              "world_size": world, "mfu_peak_flops_per_device": peak, "mfu_peak_source": peak_source,
                              "resumed_at_step": self.step})
        self.log = TrainingLog(cfg, world, self.writer, self.engine.device, flops_token, peak, spent)
        self.evaluator = Evaluator(cfg, self.engine, self.tokenizer, rank, world, self.writer)
        self.micro_tokens = t.micro_batch * world * cfg.model.block_size  # one micro-step on every rank
        self.total_tokens = planned_tokens(t, self.micro_tokens)
        self.batch_log = (open(self.run_dir / f"batches_rank{rank}.txt", "a", buffering=1)
                          if t.record_batches else None)

    def fit(self) -> dict:
        t, last = self.cfg.train, {}
        if self.step >= t.max_steps and self.rank == 0:
            print(f"{self.run_dir} is already at step {self.step} of train.max_steps={t.max_steps}: nothing to train "
                  "(raise train.max_steps to go on, or choose a new run_dir)", flush=True)
        guard, profiler = Guard(self.engine.device), StepProfiler(self.run_dir, t.profile_steps, self.rank)
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", disable=self.rank != 0 or not t.progress,
                   dynamic_ncols=True)
        try:
            while self.step < t.max_steps:
                step_loss, lr, accum = self.train_step()
                self.step += 1
                profiler.step()
                bar.update(1)
                guard.note(self.step, step_loss)
                logging, evaluating = self.log.due(self.step), self.evaluator.due(self.step)
                saving = self.checkpointer.due(self.step)
                if logging or evaluating or saving:
                    guard.check()
                if guard.non_finite:
                    raise self._non_finite_error(guard, step_loss, accum)
                self.log.add(step_loss, accum, accum * self.micro_tokens)
                if logging:
                    last = self.log.write(self.step, self.loader.consumed * self.cfg.model.block_size, lr,
                                          accum * self.micro_tokens, _grad_norm(self.engine))
                    bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{last['tokens_per_s']:,.0f}", mfu=f"{last['mfu']:.1%}")
                if guard.stopping:
                    self._save_and_stop(guard, bar)
                    break
                if evaluating:
                    last.update(self._evaluate(bar))
                if saving:
                    self.checkpointer.save(self.step, self.loader.state_dict())
                    self.log.meter.restart()  # keep checkpoint time out of tokens/s
        finally:
            profiler.close()
            self.loader.close()
            guard.close()
            bar.close()
            if self.batch_log is not None:
                self.batch_log.close()
        self._final_sample(stopped=guard.stopping)
        self.writer.close()
        return {"step": self.step, "stopped": guard.stopping, **last}

    def train_step(self) -> tuple[torch.Tensor, float, int]:
        """One optimizer step over `accum` micro-batches; returns the summed loss (on the device), lr, accum."""
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        tokens = self.loader.consumed * cfg.model.block_size
        lr = lr_at(tokens, t, self.total_tokens)
        set_lr(engine, lr)
        accum = accum_at(tokens, t, self.micro_tokens)
        if accum != engine.gradient_accumulation_steps():
            engine.set_train_batch_size(t.micro_batch * self.world * accum)
        step_loss = torch.zeros((), device=engine.device)
        for micro in range(accum):
            engine.set_gradient_accumulation_boundary(micro == accum - 1)
            windows = self.loader.next_windows()
            if self.batch_log is not None:
                self.batch_log.write(f"{self.step + 1} " + " ".join(window_hash(row) for row in windows) + "\n")
            # one copy (page-locked on a GPU: asynchronous), uint8 ids widened on the device
            windows = windows.to(engine.device, non_blocking=True).long()
            _, loss = engine(windows[:, :-1], windows[:, 1:])
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float()
        return step_loss, lr, accum

    def _non_finite_error(self, guard: Guard, step_loss: torch.Tensor, accum: int) -> RunError:
        grad_norm = _grad_norm(self.engine)
        dist.all_reduce(step_loss)
        bad, latest = guard.bad_step, self.checkpointer.latest()
        return RunError(
            f"non-finite loss at step {bad}{f' (found at step {self.step})' if bad != self.step else ''}: loss "
            f"{step_loss.item() / (accum * self.world)}, grad norm {grad_norm}; stopped without saving. The last "
            f"good checkpoint is {latest or 'none'} (resume=auto restarts from it; lower train.lr or raise "
            "train.warmup_tokens)")

    def _save_and_stop(self, guard: Guard, bar) -> None:
        self.checkpointer.save(self.step, self.loader.state_dict())
        if self.rank == 0:
            bar.write(f"stop requested ({guard.stop.signal_name or 'by a peer rank'}): saved the checkpoint of "
                      f"step {self.step} in {self.checkpointer.directory}; resume=auto continues")

    def _evaluate(self, bar) -> dict:
        val = self.evaluator.run(self.step)
        if self.rank == 0:
            unit = "byte" if self.tokenizer.kind == "bytes" else "char"
            bar.write(f"step {self.step}: val loss {val['val_loss']:.4f} | {val['val_bpc']:.3f} bits/{unit}")
        self.log.meter.restart()  # keep eval time out of tokens/s
        return val

    def _final_sample(self, stopped: bool) -> None:
        t = self.cfg.train
        if t.sample_tokens and not stopped and self.step == t.max_steps:
            text = sample_text(self.engine, self.tokenizer, "\n", t.sample_tokens, t.seed + self.step,
                               self.cfg.deepspeed.stage)
            if self.rank == 0:
                print(f"\n--- sample at step {self.step} ---{text}\n---", flush=True)


def _grad_norm(engine) -> float | None:
    """The last update's gradient norm before clipping (a host sync: logging steps only)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
