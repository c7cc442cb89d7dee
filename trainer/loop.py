"""The training run: data, engine, resume, the step loop, eval, checkpoints, metrics, final sample."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from data.loader import RankLoader
from data.prepare import check_matches, is_prepared, missing_shards_error, prepare
from data.shards import ShardReader
from data.tokenizer import CharTokenizer
from model import GPT

from . import checkpoint
from .config import Config
from .distributed import (Node, RunError, broadcast_error, init_distributed, node_of_this_rank, shared_between_nodes,
                          shutdown)
from .engine import build_engine, set_lr
from .evaluate import evaluate_engine, sample_text
from .metrics import MetricsWriter, Throughput, last_logged
from .mfu import flops_per_token, peak_flops
from .profile import StepProfiler
from .schedule import accum_at, lr_at, planned_tokens
from .stopping import StopRequest


def window_hash(window: torch.Tensor) -> str:
    """Short id of one training window (block_size + 1 token ids), for train.record_batches."""
    return hashlib.sha1(window.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def ensure_data(cfg: Config, node: Node) -> dict:
    """Each node's leader (node 0's alone when the nodes share data.dir) prepares missing shards on its
    own disk and verifies every shard's checksum while the other ranks wait; then every rank checks
    that its node's manifest is the same as every other node's. A problem becomes the same error on
    every rank, before the first step."""
    error = None
    if node.writes(shared_between_nodes(cfg.data.dir, node)):
        try:
            if not is_prepared(cfg.data):
                missing = missing_shards_error(cfg.data, cfg.preset)
                if missing:
                    raise RunError(missing)
                print(f"no shards in {cfg.data.dir}: preparing them from data.source={cfg.data.source}", flush=True)
                prepare(cfg.data)
            check_matches(cfg.data)
            if cfg.data.verify:
                for split in ("train", "val"):
                    ShardReader(cfg.data.dir, split).verify()
        except Exception as e:  # reported on every rank below
            error = f"node {node.index}: {type(e).__name__}: {e}"
    broadcast_error(error, patient=True)
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


def train(cfg: Config) -> dict:
    rank, world = init_distributed(cfg.train.collective_timeout_s)
    progress = {"step": None}  # how far this rank got, for an error that ends the job
    try:
        result = _train(cfg, rank, world, progress)
    except BaseException as e:
        if world > 1 and not isinstance(e, RunError):
            # A peer may be waiting in a collective this rank will never join: leave now, so the
            # launcher stops the job, instead of hanging in a teardown barrier.
            print(f"rank {rank}: {_describe_failure(e, cfg, progress['step'])}", file=sys.stderr, flush=True)
            os._exit(1)
        if isinstance(e, RunError):  # raised alike on every rank: a clean teardown is possible
            shutdown()
        raise
    shutdown()
    return result


def _describe_failure(e: BaseException, cfg: Config, step: int | None) -> str:
    at = f" at step {step}" if step is not None else " before the first step"
    if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
        return (f"a collective waited longer than train.collective_timeout_s={cfg.train.collective_timeout_s:g}"
                f"{at}: a peer rank is stuck or gone (see its node's log); {type(e).__name__}: {e}")
    return f"{type(e).__name__}{at}: {e}"


def _train(cfg: Config, rank: int, world: int, progress: dict) -> dict:
    t = cfg.train
    node = node_of_this_rank()
    manifest = ensure_data(cfg, node)
    shared_checkpoints = shared_between_nodes(checkpoint.checkpoint_dir(cfg.run_dir), node)
    writes_files = node.writes(shared_checkpoints)  # this disk's `latest`, meta.json, conversions, pruning
    tokenizer = CharTokenizer.from_vocab(manifest["vocab"], manifest["tokenizer"]["lowercase"])
    cfg.model.vocab_size = tokenizer.vocab_size

    # decided by rank 0, checked by every rank on its own disk, before anything is built
    resume = checkpoint.plan_resume(cfg.resume, cfg.run_dir, tokenizer.vocab, cfg.model, cfg.deepspeed.stage,
                                    node, writes_files)
    ckpt, universal = None, False
    if resume is not None:
        ckpt, meta = resume
        universal = checkpoint.needs_universal(meta, world)
        if universal:
            ckpt = checkpoint.to_universal(ckpt, writes_files)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = GPT(cfg.model)
    engine = build_engine(model, cfg, world, load_universal=universal, node_local_checkpoints=not shared_checkpoints)
    torch.manual_seed(t.seed * 1000 + rank)  # per-rank dropout streams

    on_gpu = engine.device.type == "cuda"
    train_loader = RankLoader(cfg.data.dir, "train", cfg.model.block_size, t.micro_batch, rank, world,
                              seed=t.seed, num_workers=cfg.data.workers, pin_memory=on_gpu)
    step = 0
    if ckpt is not None:
        client = checkpoint.load(engine, ckpt)
        step = client["step"]
        progress["step"] = step
        train_loader.load_state_dict(client["loader"])

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions
    if rank == 0:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        print(f"model: {model_params / 1e6:.2f}M parameters (12·L·d² + embeddings = "
              f"{cfg.model.approx_params() / 1e6:.2f}M) | ranks: {world} | ZeRO-{cfg.deepspeed.stage} "
              f"{cfg.precision} | data: {manifest['splits']['train']['tokens']:,} train tokens, "
              f"{train_loader.windows_per_epoch:,} windows/epoch | run_dir: {run_dir}"
              + (f" | resumed at step {step}" if step else ""), flush=True)
    spent_before = last_logged(run_dir, "usd_spent", step) if rank == 0 and step else 0.0
    writer = MetricsWriter(run_dir, enabled=rank == 0, resume_step=step, tracking=cfg.tracking)
    batch_log = open(run_dir / f"batches_rank{rank}.txt", "a", buffering=1) if t.record_batches else None

    # the same eval_steps batches at every evaluation: built once, rewound each time
    val_loader = RankLoader(cfg.data.dir, "val", cfg.model.block_size, t.micro_batch, rank, world,
                            seed=t.seed, num_workers=0, num_batches=t.eval_steps)

    def run_eval(at_step: int) -> dict:
        val_loader.load_state_dict({"seed": t.seed, "consumed": 0})
        result = evaluate_engine(engine, val_loader)
        text = sample_text(engine, tokenizer, "\n", 200, t.seed, cfg.deepspeed.stage)
        writer.log(at_step, result)
        writer.text("samples", text or "", at_step)
        return result

    def save(at_step: int) -> None:
        checkpoint.save(engine, run_dir, at_step, train_loader.state_dict(), cfg.model, tokenizer.vocab,
                        tokenizer.lowercase, cfg.deepspeed.stage, writes_files, keep=t.keep_ckpts)

    micro_tokens = t.micro_batch * world * cfg.model.block_size  # one micro-step on every rank
    total_tokens = planned_tokens(t, micro_tokens)
    flops_token = flops_per_token(cfg.model, model_params - cfg.model.embedding_params())
    peak, peak_source = peak_flops(engine.device, cfg.precision)
    if rank == 0:
        print(f"MFU: {flops_token / 1e6:.2f} MFLOPs/token against {peak / 1e12:.3g} TFLOP/s per device "
              f"({peak_source})", flush=True)
    writer.describe({"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "parameters": model_params,
                     "world_size": world, "mfu_peak_flops_per_device": peak, "mfu_peak_source": peak_source,
                     "resumed_at_step": step})
    bar = tqdm(total=t.max_steps, initial=step, desc="train", disable=rank != 0 or not t.progress,
               dynamic_ncols=True)
    meter, started = Throughput(), time.time()
    loss_sum = torch.zeros((), device=engine.device)
    # [non-finite loss on some rank, stop requested, -(first non-finite step)], all-reduced with MAX
    guard = torch.zeros(3, device=engine.device)
    first_bad = torch.zeros((), device=engine.device)  # first step with a non-finite loss here; 0: none
    last = {}
    non_finite = stopping = False  # read back at checks; either one ends the loop
    stop = StopRequest()
    profiler = StepProfiler(run_dir, t.profile_steps, rank)
    try:
        while step < t.max_steps:
            tokens = train_loader.consumed * cfg.model.block_size
            lr = lr_at(tokens, t, total_tokens)
            set_lr(engine, lr)
            accum = accum_at(tokens, t, micro_tokens)
            if accum != engine.gradient_accumulation_steps():
                engine.set_train_batch_size(t.micro_batch * world * accum)
            logging = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps
            step_loss = torch.zeros((), device=engine.device)
            for micro in range(accum):
                engine.set_gradient_accumulation_boundary(micro == accum - 1)
                windows = train_loader.next_windows()
                if batch_log is not None:
                    batch_log.write(f"{step + 1} " + " ".join(window_hash(row) for row in windows) + "\n")
                # one copy (page-locked on a GPU: asynchronous), uint8 ids widened on the device
                windows = windows.to(engine.device, non_blocking=True).long()
                _, loss = engine(windows[:, :-1], windows[:, 1:])
                engine.backward(loss)
                engine.step()
                step_loss += loss.detach().float()
            step += 1
            progress["step"] = step
            profiler.step()
            meter.add(micro_steps=accum, tokens=accum * micro_tokens)
            bar.update(1)

            evaluating = (t.eval_every and step % t.eval_every == 0) or step == t.max_steps
            saving = (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps
            # Non-finite losses are noted on the device (no host sync); every rank reads the guard at
            # the same steps (logging, evaluation, checkpoint: one small all-reduce), so all take the
            # same decision there, and nothing is saved after a non-finite loss.
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(step_loss), float(step), first_bad)
            checking = logging or evaluating or saving
            if checking:
                guard[0] = (first_bad > 0).float()
                guard[1] = float(stop.requested)
                guard[2] = torch.where(first_bad > 0, -first_bad, -1e12)
                dist.all_reduce(guard, op=dist.ReduceOp.MAX)
                non_finite, stopping, neg_first_bad = guard.tolist()  # the one host read of the check
            if non_finite:
                gn = _grad_norm(engine)
                dist.all_reduce(step_loss)
                bad = int(-neg_first_bad)
                raise RunError(
                    f"non-finite loss at step {bad}{f' (found at step {step})' if bad != step else ''}: loss "
                    f"{step_loss.item() / (accum * world)}, grad norm {gn}; "
                    f"stopped without saving. The last good checkpoint is "
                    f"{checkpoint.latest_tag(checkpoint.checkpoint_dir(run_dir)) or 'none'} (resume=auto restarts "
                    "from it; lower train.lr or raise train.warmup_tokens)"
                )
            loss_sum += step_loss
            if logging:
                dist.all_reduce(loss_sum)
                rates = meter.read()
                last = {"tokens": train_loader.consumed * cfg.model.block_size,
                        "loss": loss_sum.item() / (rates.pop("micro_steps") * world), "lr": lr,
                        "grad_norm": _grad_norm(engine),
                        "batch_tokens": accum * micro_tokens, **rates,
                        "mfu": rates["tokens_per_s"] * flops_token / (peak * world)}
                if t.cost_per_hour:
                    last.update(usd_per_hour=t.cost_per_hour,
                                tokens_per_usd=last["tokens_per_s"] * 3600 / t.cost_per_hour,
                                usd_spent=spent_before + t.cost_per_hour * (time.time() - started) / 3600)
                writer.log(step, last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{last['tokens_per_s']:,.0f}", mfu=f"{last['mfu']:.1%}")
                loss_sum.zero_()
            if stopping:
                save(step)
                if rank == 0:
                    bar.write(f"stop requested ({stop.signal_name or 'by a peer rank'}): saved the checkpoint of "
                              f"step {step} in {checkpoint.checkpoint_dir(run_dir)}; resume=auto continues")
                break
            if evaluating:
                val = run_eval(step)
                last.update(val)
                if rank == 0:
                    bar.write(f"step {step}: val loss {val['val_loss']:.4f} | {val['val_bpc']:.3f} bits/char")
                meter.restart()  # keep eval time out of tokens/s
            if saving:
                save(step)
                meter.restart()
    finally:
        profiler.close()
        train_loader.close()
        stop.restore()
        bar.close()
        if batch_log is not None:
            batch_log.close()

    if t.sample_tokens and not guard[1] and step == t.max_steps:
        text = sample_text(engine, tokenizer, "\n", t.sample_tokens, t.seed + step, cfg.deepspeed.stage)
        if rank == 0:
            print(f"\n--- sample at step {step} ---{text}\n---", flush=True)
    writer.close()
    return {"step": step, "stopped": bool(stopping), **last}


def _grad_norm(engine) -> float | None:
    """The last update's gradient norm before clipping (a host sync: logging steps only)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
