"""Evaluation metrics on cases with known answers, and the MFU formula and peaks."""
import json
import math

import pytest
import torch

from model import GPT, GPTConfig
from trainer.evaluate import batch_stats, evaluate, summarize
from trainer.mfu import flops_per_token, gpu_peak, peak_flops


def test_a_model_forced_to_uniform_logits_scores_log2_vocab_bits_per_char():
    cfg = GPTConfig(vocab_size=70, n_layer=2, n_head=2, d_model=32, block_size=16)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head: every logit is 0
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 70, (4, 17), generator=g) for _ in range(3)]  # windows: x and y their slices
    result = summarize(evaluate(model, batches, torch.device("cpu")))
    assert result["bpc"] == pytest.approx(math.log2(70))
    assert result["loss"] == pytest.approx(math.log(70))
    assert result["perplexity"] == pytest.approx(70)
    assert result["tokens"] == 3 * 4 * 16


def test_accuracy_and_top5_on_a_hand_made_ranking():
    # target 2 ranked first, target 0 ranked third, target 4 ranked last of 6
    logits = torch.tensor([[[0.0, 5.0, 9.0, 4.0, -3.0, 1.0]] * 3])
    targets = torch.tensor([[2, 3, 4]])
    result = summarize(batch_stats(logits, targets))
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["top5_accuracy"] == pytest.approx(2 / 3)
    probs = logits[0, 0].softmax(-1)
    expected = -(probs[2].log() + probs[3].log() + probs[4].log()).item() / 3
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_flops_per_token_by_hand_for_the_baby_model():
    cfg = GPTConfig(vocab_size=70, n_layer=4, n_head=4, d_model=128, block_size=64)
    n = GPT(cfg).num_params()
    assert n == 4 * (12 * 128 * 128 + 2 * 128) + 128  # 12d^2 and two norms per layer, final norm
    assert flops_per_token(cfg, n) == 6 * 787_584 + 12 * 4 * 4 * 32 * 64


def test_gpu_peak_table_matches_device_names():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert gpu_peak("NVIDIA H200", "bf16") == 989e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak("NVIDIA A10", "bf16") == 125e12
    assert gpu_peak("Some Future GPU", "bf16") is None
    # a name holding a shorter entry is not taken for it: the longest whole-word entry wins, or none
    assert gpu_peak("NVIDIA H200 NVL", "bf16") == 835e12
    assert gpu_peak("NVIDIA L40", "bf16") == 181e12 and gpu_peak("NVIDIA L40S", "bf16") == 362e12
    assert gpu_peak("NVIDIA A10G", "bf16") is None


def test_an_fp32_run_on_tensor_cores_is_measured_against_the_tf32_peak(monkeypatch):
    """The trainer lets fp32 matmuls use TF32 on a GPU; against the plain fp32 peak (7x lower on an
    H100) its MFU would pass 100%. The peak follows torch's matmul precision at the time."""
    assert gpu_peak("NVIDIA L40S", "fp32") == 183e12
    assert gpu_peak("NVIDIA L40S", "fp32", tf32=False) == 91.6e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    before = torch.get_float32_matmul_precision()
    try:
        peaks = {}
        for setting in ("high", "highest"):
            torch.set_float32_matmul_precision(setting)
            peaks[setting] = peak_flops(torch.device("cuda", 0), "fp32")
    finally:
        torch.set_float32_matmul_precision(before)
    assert peaks == {"high": (494.7e12, "datasheet NVIDIA H100 80GB HBM3"),
                     "highest": (67e12, "datasheet NVIDIA H100 80GB HBM3")}


def test_cpu_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    peak, source = peak_flops(torch.device("cpu"), "fp32")
    assert 1e8 < peak < 1e14 and source.startswith("measured")
    cache = tmp_path / "shakespeare_transformer" / "peak_flops.json"
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [peak]
    entries = {k: 123.0 for k in entries}
    cache.write_text(json.dumps(entries))
    assert peak_flops(torch.device("cpu"), "fp32")[0] == 123.0
