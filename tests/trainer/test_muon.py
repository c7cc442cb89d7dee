"""Muon (train.optimizer=muon): which parameters it orthogonalizes, its batched step against
torch.optim.Muon's, the ZeRO stages it refuses, and a run that resumes bit-identically with its
momentum in the checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import debug_overrides, losses, resume_into, run_train, small_config
from omegaconf import OmegaConf

from model import GPT, GPTConfig
from trainer.checkpoint import Checkpoint, CheckpointError, check_compatible
from trainer.config import Config, ConfigError, TrainConfig, to_config
from trainer.engine import build_optimizer
from trainer.muon import MuonAdamW


def test_muon_orthogonalizes_the_blocks_matrices_and_adamw_updates_the_rest():
    torch.manual_seed(0)
    model = GPT(small_config(tie_head=False))
    cfg = Config(train=TrainConfig(optimizer="muon", lr=1e-2, weight_decay=0.1))
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, MuonAdamW)
    muon = {id(p) for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1, 0.1, 0.0]  # vectors undecayed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, loss = model(torch.randint(0, 40, (64, 16)), torch.randint(0, 40, (64, 16)))
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        decayed = before[name] * (1 - 1e-2 * 0.1) if p.dim() == 2 else before[name]
        update = (p.detach() - decayed).double()
        if name == "head.weight":  # Adam's first step: about lr in every coordinate, not orthogonal
            assert torch.allclose(update.abs().mean(), torch.tensor(1e-2, dtype=torch.float64), rtol=0.05)
        if name not in names:
            continue
        # an orthogonalized step: singular values near 1 (times the scaled lr), but for the directions
        # the one small batch's gradient barely has; the kv projection's keys and values each on its own
        for part in update.chunk(2) if name.endswith("attn.kv.weight") else [update]:
            s = torch.linalg.svdvals(part / (1e-2 * 0.2 * math.sqrt(max(part.shape))))
            assert s.max() < 1.6 and 0.7 < s.median() < 1.3 and (s > 0.5).float().mean() > 0.85, (name, s)


def test_our_batched_muon_steps_as_torch_optim_muon_does():
    """trainer/muon.py orthogonalizes each shape's matrices in one batch; torch.optim.Muon (with
    match_rms_adamw) is the reference: after 3 steps on the same gradients every matrix has moved the
    same way, up to bf16 rounding."""
    from trainer.muon import Muon

    torch.manual_seed(0)
    shapes = [(32, 32), (32, 32), (64, 32), (128, 32), (32, 128)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]  # weights big enough for the decay to
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]  # move them as much as the update
    start = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=1e-2, momentum=0.9, weight_decay=0.5)
    b = torch.optim.Muon(theirs, lr=1e-2, momentum=0.9, weight_decay=0.5, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start):
        moved, expected = (p - p0).detach(), (q - p0).detach()
        # bf16 iterations, in another order: within 2% of the largest move, element by element
        assert (moved - expected).abs().max() < 0.02 * expected.abs().max(), (p.shape, moved, expected)
    idle = torch.nn.Parameter(torch.ones(4, 4))
    Muon([idle], lr=1e-2, momentum=0.9).step()  # a group none of whose parameters got a gradient
    assert torch.equal(idle, torch.ones(4, 4))


def test_muon_at_a_zero_stage_that_splits_matrices_is_a_config_error_naming_both_keys():
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match=r"^train\.optimizer=muon runs at deepspeed\.stage=0 only "
                                              rf"\(got {stage}\)"):
            to_config(OmegaConf.create({"train": {"optimizer": "muon"}, "deepspeed": {"stage": stage}}))
    with pytest.raises(ConfigError, match=r"train\.schedule='linear': choose cosine or wsd"):
        to_config(OmegaConf.create({"train": {"schedule": "linear"}}))
    with pytest.raises(ConfigError, match=r"model\.mlp='swiglu': choose gelu or relu2"):
        to_config(OmegaConf.create({"model": {"mlp": "swiglu"}}))
    # a setting that would do nothing is refused rather than ignored
    with pytest.raises(ConfigError, match=r"^train\.cooldown is set, but applies only with train\.schedule=wsd "
                                          r"\(this run: cosine\)$"):
        to_config(OmegaConf.create({"train": {"cooldown": 0.3}}))
    with pytest.raises(ConfigError, match=r"^train\.muon_momentum is set, but applies only with "
                                          r"train\.optimizer=muon \(this run: adamw\)$"):
        to_config(OmegaConf.create({"train": {"muon_momentum": 0.9}}))


@pytest.mark.processes
def test_muon_trains_and_resumes_bit_identically_with_its_momentum_in_the_checkpoint(tmp_path, shakespeare_dir):
    common = ["train.optimizer=muon", "train.lr=3e-3", "train.eval_every=0", "train.ckpt_every=5",
              "train.max_steps=10", "train.sample_tokens=0", "train.record_batches=true"]
    run_train(debug_overrides(shakespeare_dir, tmp_path / "whole", *common))
    whole = losses(tmp_path / "whole")
    assert whole[10] < whole[1] - 0.3
    states = torch.load(tmp_path / "whole" / "checkpoints" / "step00000005" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=True)["optimizer"]
    muon_groups = [g for g in states["param_groups"] if g["muon"]]
    assert muon_groups and all("momentum_buffer" in states["state"][i] for g in muon_groups for i in g["params"])

    resumed = resume_into(tmp_path / "whole", 5, tmp_path / "resumed", common, ranks=1)
    assert resumed.keys() == set(range(6, 11)) and all(resumed[s] == whole[s] for s in resumed)

    # the model and the optimizer are part of the checkpoint: another one is refused, by name
    ckpt = Checkpoint(tmp_path / "whole" / "checkpoints", "step00000005")
    meta = json.loads((ckpt.path / "meta.json").read_text())
    plain = GPTConfig(**meta["model_config"])
    assert check_compatible(ckpt, meta["vocab"], plain, 0, "muon")["train_optimizer"] == "muon"
    with pytest.raises(CheckpointError, match=r"the model differs: model\.qk_norm: checkpoint \w+, config \w+"):
        check_compatible(ckpt, meta["vocab"], GPTConfig(**{**meta["model_config"], "qk_norm": not plain.qk_norm}),
                         0, "muon")
    saved = Checkpoint(tmp_path / "whole" / "checkpoints", "step00000010")
    with pytest.raises(CheckpointError, match=r"saved with train\.optimizer=muon, this run uses "
                                              r"train\.optimizer=adamw; resume with train\.optimizer=muon$"):
        check_compatible(saved, meta["vocab"], plain, 0, "adamw")
    # one format: a meta.json without a field this trainer writes is refused, naming it; no default
    # stands in for it (a model setting or the optimizer could silently differ)
    for drop in ("qk_norm", "train_optimizer"):
        changed = json.loads(json.dumps(meta))
        (changed["model_config"] if drop == "qk_norm" else changed).pop(drop)
        (ckpt.path / "meta.json").write_text(json.dumps(changed))
        with pytest.raises(CheckpointError, match="model_config does not hold" if drop == "qk_norm" else
                           "no train_optimizer"):
            check_compatible(ckpt, meta["vocab"], plain, 0, "muon")
