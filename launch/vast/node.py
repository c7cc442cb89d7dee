"""The node side of the rented-cluster driver, run on every rented node over ssh from the project
folder with the image's python3 before `make setup`: the standard library, and of the project only
modules that need nothing more (trainer/rundir.py, launch/cli.py).
`python3 launch/vast/node.py CMD --run RUN ...`, CMD one of:

    start --cmd-file F       run F's bash command detached; record its pid, the pid's start time, its exit code
    status [--log-from N]    training's state, last metrics, latest checkpoint, log text from byte N
    stop                     SIGTERM this node's ranks (they save a checkpoint, then exit)
    fetched --tag TAG        the laptop holds TAG, verified
    training-started         training of RUN starts now (marked on every node)
    guard --instance ID --started T --usd-per-hour X --max-hours H [--max-usd D] --grace S --wait S
          --poll S --api-url URL [--detach]      the money guard, armed at `up` on every node

Each prints one JSON line and exits 0; bad input exits 2 with one line on stderr. Files live in
outputs/RUN/cluster/ and are written whole (temp file, then rename); the logs are appended.

The guard keeps the money safe once the laptop is gone: at the cap the ranks save; at the cap or
once training ends, the laptop gets --grace seconds to fetch the latest checkpoint, then the instance
destroys itself with the key in CONTAINER_API_KEY, which is never printed, written or put in an argv.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script: the project folder is not on the path
from launch.cli import FlagParser  # noqa: E402
from trainer import rundir  # noqa: E402

RUN_NAME = re.compile(r"(?=[a-z0-9-]*[a-z])[a-z0-9][a-z0-9-]{0,62}")   # with a letter
INSTANCE = re.compile(r"[1-9][0-9]{0,17}")
OFFSET = re.compile(r"[0-9]{1,18}")
API_URL = re.compile(r"https?://[^\s/?#]+\S*")
NO_CHECKPOINT = "none"   # what `fetched` says when the laptop holds the run's files and there is no checkpoint
FETCHED = re.compile(f"{rundir.TAG.pattern}|{NO_CHECKPOINT}")
KEY_VAR = "CONTAINER_API_KEY"   # the key vast.ai scopes to this one instance (start, stop, destroy)
NO_KEY = "no CONTAINER_API_KEY in this container: cannot destroy itself"
BAD_KEY = "CONTAINER_API_KEY in this container is not printable ASCII: cannot destroy itself"
QUIET_POLLS = 3          # polls in a row without ranks before a node takes its training as over
DESTROY_TRIES = 6
CHUNK = 65536            # bytes of log per status; of metrics.jsonl's tail; of an API answer


# --- files ---------------------------------------------------------------------------------------------
def cluster_dir(run: str) -> Path:
    path = rundir.named(run) / "cluster"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read(path: Path, parse=str):
    """A file's text, stripped, parsed by `parse`; None when it is missing or does not parse."""
    try:
        return parse(path.read_text(errors="replace").strip())
    except (OSError, ValueError):
        return None


def latest_tag(run: str) -> str | None:
    try:
        return rundir.read_latest(rundir.checkpoints(rundir.named(run)))
    except (OSError, ValueError):   # unreadable, or naming no checkpoint: none to report
        return None


# --- processes ------------------------------------------------------------------------------------------
def start_time(pid: int, alive: bool = False) -> str | None:
    """Field 22 of /proc/PID/stat, the start time in clock ticks since boot: with the pid it names one
    process, where a pid alone may be reused (after a container restart, say). alive: None for a zombie.
    Fields counted after the name (field 2), which may hold spaces and ')'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if len(fields) < 20 or (alive and fields[0] in ("Z", "X")) else fields[19]


def rank_pids(run: str) -> list[int]:
    """This node's training processes of `run`: argv holds launch/train.py and run_dir=outputs/RUN, not
    a DeepSpeed launcher (those would kill their ranks on SIGTERM before the ranks save), and their
    folder is this project folder (several test "nodes" share one machine)."""
    here, me, found = Path.cwd().resolve(), os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = (proc / "cwd").resolve()
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if ("launch/train.py" in args and f"run_dir=outputs/{run}" in args and cwd == here
                and not any("deepspeed.launcher" in a or a.endswith("/deepspeed") for a in args)):
            found.append(int(proc.name))
    return sorted(found)


def training(run: str) -> dict:
    """What this node knows of the training it started: "lost" is a pid recorded that no longer runs
    (or runs as another process) and no exit code, which only a killed wrapper or a restarted container
    leaves behind: a failure."""
    work = cluster_dir(run)
    pid, code = read(work / "train.pid", int), read(work / "train.exit", int)
    recorded = read(work / "train.pidstart")
    running = code is None and bool(recorded) and start_time(pid, alive=True) == recorded
    if code is not None:
        state = "succeeded" if code == 0 else "failed"
    else:
        state = "not started" if pid is None else "running" if running else "lost"
    return {"state": state, "pid": pid, "exit": code, "running": running}


# --- commands ---------------------------------------------------------------------------------------------
def start(opts) -> dict:
    work = cluster_dir(opts.run)
    before = training(opts.run)
    if before["running"] or rank_pids(opts.run):
        return {"started": False, "pid": before["pid"], "why": "training of this run is already running here"}
    command = opts.cmd_file.resolve(strict=True)
    for name in ("train.exit", "train.pid", "train.pidstart"):
        (work / name).unlink(missing_ok=True)
    exit_file = (work / "train.exit").resolve()
    # The wrapper runs the command, then records its code by a rename: the file is whole or absent.
    wrapper = 'bash "$1"; code=$?; printf "%s\\n" "$code" > "$2.tmp" && mv -f "$2.tmp" "$2"'
    with open(work / "train.log", "ab") as log:   # setsid: the ssh session's end does not hang it up
        proc = subprocess.Popen(["bash", "-c", wrapper, "train", str(command), str(exit_file)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    # Our child is readable (a zombie at worst) while we run. Start time first: no pid without one.
    rundir.atomic_write(work / "train.pidstart", start_time(proc.pid) or "")
    rundir.atomic_write(work / "train.pid", str(proc.pid))
    rundir.atomic_write(work / "train.started", repr(time.time()))
    return {"started": True, "pid": proc.pid}


def read_log(path: Path, offset: int) -> tuple[str, int, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(min(offset, size))
            data = f.read(CHUNK)
    except OSError:
        return "", 0, 0
    return data.decode(errors="replace"), min(offset, size) + len(data), size


def status(opts) -> dict:
    work, run_dir = cluster_dir(opts.run), rundir.named(opts.run)
    log, log_end, log_size = read_log(work / "train.log", opts.log_from)
    steps = re.search(r"^\s*max_steps:\s*(\d+)\s*$", read(rundir.config_path(run_dir)) or "", re.M)
    losses = [entry for entry in rundir.read_metrics(run_dir, tail=CHUNK) if "loss" in entry]
    return {**training(opts.run), "metrics": losses[-1] if losses else None,
            "latest": latest_tag(opts.run), "log": log, "log_end": log_end, "log_size": log_size,
            "max_steps": int(steps.group(1)) if steps else None,
            "started": read(work / "train.started", float),
            "guard": read(work / "guard.json", json.loads)}


def stop(opts) -> dict:
    pids = rank_pids(opts.run)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):   # it ended meanwhile
            os.kill(pid, signal.SIGTERM)
    return {"signalled": pids}


def fetched(opts) -> dict:
    path = cluster_dir(opts.run) / "fetched"
    held = read(path)
    if not (rundir.is_tag(held) and held > opts.tag):   # a late, older report moves nothing back
        rundir.atomic_write(path, opts.tag)
    return {"fetched": opts.tag}


def training_started(opts) -> dict:
    rundir.atomic_write(cluster_dir(opts.run) / "training-started", repr(now := time.time()))
    return {"training_started": now}


# --- the guard ----------------------------------------------------------------------------------------------
def note(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} guard: {message}", file=sys.stderr, flush=True)


def guard_key() -> tuple[str | None, str | None]:
    """The key and, without one, why. ssh sessions may not inherit the container's environment: then
    PID 1's holds it. A key that is not printable ASCII would make urllib raise an error quoting it."""
    key = os.environ.get(KEY_VAR)
    if not key:
        items = []
        with contextlib.suppress(OSError):   # another user's PID 1 is not readable
            items = Path("/proc/1/environ").read_bytes().split(b"\0")
        found = [item.partition(b"=")[2] for item in items if item.startswith(KEY_VAR.encode() + b"=")]
        key = found[0].decode(errors="replace") if found else None
    if key and re.fullmatch(r"[\x21-\x7e]+", key):
        return key, None
    return None, BAD_KEY if key else NO_KEY


def spent(opts) -> dict:
    hours = (time.time() - opts.started) / 3600
    return {"at": time.time(), "hours": round(hours, 4), "usd": round(hours * opts.usd_per_hour, 4)}


class Training:
    """Whether this node's training has ended, from what this node sees. The head (the node whose
    `start` wrote train.pid) knows by the exit code, or by the process being lost. Another node knows
    only by its ranks: once seen, gone for QUIET_POLLS polls in a row; never seen, `wait` seconds after
    training-started was marked (the launch never reached this node)."""

    def __init__(self, run: str, wait: float):
        self.run, self.wait = run, wait
        self.mark, self.seen, self.quiet = None, False, 0

    def ended(self) -> dict | None:
        head = training(self.run)
        if head["state"] != "not started":
            return None if head["running"] else {"exit": head["exit"], "state": head["state"]}
        mark = read(cluster_dir(self.run) / "training-started", float)
        if mark is None:
            return None
        if mark != self.mark:   # marked again: a new launch, judged afresh
            self.mark, self.seen, self.quiet = mark, False, 0
        if rank_pids(self.run):
            self.seen, self.quiet = True, 0
            return None
        self.quiet += 1
        if self.seen and self.quiet >= QUIET_POLLS:
            return {"exit": None, "state": "ranks gone"}
        if not self.seen and time.time() - mark >= self.wait:
            return {"exit": None, "state": "ranks never started"}
        return None

    def restarted(self) -> bool:   # the driver started training anew while the guard waited for the fetch
        head = training(self.run)
        return head["running"] or (head["state"] == "not started" and bool(rank_pids(self.run)))


def stop_training(opts) -> dict:
    """At the cap: SIGTERM the ranks (each saves, then exits) every poll, so ranks still starting when
    the cap came get it too, until training is over or `wait` seconds have passed."""
    deadline, quiet, signalled = time.time() + opts.wait, 0, set()
    while True:
        pids = stop(opts)["signalled"]
        signalled.update(pids)
        quiet = 0 if pids else quiet + 1
        head = training(opts.run)
        over = head["state"] in ("succeeded", "failed", "lost") or (
            head["state"] == "not started" and quiet >= QUIET_POLLS)
        if over or time.time() >= deadline:
            return {"signalled": sorted(signalled), "stopped": over, "exit": head["exit"], "state": head["state"]}
        time.sleep(opts.poll)


def wait_for_fetch(opts, tag: str | None, interrupted=lambda: False) -> str:
    """Until the laptop holds `tag` or a newer one (tags sort by step; with no checkpoint, until it
    says it holds the run's files: `none`), at most `grace` seconds: "fetched", "not fetched", or
    "restarted" when `interrupted()` says so."""
    path, deadline = cluster_dir(opts.run) / "fetched", time.time() + opts.grace
    while True:
        held = read(path)
        if held and (held == NO_CHECKPOINT if tag is None else rundir.is_tag(held) and held >= tag):
            return "fetched"
        if interrupted():
            return "restarted"
        if time.time() >= deadline:
            return "not fetched"
        time.sleep(min(opts.poll, max(0.0, deadline - time.time())))


def send(request: urllib.request.Request) -> tuple[int | None, str]:
    """The HTTP status (None: no answer came) and the body, or what went wrong."""
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read(CHUNK).decode(errors="replace")
    except urllib.error.HTTPError as e:   # 4xx, 5xx: the body says why
        reply, code = e, e.code
    except (OSError, http.client.HTTPException) as e:   # refused, reset, timed out, cut off
        return None, f"{type(e).__name__}: {e}"
    try:
        return code, reply.read(CHUNK).decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return code, f"{type(e).__name__}: {e}"


def destroy(opts, key: str | None, why_not: str | None) -> tuple[bool, str]:
    """DELETE this instance: done only when the status is 2xx and the body says "success": true (the
    API answers some refusals with 200). Retried with backoff, except for a 4xx other than 429: a bad
    key or an instance already gone does not change by asking again."""
    if key is None:
        return False, why_not or NO_KEY
    url = f"{opts.api_url}/api/v0/instances/{opts.instance}/"
    request = urllib.request.Request(url, method="DELETE", headers={
        "Authorization": f"Bearer {key}", "Accept": "application/json"})
    result = ""
    for attempt in range(1, DESTROY_TRIES + 1):
        code, body = send(request)
        try:
            answer = json.loads(body) if code is not None else None
        except ValueError:
            answer = None
        done = code is not None and 200 <= code < 300 and isinstance(answer, dict) and answer.get("success") is True
        result = f"HTTP {code}: {body[:300]}" if code is not None else body[:300]
        note(f"DELETE instance {opts.instance}, try {attempt}/{DESTROY_TRIES}: {'destroyed' if done else result}")
        final = code is not None and 400 <= code < 500 and code != 429
        if done or final or attempt == DESTROY_TRIES:
            return done, result
        time.sleep(min(60.0, opts.poll * 2 ** attempt))   # 30 s polls: about 5 minutes in all
    return False, result


def watch(opts, record: dict) -> None:
    """Polls until the cap, or until training has ended and the grace for its fetch has passed; fills
    `record` (guard.json) with what happened on the way."""
    guard_file, progress = cluster_dir(opts.run) / "guard.json", Training(opts.run, opts.wait)
    while True:
        if time.time() >= record["cap_at"]:
            record.update(event="cap", **spent(opts))
            rundir.atomic_write(guard_file, json.dumps(record))
            note(f"cap reached after {record['hours']} h (${record['usd']}): the ranks save")
            record.update(stop_training(opts))
            record["checkpoint"] = latest_tag(opts.run)
            record["fetch"] = wait_for_fetch(opts, record["checkpoint"])
            return
        ended = progress.ended()
        if ended is not None:
            record.update(event="ended", **ended, **spent(opts))
            rundir.atomic_write(guard_file, json.dumps(record))
            note(f"training ended ({ended['state']}, exit {ended['exit']}): waiting for the fetch")
            record["checkpoint"] = latest_tag(opts.run)
            record["fetch"] = wait_for_fetch(opts, record["checkpoint"], progress.restarted)
            if record["fetch"] != "restarted":
                return
            record.update(event="armed", restarted=time.time())
            rundir.atomic_write(guard_file, json.dumps(record))
            note("training runs again: watching it")
        time.sleep(opts.poll)


def guard(opts) -> dict:
    work, (key, why_not) = cluster_dir(opts.run), guard_key()
    usd_hours = opts.max_usd / opts.usd_per_hour if opts.max_usd and opts.usd_per_hour > 0 else math.inf
    record = {"event": "armed", "instance": opts.instance, "pid": os.getpid(), "armed": time.time(),
              "cap_at": opts.started + min(opts.max_hours, usd_hours) * 3600,   # hours or dollars, the first
              "can_destroy": key is not None, "result": why_not}
    rundir.atomic_write(work / "guard.json", json.dumps(record))
    note(f"armed for instance {opts.instance}: cap at {time.ctime(record['cap_at'])}; {why_not or 'key found'}")
    watch(opts, record)
    record["fetched"] = record["fetch"] == "fetched"
    record["destroyed"], record["result"] = destroy(opts, key, why_not)
    rundir.atomic_write(work / "guard.json", json.dumps(record))
    note(f"destroyed instance {opts.instance}" if record["destroyed"] else f"NOT destroyed: {record['result']}")
    return record


def take_lock(run: str, fd: int | None = None) -> int | None:
    """One guard per run on a node: it holds guard.lock for its whole life (a lock dies with its holder,
    so neither a crash nor a reused pid fakes a running guard). A detached guard inherits the lock that
    `guard --detach` took, as --lock-fd. None: another guard holds it."""
    if fd is None:
        fd = os.open(cluster_dir(run) / "guard.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def guard_argv(opts, lock_fd: int) -> list[str]:
    """The foreground guard's arguments, rebuilt from the checked options: no key among them."""
    args = ["guard", "--run", opts.run, "--instance", str(opts.instance), "--started", repr(opts.started),
            "--usd-per-hour", repr(opts.usd_per_hour), "--max-hours", repr(opts.max_hours),
            "--grace", repr(opts.grace), "--wait", repr(opts.wait), "--poll", repr(opts.poll),
            "--api-url", opts.api_url, "--lock-fd", str(lock_fd)]
    return args + (["--max-usd", repr(opts.max_usd)] if opts.max_usd is not None else [])


def detach(opts, lock: int) -> dict:
    """Re-runs the guard in its own session (it outlives this ssh session), logging to guard.log. The
    key goes through the environment: PID 1's may be the only one holding it."""
    work, (key, _) = cluster_dir(opts.run), guard_key()
    env = {**os.environ, KEY_VAR: key} if key else dict(os.environ)
    with open(work / "guard.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *guard_argv(opts, lock)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, pass_fds=(lock,))
    rundir.atomic_write(work / "guard.pid", str(proc.pid))
    return {"guard": proc.pid}


def guard_command(opts) -> dict:
    lock = take_lock(opts.run, opts.lock_fd)
    if lock is None:
        return {"guard": read(cluster_dir(opts.run) / "guard.pid", int), "already_running": True}
    if opts.detach:
        return detach(opts, lock)
    rundir.atomic_write(cluster_dir(opts.run) / "guard.pid", str(os.getpid()))
    return guard(opts)


# --- command line -----------------------------------------------------------------------------------------
def matching(pattern: re.Pattern, what: str, convert=str):
    def check(text: str):
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return convert(text)
    return check


def number(positive: bool = False):
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {'> 0' if positive else '>= 0'}")
        return value
    return check


def parser() -> FlagParser:   # errors: one line on stderr, exit 2: the driver shows it as it is
    p = FlagParser(prog="python3 launch/vast/node.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("start", "status", "stop", "fetched", "training-started", "guard"):
        sub.add_parser(name).add_argument("--run", required=True, type=matching(RUN_NAME, "a run name"))
    sub.choices["start"].add_argument("--cmd-file", required=True, type=Path)
    sub.choices["status"].add_argument("--log-from", type=matching(OFFSET, "a byte offset", int), default=0)
    sub.choices["fetched"].add_argument("--tag", required=True, type=matching(FETCHED, "a tag stepNNNNNNNN or none"))
    g = sub.choices["guard"]
    g.add_argument("--instance", required=True, type=matching(INSTANCE, "an instance id", int))
    g.add_argument("--started", required=True, type=number(), help="unix time the renting began")
    g.add_argument("--usd-per-hour", required=True, type=number())
    g.add_argument("--max-hours", required=True, type=number(positive=True))
    g.add_argument("--max-usd", type=number(positive=True))
    for name in ("--grace", "--wait"):
        g.add_argument(name, required=True, type=number(), help="seconds")
    g.add_argument("--poll", required=True, type=number(positive=True), help="seconds")
    g.add_argument("--api-url", required=True, type=matching(API_URL, "an http(s) URL", lambda u: u.rstrip("/")))
    g.add_argument("--detach", action="store_true")
    g.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    return p


COMMANDS = {"start": start, "status": status, "stop": stop, "fetched": fetched,
            "training-started": training_started, "guard": guard_command}


def main(argv: list[str] | None = None) -> int:
    opts = parser().parse_args(argv)
    try:
        result = COMMANDS[opts.cmd](opts)
    except (OSError, ValueError) as e:
        print(f"launch/vast/node.py {opts.cmd}: {' '.join(f'{type(e).__name__}: {e}'.split())}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
