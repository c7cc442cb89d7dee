"""The DeepSpeed pdsh launcher over real ssh: an sshd on 127.0.0.1 started here, two hosts reached
through the Host aliases that launch.cluster writes, one rank each, ZeRO-3."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import ROOT, debug_overrides, free_port, losses, subprocess_env

from launch.cluster import main as cluster_main

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
MISSING = [name for name, path in (("sshd", SSHD), ("pdsh", shutil.which("pdsh")),
                                   ("ssh", shutil.which("ssh")), ("ssh-keygen", shutil.which("ssh-keygen")))
           if not path]
pytestmark = [pytest.mark.processes, pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed: `make test` installs pdsh and openssh-server "
                          "with apt-get where apt-get is available")]


@pytest.fixture
def sshd(tmp_path):
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / key)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    port = free_port()
    (tmp_path / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host_key'}\nPidFile {tmp_path / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n")
    os.makedirs("/run/sshd", exist_ok=True)
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp_path / "sshd_config")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    if server.poll() is not None:
        pytest.fail(f"sshd did not start: {server.stdout.read()}")
    yield tmp_path, port
    server.terminate()
    server.wait(timeout=10)


def test_pdsh_launcher_over_ssh_aliases_trains_two_nodes(sshd, zero0_run, shakespeare_dir):
    tmp_path, port = sshd
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "hosts.txt").write_text(f"{user}@127.0.0.1:{port} 1\n{user}@localhost:{port} 1\n")
    cluster = tmp_path / "cluster"
    assert cluster_main(["--hosts", str(tmp_path / "hosts.txt"), "--out", str(cluster),
                         "--identity", str(tmp_path / "client_key"), "--pythonpath", str(ROOT),
                         "--env", f"TORCH_EXTENSIONS_DIR={subprocess_env()['TORCH_EXTENSIONS_DIR']}",
                         "--env", "GLOO_SOCKET_IFNAME=lo", "--env", "NCCL_SOCKET_IFNAME=lo"]) == 0
    env = subprocess_env()
    # pdsh's ssh takes the generated config (aliases node0/node1 with their own port and key)
    env["PDSH_SSH_ARGS_APPEND"] = f"-F {cluster / 'ssh_config'} -o UserKnownHostsFile={tmp_path / 'known_hosts'}"
    env["DS_ENV_FILE"] = str(cluster / ".deepspeed_env")
    run_dir, steps = tmp_path / "run", 10
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(cluster / "hostfile"),
           "--launcher", "pdsh", "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "launch/train.py", *debug_overrides(shakespeare_dir, run_dir, "deepspeed=zero3", f"train.max_steps={steps}",
                                          "train.eval_every=0", "train.ckpt_every=0", "train.sample_tokens=0")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "node0: " in proc.stdout and "node1: " in proc.stdout  # pdsh prefixes each host's output
    over_ssh, single_node = losses(run_dir), losses(zero0_run[0])
    assert sorted(over_ssh) == list(range(1, steps + 1))
    for step in over_ssh:
        assert over_ssh[step] == pytest.approx(single_node[step], rel=1e-5, abs=1e-5), step
