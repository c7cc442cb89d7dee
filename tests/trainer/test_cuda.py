"""The GPU paths: bf16 SDPA/flash against an fp64 reference, cached decoding, a bf16 DeepSpeed run
with the fused optimizer that resumes exactly, pinned batches, and steps that never wait on the GPU.
Run on a machine with CUDA (bench/gpu.sh does, on a lent GPU); elsewhere they are skipped, since the
CPU paths are tested everywhere else."""
import itertools

import pytest
import torch
from helpers import debug_overrides, host_reads, losses, profiled_events, run_train

from data.loader import RankLoader
from model import GPT, GPTConfig, generate
from trainer.evaluate import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VARIANTS = list(itertools.product([None, 2, 1], ["learned", "rope"]))


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("n_kv_head, pos_emb", VARIANTS)
def test_bf16_sdpa_and_einsum_match_fp64_reference(n_kv_head, pos_emb):
    cfg = dict(vocab_size=70, n_layer=2, n_head=8, n_kv_head=n_kv_head, d_model=256, block_size=512,
               dropout=0.0, pos_emb=pos_emb)
    torch.manual_seed(0)
    ref = GPT(GPTConfig(attn="einsum", **cfg)).double().cuda()
    x = torch.randint(0, 70, (4, 512), device="cuda")
    y = torch.randint(0, 70, (4, 512), device="cuda")
    ref_logits, ref_loss = ref(x, y)
    ref_loss.backward()
    ref_grad = ref.blocks[0].attn.q.weight.grad
    for attn in ("sdpa", "einsum"):
        model = GPT(GPTConfig(attn=attn, **cfg)).cuda().to(torch.bfloat16)
        model.load_state_dict(ref.state_dict())
        logits, loss = model(x, y)
        loss.backward()
        assert torch.isfinite(logits).all()
        assert _relative_error(logits, ref_logits) < 2e-2, attn
        assert _relative_error(model.blocks[0].attn.q.weight.grad, ref_grad) < 5e-2, attn


def test_cached_decoding_on_gpu_equals_full_recompute():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=70, n_layer=2, n_head=4, n_kv_head=2, d_model=64, block_size=64,
                          dropout=0.0, pos_emb="rope")).cuda().eval()
    prompt = torch.randint(0, 70, (1, 10), device="cuda")
    cached = generate(model, prompt, 40, temperature=0, use_cache=True)
    plain = generate(model, prompt, 40, temperature=0, use_cache=False)  # recomputes the whole context
    assert cached.shape == (1, 50) and torch.equal(cached, plain)


def test_training_batches_reach_the_gpu_in_one_page_locked_copy(shakespeare_dir):
    loader = RankLoader(shakespeare_dir, "train", 256, 8, num_workers=1, pin_memory=True)
    windows = loader.next_windows()
    loader.close()
    assert windows.is_pinned() and windows.is_contiguous() and windows.shape == (8, 257)


def test_evaluation_queues_its_batches_without_waiting_for_the_gpu(shakespeare_dir):
    """Torch's sync debug mode turns any call that waits for the GPU into an error: evaluating
    queues every batch (copies and forward) and its sums stay on the device."""
    model = GPT(GPTConfig(vocab_size=256, n_layer=2, n_head=2, d_model=64, block_size=64)).cuda().eval()
    loader = RankLoader(shakespeare_dir, "val", 64, 4, shuffle=False, num_workers=0, num_batches=5)
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = evaluate(model, (loader.next_windows() for _ in range(5)), torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats[3].item() == 5 * 4 * 64  # tokens scored


def _windows_by_step(run_dir) -> dict[int, list[str]]:
    """step -> the windows trained on (train.record_batches), from the last attempt at each step."""
    by_step = {}
    for line in (run_dir / "batches_rank0.txt").read_text().splitlines():
        step, *ids = line.split()
        by_step[int(step)] = ids
    return by_step


@pytest.mark.processes
def test_bf16_training_on_gpu_learns_and_resumes(tmp_path, shakespeare_dir):
    """The debug preset in bf16 on the GPU, eager in both runs: the loss falls, and a run stopped at
    step 15 resumes there (it says so) and repeats the uninterrupted run's steps 16-30, on the same
    windows, to within the GPU's run-to-run rounding."""
    full, half = tmp_path / "full", tmp_path / "half"
    bf16 = ["precision=bf16", "train.record_batches=true"]
    run_train(debug_overrides(shakespeare_dir, full, *bf16))
    first = run_train(debug_overrides(shakespeare_dir, half, *bf16, "train.max_steps=15"))
    second = run_train(debug_overrides(shakespeare_dir, half, *bf16))
    assert "resumed" not in first.stdout and "| resumed at step 15" in second.stdout
    a, b = losses(full), losses(half)
    assert sorted(a) == sorted(b) == list(range(1, 31)) and a[30] < a[1] - 0.5
    for step in range(16, 31):
        assert abs(b[step] - a[step]) < 1e-3, (step, b[step], a[step])
    assert _windows_by_step(half) == _windows_by_step(full)
    latest = (half / "checkpoints" / "latest").read_text().strip()
    client = torch.load(half / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=True)
    assert isinstance(client["rng"][0]["cuda"], torch.Tensor)  # the rank's own GPU's generator only


@pytest.mark.processes
def test_bf16_steps_on_gpu_never_wait_for_the_device(tmp_path, shakespeare_dir):
    """The hot loop on a GPU: in profiled steps that do not log, neither the loop, nor the engine, nor
    the fused AdamW (its step counters live on the device) reads a value back or synchronizes: the
    host stays ahead, queueing the next step while the GPU runs this one."""
    run_train(debug_overrides(shakespeare_dir, tmp_path, "precision=bf16", "train.max_steps=12",
                              "train.profile_steps=3", "train.log_every=10", "train.eval_every=0",
                              "train.ckpt_every=0", "train.sample_tokens=0"))
    events = profiled_events(tmp_path)
    assert sum(e["name"].startswith("Optimizer.step#") for e in events) == 3
    assert host_reads(events) == ([], [])
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    waits = [(s["name"], e["name"], round(e["ts"] - s["ts"])) for e in events for s in steps
             if e.get("cat") == "cuda_runtime" and "Synchronize" in e["name"]
             and s["ts"] <= e["ts"] <= s["ts"] + s["dur"]]
    assert len(steps) == 3 and waits == []  # (step, call, microseconds into the step)
