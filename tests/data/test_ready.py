"""Shards made ready before any process group (data/ready.py): one preparer per folder, whoever comes
first, and nothing done on a node's other ranks. Real processes and a real flock; the end-to-end
runs (two local ranks, two nodes) are in scenarios/test_reliability.py and scenarios/test_multinode_disks.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import ROOT, subprocess_env

from data.config import DataConfig
from data.ready import lock_path, locked, node_data_error

TEXT = "".join(f"line {i}: to be, or not to be, that is the question.\n" for i in range(2000))

PREPARER = """
import sys
from data.config import DataConfig
from data.ready import node_data_error
cfg = DataConfig(source="text", path=sys.argv[1], dir=sys.argv[2])
print("result:", node_data_error(cfg, "", 32, 8, 2), flush=True)
"""


@pytest.mark.processes
def test_two_preparers_of_one_folder_take_turns_and_only_the_first_prepares(tmp_path):
    """Two nodes' leaders sharing data.dir start while a third party holds its lock (a prepare of the
    same folder): once it is released, one of them prepares and the other finds the shards ready."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    data_dir = tmp_path / "shared" / "shards"
    env = {**subprocess_env(), "LOCAL_RANK": "0"}
    with locked(data_dir):
        procs = [subprocess.Popen([sys.executable, "-c", PREPARER, str(tmp_path / "corpus.txt"), str(data_dir)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        time.sleep(3)  # both reach the lock (a later one finds the manifest: still one preparer)
        assert not (data_dir / "manifest.json").exists()  # neither prepared past the lock
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert all(out.strip().endswith("result: None") for out in outs), outs
    assert sum(out.count(f"no shards in {data_dir}: preparing them") for out in outs) == 1, outs
    assert all(f"waiting for {lock_path(data_dir)}: another process is preparing" in out for out in outs), outs
    assert (data_dir / "manifest.json").is_file() and lock_path(data_dir) == tmp_path / "shared" / ".shards.lock"


@pytest.mark.parametrize("planted", ["fifo", "symlink"])
def test_a_lock_file_someone_planted_is_not_followed_nor_waited_on(tmp_path, planted, monkeypatch):
    """The lock's folder may be anyone's (data.dir=/tmp/x): a FIFO planted at the lock's name would block
    open(), a symlink would have the lock file created elsewhere. Neither is used: the shards are
    prepared unlocked, saying so, and the link's target is never made."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    data_dir = tmp_path / "shards"
    target = tmp_path / "elsewhere"
    if planted == "fifo":
        os.mkfifo(lock_path(data_dir))
    else:
        lock_path(data_dir).symlink_to(target)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus.txt"), dir=str(data_dir))
    assert node_data_error(cfg, "", 32, 8, 1) is None
    assert (data_dir / "manifest.json").is_file() and not target.exists()


def test_a_nodes_other_ranks_leave_the_data_to_local_rank_0(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus.txt"), dir=str(tmp_path / "shards"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert node_data_error(cfg, "", 32, 8, 2) is None
    assert list(tmp_path.iterdir()) == [tmp_path / "corpus.txt"]  # no shards, no lock file
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert node_data_error(cfg, "", 32, 8, 2) is None and (tmp_path / "shards" / "manifest.json").is_file()


def test_a_source_train_does_not_prepare_is_one_line_with_the_command_and_no_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # no launcher: this rank is its node's leader
    cfg = DataConfig(source="wikipedia", path=str(tmp_path / "wiki"), dir=str(tmp_path / "shards"))
    error = node_data_error(cfg, "wiki_100", 64, 12, 1)
    assert error.startswith(f"no prepared shards in data.dir={tmp_path / 'shards'}; data.source=wikipedia")
    assert "python launch/prepare.py conf=wiki_100 data.source=wikipedia" in error
    assert list(tmp_path.iterdir()) == []
