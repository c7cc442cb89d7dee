"""Tokens/s of one model in a plain PyTorch loop vs the DeepSpeed ZeRO-0 engine, in one process.

    python bench/engine_overhead.py [--steps 150] [--rounds 3] [model.d_model=...]

Both loops run the same model, batches, AdamW and clipping; they alternate in rounds and the median
of each is reported, so the ratio is measured under the same machine load.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from launch.cli import set_environment
from model import GPT
from trainer.config import to_config
from trainer.distributed import init_distributed, shutdown
from trainer.engine import build_engine, build_optimizer, set_lr


def plain_loop(model, opt, batches, clip):
    start = time.perf_counter()
    for x, y in batches:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for g in opt.param_groups:
            g["lr"] = 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def engine_loop(engine, batches):
    start = time.perf_counter()
    for x, y in batches:
        set_lr(engine, 1e-3)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. model.n_layer=6")
    args = parser.parse_args()
    set_environment()
    init_distributed()
    baby = OmegaConf.create({"model": {"vocab_size": 70}, "train": {"micro_batch": 12}})
    cfg = to_config(OmegaConf.merge(baby, OmegaConf.from_dotlist(args.overrides)))
    T, B = cfg.model.block_size, cfg.train.micro_batch
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 70, (B, T + 1), generator=g) for _ in range(args.steps)]
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]

    torch.manual_seed(0)
    plain = GPT(cfg.model)
    opt = build_optimizer(plain, cfg)
    torch.manual_seed(0)
    engine = build_engine(GPT(cfg.model), cfg, world_size=1)
    plain_loop(plain, opt, batches[:10], cfg.train.grad_clip)  # warm-up
    engine_loop(engine, batches[:10])
    times = {"plain PyTorch": [], "DeepSpeed ZeRO-0": []}
    for _ in range(args.rounds):
        times["plain PyTorch"].append(plain_loop(plain, opt, batches, cfg.train.grad_clip))
        times["DeepSpeed ZeRO-0"].append(engine_loop(engine, batches))
    n_tokens = args.steps * B * T
    base = n_tokens / statistics.median(times["plain PyTorch"])
    print(f"\nmodel {plain.num_params() / 1e6:.2f}M params, batch {B}x{T}, {args.steps} steps x {args.rounds} "
          f"rounds, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| loop | tokens/s (median) | vs plain |\n|---|---:|---:|")
    for name, ts in times.items():
        rate = n_tokens / statistics.median(ts)
        print(f"| {name} | {rate:,.0f} | {rate / base:.3f} |")
    shutdown()


if __name__ == "__main__":
    main()
