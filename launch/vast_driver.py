"""Rented clusters on vast.ai: rent, set up, train detached, fetch checkpoints, tear down.

    bash launch/vast_cluster.sh [run] --nodes N --gpus G --gpu-name NAME --max-dph P --conf NAME
         [--run NAME] [--timeout S] [--detach] [--resume outputs/RUN] [--max-hours H] [--max-usd D]
         [-- overrides]
    bash launch/vast_cluster.sh up|train|status|logs [-f]|fetch|down [--force] --run NAME

`run` does up, train, follow (log, fetch each checkpoint), fetch, down. Every step reads and writes
outputs/RUN/cluster/state.json, so any step can be run again, later, from another terminal.
docs/clusters.md describes each step, its cost, and what happens on every failure.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launch import cluster
from launch.vast import (
    FORWARDED_SECRETS,
    Provider,
    UnsafeInput,
    VastError,
    check_conf,
    check_env,
    check_override,
    check_run_name,
    instance_id,
    new_run_name,
    pick_offers,
)
from trainer.checksums import META, ChecksumError, verify, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel"   # torch 2.6: setup.py's torch>=2.6 keeps it
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TAG = re.compile(r"^step[0-9]{8}$")


class DriverError(RuntimeError):
    """A step failed; the message says which and what to do."""


class Interrupted(BaseException):
    """A signal outside the training phase: unwind to the teardown (BaseException: no `except Exception`
    in the SDK or requests can swallow it)."""


class Console:
    """Every line goes to outputs/RUN/cluster/driver.log and, while it can, to stderr. A closed terminal
    (EPIPE, EIO) turns the stderr half off; it never raises, so it cannot cut a cleanup short. A line
    logged by a signal handler while this thread is writing waits for the write to finish (writing
    it at once would be a reentrant call into the same buffered file, which raises)."""

    def __init__(self):
        self.file = None
        self.terminal = True
        self.lock = threading.RLock()
        self.busy = False
        self.pending: list[tuple[str, bool]] = []

    def open(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def __call__(self, text: str, out: bool = False):
        with self.lock:
            if self.busy:   # re-entered: a signal handler in this thread
                self.pending.append((text, out))
                return
            self.busy = True
            try:
                self._write(text, out)
                while self.pending:
                    self._write(*self.pending.pop(0))
            finally:
                self.busy = False

    def flush(self):
        with self.lock:
            while self.pending and not self.busy:
                self._write(*self.pending.pop(0))

    def _write(self, text: str, out: bool):
        if self.file is not None:
            try:
                self.file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
            except (OSError, ValueError, RuntimeError):
                pass
        if self.terminal:
            try:
                stream = sys.stdout if out else sys.stderr
                stream.write((text if out else f"[vast {time.strftime('%H:%M:%S')}] {text}") + "\n")
                stream.flush()
            except (OSError, ValueError, RuntimeError):
                self.terminal = False


log = Console()


class Signals:
    """Ctrl-C, SIGTERM, SIGHUP. Before training: the first one unwinds to the teardown. While training is
    followed: the first asks the ranks to stop and save, the second skips the wait for that checkpoint.
    During the teardown: counted and logged, nothing else (a second Ctrl-C cannot cut it short)."""

    def __init__(self):
        self.count = 0
        self.first: int | None = None
        self.mode = "unwind"        # unwind | follow | cleanup
        self.raised = False

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        self.first = self.first or signum
        name = signal.Signals(signum).name
        if self.mode == "cleanup":
            log(f"{name}: the teardown goes on (it destroys what this run rented; stopping it now would "
                "leave nodes billing)")
        elif self.mode == "follow":
            log(f"{name}: " + ("asking the ranks to save a checkpoint and stop (again to skip the wait)"
                               if self.count == 1 else "not waiting for the final checkpoint"))
        elif not self.raised:
            self.raised = True
            log(f"{name}: stopping; tearing down what this run rented")
            raise Interrupted(name)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(self.first, 1)


def _env(name: str, default):
    return os.environ.get(name, default)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash launch/vast_cluster.sh", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run",
                   choices=["run", "up", "train", "status", "logs", "fetch", "down"])
    p.add_argument("--nodes", type=int, default=int(_env("NODES", 2)), help="machines (NODES)")
    p.add_argument("--gpus", type=int, default=int(_env("GPUS", 8)), help="GPUs per machine (GPUS)")
    p.add_argument("--gpu-name", default=_env("GPU_NAME", "H100_SXM"), help="vast.ai gpu_name (GPU_NAME)")
    p.add_argument("--max-dph", type=float, default=float(_env("MAX_DPH", 25)), help="most $/h per machine")
    p.add_argument("--image", default=_env("IMAGE", DEFAULT_IMAGE))
    p.add_argument("--disk", type=int, default=int(_env("DISK", 100)), help="GB per machine")
    p.add_argument("--conf", default=_env("CONF", "shakespeare"), help="preset (conf=NAME)")
    p.add_argument("--run", default=_env("RUN", None), help="run name (default: st-DATE-TIME-RANDOM)")
    p.add_argument("--ssh-key", default=_env("SSH_KEY", "~/.ssh/id_ed25519"), help="the key vast.ai knows")
    p.add_argument("--timeout", type=int, default=int(_env("WAIT_TIMEOUT", 1200)),
                   help="seconds instances may take to run and answer ssh")
    p.add_argument("--detach", action="store_true", help="leave the nodes training; reattach with status/logs")
    p.add_argument("--resume", help="outputs/RUN: continue its latest fetched checkpoint on fresh nodes")
    p.add_argument("--max-hours", type=float, help="the nodes checkpoint and stop themselves after H hours")
    p.add_argument("--max-usd", type=float, help="... or once the cluster has cost D dollars")
    p.add_argument("--force", action="store_true", help="down: destroy even if the newest checkpoint is not fetched")
    p.add_argument("-f", "--follow", action="store_true", help="logs: follow until training ends")
    p.add_argument("--dry-run", action="store_true", help="print the plan, rent nothing")
    # knobs with defaults for real use; the tests shorten them
    p.add_argument("--poll", type=float, default=float(_env("POLL", 10)))
    p.add_argument("--destroy-retry", type=float, default=float(_env("DESTROY_RETRY_S", 600)),
                   help="seconds to keep retrying destroy")
    p.add_argument("--fetch-attempts", type=int, default=int(_env("FETCH_ATTEMPTS", 5)))
    p.add_argument("--fetch-backoff", type=float, default=float(_env("FETCH_BACKOFF_S", 5)))
    p.add_argument("--stop-wait", type=float, default=float(_env("STOP_WAIT_S", 1800)),
                   help="seconds to wait for the final checkpoint after a stop request")
    p.add_argument("--cap-grace", type=float, default=float(_env("CAP_GRACE_S", 600)),
                   help="at the budget cap, seconds the nodes wait for the laptop to fetch before stopping")
    p.add_argument("--remote-dir", default=_env("REMOTE_DIR", "/workspace/shakespeare"))
    p.add_argument("--net-dev", default=_env("NET_DEV", "eth0"), help="the overlay interface on the nodes")
    p.add_argument("--node-setup", default=_env("NODE_SETUP", None),
                   help="shell command run in the code's folder on each node (default: make setup, prepare)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    return p.parse_args(argv)


class Driver:
    def __init__(self, args: argparse.Namespace, signals: Signals):
        self.args = args
        self.signals = signals
        self.ssh = os.environ.get("SSH", "ssh")
        self.provider_ = None
        self.state: dict = {}
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()   # ssh sessions in flight (set-up threads among them)

    # --- state ------------------------------------------------------------------------------------
    @property
    def run(self) -> str:
        return self.state["run"]

    @property
    def work(self) -> Path:
        return ROOT / "outputs" / self.run / "cluster"

    def save(self):
        with self.lock:
            write_text_atomic(self.work / "state.json", json.dumps(self.state, indent=1))

    def load(self, run: str):
        path = ROOT / "outputs" / check_run_name(run) / "cluster" / "state.json"
        if not path.exists():
            raise DriverError(f"{path}: no such run (start one with `bash launch/vast_cluster.sh run`)")
        self.state = json.loads(path.read_text())
        log.open(self.work / "driver.log")

    @property
    def provider(self) -> Provider:
        if self.provider_ is None:
            self.provider_ = Provider()
        return self.provider_

    def live_ids(self) -> list[int]:
        return [i["id"] for i in self.state.get("instances", []) if not i.get("destroyed")]

    def node_ids(self) -> list[int]:
        return [i["id"] for i in self.state.get("instances", [])]

    # --- ssh ----------------------------------------------------------------------------------------
    def ssh_run(self, node: int, command: str, stdin: bytes | None = None, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess:
        """`command` on node `node` (its own session: a Ctrl-C on the terminal reaches the driver, not ssh)."""
        argv = [self.ssh, "-F", str(self.work / "ssh_config"), f"node{node}", command]
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True)
        self.children.add(child)
        try:
            out, err = child.communicate(stdin if stdin is not None else b"", timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise DriverError(f"node{node}: ssh timed out after {timeout:.0f}s") from None
        finally:
            self.children.discard(child)
        proc = subprocess.CompletedProcess(argv, child.returncode, out, err)
        if check and proc.returncode != 0:
            error = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-1500:]
            raise DriverError(f"node{node}: `{command[:120]}` exited {proc.returncode}: {error}")
        return proc

    def in_dir(self, command: str) -> str:
        return f"cd {shlex.quote(self.state['remote_dir'])} && {command}"

    def agent(self, node: int, *args: str, timeout: float = 120) -> dict:
        command = self.in_dir("python3 launch/vast_node.py " + " ".join(shlex.quote(a) for a in args))
        out = self.ssh_run(node, command, timeout=timeout).stdout.decode(errors="replace").strip()
        try:
            return json.loads(out.splitlines()[-1])
        except (ValueError, IndexError):
            raise DriverError(f"node{node}: launch/vast_node.py {args[0]} printed no JSON: {out[-300:]!r}") from None

    # --- up -----------------------------------------------------------------------------------------
    def new_state(self):
        a = self.args
        for name, value in (("--nodes", a.nodes), ("--gpus", a.gpus), ("--disk", a.disk), ("--timeout", a.timeout)):
            if value < 1:
                raise UnsafeInput(f"{name} must be a whole number >= 1, got {value}")
        run = check_run_name(a.run) if a.run else None
        resume = self.check_resume(a.resume) if a.resume else None
        if run is None:
            run = resume[0] if resume else new_run_name()
        check_conf(a.conf)
        if not re.match(r"^[A-Za-z0-9_]{1,40}$", a.gpu_name):
            raise UnsafeInput(f"--gpu-name {a.gpu_name!r}: a vast.ai gpu_name such as H100_SXM or RTX_4090")
        if not (ROOT / "conf" / f"{a.conf}.yaml").exists():
            raise UnsafeInput(f"--conf {a.conf!r}: no conf/{a.conf}.yaml")
        overrides = [check_override(o) for o in a.overrides]
        for o in overrides:
            if o.split("=", 1)[0].lstrip("+~") in ("run_dir", "resume"):
                raise UnsafeInput(f"override {o!r}: the driver sets run_dir and resume itself")
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
        if listed.returncode != 0 or not listed.stdout.strip():
            raise DriverError(f"{ROOT} is not a git checkout: the nodes get the git-tracked files only "
                              f"({listed.stderr.strip()[:200]})")
        key = Path(os.path.expanduser(a.ssh_key)).resolve()
        if any(c.isspace() for c in str(key)):
            raise UnsafeInput(f"--ssh-key {a.ssh_key!r}: a path without spaces, please")
        state_path = ROOT / "outputs" / run / "cluster" / "state.json"
        if state_path.exists():
            old = json.loads(state_path.read_text())
            left = [i["id"] for i in old.get("instances", []) if not i.get("destroyed")]
            if left:
                raise DriverError(f"run {run} still has instances {left}: `bash launch/vast_cluster.sh down --run "
                                  f"{run}` first")
            os.replace(state_path, state_path.with_name(f"state.{int(time.time())}.json"))
        self.state = {"run": run, "phase": "new", "conf": a.conf, "overrides": overrides, "nodes": a.nodes,
                      "gpus": a.gpus, "gpu_name": a.gpu_name, "image": a.image, "disk": a.disk,
                      "remote_dir": a.remote_dir, "ssh_key": str(key), "net_dev": a.net_dev,
                      "max_hours": a.max_hours, "max_usd": a.max_usd, "resume": resume[1] if resume else None,
                      "overlay": None, "creating": [], "instances": [], "fetched": None, "created_at": time.time()}
        self.work.mkdir(parents=True, exist_ok=True)
        log.open(self.work / "driver.log")
        self.save()

    def check_resume(self, path: str) -> tuple[str, str]:
        """(run name, tag) of a verified checkpoint on this machine, or an error before anything is rented."""
        resolved = (ROOT / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
        if resolved.parent != (ROOT / "outputs").resolve():
            raise UnsafeInput(f"--resume {path!r}: expected outputs/RUN")
        run = check_run_name(resolved.name)
        latest = resolved / "checkpoints" / "latest"
        if not latest.is_file():
            raise DriverError(f"--resume {path}: no checkpoints/latest (fetch it first: `bash launch/vast_cluster.sh "
                              f"fetch --run {run}`)")
        tag = latest.read_text().strip()
        if not SAFE_NAME.match(tag):
            raise DriverError(f"{latest}: names {tag!r}, not a checkpoint")
        try:
            verify(resolved / "checkpoints" / tag)
        except ChecksumError as e:
            raise DriverError(f"--resume {path}: checkpoint {tag} is not complete: {e}") from None
        return run, tag

    def up(self):
        a, run = self.args, self.run
        self.state["phase"] = "renting"
        self.save()
        mine = [r for r in self.provider.instances() if r.get("label") == run]
        if mine:
            raise DriverError(f"instances {[r.get('id') for r in mine]} already carry the label {run!r}: refusing to "
                              "rent more under it (pick another --run, or tear those down)")
        offers = self.provider.search_offers(a.gpus, a.gpu_name, a.max_dph)
        cluster_id, total, picked = pick_offers(offers, a.nodes)
        self.state.update(cluster_id=cluster_id, total_dph=round(total, 4), offers=[o["id"] for o in picked])
        self.save()
        log(f"cluster {cluster_id}: {a.nodes} x {a.gpus} {a.gpu_name}, offers {self.state['offers']}")
        log(f"total cost: ${total:.4f}/h for {a.nodes} nodes ({a.nodes * a.gpus} GPUs), from now until `down`",
            out=True)
        self.state["attempted"] = True   # from here on, teardown also sweeps by label
        self.save()
        self.provider.create_overlay(cluster_id, run)
        self.state["overlay"] = {"name": run, "cluster_id": cluster_id, "deleted": False}
        self.save()
        forwarded = {k: os.environ[k] for k in FORWARDED_SECRETS if os.environ.get(k)}  # e.g. wandb's key
        for offer in picked:
            self.state["creating"].append(offer["id"])   # sent, reply not yet read: teardown sweeps by label
            self.save()
            try:
                new_id = self.provider.create_instance(offer["id"], a.image, a.disk, run, run, secrets=forwarded)
            except VastError as e:
                if e.answered:   # refused: nothing was created
                    self.state["creating"].remove(offer["id"])
                    self.save()
                raise
            self.state["instances"].append({"id": new_id, "offer": offer["id"], "destroyed": False})
            self.state["creating"].remove(offer["id"])
            self.save()
            log(f"created instance {new_id} from offer {offer['id']}")
        self.wait_for_nodes()
        self.prepare_nodes()
        self.state["phase"] = "up"
        self.save()

    def wait_for_nodes(self):
        ids = self.node_ids()
        deadline = time.time() + self.args.timeout
        while True:
            rows = {r.get("id"): r for r in self.provider.instances()}
            states = {i: (rows.get(i) or {}).get("actual_status") or "missing" for i in ids}
            if all(s == "running" for s in states.values()):
                break
            if time.time() > deadline:
                raise DriverError(f"timed out after {self.args.timeout}s waiting for instances to run: {states}")
            log(f"waiting for instances: {states}")
            time.sleep(self.args.poll)
        try:
            nodes = cluster.nodes_from_vast([rows[i] for i in ids], ids=ids)
        except cluster.ClusterError as e:
            raise DriverError(str(e)) from None
        self.state["hosts"] = [{"id": i, "host": n.host, "port": n.port, "slots": n.slots} for i, n in zip(ids, nodes)]
        self.save()
        cluster.write(nodes, self.work, self.state["ssh_key"], known_hosts=str(self.work / "known_hosts"))
        last_error = {}
        for k in range(len(ids)):
            while True:
                proc = self.ssh_run(k, "true", timeout=60, check=False)
                if proc.returncode == 0:
                    break
                last_error[k] = proc.stderr.decode(errors="replace").strip()[-500:]
                if time.time() > deadline:
                    raise DriverError(f"timed out after {self.args.timeout}s waiting for ssh to node{k} "
                                      f"(instance {ids[k]}); last ssh error: {last_error[k] or proc.returncode}")
                log(f"waiting for ssh to node{k}")
                time.sleep(self.args.poll)
        self.state["master_addr"] = self.master_address()
        self.save()
        log(f"master address {self.state['master_addr']} (node0's {self.state['net_dev']})")

    def master_address(self) -> str:
        dev = self.state["net_dev"]
        code = ("import fcntl,socket,struct,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"  # SIOCGIFADDR
                "a=fcntl.ioctl(s.fileno(),0x8915,struct.pack('256s',sys.argv[1].encode()[:15]));"
                "print(socket.inet_ntoa(a[20:24]))")
        out = self.ssh_run(0, f"python3 -c {shlex.quote(code)} {shlex.quote(dev)}").stdout.decode().strip()
        try:
            return cluster.check_host("node0", dev, out.splitlines()[-1])
        except (cluster.ClusterError, IndexError):
            raise DriverError(f"node0: could not read the address of {dev}: {out[-200:]!r}") from None

    def project_tar(self) -> bytes:
        """The git-tracked files only, as they are in the working tree: untracked files (.env, keys,
        outputs) never leave this machine."""
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name in sorted(n for n in listed.decode().split("\0") if n):
                path = ROOT / name
                if path.is_file() and not path.is_symlink():
                    tar.add(path, arcname=name, recursive=False)
        return buffer.getvalue()

    def setup_command(self) -> str:
        if self.args.node_setup:
            return self.args.node_setup
        data = " ".join(shlex.quote(o) for o in self.state["overrides"] if o.startswith(("data.", "data=")))
        setup_log = f"outputs/{self.run}/cluster/setup.log"
        return (f"mkdir -p outputs/{self.run}/cluster && {{ make setup && .venv/bin/python launch/prepare.py "
                f"conf={self.state['conf']} {data} && {{ command -v pdsh || {{ apt-get update -qq && "
                f"apt-get install -y -qq pdsh; }}; }}; }} > {setup_log} 2>&1 || {{ tail -n 30 {setup_log}; exit 1; }}")

    def prepare_nodes(self):
        run, count = self.run, len(self.node_ids())
        key = self.work / f"{run}_key"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", run, "-f", str(key)], check=True,
                           capture_output=True, start_new_session=True)
        public = (self.work / f"{run}_key.pub").read_bytes()
        project = self.project_tar()
        remote = shlex.quote(self.state["remote_dir"])
        setup = self.setup_command()

        def one(k: int):
            self.ssh_run(k, "mkdir -p ~/.ssh && chmod 700 ~/.ssh && cat >> ~/.ssh/authorized_keys", stdin=public)
            self.ssh_run(k, f"mkdir -p {remote} && tar -xf - -C {remote}", stdin=project)
            self.ssh_run(k, self.in_dir(setup), timeout=3 * 3600)
            log(f"node{k}: code, set-up and data ready")

        self.parallel(one, range(count))
        rows = {r.get("id"): r for r in self.provider.instances()}
        nodes = cluster.nodes_from_vast([rows[i] for i in self.node_ids()], ids=self.node_ids())
        head = self.work / "head"
        files = cluster.write(nodes, head, f"~/.ssh/{run}_key", self.state["master_addr"],
                              pythonpath=self.state["remote_dir"], known_hosts=f"~/.ssh/{run}_known_hosts")
        check_env(dict(line.split("=", 1) for line in files[".deepspeed_env"].read_text().splitlines()))
        bundle = io.BytesIO()
        with tarfile.open(fileobj=bundle, mode="w") as tar:
            tar.add(key, arcname=f"{run}_key")
            tar.add(files["ssh_config"], arcname=f"{run}_config")
        self.ssh_run(0, f"tar -xf - -C ~/.ssh && chmod 600 ~/.ssh/{run}_key ~/.ssh/{run}_config",
                     stdin=bundle.getvalue())
        bundle = io.BytesIO()
        with tarfile.open(fileobj=bundle, mode="w") as tar:
            tar.add(files["hostfile"], arcname="hostfile")
            tar.add(files[".deepspeed_env"], arcname=".deepspeed_env")
        self.ssh_run(0, self.in_dir("tar -xf -"), stdin=bundle.getvalue())
        if self.state.get("resume"):
            self.upload_checkpoint()

    def upload_checkpoint(self):
        """Every file of the checkpoint to every node: the trainer converts it for this world size on each
        node, which needs all of it."""
        tag = self.state["resume"]
        source = ROOT / "outputs" / self.run / "checkpoints"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(source / tag, arcname=tag)
            tar.add(source / "latest", arcname="latest")
        data = buffer.getvalue()
        target = f"outputs/{self.run}/checkpoints"

        def one(k: int):
            self.ssh_run(k, self.in_dir(f"mkdir -p {target} && tar -xf - -C {target}"), stdin=data, timeout=3600)
            log(f"node{k}: checkpoint {tag} uploaded")

        self.parallel(one, range(len(self.node_ids())))

    def parallel(self, fn, items):
        """fn(k) for every node at once; every node's error is reported. On a signal the teardown starts
        at once: the pool is not waited for (a node's `make setup` can take minutes)."""
        pool = ThreadPoolExecutor(max_workers=8)
        try:
            futures = [pool.submit(fn, k) for k in items]
            errors = []
            for future in futures:
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
            if errors:
                raise DriverError("; ".join(str(e) for e in errors))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- train ----------------------------------------------------------------------------------------
    def train_command(self) -> str:
        """The command node0 runs detached. Overrides are quoted for pdsh's remote shell (inner) and for
        node0's shell (outer); check_override already refused what no quoting makes safe."""
        s = self.state
        inner = [f"conf={s['conf']}", f"run_dir=outputs/{self.run}", f"train.cost_per_hour={s['total_dph']}",
                 "resume=auto", *s["overrides"]]
        args = " ".join(shlex.quote(shlex.quote(o)) for o in inner)
        return (f'export PDSH_SSH_ARGS_APPEND="-F $HOME/.ssh/{self.run}_config"\n'
                f".venv/bin/deepspeed --hostfile hostfile --launcher pdsh --no_ssh_check "
                f"--master_addr {s['master_addr']} launch/train.py {args}\n")

    def train(self):
        command = self.train_command()
        path = f"outputs/{self.run}/cluster/train.cmd"
        self.ssh_run(0, self.in_dir(f"mkdir -p outputs/{self.run}/cluster && cat > {path}"), stdin=command.encode())
        self.state.update(phase="training", train_started=time.time())   # before: a signal now still fetches
        self.save()
        started = self.agent(0, "start", "--run", self.run, "--cmd-file", path)
        log(f"training started on node0 (pid {started.get('pid')}), detached: it goes on without this terminal")
        if self.state.get("max_hours") or self.state.get("max_usd"):
            cap = ["--started", str(self.state["created_at"]), "--usd-per-hour", str(self.state["total_dph"]),
                   "--grace", str(self.args.cap_grace), "--wait", str(self.args.stop_wait),
                   "--poll", str(min(30.0, self.args.poll))]
            for flag, key in (("--max-hours", "max_hours"), ("--max-usd", "max_usd")):
                if self.state.get(key):
                    cap += [flag, str(self.state[key])]
            api = os.environ.get("VAST_URL")
            if api:
                cap += ["--api-url", api]
            for k in range(len(self.node_ids())):
                self.agent(k, "watchdog", "--run", self.run, *cap, "--detach")
            log(f"budget cap on every node: {self.cap_text()}; at the cap the nodes save, then stop (not "
                "destroy) their instances")

    def cap_text(self) -> str:
        """'2.0 h or $50.0', or '' without a cap."""
        parts = [f"{self.state['max_hours']} h" if self.state.get("max_hours") else None,
                 f"${self.state['max_usd']}" if self.state.get("max_usd") else None]
        return " or ".join(p for p in parts if p)

    # --- follow, status, logs -----------------------------------------------------------------------------
    def follow(self, fetch: bool = True, print_log: bool = True, owner: bool = True) -> dict:
        """Until training ends on node0: print its log, fetch each new checkpoint. Signals: for the run
        that owns the nodes (`owner`), the first asks the ranks to stop, the second ends the wait; for a
        reader (`logs -f`), a signal only ends the reading."""
        self.signals.mode = "follow" if owner else "unwind"
        offset, stop_sent, stop_deadline = self.state.get("log_offset", 0), False, None
        last: dict = {}
        while True:
            if self.signals.count >= 1 and not stop_sent:
                self.stop_ranks()
                stop_sent, stop_deadline = True, time.time() + self.args.stop_wait
            if self.signals.count >= 2 or (stop_deadline and time.time() > stop_deadline):
                log("not waiting for the final checkpoint; fetching what the nodes hold")
                return last
            try:
                last = self.agent(0, "status", "--run", self.run, "--log-from", str(offset), timeout=60)
            except DriverError as e:
                if self.node0_stopped():
                    log("node0's instance is stopped (the budget cap, or stopped by hand): not following any more")
                    return {"running": False, "stopped": True, "cap": last.get("cap")}
                log(f"status: {e} (retrying)")
                time.sleep(self.args.poll)
                continue
            if last.get("log") and print_log:
                for line in last["log"].splitlines():
                    log(line, out=True)
            offset = last.get("log_end", offset)
            self.state["log_offset"] = offset
            if last.get("latest"):
                self.state["seen_latest"] = last["latest"]
            newest = last.get("latest")
            if fetch and newest and newest not in ((self.state.get("fetched") or {}).get("tag"),
                                                   self.state.get("fetch_failed")):
                self.fetch()   # a failed tag is retried at the next checkpoint and before the teardown
            if not last.get("running"):
                return last
            time.sleep(self.args.poll)

    def node0_stopped(self) -> bool:
        try:
            rows = {r.get("id"): r.get("actual_status") for r in self.provider.instances()}
        except VastError:
            return False
        return rows.get(self.node_ids()[0]) not in ("running", "loading", None)

    def stop_ranks(self):
        for k in range(len(self.node_ids())):
            try:
                result = self.agent(k, "stop", "--run", self.run)
                log(f"node{k}: SIGTERM to ranks {result.get('signalled')}")
            except DriverError as e:
                log(f"node{k}: could not signal the ranks: {e}")

    def status(self) -> int:
        s = self.state
        print(f"run {self.run}: phase {s.get('phase')}, instances {self.live_ids()}, ${s.get('total_dph', 0)}/h")
        spent_h = (time.time() - s.get("created_at", time.time())) / 3600
        print(f"elapsed {spent_h:.2f} h since renting, spent about ${spent_h * s.get('total_dph', 0):.2f}")
        fetched = (s.get("fetched") or {}).get("tag")
        print(f"fetched and verified here: {fetched or 'nothing yet'}")
        if s.get("phase") not in ("training", "stopping"):
            return 0
        try:
            st = self.agent(0, "status", "--run", self.run, "--log-from", str(1 << 60))
        except DriverError as e:
            print(f"node0 unreachable: {e}")
            try:
                rows = {r.get("id"): r.get("actual_status") for r in self.provider.instances()}
            except VastError as error:
                print(f"the provider could not be asked either: {error}")
                return 1
            states = {i: rows.get(i, "gone") for i in self.live_ids()}
            print(f"instances: {states}")
            if "stopped" in states.values():
                print(f"stopped instances (the budget cap, or by hand) keep billing their disks. Destroy them with: "
                      f"bash launch/vast_cluster.sh down --run {self.run} --force  (or start them with "
                      f"`vastai start instance ID`, then fetch and down)")
            return 1
        m = st.get("metrics") or {}
        state = "running" if st.get("running") else f"ended (exit {st.get('exit')})"
        print(f"training {state}; latest checkpoint on the nodes: {st.get('latest') or 'none'}")
        if m:
            started = st.get("started") or time.time()
            elapsed = time.time() - started
            eta = ""
            if st.get("max_steps") and m.get("step"):
                rate = m["step"] / max(elapsed, 1e-9)
                eta = f", ETA {(st['max_steps'] - m['step']) / rate / 60:.1f} min" if rate > 0 else ""
            print(f"step {m.get('step')}, loss {m.get('loss'):.4f}, tokens/s {m.get('tokens_per_s', 0):.0f}, "
                  f"training for {elapsed / 60:.1f} min{eta}")
        if st.get("cap"):
            print(f"budget cap reached: {json.dumps(st['cap'])}")
            print(f"the instances are stopped, not destroyed: their disks still bill. Destroy them with: "
                  f"bash launch/vast_cluster.sh down --run {self.run} --force")
        return 0

    def logs(self) -> int:
        if not self.args.follow:
            st = self.agent(0, "status", "--run", self.run, "--log-from", "0")
            sys.stdout.write(st.get("log", ""))
            return 0
        self.state["log_offset"] = 0
        last = self.follow(fetch=False, owner=False)
        return 0 if last.get("exit") in (0, None) else 1

    # --- fetch ------------------------------------------------------------------------------------------
    def fetch(self) -> bool:
        """The newest checkpoint from every node into outputs/RUN/checkpoints, verified. True when the
        newest checkpoint the nodes hold is here and complete (or none exists yet)."""
        count = len(self.node_ids())
        local = ROOT / "outputs" / self.run / "checkpoints"
        latest, failed = {}, []
        for k in range(count):   # a node's `latest` moves only once every node has written that checkpoint
            try:
                latest[k] = self.with_retries(f"node{k}: latest", lambda k=k: self.latest_on(k))
            except DriverError as e:
                failed.append(k)
                log(f"node{k}: {e}; going on with the other nodes")
        known = sorted({t for t in latest.values() if t})
        if not known:
            if not failed:
                log("no checkpoint on the nodes yet")
            return not failed
        tag = known[-1]
        already = (self.state.get("fetched") or {}).get("tag") == tag
        for k in range(count):
            if k in failed or already:
                continue
            try:
                self.with_retries(f"node{k}: fetch {tag}", lambda k=k: self.fetch_node(k, tag, local))
            except DriverError as e:
                failed.append(k)
                log(f"node{k}: fetching {tag} failed: {e}; going on with the other nodes")
        try:
            verify(local / tag)
        except ChecksumError as e:
            log(f"checkpoint {tag} is not complete here: {e}" + (f" (nodes {failed} failed)" if failed else ""))
            self.state["fetch_failed"] = tag
            self.save()
            return False
        write_text_atomic(local / "latest", tag)
        self.state["fetched"] = {"tag": tag, "verified": True, "at": time.time()}
        self.save()
        log(f"checkpoint {tag} fetched from {count} nodes and verified: outputs/{self.run}/checkpoints/{tag}")
        if self.state.get("max_hours") or self.state.get("max_usd"):   # the watchdogs wait for this
            for k in range(count):
                try:
                    self.agent(k, "fetched", "--run", self.run, "--tag", tag)
                except DriverError:
                    pass
        return not failed

    def with_retries(self, what: str, fn):
        delay = self.args.fetch_backoff
        for attempt in range(1, self.args.fetch_attempts + 1):
            try:
                return fn()
            except DriverError as e:
                if attempt == self.args.fetch_attempts:
                    raise
                log(f"{what}: attempt {attempt} failed ({str(e)[:200]}); retrying in {delay:.1f}s")
                time.sleep(delay)
                delay *= 2

    def latest_on(self, k: int) -> str | None:
        out = self.ssh_run(k, self.in_dir(f"cat outputs/{self.run}/checkpoints/latest 2>/dev/null || true"))
        tag = out.stdout.decode(errors="replace").strip()
        if tag and not TAG.match(tag):
            raise DriverError(f"node{k}: its checkpoints/latest names {tag[:80]!r}, not a checkpoint")
        return tag or None

    def fetch_node(self, k: int, tag: str, local: Path) -> None:
        """Node k's share of checkpoint `tag`, by tar over ssh (the image need not have rsync), into
        local/TAG. Every member is checked: regular files with checkpoint-like names directly inside
        `tag/` are taken, sub-folders skipped, anything else (a link, a path outside) refused."""
        staging = self.work / "incoming" / f"node{k}"
        if staging.exists():
            for p in staging.iterdir():
                p.unlink()
        staging.mkdir(parents=True, exist_ok=True)
        remote = f"tar -cf - -C outputs/{self.run}/checkpoints {tag}"
        argv = [self.ssh, "-F", str(self.work / "ssh_config"), f"node{k}", self.in_dir(remote)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        received = []
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    parts = member.name.rstrip("/").split("/")
                    if parts[0] == tag and ".." not in parts and (member.isdir() or len(parts) > 2):
                        continue   # sub-folders (a universal/ conversion made on the node) stay there
                    if not (member.isfile() and len(parts) == 2 and parts[0] == tag and SAFE_NAME.match(parts[1])):
                        raise DriverError(f"node{k}: unexpected entry {member.name!r} in the checkpoint archive")
                    with tar.extractfile(member) as source, open(staging / parts[1], "wb") as target:
                        while block := source.read(1 << 20):
                            target.write(block)
                    received.append(parts[1])
        except tarfile.TarError as e:
            proc.kill()
            proc.wait()
            raise DriverError(f"node{k}: {proc.stderr.read().decode(errors='replace').strip()[-500:] or e}") from None
        finally:
            proc.stdout.close()
        code = proc.wait()
        error = proc.stderr.read().decode(errors="replace").strip()[-500:]
        proc.stderr.close()
        if code != 0:
            raise DriverError(f"node{k}: tar over ssh exited {code}: {error}")
        target_dir = local / tag
        target_dir.mkdir(parents=True, exist_ok=True)
        meta = staging / META
        if meta.exists() and (target_dir / META).exists() and meta.read_bytes() != (target_dir / META).read_bytes():
            raise DriverError(f"node{k}: its {tag}/{META} differs from another node's")
        for name in received:
            os.replace(staging / name, target_dir / name)
        log(f"node{k}: {tag}: {len(received)} files")

    # --- down -----------------------------------------------------------------------------------------
    def down(self, force: bool) -> int:
        """Fetch and verify the newest checkpoint, then destroy every instance of the run (by id and by
        label), delete the overlay and the per-run key. Refuses to destroy unfetched checkpoints unless
        forced. Returns the exit code: 0, 4 (refused: nodes kept) or 3 (some instance survives)."""
        self.signals.mode = "cleanup"
        if self.state.get("phase") in ("training", "stopping") and self.live_ids():
            if not self.fetch():
                if not force:
                    ids = self.live_ids()
                    log(f"NOT destroying instances {ids}: the newest checkpoint on the nodes is not fetched and "
                        f"verified here (they keep billing). Retry: bash launch/vast_cluster.sh fetch --run "
                        f"{self.run}; or destroy anyway: bash launch/vast_cluster.sh down --run {self.run} --force")
                    return 4
                log("destroying without the newest checkpoint (--force)")
        return self.destroy_all()

    def destroy_all(self) -> int:
        self.signals.mode = "cleanup"
        if not self.state.get("attempted"):
            self.state["phase"] = "down"
            self.save()
            return 0   # nothing was rented (and instances of someone else's run are not ours to sweep)
        self.state["phase"] = "down"
        self.save()
        run = self.run
        deadline = time.time() + self.args.destroy_retry
        delay = min(1.0, self.args.poll * 3)
        # creates sent whose reply never came (Ctrl-C, a dropped connection): the instance may exist anyway;
        # sweep by label until each has shown up or a minute has passed
        unanswered = len(self.state.get("creating", []))
        late_deadline = time.time() + min(self.args.destroy_retry, 60.0)
        survivors: set[int] = set()
        while True:
            try:
                listed_ok = self.sweep()
            except Exception as e:  # noqa: BLE001 - nothing may end the teardown early; retried below
                log(f"teardown: {type(e).__name__}: {e} (retrying)")
                listed_ok = False
            survivors = set(self.live_ids())
            found_late = sum(1 for i in self.state["instances"] if i.get("by_label"))
            waiting_late = found_late < unanswered and time.time() < late_deadline
            if not survivors and listed_ok and not waiting_late:
                break
            if time.time() > deadline:
                break
            time.sleep(min(delay, max(0.0, deadline - time.time())))
            delay = min(delay * 2, 30)
        overlay = self.state.get("overlay")
        if overlay and not overlay.get("deleted"):
            for _attempt in range(3):
                try:
                    self.provider.delete_overlay(overlay["name"])
                    overlay["deleted"] = True
                    self.save()
                    log(f"deleted overlay {overlay['name']}")
                    break
                except VastError as e:
                    log(f"delete overlay {overlay['name']}: {e}")
                    time.sleep(min(delay, 5))
        for suffix in ("_key", "_key.pub"):
            (self.work / f"{run}{suffix}").unlink(missing_ok=True)
        for child in list(self.children):   # ssh sessions to destroyed nodes (a set-up a signal cut short)
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except OSError:
                pass
        if survivors:
            ids = " ".join(str(i) for i in sorted(survivors))
            log(f"FAILED to destroy instances {ids}: they are still billing. Run: bash launch/vast_cluster.sh down "
                f"--run {run}   (or: " + "; ".join(f"vastai destroy instance {i} -y" for i in sorted(survivors)) + ")")
            return 3
        if overlay and not overlay.get("deleted"):
            log(f"the overlay {overlay['name']} was not deleted: bash launch/vast_cluster.sh down --run {run}")
            return 3
        log(f"every instance of run {run} is destroyed")
        return 0

    def sweep(self) -> bool:
        """One round: destroy every live id of the state and every instance labelled with the run (those
        are added to the state first). Returns whether the provider's list could be read."""
        run = self.run
        try:
            listed = self.provider.instances()
        except VastError as e:
            log(f"listing instances failed: {e}")
            listed = None
        labelled = set()
        for row in listed or []:
            if row.get("label") == run:
                try:
                    labelled.add(instance_id(row.get("id")))
                except UnsafeInput as e:
                    log(f"an instance labelled {run} has no usable id ({e}): check the vast.ai console")
        for i in sorted(labelled - set(self.node_ids())):
            self.state["instances"].append({"id": i, "offer": None, "destroyed": False, "by_label": True})
            self.save()
            log(f"instance {i} carries this run's label but was not recorded (a create whose reply was lost): "
                "destroying it too")
        present = None if listed is None else {r.get("id") for r in listed}
        for i in sorted(set(self.live_ids()) | labelled):
            if present is not None and i not in present:
                self.mark_destroyed(i)   # gone already
                continue
            try:
                self.provider.destroy_instance(i)
                self.mark_destroyed(i)
                log(f"destroyed instance {i}")
            except VastError as e:
                log(f"destroy {i}: {e}")
        return listed is not None

    def end_at_cap(self, last: dict) -> int:
        """Training ended on the nodes' own decision (the budget cap). The watchdogs stop their instances
        once this laptop marks the newest checkpoint fetched; then the stopped instances are destroyed."""
        log(f"the nodes stopped training themselves (budget cap {self.cap_text() or '?'}): they saved a checkpoint "
            "and stop their instances once it is fetched")
        self.signals.mode = "cleanup"
        if not last.get("stopped") and self.fetch():   # training has ended: nothing newer can come
            self.wait_stopped(self.args.cap_grace + 60)
            return self.destroy_all()
        # node0 is unreachable (stopped): its watchdog stopped it only once the newest was marked fetched
        fetched = (self.state.get("fetched") or {}).get("tag")
        seen, failed = self.state.get("seen_latest"), self.state.get("fetch_failed")
        if fetched and fetched >= (seen or "") and not (failed and failed > fetched):
            self.wait_stopped(self.args.cap_grace + 60)
            return self.destroy_all()
        log(f"instances {self.live_ids()} are stopped, not destroyed (their disks still bill), and their newest "
            f"checkpoint may not be here: start them (vastai start instance ID), then bash launch/vast_cluster.sh "
            f"fetch --run {self.run}; or destroy them: bash launch/vast_cluster.sh down --run {self.run} --force")
        return 4

    def wait_stopped(self, seconds: float):
        """After the budget cap: the nodes stop themselves once the checkpoint is fetched; wait for that, so
        a run that hit its cap is seen to stop itself, then the teardown destroys the stopped instances."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                rows = {r.get("id"): r.get("actual_status") for r in self.provider.instances()}
            except VastError:
                rows = {}
            if all(rows.get(i) in ("stopped", "exited", None) for i in self.live_ids()):
                log(f"instances {self.live_ids()} stopped themselves at the budget cap")
                return
            time.sleep(self.args.poll)
        log("the nodes did not stop themselves in time (see outputs/RUN/cluster/watchdog.log on a node)")

    def mark_destroyed(self, inst: int):
        for entry in self.state["instances"]:
            if entry["id"] == inst:
                entry["destroyed"] = True
        self.save()


def run_all(driver: Driver, signals: Signals) -> int:
    """up, train, follow, fetch, down: the teardown runs whatever happened before it."""
    a = driver.args
    code = 0
    try:
        driver.up()
        driver.train()
        if a.detach:
            r = driver.run
            log(f"detached: the nodes train on. Watch: bash launch/vast_cluster.sh status --run {r}  |  "
                f"bash launch/vast_cluster.sh logs -f --run {r}", out=True)
            log(f"fetch checkpoints: bash launch/vast_cluster.sh fetch --run {r}  |  tear down (fetches first): "
                f"bash launch/vast_cluster.sh down --run {r}", out=True)
            return 0
        last = driver.follow()
        if last.get("cap") or last.get("stopped"):
            return driver.end_at_cap(last)
        if signals.count == 0 and last.get("exit") not in (0, None):
            log(f"training failed on node0 (exit {last.get('exit')}); the checkpoints so far are fetched before "
                "the nodes are destroyed")
            code = 1
        elif signals.count:
            code = signals.exit_code
    except Interrupted:
        code = signals.exit_code
    except (DriverError, VastError, UnsafeInput, cluster.ClusterError, ChecksumError, OSError,
            subprocess.SubprocessError) as e:
        signals.mode = "cleanup"
        log(f"error: {e}")
        code = 1
    signals.mode = "cleanup"
    down = driver.down(force=signals.count >= 2)
    if driver.state.get("fetched"):
        log(f"newest checkpoint here: outputs/{driver.run}/checkpoints/{driver.state['fetched']['tag']}")
    return down if down else code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = parse_args(argv)
    args.overrides = args.overrides + overrides
    signals = Signals()
    signals.install()
    driver = Driver(args, signals)
    try:
        if args.command in ("run", "up"):
            driver.new_state()   # refuses a run name whose instances are not all destroyed
            if args.dry_run:
                log(f"dry run: would search `cluster_id!=None num_gpus={args.gpus} gpu_name={args.gpu_name} "
                    f"dph_total<={args.max_dph}`, rent {args.nodes} nodes as {driver.run}, train conf={args.conf} "
                    f"{' '.join(args.overrides)}", out=True)
                return 0
            if args.command == "run":
                return run_all(driver, signals)
            try:
                driver.up()
                return 0
            except Interrupted:
                return driver.destroy_all() or signals.exit_code
            except (DriverError, VastError, cluster.ClusterError) as e:
                log(f"error: {e}")
                return driver.destroy_all() or 1
        if not args.run:
            raise UnsafeInput(f"{args.command} needs --run NAME")
        driver.load(args.run)
        if args.command == "train":
            driver.train()
            return 0
        if args.command == "status":
            return driver.status()
        if args.command == "logs":
            return driver.logs()
        if args.command == "fetch":
            return 0 if driver.fetch() else 1
        if args.command == "down":
            return driver.down(args.force)
    except (UnsafeInput, DriverError, VastError, cluster.ClusterError) as e:
        log(f"error: {e}")
        return 2 if isinstance(e, UnsafeInput) else 1
    except Interrupted:
        return signals.exit_code
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        log.flush()   # a line a signal handler logged during the last write
    sys.exit(code)
