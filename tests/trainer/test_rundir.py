"""trainer/rundir.py, the one description of a run directory: step tags, a `latest` that must name a
checkpoint beside it, a metrics.jsonl reader that survives a cut line, and no import beyond the
standard library (the cluster's node side loads it before anything is installed)."""
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from trainer import rundir


def test_step_tags_match_the_pattern_and_sort_as_their_steps():
    steps = [100, 9, 12_345_678, 10]
    made = [rundir.step_tag(step) for step in steps]
    assert all(rundir.is_tag(tag) for tag in made)
    assert sorted(made) == [rundir.step_tag(step) for step in sorted(steps)]
    assert not any(rundir.is_tag(text) for text in ("step1", "step000000012", "step0000001a", "x/step00000001",
                                                    "step00000001\n", None))


def test_tags_lists_checkpoint_folders_only(tmp_path):
    for name in ("step00000020", "step00000003", "step00000003.tmp", "universal"):
        (tmp_path / name).mkdir()
    (tmp_path / "step00000007").write_text("a file, not a checkpoint")
    os.symlink(tmp_path / "step00000020", tmp_path / "step00000099")
    assert rundir.tags(tmp_path) == ["step00000003", "step00000020"]
    assert rundir.tags(tmp_path / "absent") == []


@pytest.mark.parametrize("named, why", [("../../etc", "not a tag"), ("step00000008", "no such folder"),
                                        ("step00000009", "a link")])
def test_latest_must_name_a_checkpoint_folder_beside_it(tmp_path, named, why):
    checkpoints = rundir.checkpoints(tmp_path)
    (checkpoints / "step00000004").mkdir(parents=True)
    os.symlink(checkpoints / "step00000004", checkpoints / "step00000009")
    assert rundir.read_latest(checkpoints) is None  # no `latest` yet
    rundir.atomic_write(checkpoints / rundir.LATEST, "step00000004\n")
    assert rundir.read_latest(checkpoints) == "step00000004"
    rundir.atomic_write(checkpoints / rundir.LATEST, named)
    with pytest.raises(rundir.RunDirError, match=f"names '{named}'"):
        rundir.read_latest(checkpoints)


def test_the_metrics_reader_skips_a_cut_last_line(tmp_path):
    entries = [{"step": step, "loss": 4.0 / step} for step in range(1, 6)]
    whole = "".join(json.dumps(e) + "\n" for e in entries)
    rundir.metrics_path(tmp_path).write_text(whole + json.dumps({"step": 6, "loss": 0.5})[:9])  # a crash mid-line
    assert rundir.read_metrics(tmp_path) == entries
    last_two = len(json.dumps(entries[-1])) + 1 + len(json.dumps(entries[-2])) + 1 + 9
    assert rundir.read_metrics(tmp_path, tail=last_two + 3) == entries[-2:]  # the tail's first line is cut too
    assert rundir.read_metrics(tmp_path / "absent") == []


def test_run_root_from_a_run_its_checkpoints_or_one_checkpoint(tmp_path):
    tag_dir = rundir.checkpoints(tmp_path / "run") / "step00000002"
    tag_dir.mkdir(parents=True)
    (tag_dir / "meta.json").write_text("{}")
    rundir.atomic_write(tag_dir.parent / rundir.LATEST, tag_dir.name)
    assert {rundir.run_root(p) for p in (tmp_path / "run", tag_dir.parent, tag_dir)} == {tmp_path / "run"}


@pytest.mark.processes
def test_the_run_dir_and_the_command_line_modules_import_without_any_installed_package():
    """`python -S`: no site-packages at all, as on a rented node before `make setup`."""
    code = ("import sys, trainer.rundir, launch.cli; "
            "print(*{m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'__main__'})")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"data", "launch", "trainer"}  # the project's own, nothing installed
