"""The node side of the cluster driver (launch/vast_driver.py): run on each rented node over ssh, from
the project's folder, with the image's python3. Standard library only: it runs before `make setup`.

    python3 launch/vast_node.py start --run RUN --cmd-file F   start F's command detached (setsid),
                                                               so training outlives the laptop's ssh
    python3 launch/vast_node.py status --run RUN [--log-from N]  JSON: running, exit code, last metrics,
                                                               latest checkpoint, log text from byte N
    python3 launch/vast_node.py stop --run RUN                 SIGTERM this node's training ranks (the
                                                               trainer saves a checkpoint and exits 0)
    python3 launch/vast_node.py fetched --run RUN --tag TAG    the laptop holds TAG, verified
    python3 launch/vast_node.py watchdog --run RUN ...         the budget cap, enforced here (below)

Everything it writes lives in outputs/RUN/cluster/ on the node.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TAG = re.compile(r"^step[0-9]{8}$")


def _cluster_dir(run: str) -> Path:
    path = Path("outputs") / run / "cluster"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


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


def latest_tag(run: str) -> str | None:
    path = Path("outputs") / run / "checkpoints" / "latest"
    try:
        tag = path.read_text().strip()
    except OSError:
        return None
    return tag if TAG.match(tag) and (path.parent / tag).is_dir() else None


def start(run: str, cmd_file: Path) -> dict:
    work = _cluster_dir(run)
    pid_file = work / "train.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text().strip() or 0)):
        return {"started": False, "pid": int(pid_file.read_text()), "why": "already running"}
    (work / "train.exit").unlink(missing_ok=True)
    command = cmd_file.read_text()
    wrapper = f"{command}\ncode=$?\necho $code > {work}/train.exit.tmp && mv {work}/train.exit.tmp {work}/train.exit\n"
    with open(work / "train.log", "ab") as log:
        proc = subprocess.Popen(["bash", "-c", wrapper], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)  # setsid: no hang-up when the ssh session ends
    _write_atomic(pid_file, str(proc.pid))
    _write_atomic(work / "train.started", str(time.time()))
    return {"started": True, "pid": proc.pid}


def status(run: str, log_from: int = 0) -> dict:
    work = _cluster_dir(run)
    pid_file, exit_file = work / "train.pid", work / "train.exit"
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    exit_code = int(exit_file.read_text().strip()) if exit_file.exists() else None
    metrics = None
    metrics_path = Path("outputs") / run / "metrics.jsonl"
    if metrics_path.exists():
        with open(metrics_path, "rb") as f:
            f.seek(max(0, metrics_path.stat().st_size - 8192))
            for line in reversed(f.read().splitlines()):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and "loss" in entry:
                    metrics = entry
                    break
    log, log_size = "", 0
    log_path = work / "train.log"
    if log_path.exists():
        log_size = log_path.stat().st_size
        with open(log_path, "rb") as f:
            f.seek(min(log_from, log_size))
            log = f.read(65536).decode(errors="replace")
    max_steps = None
    config = Path("outputs") / run / "config.yaml"
    if config.exists():
        m = re.search(r"^\s*max_steps:\s*(\d+)\s*$", config.read_text(errors="replace"), re.M)
        max_steps = int(m.group(1)) if m else None
    started = work / "train.started"
    cap = work / "cap.json"
    return {"pid": pid, "running": pid is not None and exit_code is None and _alive(pid), "exit": exit_code,
            "metrics": metrics, "latest": latest_tag(run), "log": log, "log_end": log_from + len(log.encode()),
            "log_size": log_size, "max_steps": max_steps,
            "started": float(started.read_text()) if started.exists() else None,
            "cap": json.loads(cap.read_text()) if cap.exists() else None}


def stop(run: str) -> dict:
    pids = rank_pids(run)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return {"signalled": pids}


def _own_instance() -> tuple[str | None, str | None]:
    """This container's instance id and instance-scoped API key, which vast.ai puts in the container's
    environment as CONTAINER_ID and CONTAINER_API_KEY (ssh sessions may not inherit them: then PID 1's
    environment holds them). Not confirmed in vast.ai's own documentation: see docs/clusters.md."""
    env = {k: os.environ.get(k) for k in ("CONTAINER_ID", "CONTAINER_API_KEY")}
    if not all(env.values()):
        try:
            for item in Path("/proc/1/environ").read_bytes().split(b"\0"):
                key, _, value = item.decode(errors="replace").partition("=")
                if key in env and not env[key]:
                    env[key] = value
        except OSError:
            pass
    return env["CONTAINER_ID"], env["CONTAINER_API_KEY"]


def stop_own_instance(api_url: str) -> str:
    """PUT /api/v0/instances/{id}/ {"state": "stopped"}: the request the vastai SDK's stop_instance sends."""
    inst, key = _own_instance()
    if not inst or not inst.isdigit() or not key:
        return "not stopped: no CONTAINER_ID/CONTAINER_API_KEY in this container"
    request = urllib.request.Request(f"{api_url.rstrip('/')}/api/v0/instances/{inst}/", method="PUT",
                                     data=json.dumps({"state": "stopped"}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return f"stopped instance {inst} (HTTP {reply.status})"
        except OSError as e:
            error = e
            time.sleep(min(30, 2 ** attempt))
    return f"not stopped: {type(error).__name__}: {str(error)[:200]}"


def watchdog(run: str, started: float, usd_per_hour: float, max_hours: float | None, max_usd: float | None,
             wait_s: float, grace_s: float, api_url: str, poll_s: float) -> dict:
    """The budget cap, on the node itself (the laptop may be gone): at the cap, SIGTERM this node's ranks
    (they save a checkpoint, all nodes at the same step), wait for them to exit, give the laptop
    `grace_s` to fetch that checkpoint, then stop (not destroy) this instance. A run that ended
    earlier is stopped at the cap too, if nobody destroyed it by then."""
    work = _cluster_dir(run)
    limit_h = min(h for h in (max_hours, (max_usd / usd_per_hour) if max_usd and usd_per_hour > 0 else None)
                  if h is not None)
    while (time.time() - started) / 3600 < limit_h:   # also after training ends: idle nodes bill too
        time.sleep(poll_s)
    event = {"cap": True, "hours": (time.time() - started) / 3600, "usd": (time.time() - started) / 3600 * usd_per_hour}
    _write_atomic(work / "cap.json", json.dumps(event))
    # SIGTERM until training is over: ranks still starting up get it too. node0 knows the end by its
    # launcher's exit file; the other nodes by their ranks being gone (three checks in a row).
    head = (work / "train.pid").exists()
    deadline, quiet = time.time() + wait_s, 0
    while time.time() < deadline:
        quiet = 0 if stop(run)["signalled"] else quiet + 1
        if (head and (work / "train.exit").exists()) or (not head and quiet >= 3):
            break
        time.sleep(poll_s)
    tag = latest_tag(run)
    deadline = time.time() + grace_s

    def fetched() -> bool:   # the laptop holds this checkpoint or a newer one (tags sort by step)
        path = work / "fetched"
        return tag is None or (path.exists() and path.read_text().strip() >= tag)

    while time.time() < deadline and not fetched():
        time.sleep(poll_s)
    event.update(checkpoint=tag, fetched=fetched(), result=stop_own_instance(api_url))
    _write_atomic(work / "cap.json", json.dumps(event))
    return event


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 launch/vast_node.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("start", "status", "stop", "fetched", "watchdog"):
        s = sub.add_parser(name)
        s.add_argument("--run", required=True)
    sub.choices["start"].add_argument("--cmd-file", type=Path, required=True)
    sub.choices["status"].add_argument("--log-from", type=int, default=0)
    sub.choices["fetched"].add_argument("--tag", required=True)
    w = sub.choices["watchdog"]
    w.add_argument("--started", type=float, required=True)
    w.add_argument("--usd-per-hour", type=float, required=True)
    w.add_argument("--max-hours", type=float)
    w.add_argument("--max-usd", type=float)
    w.add_argument("--wait", type=float, default=1800)
    w.add_argument("--grace", type=float, default=600)
    w.add_argument("--poll", type=float, default=30)
    w.add_argument("--api-url", default=os.environ.get("VAST_URL") or "https://console.vast.ai")
    w.add_argument("--detach", action="store_true")
    args = p.parse_args(argv)
    if not re.match(r"^[a-z0-9][a-z0-9-]*$", args.run):
        p.error(f"--run {args.run!r}: not a run name")
    if args.cmd == "start":
        result = start(args.run, args.cmd_file)
    elif args.cmd == "status":
        result = status(args.run, args.log_from)
    elif args.cmd == "stop":
        result = stop(args.run)
    elif args.cmd == "fetched":
        if not TAG.match(args.tag):
            p.error(f"--tag {args.tag!r}: not a checkpoint tag")
        _write_atomic(_cluster_dir(args.run) / "fetched", args.tag)
        result = {"fetched": args.tag}
    elif args.detach:  # watchdog: outlive this ssh session
        work = _cluster_dir(args.run)
        argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--detach"]
        with open(work / "watchdog.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)
        result = {"watchdog": proc.pid}
    else:
        result = watchdog(args.run, args.started, args.usd_per_hour, args.max_hours, args.max_usd, args.wait,
                          args.grace, args.api_url, args.poll)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
