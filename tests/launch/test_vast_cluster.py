"""launch/cluster.py (hostfile, ssh config, .deepspeed_env) and launch/vast/ (offer picking, the
checks on provider and user strings): pure functions, no processes. The driver end to end is in
scenarios/test_vast_driver.py."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from launch.cluster import (
    ClusterError,
    deepspeed_env,
    main as cluster_main,
    nodes_from_vast,
    parse_host_list,
    write as cluster_write,
)
from launch.vast.checks import (
    RUN_NAME,
    UnsafeInput,
    check_env,
    check_override,
    check_run_name,
    new_run_name,
)
from launch.vast.provider import VastError, pick_offers


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


@pytest.mark.parametrize("ports", [[8080, 8081], None, "22/tcp", {"22/tcp": "41001"}, {"22/tcp": [41001]},
                                   {"22/tcp": []}])
def test_odd_shapes_of_ports_fall_back_to_the_proxy_route(ports):
    """`ports` as a list (seen in public code), null, a string...: no direct route, never an AttributeError
    (which once left both instances billing)."""
    node = nodes_from_vast([_instance(4, ports=ports)])[0]
    assert (node.host, node.port) == ("ssh4.vast.example", 20004)


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


# --- strings from the provider and the user --------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("ssh_host", "evil.example\n  ProxyCommand touch /tmp/pwned"), ("ssh_host", "-oProxyCommand=id"),
    ("public_ipaddr", "1.2.3.4 x"), ("local_ipaddrs", "$(id)")])
def test_provider_hostnames_that_could_reach_an_ssh_config_are_refused(field, value):
    inst = _instance(1, **{field: value})
    if field == "ssh_host":
        inst.update(ports={})
    with pytest.raises(ClusterError, match=f"instance 901: {field} .* is not a hostname or IP address"):
        nodes_from_vast([inst])


def test_nodes_are_the_recorded_ids_in_order_never_the_label():
    a, b, stranger = _instance(1), _instance(2), _instance(0)   # the stranger has our label and a lower id
    nodes = nodes_from_vast([stranger, a, b], ids=[902, 901])
    assert [(n.alias, n.port) for n in nodes] == [("node0", 41002), ("node1", 41001)]
    with pytest.raises(ClusterError, match=r"instances \[903\] are not in the instance list"):
        nodes_from_vast([a, b], ids=[901, 903])


@pytest.mark.parametrize("text", ["-oProxyCommand=id 2\n", "root@a.b;id 2\n", "us\ner@a 2\n"])
def test_host_lists_refuse_option_like_or_odd_hosts(text):
    with pytest.raises(ClusterError, match="line 1"):
        parse_host_list(text, "hosts.txt")


@pytest.mark.parametrize("env", [{"NCCL_DEBUG": "INFO; touch x"}, {"A B": "1"}, {"X": "a b"}, {"X": "$(id)"}])
def test_deepspeed_env_values_are_exported_unquoted_so_odd_ones_are_refused(env):
    with pytest.raises(ClusterError, match=".deepspeed_env"):
        deepspeed_env(env, None)
    with pytest.raises(UnsafeInput, match=".deepspeed_env"):
        check_env(env)


@pytest.mark.parametrize("override, ok", [
    ("train.lr=3e-4", True), ("tracking.tags=[a,b]", True), ("+model.bias=false", True), ("~train.seed", True),
    ("data.path=/data/wiki", True), ("train.lr=1;touch x", False), ("x=$(id)", False), ("x=`id`", False),
    ("x=a b", False), ("--cfg=job", False), ("x=a|b", False), ("x='a'", False), ("noequals", False)])
def test_overrides_are_refused_unless_safe_through_two_shells(override, ok):
    if ok:
        assert check_override(override) == override
    else:
        with pytest.raises(UnsafeInput, match="override"):
            check_override(override)


@pytest.mark.parametrize("name, ok", [("st-20261129-abc", True), ("a", True), ("..", False), ("-x", False),
                                      ("Run", False), ("a_b", False), ("a/b", False), ("a" * 64, False),
                                      ("4242", False), ("abc\n", False), ("abc\ndef", False), ("-", False)])
def test_run_names_are_overlay_names(name, ok):
    if ok:
        assert check_run_name(name) == name
    else:
        with pytest.raises(UnsafeInput, match="--run"):
            check_run_name(name)
    assert RUN_NAME.match(new_run_name()) and new_run_name() != new_run_name()


@pytest.mark.processes
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_the_real_ssh_reads_the_generated_config_as_meant(tmp_path):
    """`ssh -G` (the real OpenSSH client, connecting nowhere) resolves each alias of the config the driver
    writes: its own address and port, the key, the per-run known_hosts, unattended options."""
    nodes = nodes_from_vast([_instance(1), _instance(2)], ids=[901, 902])
    cluster_write(nodes, tmp_path, str(tmp_path / "id_test"), known_hosts=str(tmp_path / "known_hosts"))
    for alias, port in (("node0", 41001), ("node1", 41002)):
        resolved = subprocess.run(["ssh", "-G", "-F", str(tmp_path / "ssh_config"), alias], capture_output=True,
                                  text=True, check=True).stdout.splitlines()
        for line in (f"hostname 203.0.113.{port - 41000}", f"port {port}", f"identityfile {tmp_path / 'id_test'}",
                     f"userknownhostsfile {tmp_path / 'known_hosts'}", "batchmode yes", "user root"):
            assert line in resolved, (alias, line)
        assert not any(line.startswith("proxycommand") for line in resolved)
