"""Torch on rented nodes: the default image's torch satisfies setup.py, and `make setup` keeps it.

`make setup` on a node creates .venv with --system-site-packages when the image's python imports
torch (checked here on the Makefile's own recipe, as `make -n` prints it), then pip-installs this
package, whose setup.py asks for torch>=2.6. Whether pip keeps the image's CUDA torch or replaces it
(a multi-GB download of another build) is pip's decision on the installed distribution's version:
this test asks pip itself (--no-index --dry-run: nothing is downloaded) about an environment whose
site-packages hold a torch distribution (a dist-info with the version, and a package that imports).
pip reads only that metadata to decide, so the stand-in hides no difference that matters here. Not
exercised: that a --system-site-packages venv sees its base interpreter's packages (CPython's
documented venv behaviour; a venv cannot serve as that base, and the system python is not ours to
write into). With 2.6.0 (the default image) pip keeps torch; with 2.5.1 (the image used before) it
would have to fetch another torch, the conflict this guards against.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from launch.vast.commands import DEFAULT_IMAGE


def _torch_requirement() -> str:
    return re.search(r'"(torch[<>=!~][^"]*)"', (ROOT / "setup.py").read_text()).group(1)


def test_default_image_torch_satisfies_setup_py():
    from packaging.requirements import Requirement
    version = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", DEFAULT_IMAGE).group(1)
    assert Requirement(_torch_requirement()).specifier.contains(version), (DEFAULT_IMAGE, _torch_requirement())


def _image_python(base: Path, torch_version: str) -> Path:
    """An environment like the image's: a venv (no pip of its own) whose site-packages hold torch."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base)], check=True)
    python = base / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "torch").mkdir(parents=True)
    (purelib / "torch" / "__init__.py").write_text(f'__version__ = "{torch_version}"\n')
    info = purelib / f"torch-{torch_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    return python


@pytest.mark.processes
def test_make_setup_uses_the_images_site_packages_when_it_has_torch(tmp_path):
    python = _image_python(tmp_path / "image", "2.6.0")
    venv = tmp_path / "venv"
    plan = subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), f"PYTHON={python}", f"VENV={venv}",
                           f"{venv}/.installed"], cwd=ROOT, capture_output=True, text=True)
    commands = plan.stdout.replace("\\\n", "").splitlines()   # make -n keeps the recipe's continued lines
    create = next(line for line in commands if "-m venv" in line)
    assert f"-m venv --system-site-packages {venv}" in create
    assert "import torch" in create


@pytest.mark.processes
@pytest.mark.parametrize("image_torch, kept", [("2.6.0", True), ("2.5.1", False)])
def test_pip_keeps_the_images_torch(tmp_path, image_torch, kept):
    python = _image_python(tmp_path / "image", image_torch)
    # --isolated: no pip.conf or PIP_* find-links (a local torch wheel would otherwise be "found")
    decision = subprocess.run([sys.executable, "-m", "pip", "--isolated", "--python", str(python), "install",
                               "--no-index", "--dry-run", "--disable-pip-version-check", _torch_requirement()],
                              capture_output=True, text=True)
    if kept:
        assert decision.returncode == 0 and "Requirement already satisfied: torch" in decision.stdout, decision.stderr
    else:
        # pip wants another torch: it fails offline, or (with a local wheel around) would install one
        assert "Requirement already satisfied: torch" not in decision.stdout
        assert decision.returncode != 0 or "Would install torch" in decision.stdout
