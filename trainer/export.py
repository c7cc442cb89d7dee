"""Our GPT as a Hugging Face `transformers` folder, checked by logits before it is handed over.

Each variant goes to the stock architecture that computes exactly what ours computes (checked
against transformers' own modeling code, and proved by tests/trainer/test_export.py):
- learned positions -> GPT-2 (`GPT2LMHeadModel`): pre-LayerNorm blocks, exact GELU, eps 1e-5, tied
  head. GPT-2 has no grouped K/V heads, so each K/V head is repeated for the query heads of its
  group (exact: those heads saw the same keys and values), and it always has biases, so a model
  trained without them gets zero biases (exact).
- rope -> Starcoder2 (`Starcoder2ForCausalLM`): LayerNorm, a non-gated GELU MLP, sequential
  residuals, rotate-half RoPE over the whole head dim, scores scaled by 1/sqrt(head dim), and
  `num_key_value_heads` with the same (group, head) order as model/attention.py.
- rope with QK-norm -> Persimmon (`PersimmonForCausalLM`): as Starcoder2, plus a LayerNorm over each
  head's queries and keys before RoPE (`qk_layernorm`, eps 1e-5), with RoPE over the whole head dim
  (`partial_rotary_factor` 1). It is multi-head with biases: K/V heads repeated, zero biases (exact).
All three take relu2 for the MLP and a tied or untied head. Anything else (a new GPTConfig setting,
another position embedding) is refused by name, never exported approximately.

The folder holds model.safetensors, config.json, the tokenizer (tokenizer.json: one token per
character, our ids, our normalization: anyascii's table as a precompiled charsmap) and README.md.
"""
from __future__ import annotations

import os
import shutil
import unicodedata
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch

from data.tokenizer import transliterations
from model import GPT, GPTConfig
from model.norm import EPS as LAYER_NORM_EPS

from . import charsmap, rundir

TOLERANCE = 1e-5       # largest |logit difference| allowed, relative to the largest |logit| (at least 1)
WEIGHTS = "model.safetensors"
CARD = "README.md"
# The GPTConfig settings this module maps (a new one must be taught here before models using it export).
KNOWN_SETTINGS = {"vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "block_size", "dropout", "bias",
                  "pos_emb", "attn", "qk_norm", "mlp", "tie_head"}
ACTIVATIONS = {"gelu": "gelu", "relu2": "relu2"}  # model.mlp -> transformers' ACT2FN name
ARCHITECTURES = {"learned": "GPT2LMHeadModel", "rope": "Starcoder2ForCausalLM"}  # by model.pos_emb
QK_NORM_ARCHITECTURE = "PersimmonForCausalLM"  # rope + qk_norm


class ExportError(ValueError):
    """This model cannot be exported exactly, or its export did not compute what it computes."""


def architecture_for(cfg: GPTConfig) -> str:
    """The transformers class that computes exactly what a GPT of `cfg` computes; ExportError naming
    the setting when none does."""
    unknown = sorted(set(asdict(cfg)) - KNOWN_SETTINGS)
    if unknown:
        settings = ", ".join(f"model.{key}={getattr(cfg, key)!r}" for key in unknown)
        raise ExportError(f"{settings}: trainer/export.py has no exact transformers mapping for this setting "
                          "(teach it one, with its test in tests/trainer/test_export.py)")
    if cfg.pos_emb not in ARCHITECTURES:
        raise ExportError(f"model.pos_emb={cfg.pos_emb!r}: no stock transformers architecture computes it "
                          f"exactly; exportable: {', '.join(f'{k} ({v})' for k, v in ARCHITECTURES.items())}")
    if cfg.qk_norm and cfg.pos_emb != "rope":
        raise ExportError(f"model.qk_norm=True with model.pos_emb={cfg.pos_emb!r}: GPT-2 has no QK-norm, and "
                          "Persimmon, which has, uses RoPE; only model.pos_emb=rope exports with QK-norm")
    return QK_NORM_ARCHITECTURE if cfg.qk_norm else ARCHITECTURES[cfg.pos_emb]


def rope_base(model: GPT) -> float:
    rotary = model.blocks[0].attn.rotary
    return float(rotary.base)


def hf_config(model: GPT):
    """The transformers config object of the architecture that matches `model`."""
    import transformers

    cfg = model.cfg
    arch = architecture_for(cfg)
    common = dict(vocab_size=cfg.vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=cfg.tie_head, architectures=[arch])
    if arch == "GPT2LMHeadModel":
        return transformers.GPT2Config(
            n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_inner=4 * cfg.d_model, activation_function=ACTIVATIONS[cfg.mlp], layer_norm_epsilon=LAYER_NORM_EPS,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
            **common)
    if arch == QK_NORM_ARCHITECTURE:
        return transformers.PersimmonConfig(
            hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, hidden_act=ACTIVATIONS[cfg.mlp], max_position_embeddings=cfg.block_size,
            layer_norm_eps=LAYER_NORM_EPS, qk_layernorm=True, hidden_dropout=cfg.dropout,
            attention_dropout=cfg.dropout, rope_parameters={"rope_type": "default", "rope_theta": rope_base(model),
                                                            "partial_rotary_factor": 1.0}, **common)
    return transformers.Starcoder2Config(
        hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, hidden_act=ACTIVATIONS[cfg.mlp],
        max_position_embeddings=cfg.block_size, norm_epsilon=LAYER_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": rope_base(model)}, sliding_window=None,
        attention_dropout=cfg.dropout, residual_dropout=cfg.dropout, embedding_dropout=cfg.dropout,
        use_bias=cfg.bias, **common)


def _bias(linear: torch.nn.Linear) -> torch.Tensor:
    """A Linear's bias, or the zeros it stands for when the model has none."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype)


def _norm(prefix: str, ln) -> dict[str, torch.Tensor]:
    bias = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)
    return {f"{prefix}.weight": ln.weight, f"{prefix}.bias": bias}


def _split_kv(attn, tensor: torch.Tensor, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys' and values' rows of the fused kv projection (laid out "(two g d)"), each K/V head
    repeated `repeat` times in a row: query head h = g * repeat + r reads K/V head g."""
    k, v = tensor.chunk(2, dim=0)
    return tuple(x.unflatten(0, (attn.n_kv, attn.hd)).repeat_interleave(repeat, dim=0).flatten(0, 1)
                 for x in (k, v))


def _gpt2_weights(model: GPT) -> dict[str, torch.Tensor]:
    """GPT-2 names; its Conv1D layers hold (in, out) weights, the transpose of nn.Linear's."""
    out = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight}
    for i, block in enumerate(model.blocks):
        p, attn = f"transformer.h.{i}", block.attn
        group = attn.n_head // attn.n_kv  # GPT-2 is multi-head: every query head gets its own K/V copy
        k, v = _split_kv(attn, attn.kv.weight, group)
        kb, vb = _split_kv(attn, _bias(attn.kv), group)
        out |= _norm(f"{p}.ln_1", block.ln1) | _norm(f"{p}.ln_2", block.ln2)
        out |= {f"{p}.attn.c_attn.weight": torch.cat([attn.q.weight, k, v]).T,
                f"{p}.attn.c_attn.bias": torch.cat([_bias(attn.q), kb, vb]),
                f"{p}.attn.c_proj.weight": attn.out.weight.T, f"{p}.attn.c_proj.bias": _bias(attn.out),
                f"{p}.mlp.c_fc.weight": block.mlp.up.weight.T, f"{p}.mlp.c_fc.bias": _bias(block.mlp.up),
                f"{p}.mlp.c_proj.weight": block.mlp.down.weight.T, f"{p}.mlp.c_proj.bias": _bias(block.mlp.down)}
    return out | _norm("transformer.ln_f", model.ln_f)


def _starcoder2_weights(model: GPT) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        p, attn, mlp = f"model.layers.{i}", block.attn, block.mlp
        k, v = _split_kv(attn, attn.kv.weight, 1)
        out |= _norm(f"{p}.input_layernorm", block.ln1) | _norm(f"{p}.post_attention_layernorm", block.ln2)
        out |= {f"{p}.self_attn.q_proj.weight": attn.q.weight, f"{p}.self_attn.k_proj.weight": k,
                f"{p}.self_attn.v_proj.weight": v, f"{p}.self_attn.o_proj.weight": attn.out.weight,
                f"{p}.mlp.c_fc.weight": mlp.up.weight, f"{p}.mlp.c_proj.weight": mlp.down.weight}
        if model.cfg.bias:  # Starcoder2's use_bias covers exactly our Linear layers
            kb, vb = _split_kv(attn, attn.kv.bias, 1)
            out |= {f"{p}.self_attn.q_proj.bias": attn.q.bias, f"{p}.self_attn.k_proj.bias": kb,
                    f"{p}.self_attn.v_proj.bias": vb, f"{p}.self_attn.o_proj.bias": attn.out.bias,
                    f"{p}.mlp.c_fc.bias": mlp.up.bias, f"{p}.mlp.c_proj.bias": mlp.down.bias}
    return out | _norm("model.norm", model.ln_f)


def _per_head_qkv(attn, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Persimmon's fused rows: for each head its query, key and value rows (K/V heads repeated for
    the query heads of their group)."""
    k, v = _split_kv(attn, kv, attn.n_head // attn.n_kv)
    return torch.stack([x.unflatten(0, (attn.n_head, attn.hd)) for x in (q, k, v)], dim=1).flatten(0, 2)


def _persimmon_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Persimmon's fused projection holds, head by head, that head's query, key and value rows."""
    out = {"model.embed_tokens.weight": model.tok_emb.weight}
    for i, block in enumerate(model.blocks):
        p, attn, mlp = f"model.layers.{i}", block.attn, block.mlp
        out |= _norm(f"{p}.input_layernorm", block.ln1) | _norm(f"{p}.post_attention_layernorm", block.ln2)
        out |= _norm(f"{p}.self_attn.q_layernorm", attn.q_norm) | _norm(f"{p}.self_attn.k_layernorm", attn.k_norm)
        out |= {f"{p}.self_attn.query_key_value.weight": _per_head_qkv(attn, attn.q.weight, attn.kv.weight),
                f"{p}.self_attn.query_key_value.bias": _per_head_qkv(attn, _bias(attn.q), _bias(attn.kv)),
                f"{p}.self_attn.dense.weight": attn.out.weight, f"{p}.self_attn.dense.bias": _bias(attn.out),
                f"{p}.mlp.dense_h_to_4h.weight": mlp.up.weight, f"{p}.mlp.dense_h_to_4h.bias": _bias(mlp.up),
                f"{p}.mlp.dense_4h_to_h.weight": mlp.down.weight, f"{p}.mlp.dense_4h_to_h.bias": _bias(mlp.down)}
    return out | _norm("model.final_layernorm", model.ln_f)


def hf_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict of the matching transformers model (a tied output head left out: config.json
    ties it), as contiguous fp32 tensors that share no memory, as safetensors requires."""
    arch = architecture_for(model.cfg)
    with torch.no_grad():
        weights = {"GPT2LMHeadModel": _gpt2_weights, "Starcoder2ForCausalLM": _starcoder2_weights,
                   QK_NORM_ARCHITECTURE: _persimmon_weights}[arch](model)
        if not model.cfg.tie_head:
            weights["lm_head.weight"] = model.head.weight
        return {name: w.detach().to("cpu", torch.float32).contiguous().clone() for name, w in weights.items()}


def hf_tokenizer(vocab: str, lowercase: bool, block_size: int):
    """A fast tokenizer with our ids: one token per character of `vocab`, and data/tokenizer.py's
    normalization as a `tokenizers` normalizer, so that any text gets the ids ours gives it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    steps = [*_transliteration_steps(), normalizers.Replace(Regex(r"[^\x00-\x7f]"), ""),
             normalizers.Replace("\r\n", "\n"), normalizers.Replace("\r", "\n"), normalizers.Replace("\t", " ")]
    if lowercase:
        steps.append(normalizers.Lowercase())
    dropped = "".join(chr(c) for c in range(128) if chr(c) not in vocab)
    if dropped:  # the ASCII characters outside the vocabulary: controls (and capitals when lowercased)
        steps.append(normalizers.Replace(Regex(_char_class(dropped)), ""))
    # BPE without merges over the whole text: each character is its own token, no pre-tokenizer needed
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=[]))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Fuse()  # ids back to text with nothing between characters
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=block_size,
                                   clean_up_tokenization_spaces=False)


@lru_cache(maxsize=1)
def _transliteration_steps() -> tuple:
    """anyascii's transliteration as normalizers. Most characters go through one precompiled charsmap
    (a single pass); it matches whole grapheme clusters by their first character, so the characters
    that join a cluster (marks, format characters) are replaced first, one Replace per distinct text."""
    from tokenizers import Regex, normalizers

    table = transliterations()
    joining = [chr(c) for c in range(0x80, 0x110000)
               if unicodedata.category(chr(c)) in ("Mn", "Mc", "Me", "Cf") and not 0xD800 <= c < 0xE000]
    by_text: dict[str, list[str]] = {}
    for char in joining:
        by_text.setdefault(table.get(char, ""), []).append(char)
    steps = [normalizers.Replace(Regex(_char_class(chars)), text) for text, chars in by_text.items()]
    rest = {char: text for char, text in table.items() if char not in set(joining)}
    return (*steps, normalizers.Precompiled(charsmap.build(rest)))


def _char_class(chars) -> str:
    """A regex character class of `chars`, runs of consecutive code points as ranges."""
    codes, ranges = sorted(ord(c) for c in chars), []
    for code in codes:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "[" + "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges) + "]"


def max_logit_difference(model: GPT, hf_model, ids: torch.Tensor) -> float:
    """Largest |logit difference| between our model and the exported one on ids (batch, time)."""
    with torch.no_grad():
        ours = model.eval()(ids)
        theirs = hf_model.eval()(input_ids=ids).logits
    return (ours.float() - theirs.float()).abs().max().item()


def check_batch(cfg: GPTConfig, seed: int = 0) -> torch.Tensor:
    """Two full-context rows of random ids, the same for every export of a model."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=gen)


def load_exported(folder: Path):
    """The exported folder through transformers' own loader, refusing any missing or unused weight."""
    from transformers import AutoModelForCausalLM

    hf_model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
           and v}
    if bad:
        raise ExportError(f"{folder}: transformers did not load the weights one for one: {bad}")
    return hf_model.eval()


def refuse_taken(out: Path) -> None:
    """ExportError unless `out` is absent or an empty folder: an export never mixes with other files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"out={out}: exists and is not an empty folder; remove it or choose another")


def _readable_as_umask_allows(folder: Path) -> None:
    """safetensors writes its file for its owner alone; the others follow the umask: so does it, here."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def export(model: GPT, vocab: str, lowercase: bool, out, facts: dict | None = None) -> float:
    """Write the transformers folder `out` (which must not exist, or be empty) for `model` (put in eval
    mode), check it by loading it back through transformers and comparing logits on check_batch, and
    return the largest |logit difference|. It is written beside `out` first and moved there only once
    it passed.

    facts: what the model card says of the run (see model_card); none for an in-process model."""
    from safetensors.torch import save_file

    out = Path(out)
    arch = architecture_for(model.cfg)  # refuse before writing anything
    refuse_taken(out)
    if len(vocab) != model.cfg.vocab_size:
        raise ExportError(f"the vocabulary has {len(vocab)} characters, the model {model.cfg.vocab_size} ids")
    model.float().eval()
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_config(model).save_pretrained(tmp)
        save_file(hf_weights(model), tmp / WEIGHTS, metadata={"format": "pt"})
        hf_tokenizer(vocab, lowercase, model.cfg.block_size).save_pretrained(tmp)
        ids = check_batch(model.cfg)
        with torch.no_grad():
            scale = max(1.0, model(ids).abs().max().item())
        diff = max_logit_difference(model, load_exported(tmp), ids)
        if not diff <= TOLERANCE * scale:
            raise ExportError(f"the exported {arch} differs from the model by {diff:.3g} in its logits (allowed: "
                              f"{TOLERANCE * scale:.3g}); nothing was written to {out}")
        (tmp / CARD).write_text(model_card(model.cfg, arch, vocab, lowercase, diff, facts or {}, out))
        _readable_as_umask_allows(tmp)
        if out.is_dir():
            out.rmdir()  # empty: checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff


def run_facts(run_dir: Path, step: int) -> dict:
    """What a run dir tells the model card: its data, and the val bpc logged last at or before `step`."""
    facts: dict = {}
    config = rundir.config_path(run_dir)
    if config.is_file():
        from omegaconf import OmegaConf

        data = OmegaConf.load(config).get("data", {})
        facts["data"] = f"{data.get('source')} ({data.get('path')})"
        facts["config_yaml"] = config.read_text()
    for entry in rundir.read_metrics(run_dir):
        if "val_bpc" in entry and entry.get("step", 0) <= step:
            facts["val_bpc"], facts["val_step"] = entry["val_bpc"], entry["step"]
    return facts


FAMILIES = {"GPT2LMHeadModel": "GPT-2", "Starcoder2ForCausalLM": "Starcoder2", QK_NORM_ARCHITECTURE: "Persimmon"}


def _exactness_notes(cfg: GPTConfig, arch: str, lowercase: bool) -> list[str]:
    """The model card's list of what the export keeps exactly, and where it differs from training."""
    family, multi_head_only = FAMILIES[arch], arch != "Starcoder2ForCausalLM"
    notes = []
    if multi_head_only and cfg.kv_heads != cfg.n_head:
        notes.append(f"{family} has no grouped K/V heads: each of the {cfg.kv_heads} K/V heads is repeated "
                     f"for the {cfg.n_head // cfg.kv_heads} query heads of its group. Exact, but the K/V weights and "
                     "the KV cache are that much larger than the model trained.")
    if not cfg.bias and multi_head_only:
        notes.append(f"The model was trained without biases; {family} always has them, so they are zeros (exact).")
    elif not cfg.bias:
        notes.append("The model was trained without biases; LayerNorm's biases are zeros (exact).")
    notes.append(f"Context: at most {cfg.block_size} characters, prompt and new ones together. Our sampler "
                 "slides the window past that; `generate()` does not"
                 + (" (GPT-2 has no positions beyond it)." if arch.startswith("GPT2")
                    else " (RoPE goes on, to positions the model never trained on)."))
    notes.append("Tokenizer: one token per character, the same ids as in training, and the same normalization in "
                 "`tokenizer.json`: non-ASCII text transliterated as `anyascii` does (\"Straße\" -> \"Strasse\", "
                 "\"東京\" -> \"DongJing\"), what it cannot spell dropped, CRLF and CR to LF, tabs to spaces, other "
                 "control characters dropped" + (", lowercased" if lowercase else "") + ". Any text gets the ids our "
                 "tokenizer gives it (tested on mixed scripts). Unicode newer than this Python's `unicodedata` may "
                 "differ in combining characters.")
    return notes


def model_card(cfg: GPTConfig, arch: str, vocab: str, lowercase: bool, diff: float, facts: dict,
               folder: Path) -> str:
    """A short README.md: what the model is, how it was trained, how to use it, what is exact."""
    step, name = facts.get("step"), facts.get("name", "model")
    kv = {cfg.n_head: "multi-head", 1: "multi-query"}.get(cfg.kv_heads, "grouped-query")
    rows = [("architecture", f"`{arch}` ({FAMILIES[arch]} in transformers)"),
            ("model", f"{cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} K/V heads, {kv}), width "
                      f"{cfg.d_model}, context {cfg.block_size} characters, {cfg.pos_emb} positions, "
                      f"{'QK-norm, ' if cfg.qk_norm else ''}{cfg.mlp} MLP, {'tied' if cfg.tie_head else 'untied'} "
                      f"head, {'with' if cfg.bias else 'no'} biases"),
            ("vocabulary", f"{len(vocab)} characters, {'lowercased' if lowercase else 'case-sensitive'}")]
    if "data" in facts:
        rows.append(("data", facts["data"]))
    if step is not None:
        ranks = f"{facts.get('world_size', 1)} rank{'s' if facts.get('world_size', 1) > 1 else ''}"
        rows.append(("steps", f"{step}" + (f" (ZeRO-{facts['zero_stage']}, {ranks})" if "zero_stage" in facts
                                           else "")))
    if "val_bpc" in facts:
        rows.append(("val bits per character", f"{facts['val_bpc']:.4f} (at step {facts['val_step']})"))
    rows.append(("checked", f"largest absolute logit difference from the training code's model: {diff:.2e} (fp32, "
                            f"2 x {cfg.block_size} random ids)"))
    notes = _exactness_notes(cfg, arch, lowercase)
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [character-level, shakespeare-transformer]", "---", "",
             f"# {name}: a character-level GPT", "",
             "Trained with Shakespeare Transformer and exported with `launch/export.py`, which loaded this "
             "folder back through transformers and compared its logits with the training code's before "
             "writing it.", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "", "## Use", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})",
             f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})",
             'ids = tokenizer("to be", return_tensors="pt").input_ids',
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))", "```", "",
             "## Exactness", "", *[f"- {n}" for n in notes], ""]
    if "command" in facts:
        lines += ["## Training", "", "```", facts["command"], "```", ""]
    if "config_yaml" in facts:
        lines += ["<details><summary>The run's resolved config.yaml</summary>", "", "```yaml",
                  facts["config_yaml"].rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)
