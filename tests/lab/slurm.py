"""A real Slurm on the lab's hosts (tests/lab/hosts.py), for `make test-slurm`: the distribution's
slurmctld, slurmd and munged (Debian's slurm-wlm and munge packages), each started inside a host.

- munged on every host, all with one key (written to the shared folder), on the host's own /run;
- slurmctld on node-0, which is also the login node the tests submit from;
- a slurmd on every host, named by the host's own hostname; no cgroups (proctrack/linuxproc, task/none);
- the hosts share /mnt/shared (the cluster's NFS home): slurm.conf, the daemons' logs, the checkout.

Each node declares 2 GPUs (gres/gpu over device files with /dev/null's numbers): the only fake, so that a job may ask
for GPUs where torch sees none. Every daemon runs inside a host: killing the hosts ends them all."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from .hosts import Host, why_not as hosts_why_not

SHARED = "/mnt/shared"          # the shared folder, as the hosts see it
CONF = f"{SHARED}/slurm/slurm.conf"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
FAKE_GPUS = 2
# gres/gpu wants character devices: each host's fake GPUs are /dev/null's numbers under new names
FAKE_GPU_FILES = "mkdir -p /run/fake-gpus && " + " && ".join(
    f"mknod /run/fake-gpus/nvidia{i} c 1 3" for i in range(FAKE_GPUS))

SLURM_CONF = """\
ClusterName=lab
SlurmctldHost=node-0({controller})
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire seconds (120 by default)
AuthInfo=cred_expire=5
StateSaveLocation={shared}/slurm/state
SlurmdSpoolDir=/run/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile={shared}/slurm/log/slurmctld.log
SlurmdLogFile={shared}/slurm/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# look at pending jobs every 2 s, not 60: a requeued job starts once it may
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
KillWait=30
MinJobAge=600
MpiDefault=none
NodeName=DEFAULT CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
{nodes}
PartitionName=lab Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def why_not() -> str | None:
    """Why a Slurm cluster cannot be made here, in one line; None when it can."""
    reason = hosts_why_not()
    if reason:
        return reason
    missing = [name for name in BINARIES if not shutil.which(name, path=PATH)]
    if missing:
        return f"{', '.join(missing)} not found: `make test-slurm` installs Slurm and munge where apt-get can"
    return None


def clean_env(**extra: str) -> str:
    """An `env -i` prefix: a login shell's environment, not the test process's."""
    pairs = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SLURM_CONF": CONF, **extra}
    return "env -i " + " ".join(f"{k}={v}" for k, v in pairs.items())


class Cluster:
    def __init__(self, shared: Path, hosts: list[Host]):
        self.shared, self.hosts = Path(shared), hosts
        self.login = hosts[0]

    # --- start -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._write_config()
        for host in self.hosts:
            self._daemon(host, "mkdir -m 755 -p /run/munge && munged --force --key-file "
                               f"{SHARED}/slurm/munge.key --socket /run/munge/munge.socket.2 --log-file "
                               "/run/munge/munged.log --pid-file /run/munge/munged.pid --seed-file /run/munge/seed")
        self._daemon(self.login, f"slurmctld -f {CONF}")
        for host in self.hosts:
            self._daemon(host, f"mkdir -p /run/slurmd && {FAKE_GPU_FILES} && slurmd -f {CONF}")
        self._wait_idle()

    def _write_config(self) -> None:
        conf = self.shared / "slurm"
        for sub in ("state", "log"):
            (conf / sub).mkdir(parents=True, exist_ok=True)
        key = conf / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr}" for h in self.hosts)
        (conf / "slurm.conf").write_text(SLURM_CONF.format(
            controller=self.login.addr, shared=SHARED, cpus=os.cpu_count() or 1, gpus=FAKE_GPUS, nodes=nodes))
        (conf / "gres.conf").write_text(f"Name=gpu File=/run/fake-gpus/nvidia[0-{FAKE_GPUS - 1}]\n")
        # slurmd 22.05 loads a cgroup plugin even with no cgroup plugin configured; v1's loads without
        # a cgroup filesystem (the hosts' /sys is their network namespace's, with none mounted)
        (conf / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def _daemon(self, host: Host, command: str) -> None:
        """A daemon that forks into the background inside the host (its PID 1 reaps it)."""
        proc = host.run(f"{clean_env()} {command} </dev/null >/dev/null 2>&1", timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{host.name}: `{command}` exited {proc.returncode}: {self.logs()}")

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.shell("sinfo -h -N -o '%N %t'").stdout
            if sorted(line.split()[1] for line in out.splitlines() if line.strip()) == ["idle"] * len(self.hosts):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the slurmd's did not register as idle in {timeout:.0f} s: {out!r}\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs, for a failure's message."""
        out = []
        for log in sorted((self.shared / "slurm" / "log").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # --- use -----------------------------------------------------------------------------------------------
    def shell(self, command: str, cwd: str = SHARED, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        """A command on the login node, as its user would type it (a clean environment, SLURM_CONF set)."""
        return self.login.run(f"cd {cwd} && {clean_env(**env)} bash -c {quote(command)}", timeout=timeout)

    def submit(self, args: str, cwd: str, **env: str) -> int:
        proc = self.shell(f"sbatch --parsable {args}", cwd=cwd, **env)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {args}: {proc.stdout}{proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.shell(f"scontrol show job -o {job_id}").stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until done(fields) is true; its last fields."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            fields = self.job(job_id)
            if done(fields):
                return fields
            time.sleep(1)
        raise AssertionError(f"job {job_id}: no {what} in {timeout:.0f} s: {fields}\n{self.logs()}")


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
