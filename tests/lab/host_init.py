"""PID 1 of one rehearsal host (standard library only). Started by tests/lab/hosts.py inside the host's
network namespace, in new mount, PID and UTS namespaces. It makes the host's own filesystem view, then
runs the host's sshd and reaps orphans (as a container's init does) until sshd ends.

The view: /root and /workspace are the host's own folders (or a size-limited tmpfs for /workspace);
/tmp, /run and /opt are empty tmpfs; the distribution's python3 sees the "image" (torch) as its
site-packages; /opt/wheels is the wheelhouse that stands in for PyPI; /etc/ssh is the host's own
(config and host key). The test project and every other host's folder are hidden. Optionally (a
Slurm cluster's nodes): /mnt/shared is a folder every such host shares, and /etc/hosts names the hosts.

Its environment holds CONTAINER_ID and CONTAINER_API_KEY, as a vast.ai container's PID 1 does; ssh
sessions do not inherit it (sshd builds their environment), as on a rented node."""
import json
import os
import subprocess
import sys


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def bind(source: str, target: str, read_only: bool = False) -> None:
    os.makedirs(target, exist_ok=True)
    mount("--bind", source, target)
    if read_only:
        mount("-o", "remount,bind,ro", target)


def make_view(cfg: dict) -> None:
    disk = cfg["disk"]
    bind(f"{disk}/root", "/root")
    if cfg.get("workspace_mb"):
        os.makedirs("/workspace", exist_ok=True)
        mount("-t", "tmpfs", "-o", f"size={int(cfg['workspace_mb'])}m", "tmpfs", "/workspace")
    else:
        bind(f"{disk}/workspace", "/workspace")
    bind(f"{disk}/etc-ssh", "/etc/ssh")
    bind(cfg["image"], cfg["site_packages"], read_only=True)
    # the wheelhouse first to a private place: /opt and the tests' folders are covered next
    os.makedirs("/mnt", exist_ok=True)
    mount("-t", "tmpfs", "tmpfs", "/mnt")
    bind(cfg["wheels"], "/mnt/wheels", read_only=True)
    if cfg.get("shared"):   # an owned cluster's NFS export: bound before the tests' folders are covered
        bind(cfg["shared"], "/mnt/shared")
    if cfg.get("etc_hosts"):
        mount("--bind", f"{disk}/etc-hosts", "/etc/hosts")
    for path in ["/tmp", "/run", "/opt", *cfg["hide"]]:
        if os.path.isdir(path):
            mount("-t", "tmpfs", "tmpfs", path)
    os.makedirs("/opt/wheels")
    mount("--move", "/mnt/wheels", "/opt/wheels")
    os.makedirs("/run/sshd", mode=0o755)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    subprocess.run(["hostname", cfg["name"]], check=True)
    make_view(cfg)
    os.chdir("/root")
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e"])
    print(f"{cfg['name']}: sshd pid {sshd.pid}", flush=True)
    while True:   # reap every orphan (detached trainers end up here); stop with sshd
        pid, _ = os.wait()
        if pid == sshd.pid:
            return 1


if __name__ == "__main__":
    sys.exit(main())
