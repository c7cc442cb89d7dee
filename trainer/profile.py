"""An optional torch.profiler window over a few training steps: where a step's time goes (kernels,
copies, optimizer, communication), as a Chrome/Perfetto trace and an op table per rank."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

SKIP_STEPS = 5  # start-up, the first (compiling) steps and allocator growth stay out of the window


class StepProfiler:
    """Records steps SKIP_STEPS + 2 .. SKIP_STEPS + 1 + `steps` after it starts (one more step
    warms the profiler up); a no-op when steps is 0. Call step() after every optimizer step."""

    def __init__(self, run_dir: Path, steps: int, rank: int):
        self.out, self.rank, self.steps = Path(run_dir) / "profile", rank, steps
        self._prof = None
        if steps > 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, on_trace_ready=self._write,
                                 schedule=schedule(wait=SKIP_STEPS, warmup=1, active=steps, repeat=1))
            self._prof.start()

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        """Stop; a window the run ended inside is written as far as it got."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None

    def _write(self, prof) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        ops, on_gpu = prof.key_averages(), torch.cuda.is_available()
        tables = [ops.table(sort_by="self_cuda_time_total", row_limit=30)] if on_gpu else []
        # the host's time too: on a GPU it tells a step the host cannot queue fast enough from a busy GPU
        tables.append(ops.table(sort_by="self_cpu_time_total", row_limit=15 if on_gpu else 30))
        table = "\n".join(tables)
        (self.out / f"ops_rank{self.rank}.txt").write_text(table + "\n")
        if self.rank == 0:
            print(f"profile of {self.steps} steps (trace and op table per rank in {self.out}):\n{table}", flush=True)
