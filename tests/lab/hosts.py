"""Real hosts on this machine for the rehearsal of the rented-cluster path (`make test-cluster`).

A `Lab` is a "laptop" network namespace holding a bridge (the overlay network) and hosts, each:
- its own network namespace, with an `eth0` on the bridge and no route out;
- its own sshd (the distribution's OpenSSH) with a host key made for it;
- its own disk: a mount namespace in which /root and /workspace are its own folders;
- its own processes: a PID namespace whose init (host_init.py) is PID 1, so killing it ends the host;
- the "image": the distribution's python3 with torch, and a wheelhouse standing in for PyPI
  (`make lab` builds both once).
The driver runs in the laptop namespace (`Lab.laptop(argv)`); the provider's stand-in listens there too
(`Lab.in_laptop(fn)` creates its socket), where the hosts reach it as the nodes reach vast.ai.

Addresses exist only inside these namespaces, and nothing touches the machine's own network. Names start
with `stl<pid>-`: namespaces of a test process that no longer runs are removed at start."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB_CACHE = ROOT / ".cache" / "lab"
HOST_PYTHON = os.environ.get("HOST_PYTHON", "/usr/bin/python3")   # the Makefile's, which `make lab` used
SUBNET = "10.77.0"
LAPTOP_ADDR = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000


def why_not() -> str | None:
    """Why hosts cannot be made here, in one line; None when they can."""
    if os.geteuid() != 0:
        return "the rehearsal's hosts need root (network, mount and PID namespaces)"
    missing = [t for t in ("ip", "unshare", "mount", "bridge", "/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh",
                           HOST_PYTHON) if not shutil.which(t) and not os.path.exists(t)]
    if missing:
        return f"{', '.join(missing)} not found: `make test-cluster` installs them where apt-get can"
    if not (LAB_CACHE / ".built").exists():
        return "no image: `make lab` builds the hosts' image and wheelhouse (`make test-cluster` runs it)"
    probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make namespaces here: {probe.stderr.strip()[-200:]}"
    return None


@functools.cache
def image_site_packages() -> str:
    """Where the host python looks for packages installed locally: the image is bound there."""
    out = subprocess.run([HOST_PYTHON, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def remove_stale() -> None:
    """Namespaces left by a test process that no longer runs (a killed pytest), and the processes still
    in them (a host's sshd and what it started outlive the test that booted it)."""
    for name in _ip("netns", "list").stdout.split():
        m = re.fullmatch(r"stl(\d+)-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)


class Host:
    def __init__(self, lab: Lab, index: int, name: str, disk: Path):
        self.lab, self.index, self.name, self.disk = lab, index, name, disk
        self.netns = f"{lab.prefix}-h{index}"
        self.addr = f"{SUBNET}.{10 + index}"
        self.port = f"v{index}"            # its end on the bridge, in the laptop namespace
        self.init: subprocess.Popen | None = None

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command inside the host (its network, mounts and processes), as root: for the tests' checks."""
        pid = self.init_pid()
        return subprocess.run(["nsenter", "-t", str(pid), "-n", "-m", "-p", "-u", "bash", "-c", command],
                              capture_output=True, text=True, timeout=timeout)

    def init_pid(self) -> int:
        """The host's PID 1, as this machine sees it (the child of `unshare`)."""
        children = Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children")
        for _ in range(200):
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return int(pids[0])
            time.sleep(0.01)
        raise RuntimeError(f"{self.name}: no init process")

    def alive(self) -> bool:
        return self.init is not None and self.init.poll() is None

    def kill(self) -> None:
        """Everything on the host ends at once (its PID namespace's init is killed), as a preempted or
        crashed machine does; its disk stays until the host is destroyed."""
        if self.alive():
            self.init.kill()          # unshare --kill-child: its PID 1 gets SIGKILL, and with it the namespace
            self.init.wait(timeout=30)

    def processes(self) -> list[str]:
        out = self.run("ps -eo pid=,args=").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]


class Lab:
    def __init__(self, base: Path, hide: tuple[str, ...] = ()):
        self.base = Path(base)
        self.prefix = f"stl{os.getpid()}"
        self.laptop_ns = f"{self.prefix}-laptop"
        self.address = LAPTOP_ADDR
        self.hosts: dict[int, Host] = {}
        self.next_index = 0
        self.hide = [str(ROOT), str(self.base), *hide]
        self.lock = threading.Lock()
        self.wipes: list[threading.Thread] = []

    # --- the network --------------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        remove_stale()
        _ip("netns", "del", self.laptop_ns, check=False)
        _ip("netns", "add", self.laptop_ns)
        _ip("-n", self.laptop_ns, "link", "set", "lo", "up")
        _ip("-n", self.laptop_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.laptop_ns, "addr", "add", f"{LAPTOP_ADDR}/24", "dev", "br0")
        _ip("-n", self.laptop_ns, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc) -> None:
        for host in list(self.hosts.values()):
            self.destroy(host)
        for wipe in self.wipes:
            wipe.join()
        _ip("netns", "del", self.laptop_ns, check=False)

    def laptop(self, argv: list[str]) -> list[str]:
        """argv run in the laptop's network namespace (the machine's own filesystem and processes)."""
        return ["ip", "netns", "exec", self.laptop_ns, *argv]

    def in_laptop(self, fn):
        """fn() in a thread that joined the laptop's network namespace: the sockets it makes live there."""
        result: dict = {}

        def target():
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{self.laptop_ns}") as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    result["error"] = OSError(ctypes.get_errno(), "setns")
                    return
            try:
                result["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                result["error"] = e

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    # --- hosts -----------------------------------------------------------------------------------------------
    def boot(self, authorized_key: str, env: dict[str, str], workspace_mb: int | None = None,
             shared: Path | None = None, etc_hosts: str | None = None) -> Host:
        """A new host, up with its sshd listening on port 22 of its eth0.

        shared: a folder of this machine that every host booted with it sees at /mnt/shared, as an owned
        cluster's nodes see one NFS export. etc_hosts: the host's /etc/hosts (names as a cluster's DNS
        resolves them); by default the machine's."""
        with self.lock:
            index = self.next_index
            self.next_index += 1
        host = Host(self, index, f"node-{index}", self.base / f"host{index}")
        self._disk(host, authorized_key)
        if etc_hosts is not None:
            (host.disk / "etc-hosts").write_text(etc_hosts)
        self._network(host)
        cfg = {"name": host.name, "disk": str(host.disk), "image": str(LAB_CACHE / "image"),
               "site_packages": image_site_packages(), "wheels": str(LAB_CACHE / "wheels"),
               "hide": self.hide, "workspace_mb": workspace_mb, "shared": str(shared) if shared else None,
               "etc_hosts": etc_hosts is not None}
        log = open(self.base / f"host{index}.log", "ab")
        host.init = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--pid", "--uts", "--fork", "--kill-child",
             "--mount-proc", "--propagation", "private", HOST_PYTHON, str(Path(__file__).with_name("host_init.py")),
             json.dumps(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **env}, start_new_session=True)
        log.close()
        self.hosts[index] = host
        self._wait_for_sshd(host)
        return host

    def _disk(self, host: Host, authorized_key: str) -> None:
        for sub in ("root/.ssh", "workspace", "etc-ssh"):
            (host.disk / sub).mkdir(parents=True, exist_ok=True)
        (host.disk / "root/.ssh/authorized_keys").write_text(authorized_key.strip() + "\n")
        key = host.disk / "etc-ssh/ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(key)], check=True)
        if Path("/etc/ssh/ssh_config").exists():
            shutil.copy("/etc/ssh/ssh_config", host.disk / "etc-ssh/ssh_config")
        path = ":".join(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        (host.disk / "etc-ssh/sshd_config").write_text(
            "Port 22\nListenAddress 0.0.0.0\nHostKey /etc/ssh/ssh_host_ed25519_key\nPidFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nMaxStartups 100:30:200\nMaxSessions 100\n"
            # the hosts' PyPI is the wheelhouse: pip reads no config of this machine
            f"SetEnv PATH={path} PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels "
            "PIP_DISABLE_PIP_VERSION_CHECK=1\n")

    def _network(self, host: Host) -> None:
        _ip("netns", "del", host.netns, check=False)
        _ip("netns", "add", host.netns)
        _ip("-n", self.laptop_ns, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns",
            host.netns)
        _ip("-n", self.laptop_ns, "link", "set", host.port, "master", "br0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")

    def _wait_for_sshd(self, host: Host, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], 22), 1).close()\n"
                 "except OSError: sys.exit(1)")
        while time.time() < deadline:
            if not host.alive():
                raise RuntimeError(f"{host.name} did not start: {(self.base / f'host{host.index}.log').read_text()}")
            if subprocess.run(self.laptop([sys.executable, "-c", probe, host.addr])).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{host.name}: no sshd on {host.addr}:22 after {timeout}s")

    def hosts_file(self, count: int) -> str:
        """/etc/hosts naming the first `count` hosts by their addresses on the bridge."""
        lines = ["127.0.0.1 localhost"] + [f"{SUBNET}.{10 + i} node-{i}" for i in range(count)]
        return "\n".join(lines) + "\n"

    def destroy(self, host: Host) -> None:
        """The host is gone at once; its disk (a few hundred MB of virtualenv) is removed in the background,
        so that the provider's stand-in answers a destroy as quickly as vast.ai does."""
        host.kill()
        _ip("netns", "del", host.netns, check=False)
        self.hosts.pop(host.index, None)
        wipe = threading.Thread(target=shutil.rmtree, args=(host.disk,), kwargs={"ignore_errors": True})
        wipe.start()
        self.wipes.append(wipe)

    # --- faults -------------------------------------------------------------------------------------------------
    def cut(self, *hosts: Host) -> None:
        """Traffic between these hosts is dropped on the bridge (isolated ports); each still reaches the
        laptop, as when the overlay fails but the nodes' public ssh does not."""
        for host in hosts:
            subprocess.run(["ip", "netns", "exec", self.laptop_ns, "bridge", "link", "set", "dev", host.port,
                            "isolated", "on"], check=True, capture_output=True)
