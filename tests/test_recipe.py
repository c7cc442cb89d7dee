"""The recipe options (model.qk_norm, model.mlp=relu2, model.tie_head=false, cached RoPE tables,
train.optimizer=muon, train.schedule=wsd): each computes what it claims, keeps SDPA equal to the
einsum reference and the KV cache equal to the full forward, exports exactly or is refused by name,
trains at ZeRO-0 and ZeRO-3 alike, and resumes bit-identically."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from conftest import debug_overrides, losses, resume_into, run_train
from model import GPT, GPTConfig
from model.attention import Rotary
from trainer.checkpoint import Checkpoint, CheckpointError, check_compatible
from trainer.config import Config, ConfigError, TrainConfig, to_config
from trainer.engine import build_optimizer
from trainer.export import ExportError, export
from trainer.muon import MuonAdamW
from trainer.schedule import lr_at

RECIPE = dict(pos_emb="rope", qk_norm=True, mlp="relu2", tie_head=False)
RECIPE_OVERRIDES = ["model.pos_emb=rope", "model.qk_norm=true", "model.mlp=relu2", "model.tie_head=false"]


def small(**changes) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=40, n_layer=2, n_head=4, d_model=32, block_size=16), **changes})


def test_rope_tables_are_built_once_per_device_and_rotate_as_complex_numbers():
    rotary = Rotary(head_dim=8)
    x = torch.randn(2, 3, 10, 8)
    for start in (0, 4):
        got = rotary(x, start)
        # the same rotation as complex multiplication: (x_i + i x_{i+d/2}) * e^{i pos theta_i}
        theta = 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
        angle = torch.outer(torch.arange(start, start + 10).double(), theta)
        z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * torch.polar(torch.ones_like(angle), angle)
        assert torch.allclose(got.double(), torch.cat([z.real, z.imag], dim=-1), atol=1e-5)
    tables = rotary.tables(14, x.device)
    rotary(x, 0)
    assert rotary.tables(14, x.device)[0] is tables[0]  # not recomputed by a call within its length


def test_rope_tables_first_made_while_sampling_in_inference_mode_still_serve_training():
    model = GPT(small(pos_emb="rope"))
    ids = torch.randint(0, 40, (2, 16))
    with torch.inference_mode():
        model(ids)
    _, loss = model(ids, ids)
    loss.backward()  # inference tensors cannot be saved for backward: the tables are not made as such
    assert model.blocks[0].attn.rotary.tables(16, ids.device)[0].shape[0] == 16  # block_size, made once


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_every_recipe_option_keeps_sdpa_equal_to_einsum_and_the_cache_equal_to_the_full_forward(kv):
    torch.manual_seed(0)
    reference = GPT(small(attn="einsum", n_kv_head=kv, **RECIPE)).eval()
    fast = GPT(small(attn="sdpa", n_kv_head=kv, **RECIPE)).eval()
    fast.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        full = reference(ids)
        assert (fast(ids) - full).abs().max() < 1e-5
        cache = fast.new_cache(3)
        steps = [fast(ids[:, :9], cache=cache)] + [fast(ids[:, i:i + 1], cache=cache) for i in range(9, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 16))
    for qk_norm, blind in ((True, True), (False, False)):
        model = GPT(small(qk_norm=qk_norm)).eval()
        with torch.no_grad():
            before = model(ids)
            for block in model.blocks:
                block.attn.q.weight.mul_(7.0)
                block.attn.kv.weight[:block.attn.n_kv * block.attn.hd].mul_(7.0)  # the keys' rows
            assert torch.allclose(model(ids), before, atol=1e-4) is blind


def test_an_untied_head_is_its_own_parameter_and_counted():
    tied, untied = GPT(small()), GPT(small(tie_head=False))
    assert tied.head.weight is tied.tok_emb.weight and untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == 40 * 32
    assert untied.num_params() == tied.num_params()  # the head is not a hidden-layer parameter


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_relu2_and_an_untied_head_export_exactly_and_qk_norm_without_rope_is_refused_by_name(pos, tmp_path):
    from data.tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPT(small(vocab_size=tok.vocab_size, pos_emb=pos, mlp="relu2", tie_head=False)).eval()
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))  # a head far from the embedding
    export(model, tok.vocab, tok.lowercase, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings is False
    ids = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max() < 1e-5

    if pos == "learned":
        model.cfg = small(vocab_size=tok.vocab_size, pos_emb=pos, qk_norm=True)
        with pytest.raises(ExportError, match=r"^model\.qk_norm=True with model\.pos_emb='learned': GPT-2 has no"):
            export(model, tok.vocab, tok.lowercase, tmp_path / "refused")
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("kv,bias,tied", [(None, False, False), (2, True, True), (1, False, True)])
def test_the_recipe_model_exports_exactly_as_persimmon(kv, bias, tied, tmp_path):
    """rope + QK-norm (+ relu2, a tied or untied head, grouped K/V heads, biases or none) computes what
    transformers' Persimmon computes: logits and greedy text, loaded as any user loads it."""
    from data.tokenizer import CharTokenizer
    from model import generate

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPT(small(vocab_size=tok.vocab_size, n_kv_head=kv, bias=bias, **{**RECIPE, "tie_head": tied})).eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight matters: norms and biases off their 1/0 init
            p.add_(0.1 * torch.randn_like(p))
    export(model, tok.vocab, tok.lowercase, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.architectures == ["PersimmonForCausalLM"] and hf.config.qk_layernorm
    ids = torch.randint(0, tok.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max() < 1e-5
    prompt = ids[:1, :5]
    theirs = hf.generate(prompt, max_new_tokens=11, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert theirs[0].tolist() == generate(model, prompt, 11, temperature=0)[0].tolist()
    assert "QK-norm, relu2 MLP" in (tmp_path / "hf" / "README.md").read_text()


def test_muon_orthogonalizes_the_blocks_matrices_and_adamw_updates_the_rest():
    torch.manual_seed(0)
    model = GPT(small(tie_head=False))
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


def test_wsd_holds_the_peak_then_cools_down_linearly_to_min_lr():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_tokens=100, schedule="wsd", cooldown=0.25)
    total = 1100  # 1000 tokens after the warmup: flat to 850, then down to 0.1 at 1100
    assert lr_at(99, t, total) == 1.0 and lr_at(50, t, total) == pytest.approx(0.51)
    assert lr_at(100, t, total) == lr_at(850, t, total) == 1.0
    assert lr_at(975, t, total) == pytest.approx(0.55)
    assert lr_at(1100, t, total) == lr_at(5000, t, total) == 0.1
    cosine = TrainConfig(lr=1.0, min_lr=0.1, warmup_tokens=100)
    assert lr_at(600, cosine, total) == pytest.approx(0.55)  # the cosine's midpoint, for contrast


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
