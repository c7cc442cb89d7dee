"""Tokens/s of one model in a plain PyTorch loop vs the DeepSpeed engine at ZeRO 0-3 and with the
training options (activation checkpointing, torch.compile, unfused AdamW), in one process, as ratios.

    python bench/engine_overhead.py [--steps 100] [--rounds 3] [--no-compile] [--zero0-only] [model.d_model=...]

Every loop runs the same model, batches and clipping, and fused AdamW except in the row that says
otherwise; they alternate in rounds and the median of each is reported, so the ratios are measured
under the same machine load. precision=bf16 autocasts the plain loop's forward as the ZeRO-0 engine
does. --zero0-only keeps the goal's pair (plain, ZeRO-0): for a large model on a GPU, where the
other rows would cost minutes and memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from deepspeed.accelerator import get_accelerator
from omegaconf import OmegaConf

from launch.cli import set_environment
from model import GPT
from trainer.config import to_config
from trainer.distributed import init_distributed, shutdown
from trainer.engine import build_engine, build_optimizer, set_lr


def plain_step(model, opt, clip, bf16: bool):
    """A tight plain loop: the parameter list is made once (model.parameters() walks the module tree,
    ~60 us a call here), as the engine's clipping does, so the ratio is the engine's own cost."""
    params = list(model.parameters())
    device_type = params[0].device.type

    def step(x, y):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        for g in opt.param_groups:
            g["lr"] = 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def engine_step(engine):
    def step(x, y):
        set_lr(engine, 1e-3)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    return step


def timed(step, batches) -> float:
    start = time.perf_counter()
    for x, y in batches:
        step(x, y)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is queued: count it all
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (slow to build)")
    parser.add_argument("--zero0-only", action="store_true", help="only the plain loop and the ZeRO-0 engine")
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. model.n_layer=6")
    args = parser.parse_args()
    set_environment()
    init_distributed()
    baby = OmegaConf.create({"model": {"vocab_size": 70}, "train": {"micro_batch": 12}})
    base = OmegaConf.merge(baby, OmegaConf.from_dotlist(args.overrides))
    cfg = to_config(base)
    T, B = cfg.model.block_size, cfg.train.micro_batch
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 70, (B, T + 1), generator=g) for _ in range(args.steps)]
    device = get_accelerator().current_device_name()
    batches = [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in tokens]

    def engine_for(**train_and_zero):
        variant = OmegaConf.merge(base, OmegaConf.create(train_and_zero))
        torch.manual_seed(0)
        c = to_config(variant)
        return engine_step(build_engine(GPT(c.model), c, world_size=1))

    torch.manual_seed(0)
    plain = GPT(cfg.model).to(device)
    bf16 = cfg.precision == "bf16"
    loops = {"plain PyTorch": plain_step(plain, build_optimizer(plain, cfg), cfg.train.grad_clip, bf16)}
    for stage in range(1 if args.zero0_only else 4):
        loops[f"DeepSpeed ZeRO-{stage}"] = engine_for(deepspeed={"stage": stage})
    if not args.zero0_only:
        loops["ZeRO-0 + activation checkpointing"] = engine_for(train={"activation_checkpointing": True})
        loops["ZeRO-0, AdamW not fused"] = engine_for(train={"fused_adamw": False})
        if not args.no_compile:
            loops["ZeRO-0 + torch.compile"] = engine_for(train={"compile": True})
    for step in loops.values():
        timed(step, batches[:5])  # warm-up (and compilation)
    times = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            times[name].append(timed(step, batches))
    n_tokens = args.steps * B * T
    base_rate = n_tokens / statistics.median(times["plain PyTorch"])
    print(f"\nmodel {plain.num_params() / 1e6:.2f}M params, batch {B}x{T}, {args.steps} steps x {args.rounds} "
          f"rounds, {cfg.precision}, torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          "one process\n")
    print("| loop | tokens/s (median) | vs plain |\n|---|---:|---:|")
    for name, ts in times.items():
        rate = n_tokens / statistics.median(ts)
        print(f"| {name} | {rate:,.0f} | {rate / base_rate:.3f} |")
    shutdown()


if __name__ == "__main__":
    main()
