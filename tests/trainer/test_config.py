"""Presets and config errors, composed in-process with Hydra's compose API as the entry point
composes them (launch/train.py's load_config), and one real entry-point process."""
import io
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env
from omegaconf import OmegaConf

from launch.cli import CONF_DIR, compose
from launch.train import load_config
from trainer.config import Config, ConfigError, print_keys, register_presets, to_config

PRESETS = register_presets(CONF_DIR)


def _resolved(*args) -> dict:
    return OmegaConf.to_container(compose(list(args)), resolve=True)


def _config_error(*args, world_size: int = 1) -> str:
    """What the entry point prints (its whole stderr) for these overrides; it must exit."""
    with pytest.raises(SystemExit) as exit_:
        load_config(list(args), world_size)
    return exit_.value.code  # sys.exit(str): printed to stderr, exit status 1


def test_baby_preset_is_the_documented_cpu_recipe():
    cfg = _resolved("conf=baby")
    assert {k: cfg["model"][k] for k in ("n_layer", "n_head", "d_model", "block_size", "dropout")} == \
        {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": 64, "dropout": 0.0}
    t = cfg["train"]
    assert (t["micro_batch"], t["max_steps"], t["lr"], t["min_lr"]) == (12, 1500, 1e-3, 1e-4)
    assert cfg["run_dir"] == "outputs/baby" and cfg["deepspeed"]["stage"] == 0 and cfg["preset"] == "baby"
    recipe = {k: cfg["model"][k] for k in ("pos_emb", "qk_norm", "mlp", "tie_head")}
    assert recipe == {"pos_emb": "rope", "qk_norm": True, "mlp": "relu2", "tie_head": False}
    assert t["optimizer"] == "muon"
    gpt3 = _resolved("conf=baby", "recipe=gpt3")  # the recipe before bench/recipe.py, one switch away
    assert (gpt3["model"]["pos_emb"], gpt3["model"]["tie_head"], gpt3["train"]["optimizer"]) == \
        ("learned", True, "adamw")


def test_shakespeare_preset_and_command_line_overrides():
    cfg = _resolved("conf=shakespeare", "deepspeed=zero3", "train.optimizer=adamw", "precision=bf16",
                    "model.n_layer=8")
    assert (cfg["model"]["n_layer"], cfg["model"]["n_head"], cfg["model"]["d_model"]) == (8, 6, 384)
    assert (cfg["model"]["block_size"], cfg["model"]["dropout"], cfg["train"]["micro_batch"]) == (256, 0.2, 64)
    assert cfg["train"]["max_steps"] == 5000
    assert cfg["deepspeed"]["stage"] == 3 and cfg["precision"] == "bf16"
    to_config(cfg)  # valid


def test_the_benchmark_presets_model_bytes_and_the_others_keep_the_char_tokenizer():
    for preset in ("enwik8", "text8"):
        cfg = _resolved(f"conf={preset}")
        data, model = cfg["data"], cfg["model"]
        assert (data["source"], data["tokenizer"], data["split"], data["dir"]) == \
            (preset, "bytes", [0.9, 0.05, 0.05], f"shards/{preset}")
        assert (model["n_layer"], model["d_model"], model["block_size"]) == (12, 512, 512)
        assert cfg["precision"] == "bf16" and cfg["run_dir"] == f"outputs/{preset}"
    for preset in set(PRESETS) - {"enwik8", "text8"}:
        assert _resolved(f"conf={preset}")["data"]["tokenizer"] == "char"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_into_a_valid_config(preset):
    config = load_config([f"conf={preset}"])
    assert config.preset == preset and config.run_dir == f"outputs/{preset}"


@pytest.mark.parametrize("args, line", [
    (["model.n_head=3"], "config error: model.d_model=32 is not divisible by model.n_head=3"),
    (["model.n_kv_head=3", "model.n_head=4", "model.d_model=32"],
     "config error: model.n_head=4 is not divisible by model.n_kv_head=3 (n_kv_head must be a divisor of n_head "
     "between 1 and n_head)"),
    (["model.pos_emb=rope", "model.d_model=36", "model.n_head=4"],
     "config error: model.pos_emb=rope needs an even head dim, but model.d_model=36 / model.n_head=4 = 9"),
    (["precision=fp16"], "config error: precision='fp16': choose fp32 or bf16"),
    (["train.micro_batch=0"], "config error: train.micro_batch must be >= 1, got 0"),
    (["data=text"], "config error: data.path is required for data.source=text (a file or a folder)"),
    (["data=enwik8", "data.tokenizer=char"], "config error: data.source=enwik8 is modelled as raw bytes: set "
                                             "data.tokenizer=bytes"),
])
def test_bad_values_are_one_line_errors_naming_the_key(args, line):
    assert _config_error("conf=debug", *args) == line


@pytest.mark.parametrize("args, line", [
    (["conf=nope"], "config error: conf=nope: no such option; choose one of " + ", ".join(PRESETS)),
    (["deepspeed=zero9"], "config error: deepspeed=zero9: no such option; choose one of zero0, zero1, zero2, zero3"),
    (["model.n_layr=2"], "config error: unknown key `model.n_layr`; did you mean `model.n_layer`?"),
    (["+foo=1"], "config error: unknown key `foo`; `python -m trainer.config` lists them"),
    (["train.max_steps=many"],
     "config error: train.max_steps: Value 'many' of type 'str' could not be converted to Integer"),
    (["model.n_layer"], "config error: Error parsing override 'model.n_layer'; missing EQUAL at '<EOF>'"),
])
def test_hydras_own_errors_are_one_line_too(args, line):
    """An unknown preset, option or key, a wrong type, bad syntax: Hydra's multi-line reports become
    one line at the entry point."""
    assert _config_error(*args) == line


def test_global_batch_is_checked_against_the_world_size():
    line = _config_error("conf=debug", "train.global_batch=8", world_size=2)
    assert line == "config error: train.global_batch=8 but train.micro_batch=8 x train.grad_accum=1 x 2 ranks = 16"
    assert load_config(["conf=debug", "train.global_batch=16"], world_size=2).train.global_batch == 16


@pytest.mark.processes
def test_the_entry_point_prints_one_line_and_exits_1():
    """The one real process: what a user sees for a misspelt key is exactly one line on stderr."""
    proc = subprocess.run([sys.executable, "launch/train.py", "conf=debug", "model.n_layr=2"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["config error: unknown key `model.n_layr`; did you mean `model.n_layer`?"]
    assert proc.stdout == ""


def test_typed_schema_rejects_wrong_types_in_code():
    with pytest.raises(ConfigError, match="train.lr"):
        to_config({"train": {"lr": "fast"}})
    assert isinstance(to_config({}), Config)


@pytest.mark.parametrize("preset, world", [(p, 2) for p in PRESETS if p != "wiki_full"]
                         + [("wiki_full", 8), ("wiki_full", 16)])
def test_every_preset_builds_its_model_and_deepspeed_config(preset, world):
    """What a run builds before its first step, without a process group: the model at the data's
    vocabulary size, and DeepSpeed's config for `world` ranks (wiki_full: one and two 8-GPU nodes)."""
    from model import GPT
    from trainer.engine import deepspeed_config

    config = to_config(OmegaConf.to_container(compose([f"conf={preset}"]), resolve=True), world)
    config.model.vocab_size = 70
    model = GPT(config.model)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - config.model.approx_params()) / params < 0.01
    ds = deepspeed_config(config, world, params)
    t = config.train
    assert ds["train_batch_size"] == t.micro_batch * t.grad_accum * world
    assert ds["zero_optimization"]["stage"] == config.deepspeed.stage
    assert ds["bf16"]["enabled"] or ds["torch_autocast"]["enabled"] or config.precision == "fp32"


def test_your_own_text_gets_its_own_shards_and_run_dir():
    """A text corpus never lands in a preset's run dir (or another text's shards) by default."""
    book = _resolved("data=text", "data.path=/home/me/book.txt")
    assert (book["data"]["dir"], book["run_dir"]) == ("shards/book", "outputs/baby-book")
    novel = _resolved("conf=debug", "data=text", "data.path=novel.txt", "data.dir=shards/mine")
    assert novel["run_dir"] == "outputs/debug-mine"
    assert _resolved()["run_dir"] == "outputs/baby" and _resolved("conf=wiki_100")["run_dir"] == "outputs/wiki_100"


def test_the_keys_command_shows_a_presets_values():
    """`python -m trainer.config conf=debug ...` (its arguments go to print_keys) prints that run's values."""
    def keys(*args) -> dict[str, str]:
        out = io.StringIO()
        print_keys(out, overrides=list(args))
        return dict(line.split(" = ", 1) for line in out.getvalue().splitlines() if not line.startswith(" "))

    defaults, debug = keys(), keys("conf=debug", "train.lr=0.01")
    assert defaults["train.max_steps"] == "2000" and defaults["model.n_layer"] == "4"
    assert (debug["train.max_steps"], debug["model.n_layer"], debug["train.lr"]) == ("40", "2", "0.01")
    assert (debug["preset"], debug["run_dir"]) == ("debug", "outputs/debug")
