"""Builds the DeepSpeed config from ours, and the optimizer and engine around the model."""
from __future__ import annotations

import deepspeed
import torch

from .config import Config
from .deepspeed_compat import clip_and_record_grad_norm, skip_one_rank_allreduce, zero_grad_from_a_list
from .muon import MuonAdamW, adamw_groups, param_groups


def auto_bucket(n_params: int) -> int:
    """ZeRO buffer size sized to the model: a fixed 5e6 elements is most of ZeRO-3's memory for a 10M
    model, while large models want buckets big enough to keep the links busy."""
    return int(min(5e8, max(5e5, n_params // 16)))


def deepspeed_config(cfg: Config, world_size: int, n_params: int, load_universal: bool = False,
                     node_local_checkpoints: bool = False) -> dict:
    """load_universal: the checkpoint to resume from is a universal (world-size-free) conversion.
    node_local_checkpoints: the nodes share no disk, so each one writes its own copy of the model
    states (else, at ZeRO 0-2, global rank 0 alone would, and no other node could resume)."""
    t, z = cfg.train, cfg.deepspeed
    zero = {"stage": z.stage}
    if z.stage > 0:
        zero.update(overlap_comm=z.overlap_comm, contiguous_gradients=z.contiguous_gradients,
                    reduce_bucket_size=z.reduce_bucket_size or auto_bucket(n_params))
    if z.stage == 3:
        zero.update(stage3_prefetch_bucket_size=z.stage3_prefetch_bucket_size or auto_bucket(n_params),
                    stage3_param_persistence_threshold=z.stage3_param_persistence_threshold)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world_size,
        "gradient_clipping": 0.0 if clips_in_torch(cfg) else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16" and not autocasts(cfg)},
        "torch_autocast": {"enabled": autocasts(cfg), "dtype": "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer waits for the device at every forward and every step (a GPU
        # then idles while the host queues the next step); the loop's own meter keeps time instead
        "timers": {"throughput": {"enabled": False}},
        "checkpoint": {"load_universal": load_universal, "use_node_local_storage": node_local_checkpoints},
    }


def autocasts(cfg: Config) -> bool:
    """bf16 at ZeRO-0 is torch autocast over fp32 weights, gradients and AdamW (what a plain PyTorch
    loop does). DeepSpeed's own bf16 at ZeRO-0 wraps the optimizer in its unfused fp16 optimizer:
    per-tensor master copies and an overflow check that reads every gradient back to the host, one
    sync per parameter tensor per step. ZeRO 1-3 keep DeepSpeed's bf16 (flat partitions)."""
    return cfg.deepspeed.stage == 0 and cfg.precision == "bf16"


def clips_in_torch(cfg: Config) -> bool:
    """ZeRO-0 (fp32 weights, also under bf16 autocast): DeepSpeed would clip with a loop of per-tensor
    norms and an all-reduce of the total; torch's foreach clip on the already all-reduced gradients
    gives the same in a few kernels. ZeRO 1-3 clip their own partitions and are left to."""
    return cfg.deepspeed.stage == 0


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Torch AdamW (DeepSpeed then JIT-builds no optimizer op), or Muon for the blocks' matrices beside
    it (train.optimizer); weight decay on matrices only.

    train.fused_adamw: torch's fused kernel, on CPU as on CUDA. It updates every tensor in one pass
    (4x faster than the default per-tensor loop on 2 CPU cores); on CUDA it keeps its step counters
    on the device, so an update never waits for the GPU.
    """
    t = cfg.train
    adam = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=t.fused_adamw or None)
    if t.optimizer == "muon":
        return MuonAdamW(*param_groups(model, t.weight_decay), momentum=t.muon_momentum, **adam)
    return torch.optim.AdamW(adamw_groups(model.parameters(), t.weight_decay), **adam)


def build_engine(model: torch.nn.Module, cfg: Config, world_size: int, load_universal: bool = False,
                 node_local_checkpoints: bool = False):
    """The DeepSpeed engine around the model, with the training-time options of train.*."""
    from deepspeed.accelerator import get_accelerator

    model.activation_checkpointing = cfg.train.activation_checkpointing
    device = get_accelerator().current_device_name()
    if device.startswith("cuda"):
        model.to(device)  # the fused optimizer is built for parameters already on the GPU
        torch.set_float32_matmul_precision("high")  # fp32 runs use TF32 tensor cores (bf16 runs are unaffected)
    n_params = sum(p.numel() for p in model.parameters())
    config = deepspeed_config(cfg, world_size, n_params, load_universal, node_local_checkpoints)
    optimizer = build_optimizer(model, cfg)
    if clips_in_torch(cfg):
        clip_and_record_grad_norm(optimizer, cfg.train.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if world_size == 1 and cfg.deepspeed.stage == 0:
        skip_one_rank_allreduce(engine)  # ZeRO 1-3 keep their reduce path: it also fills their partitions
    if cfg.deepspeed.stage == 0:
        zero_grad_from_a_list(engine, model)
    if cfg.train.compile:
        engine.compile()  # compiles the wrapped module in place: checkpoints keep their parameter names
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
