"""Builds the DeepSpeed config from ours, and the optimizer and engine around the model."""
from __future__ import annotations

import deepspeed
import torch

from .config import Config


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


def _clip_before_each_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip (when max_norm > 0) and record the global gradient norm before every update; DeepSpeed's
    engine copies an optimizer's _global_grad_norm into its own after the step, so
    engine.get_global_grad_norm() means the same for every stage and precision."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(opt, args, kwargs):
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            opt._global_grad_norm = norm

    optimizer.register_step_pre_hook(clip)


def _zero_grad_from_a_list(engine, model: torch.nn.Module) -> None:
    """DeepSpeed's ZeRO-0 step ends in engine.zero_grad(), which walks the whole module tree through
    named_parameters() to set each gradient to None: the largest part of the engine's host time per
    step (bench/engine_overhead.py, tiny 6-layer CPU model: 0.936 of a plain loop's tokens/s with
    the walk, 0.97 with this list). ZeRO 1-3 clear their own flat buffers and keep theirs."""
    params = list(model.parameters())

    def zero_grad():
        for p in params:
            p.grad = None

    engine.zero_grad = zero_grad


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Torch AdamW (DeepSpeed then JIT-builds no optimizer op); weight decay on matrices only.

    train.fused_adamw: torch's fused kernel, on CPU as on CUDA. It updates every tensor in one pass
    (4x faster than the default per-tensor loop on 2 CPU cores); on CUDA it keeps its step counters
    on the device, so an update never waits for the GPU.
    """
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=t.fused_adamw or None)


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
        _clip_before_each_step(optimizer, cfg.train.grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if world_size == 1 and cfg.deepspeed.stage == 0:
        # averaging gradients over one rank only copies them into buckets and back (4% of a small
        # model's step); ZeRO 1-3 keep their reduce path, which also fills their partitions
        engine.enable_backward_allreduce = False
    if cfg.deepspeed.stage == 0:
        _zero_grad_from_a_list(engine, model)
    if cfg.train.compile:
        engine.compile()  # compiles the wrapped module in place: checkpoints keep their parameter names
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
