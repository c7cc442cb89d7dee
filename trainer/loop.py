"""The training run: data, engine, resume, the step loop, eval, checkpoints, metrics, final sample."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from data.loader import RankLoader
from data.prepare import check_matches, is_prepared, prepare
from data.tokenizer import CharTokenizer
from model import GPT

from . import checkpoint
from .config import Config
from .distributed import broadcast_error, init_distributed, shutdown
from .engine import build_engine, grad_norm, set_lr
from .evaluate import evaluate, sample_text
from .metrics import MetricsWriter
from .schedule import lr_at

TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "perf/tokens_per_s", "step_time_s": "perf/step_time_s",
           "val_loss": "val/loss", "val_bpc": "val/bpc", "val_accuracy": "val/accuracy"}


def ensure_data(cfg: Config, rank: int) -> dict:
    """Rank 0 prepares missing shards while the others wait; every rank gets the manifest."""
    error = None
    if rank == 0:
        try:
            if not is_prepared(cfg.data):
                print(f"no shards in {cfg.data.dir}: preparing them from data.source={cfg.data.source}", flush=True)
                prepare(cfg.data)
            check_matches(cfg.data)
        except Exception as e:  # reported on every rank below
            error = f"{type(e).__name__}: {e}"
    broadcast_error(error)
    return check_matches(cfg.data)


def train(cfg: Config) -> dict:
    rank, world = init_distributed()
    try:
        return _train(cfg, rank, world)
    finally:
        shutdown()


def _train(cfg: Config, rank: int, world: int) -> dict:
    t = cfg.train
    manifest = ensure_data(cfg, rank)
    tokenizer = CharTokenizer.from_vocab(manifest["vocab"], manifest["tokenizer"]["lowercase"])
    cfg.model.vocab_size = tokenizer.vocab_size

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = GPT(cfg.model)
    engine = build_engine(model, cfg, world)
    torch.manual_seed(t.seed * 1000 + rank)  # per-rank dropout streams

    train_loader = RankLoader(cfg.data.dir, "train", cfg.model.block_size, t.micro_batch, rank, world,
                              seed=t.seed, num_workers=cfg.data.workers)
    step = 0
    where = checkpoint.resolve(cfg.resume, cfg.run_dir)
    if where is not None:
        client = checkpoint.load(engine, where)
        if client["vocab"] != tokenizer.vocab:
            raise ValueError(f"{where[0] / where[1]}: checkpoint vocab differs from {cfg.data.dir}/manifest.json")
        step = client["step"]
        train_loader.load_state_dict(client["loader"])

    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        n_params = model.num_params() if cfg.deepspeed.stage < 3 else sum(
            p.ds_numel for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters | ranks: {world} | ZeRO-{cfg.deepspeed.stage} "
              f"{cfg.precision} | data: {manifest['splits']['train']['tokens']:,} train tokens, "
              f"{train_loader.windows_per_epoch:,} windows/epoch | run_dir: {run_dir}"
              + (f" | resumed at step {step}" if step else ""), flush=True)
    writer = MetricsWriter(run_dir, enabled=rank == 0, resume_step=step)

    def run_eval(at_step: int) -> dict:
        val = RankLoader(cfg.data.dir, "val", cfg.model.block_size, t.micro_batch, rank, world,
                         seed=t.seed, num_workers=0, num_batches=t.eval_steps)
        result = evaluate(engine, val)
        text = sample_text(engine, tokenizer, "\n", 200, t.seed, cfg.deepspeed.stage)
        writer.log(at_step, result, TB_TAGS)
        writer.text("samples", text or "", at_step)
        return result

    def save(at_step: int) -> None:
        checkpoint.save(engine, run_dir, at_step, train_loader.state_dict(), cfg.model, tokenizer.vocab,
                        tokenizer.lowercase, cfg.deepspeed.stage)

    tokens_per_step = t.micro_batch * t.grad_accum * world * cfg.model.block_size
    bar = tqdm(total=t.max_steps, initial=step, desc="train", disable=rank != 0 or not t.progress,
               dynamic_ncols=True)
    loss_sum = torch.zeros((), device=engine.device)
    window_start, window_steps = time.perf_counter(), 0
    last = {}
    own_grad_norm = cfg.deepspeed.stage == 0 and cfg.precision == "fp32"  # see engine.grad_norm
    norm = None
    while step < t.max_steps:
        lr = lr_at(step, t)
        set_lr(engine, lr)
        logging = (step + 1) % t.log_every == 0 or step + 1 == t.max_steps
        for micro in range(t.grad_accum):
            x, y = train_loader.next()
            _, loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            if logging and micro == t.grad_accum - 1 and own_grad_norm:
                norm = grad_norm(engine)
            engine.step()
            loss_sum += loss.detach().float()
        step += 1
        window_steps += 1
        bar.update(1)

        if logging:
            dist.all_reduce(loss_sum)
            elapsed = time.perf_counter() - window_start
            norm = norm if own_grad_norm else engine.get_global_grad_norm()
            last = {"tokens": step * tokens_per_step,
                    "loss": loss_sum.item() / (window_steps * t.grad_accum * world), "lr": lr,
                    "grad_norm": float(norm) if norm is not None else None,
                    "tokens_per_s": window_steps * tokens_per_step / elapsed,
                    "step_time_s": elapsed / window_steps}
            writer.log(step, last, TB_TAGS)
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:,.0f}")
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
            val = run_eval(step)
            last.update(val)
            if rank == 0:
                bar.write(f"step {step}: val loss {val['val_loss']:.4f} | {val['val_bpc']:.3f} bits/char")
            window_start = time.perf_counter()  # keep eval time out of tokens/s
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps:
            save(step)
            window_start = time.perf_counter()
    bar.close()

    if t.sample_tokens:
        text = sample_text(engine, tokenizer, "\n", t.sample_tokens, t.seed + step, cfg.deepspeed.stage)
        if rank == 0:
            print(f"\n--- sample at step {step} ---{text}\n---", flush=True)
    writer.close()
    return {"step": step, **last}
