"""What one optimizer step launches: ops and host reads (each a device sync on a GPU) per step, by
precision and ZeRO stage, beside the plain PyTorch loop of bench/engine_overhead.py, counted with
torch.profiler in one process. A GPU pays a launch per op and a stall per host read, so these counts
are what a CPU can say about GPU step overhead. (Fused AdamW's reads of its step counters are left
out: its CUDA kernel keeps them on the device.)

    python bench/step_ops.py [model.n_layer=12 model.d_model=768 ...]
"""
from __future__ import annotations

import argparse

import deepspeed
import torch
from engine_overhead import engine_step, plain_step
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from launch.cli import set_environment
from model import GPT
from trainer.config import to_config
from trainer.distributed import init_distributed, shutdown
from trainer.engine import build_engine, build_optimizer, deepspeed_config

HOST_READS = ("aten::_local_scalar_dense",)  # what .item(), bool() and float() of a tensor run


def deepspeed_bf16_engine(model, cfg):
    """ZeRO-0 with DeepSpeed's own bf16 (bf16 weights, its unfused optimizer wrapper): the path
    precision=bf16 took at ZeRO-0 before it became torch autocast."""
    config = deepspeed_config(cfg, 1, sum(p.numel() for p in model.parameters()))
    config.update(bf16={"enabled": True}, torch_autocast={"enabled": False}, gradient_clipping=cfg.train.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=config)
    return engine


def _in_torch_adamw(event) -> bool:
    """Host reads inside torch's AdamW here are its CPU kernel reading the step counters: on a GPU
    they stay on the device, so they are not counted."""
    while event is not None:
        if event.name.startswith("Optimizer.step#AdamW"):
            return True
        event = event.cpu_parent
    return False


def count(step, x, steps: int = 3) -> tuple[float, float]:
    """(ops, host reads) per optimizer step."""
    for _ in range(3):
        step(x[:, :-1], x[:, 1:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x[:, :-1], x[:, 1:])
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::"))
    reads = sum(1 for e in events if e.name in HOST_READS and not _in_torch_adamw(e))
    return ops / steps, reads / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted config keys, e.g. model.n_layer=12")
    args = parser.parse_args()
    set_environment()
    init_distributed()
    base = OmegaConf.merge(OmegaConf.create({"model": {"vocab_size": 70}, "train": {"micro_batch": 4}}),
                           OmegaConf.from_dotlist(args.overrides))
    rows = [("fp32", "plain loop"), ("fp32", 0), ("bf16 (autocast)", "plain loop"), ("bf16 (autocast)", 0),
            ("bf16 (autocast), Muon", 0), ("bf16, DeepSpeed's bf16 wrapper", 0), ("bf16", 1), ("bf16", 2)]
    print("\n| precision | ZeRO stage | ops per step | host reads per step |\n|---|---:|---:|---:|")
    for name, stage in rows:
        cfg = to_config(OmegaConf.merge(base, {"precision": name.split(maxsplit=1)[0].rstrip(","),
                                               "deepspeed": {"stage": 0 if stage == "plain loop" else stage},
                                               "train": {"optimizer": "muon" if "Muon" in name else "adamw"}}))
        torch.manual_seed(0)
        model = GPT(cfg.model)
        if stage == "plain loop":
            step = plain_step(model, build_optimizer(model, cfg), cfg.train.grad_clip, cfg.precision == "bf16")
        else:
            step = engine_step(deepspeed_bf16_engine(model, cfg) if "wrapper" in name else build_engine(model, cfg, 1))
        x = torch.randint(0, 70, (cfg.train.micro_batch, cfg.model.block_size + 1))
        ops, reads = count(step, x)
        print(f"| {name} | {stage} | {ops:,.0f} | {reads:,.0f} |", flush=True)
    params = list(GPT(cfg.model).parameters())
    print(f"\nmodel: {sum(p.numel() for p in params) / 1e6:.2f}M parameters in {len(params)} tensors, "
          f"batch {cfg.train.micro_batch}x{cfg.model.block_size}")
    shutdown()


if __name__ == "__main__":
    main()
