"""launch/cli.py: one command-line convention for every entry point. Strings are taken as typed, an
unknown key or flag is one line naming the closest valid one, and `--help` lists the keys with the
docs written under their dataclass fields."""
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from data.tokenizer import CharTokenizer
from launch import sample
from launch.eval import EvalArgs
from launch.export import ExportArgs
from launch.sample import SampleArgs
from launch.train import load_config
from model import GPT, GPTConfig
from trainer.config import TrainConfig, field_docs

# every entry point with one misspelt key (or flag) and the key meant
MISTAKES = {
    "train": (["launch/train.py", "conf=debug", "train.max_stpes=3"], "train.max_stpes", "train.max_steps"),
    "prepare": (["launch/prepare.py", "data.pth=book.txt"], "data.pth", "data.path"),
    "sample": (["launch/sample.py", "run_dir=outputs/none", "temprature=0"], "temprature", "temperature"),
    "eval": (["launch/eval.py", "splt=test"], "splt", "split"),
    "export": (["launch/export.py", "ot=hf/x"], "ot", "out"),
    "vast": (["-m", "launch.vast", "plan", "--nodez", "2"], "--nodez", "--nodes"),
    "cluster": (["-m", "launch.cluster", "--hosts", "h.txt", "--out", "x", "--identiy", "k"], "--identiy",
                "--identity"),
    "node": (["launch/vast/node.py", "status", "--run", "r", "--log-form", "3"], "--log-form", "--log-from"),
    "pack": (["launch/vast/pack.py", "--run", "r", "--cluster-onyl"], "--cluster-onyl", "--cluster-only"),
}


def _run(args: list[str], cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.processes
@pytest.mark.parametrize("entry", MISTAKES)
def test_an_unknown_key_is_one_line_naming_the_closest_valid_one(entry, tmp_path):
    args, typo, meant = MISTAKES[entry]
    node_side = entry in ("node", "pack")  # scripts run from a node's project folder, not this one
    proc = _run([str(ROOT / args[0]), *args[1:]] if node_side else args, cwd=tmp_path if node_side else ROOT)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"`{typo}`" in lines[0] and f"did you mean `{meant}`?" in lines[0], lines[0]


@pytest.mark.processes
@pytest.mark.parametrize("prompt", ["the ", " to be", "it's \\ \"so\"\n"])
def test_a_prompt_is_taken_verbatim_spaces_and_all(prompt, monkeypatch, capsys):
    """`sample.py prompt="the " temperature=0` generates from `the `: the value is not read as YAML,
    which dropped its edge spaces. No new token, so the printed text is the prompt the model got."""
    tok = CharTokenizer(lowercase=True)
    model = GPT(GPTConfig(vocab_size=len(tok.vocab), n_layer=1, n_head=1, d_model=8, block_size=16)).eval()
    client = {"tokenizer": "char", "vocab": tok.vocab, "lowercase": True}
    monkeypatch.setattr(sample, "load_checkpoint_or_exit", lambda run_dir, prog: (model, client))
    sample.main([f"prompt={prompt}", "temperature=0", "max_new_tokens=0"])
    assert capsys.readouterr().out == prompt + "\n"


def test_train_and_prepare_take_strings_verbatim_and_still_interpolate():
    name, path = " my run ", "a,b'c\\"  # edge spaces, a comma, a quote, a trailing backslash
    config = load_config(["conf=debug", f"tracking.name={name}", f"data.path={path}", "run_dir=outputs/${preset}-x"])
    assert (config.tracking.name, config.data.path, config.run_dir) == (name, path, "outputs/debug-x")


@pytest.mark.parametrize("text, line", [
    ("top_k=many", "config error: top_k=many: expected a whole number"),
    ("temperature=warm", "config error: temperature=warm: expected a number"),
    ("prompt", "config error: `prompt`: expected key=value (`launch/sample.py --help` lists the keys)"),
])
def test_a_bad_value_is_one_line_naming_the_key(text, line):
    with pytest.raises(SystemExit) as exit_:
        sample.main([text])
    assert exit_.value.code == line


@pytest.mark.processes
@pytest.mark.parametrize("script, schema", [("launch/sample.py", SampleArgs), ("launch/eval.py", EvalArgs),
                                            ("launch/export.py", ExportArgs)])
def test_help_lists_every_key_with_the_doc_under_its_field(script, schema):
    proc = _run([script, "--help"])
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for key, doc in field_docs(schema).items():
        assert f"{key} = " in proc.stdout and " ".join(doc.split()) in text, key


@pytest.mark.processes
def test_train_help_lists_the_keys_with_a_runs_values():
    proc = _run(["launch/train.py", "conf=debug", "train.lr=0.01", "--help"])
    assert proc.returncode == 0, proc.stderr
    keys = dict(line.split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line and line[0] != " ")
    assert (keys["train.lr"], keys["train.max_steps"]) == ("0.01", "40")
    assert " ".join(field_docs(TrainConfig)["max_steps"].split()) in " ".join(proc.stdout.split())
