"""Model FLOPs utilization: model FLOPs per token over the hardware's peak.

FLOPs per token (forward and backward) = 6·N + 12·L·H·Q·T, with N the non-embedding parameters,
L layers, H heads, Q head dim, T context (the PaLM paper's count, appendix B). Peaks are dense
(no sparsity) from the vendors' datasheets for known GPUs; elsewhere a matmul is timed once and the
result cached, so the CPU figure means "share of what this machine's BLAS reaches". An fp32 run's
matmuls use TF32 tensor cores on a GPU when torch allows it (the trainer does), so its peak is the
TF32 one then: against the plain fp32 peak, 7x lower on an H100, MFU would pass 100%.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from data.files import atomic_write
from model import GPTConfig
from trainer.peaks import GPU_PEAKS, gpu_peak  # noqa: F401 - the table lives where torch is not needed


def flops_per_token(cfg: GPTConfig, non_embedding_params: int) -> float:
    return 6 * non_embedding_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, trials: int = 5,
                        seconds: float = 0.1) -> float:
    """Best of several short timings of an n x n matmul, so a moment of contention does not stick."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "shakespeare_transformer" / "peak_flops.json"


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision, tf32=torch.get_float32_matmul_precision() != "highest")
        if peak is not None:
            return peak, f"datasheet {name}"
    else:
        name = _cpu_name()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    key = f"{device.type}|{name}|{torch.get_num_threads()} threads|{dtype}"
    if device.type == "cuda" and dtype == torch.float32:  # the timing itself uses TF32 when allowed
        key += f"|matmul precision {torch.get_float32_matmul_precision()}"
    path = _cache_file()
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache[key] = measure_matmul_peak(device, dtype, n=4096 if device.type == "cuda" else 1024)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(cache, indent=1))
    return cache[key], f"measured matmul ({key})"
