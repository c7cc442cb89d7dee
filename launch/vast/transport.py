"""How the laptop reaches the nodes: ssh sessions, tar in both directions, and the console every
line goes through (with control characters escaped: node logs and provider answers are untrusted)."""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

from launch.vast.checks import printable
from launch.vast.state import DriverError

NODE_SCRIPT = "launch/vast/node.py"


class Console:
    """Every line goes to outputs/RUN/cluster/driver.log and, while it can, to stderr (or stdout). A
    closed terminal (EPIPE, EIO) turns the terminal half off; it never raises, so it cannot cut a
    teardown short. A line logged by a signal handler while this thread writes waits for that write
    (writing at once would re-enter the same buffered file, which raises)."""

    def __init__(self):
        self.file = None
        self.terminal = True
        self.lock = threading.RLock()
        self.busy = False
        self.pending: list[tuple[str, bool]] = []

    def open(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.file is None or self.file.name != str(path):
            self.file = open(path, "a", buffering=1)

    def __call__(self, text: str, out: bool = False):
        text = printable(text)
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


class Transport:
    """ssh to `nodeK` through the run's ssh config, in the code's folder on the node. Every session
    runs in its own process group: a Ctrl-C on the terminal reaches the driver, not ssh."""

    def __init__(self, work: Path, remote_dir: str):
        self.work = work
        self.remote_dir = remote_dir
        self.ssh = os.environ.get("SSH", "ssh")
        self.children: set[subprocess.Popen] = set()

    def argv(self, node: int, command: str) -> list[str]:
        return [self.ssh, "-F", str(self.work / "ssh_config"), f"node{node}", command]

    def in_dir(self, command: str) -> str:
        return f"cd {shlex.quote(self.remote_dir)} && {command}"

    def popen(self, node: int, command: str, **kwargs) -> subprocess.Popen:
        try:
            child = subprocess.Popen(self.argv(node, command), start_new_session=True, **kwargs)
        except OSError as e:   # no ssh binary, no such file: a failed step like any other
            raise DriverError(f"node{node}: cannot run {self.ssh!r}: {e.strerror or e}") from None
        self.children.add(child)
        return child

    def run(self, node: int, command: str, stdin: bytes | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
        child = self.popen(node, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = child.communicate(stdin if stdin is not None else b"", timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise DriverError(f"node{node}: ssh timed out after {timeout:.0f}s") from None
        finally:
            self.children.discard(child)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
        if check and proc.returncode != 0:
            error = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-1500:]
            raise DriverError(f"node{node}: `{command[:120]}` exited {proc.returncode}: {error}")
        return proc

    def agent(self, node: int, *args: str, timeout: float = 120) -> dict:
        """launch/vast/node.py on the node: one JSON line back."""
        command = self.in_dir(f"python3 {NODE_SCRIPT} " + " ".join(shlex.quote(a) for a in args))
        out = self.run(node, command, timeout=timeout).stdout.decode(errors="replace").strip()
        try:
            reply = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError):
            reply = None
        if not isinstance(reply, dict):
            raise DriverError(f"node{node}: {NODE_SCRIPT} {args[0]} printed no JSON object: {out[-300:]!r}")
        return reply

    def receive(self, node: int, command: str, accept, max_bytes: int) -> int:
        """Run `command` (which writes a tar to stdout) and hand each member to `accept(member, stream)`,
        which stores it and returns the bytes written; returns the total. Stops, naming the node and
        the member, past `max_bytes` in all."""
        child = self.popen(node, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        total = 0
        try:
            with tarfile.open(fileobj=child.stdout, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and total + member.size > max_bytes:
                        raise DriverError(f"node{node}: {printable(member.name)!r} would bring the fetch past its "
                                          f"bound of {max_bytes} bytes: stopped")
                    source = tar.extractfile(member) if member.isfile() else None
                    total += accept(member, source)
        except (tarfile.TarError, DriverError) as e:
            os.killpg(child.pid, signal.SIGKILL)   # its whole session: nothing may hold the pipes open
            child.wait()
            detail = child.stderr.read().decode(errors="replace").strip()[-500:]
            raise DriverError(str(e) if isinstance(e, DriverError) else f"node{node}: {detail or e}") from None
        finally:
            child.stdout.close()
            self.children.discard(child)
        code = child.wait()
        error = child.stderr.read().decode(errors="replace").strip()[-500:]
        child.stderr.close()
        if code != 0:
            raise DriverError(f"node{node}: tar over ssh exited {code}: {error}")
        return total

    def end_sessions(self):
        """ssh sessions still open (a set-up a signal cut short): their nodes are being destroyed."""
        for child in list(self.children):
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except OSError:
                pass


def tar_bytes(files: dict[str, Path]) -> bytes:
    """A tar of `files` (archive name -> local path)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, path in files.items():
            tar.add(path, arcname=name, recursive=path.is_dir())
    return buffer.getvalue()
