"""Per-rank memory of ZeRO stages 0-3 at 2 ranks, measured from the live tensors, beside the ZeRO
paper's formulas, in fp32 and in bf16 mixed precision.

    python bench/zero_memory.py [--precision fp32|bf16|both] [model.n_layer=6 model.d_model=384 ...]

Each stage runs in its own 2-rank job (`deepspeed --num_gpus 2 bench/zero_memory.py --stage S`), so
nothing one engine leaves behind is counted for the next. In each: one full step (so Adam's state
exists), then forward + backward, then every live tensor storage of this rank is summed
(parameters, gradients, optimizer state, DeepSpeed's buffers). Formulas, Ψ parameters, N ranks, in
bytes: bf16 is the paper's mixed precision (2Ψ weights + 2Ψ gradients + 12Ψ fp32 weights and Adam
moments): ZeRO-0 16Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N. For fp32 Adam: 16Ψ,
8Ψ + 8Ψ/N, 4Ψ + 12Ψ/N, 16Ψ/N, each plus 4Ψ/N, since DeepSpeed keeps an fp32 copy of each partition
even when the model is fp32.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from launch.cli import set_environment, strip_launcher_args
from model import GPT
from trainer.config import to_config
from trainer.distributed import init_distributed, shutdown
from trainer.engine import build_engine


def live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type in ("cpu", "cuda"):
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes():
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # tensors without storage (meta, sparse views)
            continue
    return total


def formula(precision: str, stage: int, psi: int, n: int) -> float:
    if precision == "bf16":
        return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]
    return {0: 16 * psi, 1: 8 * psi + 12 * psi / n, 2: 4 * psi + 16 * psi / n, 3: 20 * psi / n}[stage]


def measure(stage: int, overrides: list[str]) -> None:
    """Inside one rank of the job: print {"stage", "params", "bytes"} (the larger of the ranks) on rank 0."""
    rank, world = init_distributed()
    base = OmegaConf.merge(OmegaConf.create({"model": {"vocab_size": 70, "n_layer": 6, "n_head": 6,
                                                       "d_model": 384, "block_size": 256},
                                             "train": {"micro_batch": 4}}), OmegaConf.from_dotlist(overrides))
    cfg = to_config(OmegaConf.merge(base, {"deepspeed": {"stage": stage}}))
    x = torch.randint(0, 70, (cfg.train.micro_batch, cfg.model.block_size))
    gc.collect()
    floor = live_tensor_bytes()
    torch.manual_seed(0)
    engine = build_engine(GPT(cfg.model), cfg, world)
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    for boundary in (True, False):  # a full step (Adam's state exists), then forward + backward
        _, loss = engine(x.to(engine.device), x.to(engine.device))
        engine.backward(loss)
        if boundary:
            engine.step()
    gc.collect()
    measured = torch.tensor([float(live_tensor_bytes() - floor)], dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    if rank == 0:
        print("RESULT " + json.dumps({"stage": stage, "params": psi, "bytes": measured.item(), "world": world}))
    shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, help="(inside the launcher) measure this stage")
    parser.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(strip_launcher_args(sys.argv)[1:])
    set_environment()
    if args.stage is not None:
        measure(args.stage, args.overrides)
        return
    for precision in ["fp32", "bf16"] if args.precision == "both" else [args.precision]:
        rows = []
        for stage in range(4):
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "bench/zero_memory.py",
                   "--stage", str(stage), *args.overrides, f"precision={precision}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        psi, world, zero0 = rows[0]["params"], rows[0]["world"], rows[0]["bytes"]
        print(f"\n{psi / 1e6:.2f}M parameters (Ψ), {precision}, Adam, {world} ranks; MB per rank (the larger rank)\n")
        print("| ZeRO stage | measured MB | formula MB | measured / stage 0 |\n|---|---:|---:|---:|")
        for row in rows:
            expected = formula(precision, row["stage"], psi, world)
            print(f"| {row['stage']} | {row['bytes'] / 1e6:.1f} | {expected / 1e6:.1f} | {row['bytes'] / zero0:.2f} |")


if __name__ == "__main__":
    main()
