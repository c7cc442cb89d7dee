"""The README's commands run as printed from a shell that has only run `make train`: every one goes
through the virtualenv, and those that a CPU runs in a minute are run, in the README's order, in a
checkout of their own (code linked, outputs/ and shards/ its own)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env

README = (ROOT / "README.md").read_text()
TOOLS = ("python", "python3", "deepspeed", "pip", "tensorboard", "wandb", "vastai")
BOOK = "book.txt"
# Lines run as printed, but for the baby preset's 1500 steps on your own text: 2 are enough here.
SHORTER = {"data.path=book.txt": " train.max_steps=2 train.eval_steps=2 train.sample_tokens=0"}
RUN = (".venv/bin/python launch/train.py conf=debug ", "launch/train.py data=text data.path=book.txt",
       "launch/sample.py run_dir=", "launch/export.py run_dir=", "from transformers import pipeline")


def command_lines(text: str) -> list[str]:
    """Every line of the README's code blocks, a line ending in a backslash joined with the next."""
    commands, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.strip():
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
            else:
                commands.append(pending)
                pending = ""
    return commands


def test_every_command_goes_through_the_virtualenv():
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.DOTALL))
    commands = [*command_lines(README), *inline]
    bare = [c for c in commands for part in re.split(r"&&|;|\|", c)
            if part.split() and part.split()[0] in TOOLS]
    assert bare == []
    assert any(c.startswith(".venv/bin/python -m trainer.config") for c in inline)


@pytest.mark.processes
def test_the_export_folder_is_ignored_by_git():
    folders = set(re.findall(r"out=(\S+)", README))
    assert folders
    for folder in folders:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/model.safetensors"], cwd=ROOT)
        assert ignored.returncode == 0, f"{folder} is not in .gitignore"


@pytest.mark.processes
@pytest.mark.timeout(900)
def test_the_readme_commands_run_as_printed_on_a_cpu(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("launch", "conf", "data", "model", "trainer", ".cache"):
        (checkout / name).symlink_to(ROOT / name)
    venv_bin = checkout / ".venv" / "bin"  # the suite's venv under the name the README uses; a link to
    venv_bin.mkdir(parents=True)  # the whole venv would move DeepSpeed's sources, and so rebuild its op
    for tool in ("python", "deepspeed"):
        (venv_bin / tool).write_text(f'#!/bin/sh\nexec "{Path(sys.executable).parent / tool}" "$@"\n')
        (venv_bin / tool).chmod(0o755)
    words = "the river ran past an old mill where seven ravens kept their quiet watch all night".split()
    (checkout / BOOK).write_text("\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(10))
                                           for i in range(2000)))
    env = subprocess_env() | {"PYTHONPATH": str(ROOT)}  # the code of this checkout, as `make` installs it
    env.pop("TORCH_EXTENSIONS_DIR", None)  # the commands set it themselves
    ran = []
    for line in command_lines(README):
        if not any(key in line for key in RUN):
            continue
        if line.startswith(".venv/bin/python launch/sample.py"):  # the baby preset's run, shortened
            (checkout / "outputs" / "baby").symlink_to(checkout / "outputs" / "baby-book")
        command = re.sub(r"\s+# .*$", "", line) + next((extra for key, extra in SHORTER.items() if key in line), "")
        done = subprocess.run(command, shell=True, cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append((line, done.stdout))
    assert [next(key for key in RUN if key in line) for line, _ in ran] == list(RUN)
    assert (checkout / "outputs" / "baby-book" / "checkpoints").is_dir() and (checkout / "shards" / "book").is_dir()
    assert ran[-1][1].startswith("to be")
    assert os.path.isfile(checkout / "hf" / "baby" / "tokenizer.json")
