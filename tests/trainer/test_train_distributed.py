"""Real training runs: 2 CPU ranks under the deepspeed launcher, and one plain process."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import (
    RECIPE_OVERRIDES,
    ROOT,
    STEPS,
    debug_overrides,
    free_port,
    host_reads,
    losses,
    profiled_events,
    read_metrics,
    resume_into,
    run_train,
    subprocess_env,
)
from omegaconf import OmegaConf

from model import GPT
from trainer.config import to_config
from trainer.engine import build_optimizer


@pytest.mark.processes
def test_two_rank_run_learns_logs_and_checkpoints(zero0_run):
    run_dir, proc = zero0_run
    assert "ranks: 2" in proc.stdout
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 0.5  # from ~ln(70)=4.25 down
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    last = metrics[-2] if "loss" not in metrics[-1] else metrics[-1]
    assert last["tokens"] == STEPS * 8 * 2 * 32 and last["grad_norm"] > 0 and last["tokens_per_s"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{STEPS:08d}"
    assert (run_dir / "checkpoints" / f"step{STEPS:08d}" / "mp_rank_00_model_states.pt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert f"--- sample at step {STEPS} ---" in proc.stdout
    # DeepSpeed's CPU all-reduce buffers (/dev/shm, ~69 MB a rank) are not left behind
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.master_port}_*"))


@pytest.mark.processes
def test_tensorboard_event_files_hold_the_scalars(zero0_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = zero0_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
            "val/loss", "val/bpc"} <= tags
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx(losses(run_dir), rel=1e-6)
    assert "samples/text_summary" in acc.Tags()["tensors"]  # the text tab's samples


@pytest.mark.processes
def test_tensorboard_server_serves_the_scalars_over_http(zero0_run):
    run_dir, _ = zero0_run
    port = free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast", "false"]
    server = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, runs = time.time() + 90, {}
        while time.time() < deadline:
            try:
                runs = json.load(urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5))
                if any("val/bpc" in tags for tags in runs.values()):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert runs, "tensorboard never answered"
        run = next(r for r, tags in runs.items() if "train/loss" in tags)
        query = urllib.parse.urlencode({"run": run, "tag": "train/loss"})
        points = json.load(urllib.request.urlopen(f"{base}/data/plugin/scalars/scalars?{query}", timeout=10))
        served = {step: value for _, step, value in points}
        assert served == pytest.approx(losses(run_dir), rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.processes
def test_single_process_mode_trains_without_the_launcher_then_samples_and_evaluates(tmp_path, shakespeare_dir):
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path, "train.max_steps=10", "train.eval_every=5",
                                "train.ckpt_every=5"))
    assert "ranks: 1" in proc.stdout
    assert sorted(losses(tmp_path)) == list(range(1, 11))
    out = subprocess.run([sys.executable, "launch/sample.py", f"run_dir={tmp_path}", "prompt=To be",
                          "max_new_tokens=40", "seed=3"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip("\n")
    assert text.startswith("to be") and len(text) == len("to be") + 40

    out = subprocess.run([sys.executable, "launch/eval.py", f"run_dir={tmp_path}", "split=val", "max_batches=5",
                          "batch_size=16"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # stdout is exactly one JSON object
    assert result["tokens"] == 5 * 16 * 32 and result["step"] == 10
    assert 0 < result["accuracy"] <= result["top5_accuracy"] < 1
    assert result["loss"] < math.log(70)  # better than uniform after 10 steps


@pytest.mark.processes
def test_rope_mqa_sdpa_model_trains(tmp_path, shakespeare_dir):
    run_train(debug_overrides(shakespeare_dir, tmp_path, "model.pos_emb=rope", "model.n_kv_head=1",
                         "model.attn=sdpa", "train.max_steps=20", "train.eval_every=0", "train.ckpt_every=0"))
    curve = losses(tmp_path)
    assert curve[20] < curve[1] - 0.5


@pytest.mark.processes
def test_batch_ramp_grows_the_batch_by_accumulation_and_trains(tmp_path, shakespeare_dir):
    run_train(debug_overrides(shakespeare_dir, tmp_path, "train.max_steps=12", "train.grad_accum=4",
                         "train.batch_ramp_tokens=4096", "train.batch_start_tokens=256",
                         "train.eval_every=0", "train.ckpt_every=0"))
    metrics = [m for m in read_metrics(tmp_path) if "loss" in m]
    batch = [m["batch_tokens"] for m in metrics]
    assert batch[0] == 256 and batch[-1] == 4 * 256 and batch == sorted(batch)
    tokens = [m["tokens"] for m in metrics]
    assert all(b - a == size for a, b, size in zip([0] + tokens, tokens, batch))
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3


@pytest.mark.processes
def test_two_nodes_on_one_machine_match_a_two_rank_single_node_run(zero0_run, tmp_path, shakespeare_dir):
    """A real 2-node job: two launchers (--no_ssh, node_rank 0 and 1) over a hostfile written by
    launch.cluster from a host list whose two hosts both are this machine."""
    from launch.cluster import main as cluster_main

    (tmp_path / "hosts.txt").write_text("root@localhost 1\nroot@127.0.0.1 1\n")
    assert cluster_main(["--hosts", str(tmp_path / "hosts.txt"), "--out", str(tmp_path / "cluster")]) == 0
    hostfile = tmp_path / "cluster" / "hostfile"
    assert hostfile.read_text() == "node0 slots=1\nnode1 slots=1\n"
    master = (tmp_path / "cluster" / "master_addr").read_text().strip()
    port, run_dir, steps = free_port(), tmp_path / "run", 10
    overrides = debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero3", f"train.max_steps={steps}",
                           "train.eval_every=0", "train.ckpt_every=0", "train.sample_tokens=0")
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--no_ssh", "--node_rank", str(rank), "--master_addr", master,
                               "--master_port", str(port), "launch/train.py", *overrides],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "ranks: 2" in outputs[0]
    two_nodes, single_node = losses(run_dir), losses(zero0_run[0])
    assert sorted(two_nodes) == list(range(1, steps + 1))
    for step in two_nodes:
        assert two_nodes[step] == pytest.approx(single_node[step], rel=1e-5, abs=1e-5), step


@pytest.mark.processes
def test_compile_and_activation_checkpointing_train_like_the_plain_engine(zero0_run, tmp_path, shakespeare_dir):
    """The plain engine: the reference's first 6 steps (1 rank taking its 2 ranks' windows as 2
    micro-batches gives its losses, as the test below shows over all 30)."""
    run_train(debug_overrides(shakespeare_dir, tmp_path, "deepspeed=zero0", "train.grad_accum=2",
                              "train.max_steps=6", "train.eval_every=0", "train.ckpt_every=0",
                              "train.sample_tokens=0", "train.compile=true", "train.activation_checkpointing=true"))
    plain, fast = losses(zero0_run[0]), losses(tmp_path)
    assert fast.keys() == set(range(1, 7))
    for step in fast:
        assert fast[step] == pytest.approx(plain[step], rel=1e-5), step


@pytest.mark.processes
def test_one_rank_accumulating_two_micro_batches_matches_two_ranks(zero0_run, tmp_path, shakespeare_dir):
    """One rank at ZeRO-0 skips DeepSpeed's gradient all-reduce (an average over one rank); taking
    the two ranks' windows as two accumulated micro-batches must still give their losses and their
    gradient norms (DeepSpeed 0.19.5 and older halve an accumulated gradient here: norms 2x apart,
    losses only ~1e-4, since Adam barely sees the scale)."""
    run_train(debug_overrides(shakespeare_dir, tmp_path, "deepspeed=zero0", "train.grad_accum=2",
                              "train.eval_every=0", "train.ckpt_every=0", "train.sample_tokens=0"))
    norms = [{m["step"]: m["grad_norm"] for m in read_metrics(run) if "grad_norm" in m}
             for run in (zero0_run[0], tmp_path)]
    assert norms[0].keys() == norms[1].keys() == set(range(1, STEPS + 1))
    for step in norms[0]:
        assert norms[1][step] == pytest.approx(norms[0][step], rel=1e-4), step
    two_ranks, one_rank = losses(zero0_run[0]), losses(tmp_path)
    assert one_rank.keys() == two_ranks.keys() == set(range(1, STEPS + 1))
    for step in two_ranks:
        assert one_rank[step] == pytest.approx(two_ranks[step], rel=1e-5, abs=1e-5), step


@pytest.mark.processes
def test_profile_steps_writes_a_trace_and_an_op_table_of_exactly_those_steps(tmp_path, shakespeare_dir):
    """Also the hot loop's promise: steps that do not log read nothing back from the device."""
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path, "train.max_steps=12", "train.profile_steps=3",
                                     "train.log_every=10", "train.eval_every=0", "train.ckpt_every=0",
                                     "train.sample_tokens=0"))
    assert "profile of 3 steps" in proc.stdout
    events = profiled_events(tmp_path)
    steps = {e["name"] for e in events if e["name"].startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#6", "ProfilerStep#7", "ProfilerStep#8"}  # training steps 7-9
    table = (tmp_path / "profile" / "ops_rank0.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table  # the model's matmuls are in the op table
    outside, in_adamw = host_reads(events)
    assert in_adamw  # AdamW's CPU kernel reads its step counters (its CUDA kernel keeps them on the device)
    assert outside == []


def _aten_ops_per_step(step, x, steps: int = 3) -> float:
    """Ops a training step runs, counted by torch.profiler (on a GPU, each one a kernel launch)."""
    from torch.profiler import ProfilerActivity, profile

    step(x[:, :-1], x[:, 1:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x[:, :-1], x[:, 1:])
    return sum(e.name.startswith("aten::") for e in prof.events()) / steps


@pytest.mark.processes
def test_zero0_engine_steps_never_wait_for_the_device_nor_walk_the_model_nor_add_ops(monkeypatch):
    """DeepSpeed's engine synchronizes the device through its accelerator (on a GPU the host then
    waits for every queued kernel, and the GPU idles while the next step is queued). A CPU's
    synchronize does nothing, so the calls are counted in-process: none in ZeRO-0 steps, fp32 or bf16.
    Nor does a step walk the module tree (DeepSpeed's zero_grad did, the most host time the engine
    added to a small model's step). And a step runs the ops of a plain PyTorch loop (the same model,
    fused AdamW and clipping) plus a few for the loss's division by the accumulation steps: nothing
    per parameter tensor, like a one-rank all-reduce's bucket copies or per-tensor norms, each a
    kernel launch on a GPU. (One process group for both precisions: DeepSpeed keeps its groups, so a
    process initializes only once.)"""
    from deepspeed.accelerator import get_accelerator

    from trainer.distributed import init_distributed, shutdown
    from trainer.engine import build_engine

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", subprocess_env()["TORCH_EXTENSIONS_DIR"])
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)  # restored afterwards, unlike init_distributed's own defaults
    syncs, walks = [], []
    monkeypatch.setattr(get_accelerator(), "synchronize", lambda *args, **kwargs: syncs.append(args))
    named_modules = torch.nn.Module.named_modules

    def counted_named_modules(module, *args, **kwargs):
        walks.append(type(module).__name__)
        return named_modules(module, *args, **kwargs)
    init_distributed()
    try:
        for precision in ("fp32", "bf16"):
            cfg = to_config(OmegaConf.create({"model": {"vocab_size": 70, "n_layer": 2, "n_head": 2, "d_model": 32,
                                                        "block_size": 16}, "train": {"micro_batch": 2},
                                              "precision": precision}))
            engine = build_engine(GPT(cfg.model), cfg, world_size=1)
            syncs.clear()
            x = torch.randint(0, 70, (2, 17))

            def engine_step(inputs, targets):
                engine.backward(engine(inputs, targets)[1])
                engine.step()
            with monkeypatch.context() as walking:
                walking.setattr(torch.nn.Module, "named_modules", counted_named_modules)
                for _ in range(5):  # DeepSpeed's throughput timer starts synchronizing at its third step
                    engine_step(x[:, :-1], x[:, 1:])
            assert engine.global_steps == 5 and syncs == [] and walks == [], precision
            assert all(p.grad is None for p in engine.module.parameters()), precision  # cleared after each step

            plain = GPT(cfg.model)
            params, opt = list(plain.parameters()), build_optimizer(plain, cfg)
            tensors = len(params)

            def plain_step(inputs, targets):
                with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                    loss = plain(inputs, targets)[1]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            added = _aten_ops_per_step(engine_step, x) - _aten_ops_per_step(plain_step, x)
            assert 0 <= added < tensors, (precision, added, tensors)
    finally:
        shutdown()


@pytest.mark.processes
def test_bf16_at_zero0_is_autocast_over_fp32_weights_and_resumes_bit_identically(zero0_run, tmp_path,
                                                                                  shakespeare_dir):
    """precision=bf16 at ZeRO-0: bf16 matmuls (the losses move off the fp32 run's, a little), fp32
    weights in the checkpoint, and a stop/resume that repeats the uninterrupted run exactly."""

    # 10 steps (the reference's first 10: its lr schedule is fixed by decay_tokens), resumed at 5
    bf16 = ["deepspeed=zero0", "precision=bf16", "train.sample_tokens=0", "train.eval_every=0",
            "train.ckpt_every=5", "train.max_steps=10", "train.record_batches=true"]
    run_train(debug_overrides(shakespeare_dir, tmp_path / "whole", *bf16), ranks=2)
    whole, fp32 = losses(tmp_path / "whole"), losses(zero0_run[0])
    assert whole.keys() == set(range(1, 11))
    gaps = [abs(whole[step] - fp32[step]) for step in whole]
    assert 0 < max(gaps) < 0.02
    states = torch.load(tmp_path / "whole" / "checkpoints" / "step00000010" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=True)
    assert {t.dtype for t in states["module"].values()} == {torch.float32}

    resumed = resume_into(tmp_path / "whole", 5, tmp_path / "resumed", bf16, ranks=2)
    assert resumed.keys() == set(range(6, 11)) and all(resumed[s] == whole[s] for s in resumed)


@pytest.mark.processes
def test_a_checkpoint_whose_engine_state_this_engine_cannot_read_is_one_line(tmp_path, shakespeare_dir):
    """A ZeRO-0 checkpoint whose optimizer state is not the shape this run's engine keeps (here: nested
    one level down, as DeepSpeed's bf16 wrapper kept it), with matching sums: resuming it is a one-line
    error saying how to go on, not DeepSpeed's KeyError."""

    from trainer import checksums

    bf16 = ["deepspeed=zero0", "precision=bf16", "train.sample_tokens=0", "train.eval_every=0"]
    run_train(debug_overrides(shakespeare_dir, tmp_path, *bf16, "train.max_steps=2"))
    states_file = tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    states = torch.load(states_file, map_location="cpu", weights_only=True)
    states["optimizer"] = {"dynamic_loss_scale": False, "cur_scale": 1.0, "cur_iter": 2,
                           "optimizer_state_dict": states["optimizer"], "fp32_groups": []}
    torch.save(states, states_file)
    meta = json.loads((states_file.parent / "meta.json").read_text())
    meta["files"] = checksums.merge([checksums.hash_files(states_file.parent)])
    (states_file.parent / "meta.json").write_text(json.dumps(meta))
    proc = run_train(debug_overrides(shakespeare_dir, tmp_path, *bf16, "train.max_steps=4"), check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "its engine state has no 'param_groups' that this run's engine needs" in last and "resume=never" in last


def test_the_cpu_ranks_of_a_node_split_its_cores_unless_omp_num_threads_says(monkeypatch):
    """Torch gives each process a thread per core: 2 CPU ranks on 2 cores ran 4 threads, 4x slower
    (measured on this 2-core machine). The launcher's LOCAL_SIZE (torchrun: LOCAL_WORLD_SIZE) splits them."""
    import os

    from trainer.distributed import share_cores

    before, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        for variable in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv("LOCAL_SIZE", raising=False)
            monkeypatch.setenv(variable, "2")
            torch.set_num_threads(cores)
            share_cores()
            assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
        torch.set_num_threads(cores)
        share_cores()
        assert torch.get_num_threads() == cores  # the user's choice stands
    finally:
        torch.set_num_threads(before)


@pytest.mark.processes
def test_the_recipe_model_trains_alike_at_zero3_and_zero0_and_resumes_bit_identically(tmp_path, shakespeare_dir):
    """fp32: ZeRO-3 over 2 ranks (parameters partitioned) follows ZeRO-0's losses (1 rank taking the
    same global batch as 2 micro-batches); ZeRO-3 resumed from step 5 repeats the uninterrupted ZeRO-3
    run exactly, on the same windows."""
    common = [*RECIPE_OVERRIDES, "train.schedule=wsd", "train.eval_every=0", "train.ckpt_every=5",
              "train.max_steps=10", "train.sample_tokens=0", "train.record_batches=true"]
    run_train(debug_overrides(shakespeare_dir, tmp_path / "z0", *common, "deepspeed=zero0", "train.grad_accum=2"))
    run_train(debug_overrides(shakespeare_dir, tmp_path / "z3", *common, "deepspeed=zero3"), ranks=2)
    z0, z3 = losses(tmp_path / "z0"), losses(tmp_path / "z3")
    assert z3.keys() == set(range(1, 11)) and z0[10] < z0[1] - 0.3
    assert max(abs(z3[s] - z0[s]) for s in z0) < 1e-5

    resumed = resume_into(tmp_path / "z3", 5, tmp_path / "resumed", [*common, "deepspeed=zero3"], ranks=2)
    assert resumed.keys() == set(range(6, 11)) and all(resumed[s] == z3[s] for s in resumed)
