"""launch/cluster.py (hostfile, ssh config, .deepspeed_env) and launch/vast_cluster.sh against fake
vastai/ssh/rsync tools that record every call: no network, no money."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from launch.cluster import ClusterError, main as cluster_main, nodes_from_vast, parse_host_list
from launch.vast import VastError, contract_id, pick_offers

SECRET = "vast-key-SECRET-0123456789"


def _instance(i, status="running", **kw):
    inst = {"id": 900 + i, "label": "run1", "actual_status": status, "public_ipaddr": f"203.0.113.{i} ",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(41000 + i)}]},
            "ssh_host": f"ssh{i}.vast.example", "ssh_port": 20000 + i, "num_gpus": 4,
            "local_ipaddrs": f"10.0.0.{i} 172.17.0.2"}
    inst.update(kw)
    return inst


# --- hostfile / ssh config / .deepspeed_env -------------------------------------------------------

def test_host_list_to_hostfile_ssh_config_and_env(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# my nodes\nroot@198.51.100.7:2201 8\n\nubuntu@198.51.100.8 4  # second\n")
    assert cluster_main(["--hosts", str(hosts), "--out", str(tmp_path / "out"), "--identity", "~/.ssh/k",
                         "--pythonpath", "/work/code", "--env", "NCCL_DEBUG=INFO"]) == 0
    out = tmp_path / "out"
    assert (out / "hostfile").read_text() == "node0 slots=8\nnode1 slots=4\n"
    config = (out / "ssh_config").read_text()
    assert "Host node0\n  HostName 198.51.100.7\n  Port 2201\n  User root\n  IdentityFile ~/.ssh/k\n" in config
    assert "Host node1\n  HostName 198.51.100.8\n  Port 22\n  User ubuntu\n" in config
    assert "BatchMode yes" in config and "StrictHostKeyChecking accept-new" in config
    env = (out / ".deepspeed_env").read_text()
    lines = env.splitlines()
    assert all(line and not line.startswith("#") and "=" in line for line in lines)  # the launcher's parser
    assert "NCCL_SOCKET_IFNAME=eth0" in lines and "PYTHONPATH=/work/code" in lines and "NCCL_DEBUG=INFO" in lines
    assert (out / "master_addr").read_text() == "198.51.100.7\n"


@pytest.mark.parametrize("text, message", [
    ("a 2\na 3\n", "line 2: duplicate host a:22 (first on line 1)"),
    ("a 2\nb 0\n", "line 2: slots must be a whole number >= 1, got '0'"),
    ("a 2\nroot@b:22\n", "line 2: 'root@b:22' is not `[user@]host[:port] slots`"),
    ("a:99999 2\n", "line 1: port 99999 out of range"),
    ("# nothing\n", "no hosts"),
])
def test_bad_host_lists_name_the_line(text, message):
    with pytest.raises(ClusterError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_host_list(text, "hosts.txt")


def test_vast_instances_use_direct_ports_and_private_addresses():
    nodes = nodes_from_vast([_instance(2), _instance(1), _instance(3, label="other")], label="run1")
    assert [(n.alias, n.host, n.port, n.slots, n.private_addr) for n in nodes] == [
        ("node0", "203.0.113.1", 41001, 4, "10.0.0.1"), ("node1", "203.0.113.2", 41002, 4, "10.0.0.2")]
    proxy = _instance(4, ports={}, public_ipaddr=None)
    assert nodes_from_vast([proxy])[0].host == "ssh4.vast.example" and nodes_from_vast([proxy])[0].port == 20004


@pytest.mark.parametrize("bad, message", [
    (_instance(5, status="loading"), "instance 905: status 'loading', not running"),
    (_instance(6, num_gpus=0), "instance 906: num_gpus is 0"),
    (_instance(7, ports={}, ssh_host=None), "instance 907: no ssh address"),
])
def test_bad_vast_instances_are_named(bad, message):
    with pytest.raises(ClusterError, match=message):
        nodes_from_vast([_instance(1), bad])


def test_offer_picking_stays_in_one_cluster_and_reads_contract_ids():
    offers = [{"id": 1, "cluster_id": 7, "machine_id": 1, "dph_total": 3.0},
              {"id": 2, "cluster_id": 7, "machine_id": 1, "dph_total": 3.5},  # same machine: skipped
              {"id": 3, "cluster_id": 7, "machine_id": 2, "dph_total": 4.0},
              {"id": 4, "cluster_id": 8, "machine_id": 5, "dph_total": 1.0},
              {"id": 5, "cluster_id": None, "machine_id": 6, "dph_total": 0.5}]
    cluster, cost, picked = pick_offers(offers, 2)
    assert (cluster, cost, [o["id"] for o in picked]) == (7, 7.0, [1, 3])
    with pytest.raises(VastError, match="no cluster offers 3 machines"):
        pick_offers(offers, 3)
    assert contract_id("Started. {'success': True, 'new_contract': 7835610}") == 7835610
    with pytest.raises(VastError, match="did not succeed"):
        contract_id('{"success": false, "msg": "no capacity"}')


# --- vast_cluster.sh against fakes ----------------------------------------------------------------

@pytest.fixture
def fake_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    source = (ROOT / "tests" / "fakes" / "fake_tool.py").read_text()
    for tool in ("vastai", "ssh", "rsync", "ssh-keygen"):
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{source}")
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls.jsonl"),
               FAKE_STATE=str(tmp_path / "state.json"), PYTHON=sys.executable, VAST_API_KEY=SECRET,
               NODES="2", GPUS="8", POLL="0", WAIT_TIMEOUT="3", SSH_KEY=str(tmp_path / "id_test"))
    return env, tmp_path


def _run_script(env, run, *args, fail=""):
    env = dict(env, RUN=run, FAKE_FAIL=fail)
    proc = subprocess.run(["bash", "launch/vast_cluster.sh", "--conf", "debug", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc


def _calls(tmp_path, prog=None):
    path = tmp_path / "calls.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [c for c in calls if prog is None or c["prog"] == prog]


def _created_and_destroyed(tmp_path):
    state = tmp_path / "state.json"
    created = {i["id"] for i in json.loads(state.read_text())} if state.exists() else set()
    destroyed = {int(c["args"][2]) for c in _calls(tmp_path, "vastai") if c["args"][:2] == ["destroy", "instance"]}
    return created, destroyed


def _assert_no_secret(proc, run):
    assert SECRET not in proc.stdout + proc.stderr
    for path in (ROOT / "outputs" / run).rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


@pytest.fixture
def run_name(request):
    name = f"test-vast-{request.node.name.split('[')[-1].rstrip(']')}-{os.getpid()}"
    yield name
    shutil.rmtree(ROOT / "outputs" / name, ignore_errors=True)


def test_happy_path_rents_trains_copies_back_and_destroys(fake_env, run_name):
    env, tmp = fake_env
    proc = _run_script(env, run_name, "--", "train.max_steps=5", "data.workers=0")
    assert proc.returncode == 0, proc.stderr
    assert "total cost: $21.0000/h for 2 nodes (16 GPUs)" in proc.stdout
    vast = [c["args"][:2] for c in _calls(tmp, "vastai")]
    assert vast[0] == ["search", "offers"] and vast[1] == ["create", "overlay"]
    assert vast.count(["create", "instance"]) == 2
    created_offers = [c["args"][2] for c in _calls(tmp, "vastai") if c["args"][:2] == ["create", "instance"]]
    assert created_offers == ["101", "102"]  # the two cheapest in cluster 7, not the lone cheap one in 9
    created, destroyed = _created_and_destroyed(tmp)
    assert created == destroyed == {5000, 5001}
    train = [" ".join(c["args"]) for c in _calls(tmp, "ssh") if "launch/train.py" in " ".join(c["args"])]
    assert len(train) == 1
    assert ("deepspeed --hostfile hostfile --launcher pdsh --master_addr 10.1.0.2 launch/train.py conf=debug "
            f"run_dir=outputs/{run_name} train.cost_per_hour=21.0000 train.max_steps=5 data.workers=0") in train[0]
    prepares = [" ".join(c["args"]) for c in _calls(tmp, "ssh") if "launch/prepare.py" in " ".join(c["args"])]
    assert len(prepares) == 2 and all("launch/prepare.py conf=debug data.workers=0 " in p for p in prepares)
    work = ROOT / "outputs" / run_name / "cluster"
    assert (work / "hostfile").read_text() == "node0 slots=8\nnode1 slots=8\n"
    assert "Port 40001" in (work / "ssh_config").read_text()
    assert (work / "head" / "master_addr").read_text() == "10.1.0.2\n"
    assert "step 5: val loss" in (work / "train.log").read_text()
    copies = [c for c in _calls(tmp, "rsync") if any(f"/outputs/{run_name}/" in a and a.startswith("node")
                                                        for a in c["args"])]
    assert len(copies) == 2  # from both nodes
    _assert_no_secret(proc, run_name)


@pytest.mark.parametrize("stage", ["search", "overlay", "create2", "wait", "ssh", "train", "copy"])
def test_a_failure_at_any_stage_destroys_every_created_instance(fake_env, run_name, stage):
    env, tmp = fake_env
    proc = _run_script(env, run_name, fail=stage)
    assert proc.returncode != 0
    created, destroyed = _created_and_destroyed(tmp)
    assert destroyed == created
    expected = {"search": 0, "overlay": 0, "create2": 1}.get(stage, 2)
    assert len(created) == expected
    _assert_no_secret(proc, run_name)


def test_ctrl_c_while_waiting_destroys_the_instances(fake_env, run_name):
    env, tmp = fake_env
    env = dict(env, RUN=run_name, FAKE_FAIL="wait", WAIT_TIMEOUT="600", POLL="1")
    proc = subprocess.Popen(["bash", "launch/vast_cluster.sh", "--conf", "debug"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(c["args"][:2] == ["show", "instances"] for c in _calls(tmp, "vastai")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    created, destroyed = _created_and_destroyed(tmp)
    assert created == destroyed == {5000, 5001}
    assert "interrupted" in err


def test_dry_run_prints_every_command_and_runs_none(fake_env, run_name):
    env, tmp = fake_env
    proc = _run_script(env, run_name, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert _calls(tmp) == []
    printed = proc.stderr
    for expected in ("vastai search offers", "vastai create overlay", "vastai create instance \\<OFFER_1\\>",
                     "vastai create instance \\<OFFER_2\\>", "rsync -az", "deepspeed --hostfile hostfile",
                     "vastai destroy instance \\<ID_of_\\<OFFER_2\\>\\>"):
        assert expected in printed, expected
    _assert_no_secret(proc, run_name)


def test_bad_settings_fail_before_anything_is_rented(fake_env, run_name):
    env, tmp = fake_env
    proc = _run_script(env, run_name, "--nodes", "zero")
    assert proc.returncode == 2 and "NODES must be a whole number" in proc.stderr
    assert _calls(tmp) == []
