"""Each config key's default and doc live once, on its dataclass field; conf/ holds only changes."""
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT
from omegaconf import OmegaConf

from trainer.config import Config, describe

DEFAULTS = OmegaConf.to_container(OmegaConf.structured(Config))


@pytest.mark.processes
def test_every_key_has_a_doc_and_the_command_prints_them_all():
    keys = {key: doc for key, _, doc in describe()}
    assert [key for key, doc in keys.items() if not doc] == []
    printed = subprocess.run([sys.executable, "-m", "trainer.config"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert {line.split(" = ")[0] for line in printed.splitlines() if not line.startswith(" ")} == set(keys)
    assert "train.lr = 0.001\n    Peak learning rate" in printed


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_group_option_sets_only_what_differs_from_the_defaults(path):
    values = yaml.safe_load(path.read_text()) or {}
    if path.parent.name == "recipe":  # a global package: sections of their own
        assert [f"{s}.{k}" for s, keys in values.items() for k, v in keys.items() if DEFAULTS[s][k] == v] == []
        return
    defaults = DEFAULTS[path.parent.name]
    assert [key for key, value in values.items() if defaults[key] == value] == []
