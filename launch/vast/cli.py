"""The user's commands, and the one teardown every exit of a paid command goes through.

    bash launch/vast_cluster.sh [run] --nodes N --gpus G --gpu-name NAME --max-dph P --conf NAME
         [--run NAME] [--timeout S] [--detach] [--resume outputs/RUN] [--max-hours H] [--max-usd D]
         [--grace-minutes M] [--interruptible [--bid P] [--nodes-min N]]
         [--ckpt-minutes M] [--yes] [-- overrides]
    bash launch/vast_cluster.sh plan ... (the flags of run: the cost, renting nothing)
    bash launch/vast_cluster.sh up|train|status|logs [-f]|fetch|down [--force]|watch --run NAME

`run` does up, train, follow (log, fetch each checkpoint), then the teardown. Every command reads and
writes outputs/RUN/cluster/state.json, so any of them can be run again, later, from another
terminal. docs/clusters.md describes each step, its cost, and what happens on every failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from launch.cli import FlagParser
from launch.vast import plan, recover
from launch.vast.checks import (
    UnsafeInput,
    check_conf,
    check_gpu_name,
    check_local_path,
    check_override,
    check_positive,
    check_remote_dir,
    check_run_name,
    new_run_name,
    printable,
)
from launch.vast.commands import DEFAULT_IMAGE, Driver, Interrupted, Signals
from launch.vast.provider import Provider, VastError, pick_offers
from launch.vast.state import ROOT, DriverError, Phase, RunLock, RunState
from launch.vast.transport import log
from trainer import rundir
from trainer.checksums import ChecksumError, verify

COMMANDS = ["run", "up", "train", "status", "logs", "fetch", "down", "plan", "watch"]


def _env(name: str, default):
    return os.environ.get(name, default)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = FlagParser(prog="bash launch/vast_cluster.sh", description=__doc__.splitlines()[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=COMMANDS)
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
    p.add_argument("--max-hours", type=float, default=float(_env("MAX_HOURS", 12)),
                   help="budget cap: the nodes save and destroy themselves H hours after renting (default 12)")
    p.add_argument("--max-usd", type=float, help="... or once the cluster has cost D dollars")
    p.add_argument("--grace-minutes", type=float, default=float(_env("GRACE_MINUTES", 30)),
                   help="after training ends (or at the cap), minutes the nodes wait for the fetch before "
                        "destroying themselves")
    p.add_argument("--force", action="store_true", help="down: destroy even if the newest work is not fetched")
    p.add_argument("-f", "--follow", action="store_true", help="logs: follow until training ends")
    p.add_argument("--dry-run", action="store_true", help="the same as `plan`: print the plan, rent nothing")
    p.add_argument("-y", "--yes", action="store_true", help="run, up: rent without asking `Proceed? [y/N]` (scripts)")
    p.add_argument("--json", action="store_true", help="plan: print the plan as one JSON object")
    p.add_argument("--interruptible", action="store_true",
                   help="rent at a bid; a preempted node is replaced and training resumes by itself")
    p.add_argument("--bid", type=float,
                   help="with --interruptible: $/h per machine (default: the offer's min_bid + 20%%)")
    p.add_argument("--nodes-min", type=int, help="with --interruptible: the fewest nodes a recovery rents "
                                                  "(default: --nodes)")
    p.add_argument("--ckpt-minutes", type=float, help="set train.ckpt_every for a checkpoint about every M minutes "
                                                      "at the plan's step time")
    # knobs with defaults for real use; the tests shorten them
    p.add_argument("--poll", type=float, default=float(_env("POLL", 10)))
    p.add_argument("--confirm-polls", type=int, default=int(_env("CONFIRM_POLLS", 3)),
                   help="listings in a row a node must read as gone before it counts as gone")
    p.add_argument("--destroy-retry", type=float, default=float(_env("DESTROY_RETRY_S", 600)),
                   help="seconds to keep retrying destroy")
    p.add_argument("--late-create-wait", type=float, default=float(_env("LATE_CREATE_WAIT_S", 120)),
                   help="seconds the teardown waits for an instance whose create got no answer")
    p.add_argument("--fetch-attempts", type=int, default=int(_env("FETCH_ATTEMPTS", 5)))
    p.add_argument("--fetch-backoff", type=float, default=float(_env("FETCH_BACKOFF_S", 5)))
    p.add_argument("--fetch-max-gb", type=float, default=float(_env("FETCH_MAX_GB", 200)),
                   help="the most a node's share of a checkpoint may weigh when the model config is unknown")
    p.add_argument("--stop-wait", type=float, default=float(_env("STOP_WAIT_S", 1800)),
                   help="seconds to wait for the final checkpoint after a stop request")
    p.add_argument("--remote-dir", default=_env("REMOTE_DIR", "/workspace/shakespeare"))
    p.add_argument("--net-dev", default=_env("NET_DEV", "eth0"), help="the overlay interface on the nodes")
    p.add_argument("--node-setup", default=_env("NODE_SETUP", None),
                   help="shell command run in the code's folder on each node (default: make setup, prepare)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    return p.parse_args(argv)


def new_state(args: argparse.Namespace) -> RunState:
    """Every local check, before anything is rented; then the run's fresh state, saved."""
    state, _ = checked_state(args)
    retire_old_state(state.run)
    state.save()
    return state


def checked_state(args: argparse.Namespace, renting: bool = True):
    """Every local check (those of this machine's tools and key only when `renting`); the run's state,
    not yet saved, and its composed config."""
    check_flags(args)
    resume = check_resume(args.resume) if args.resume else None
    run = check_run_name(args.run) if args.run else (resume[0] if resume else new_run_name())
    overrides = [check_override(o) for o in args.overrides]
    config = check_config(check_conf(args.conf, ROOT), overrides, args.nodes * args.gpus)
    if args.ckpt_minutes:
        every = ckpt_every_for(args, config, resume[1] if resume else None)
        overrides = [o for o in overrides if not o.startswith("train.ckpt_every=")] + [f"train.ckpt_every={every}"]
        config = check_config(check_conf(args.conf, ROOT), overrides, args.nodes * args.gpus)
    if renting:
        check_tools()
    key = check_local_path("--ssh-key", Path(os.path.expanduser(args.ssh_key)).resolve())
    if renting and not key.is_file():
        raise UnsafeInput(f"--ssh-key {args.ssh_key!r}: no such file (the private key whose public half vast.ai has)")
    state = RunState(run=run, conf=args.conf, overrides=overrides, nodes=args.nodes,
                     gpus=args.gpus, gpu_name=check_gpu_name(args.gpu_name), image=args.image, disk=args.disk,
                     remote_dir=check_remote_dir(args.remote_dir), ssh_key=str(key), net_dev=args.net_dev,
                     max_hours=args.max_hours, max_usd=args.max_usd, grace_minutes=args.grace_minutes,
                     resume=resume[1] if resume else None, model=dataclasses.asdict(config.model),
                     precision=config.precision, zero_stage=config.deepspeed.stage,
                     interruptible=args.interruptible, nodes_min=args.nodes_min or args.nodes)
    return state, config


def check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--nodes", args.nodes), ("--gpus", args.gpus), ("--disk", args.disk),
                        ("--timeout", args.timeout)):
        check_positive(flag, value)
    for flag, value in (("--max-hours", args.max_hours), ("--max-dph", args.max_dph), ("--poll", args.poll)):
        check_positive(flag, value, whole=False)
    check_positive("--confirm-polls", args.confirm_polls)
    for flag, value in (("--max-usd", args.max_usd), ("--bid", args.bid), ("--ckpt-minutes", args.ckpt_minutes)):
        if value is not None:
            check_positive(flag, value, whole=False)
    if args.grace_minutes < 0:
        raise UnsafeInput(f"--grace-minutes must be >= 0, got {args.grace_minutes}")
    if (args.bid is not None or args.nodes_min is not None) and not args.interruptible:
        raise UnsafeInput("--bid and --nodes-min go with --interruptible")
    if args.nodes_min is not None:
        check_positive("--nodes-min", args.nodes_min)
        if args.nodes_min > args.nodes:
            raise UnsafeInput(f"--nodes-min {args.nodes_min} is more than --nodes {args.nodes}")


def check_tools() -> None:
    for tool in ("ssh", "ssh-keygen", "git"):
        if shutil.which(os.environ.get("SSH", "ssh") if tool == "ssh" else tool) is None:
            raise UnsafeInput(f"`{tool}` is not on PATH: install it (OpenSSH client, git) before renting")
    check_local_path("this checkout's path", ROOT)
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout.strip():
        raise DriverError(f"{ROOT} is not a git checkout: the nodes get the git-tracked files only")


def ckpt_every_for(args: argparse.Namespace, config, resume_tag: str | None) -> int:
    """--ckpt-minutes as steps, at the step time the plan expects (measured figures, launch/vast/plan.py)."""
    work = plan.Workload.from_config(config, args.nodes * args.gpus)
    try:
        est = plan.estimate(plan.measured_rows(), args.gpu_name, work.shape, work.precision, work.compiled,
                            work.micro_batch, work.world)
    except ValueError as e:
        raise UnsafeInput(f"--ckpt-minutes: {e}") from None
    step_s = work.tokens_per_step / (est.per_gpu * work.world)
    every = plan.ckpt_every(step_s, args.ckpt_minutes)
    log(f"--ckpt-minutes {args.ckpt_minutes:g}: train.ckpt_every={every} (expected step time {step_s:.3f} s; "
        f"{est.source})", out=True)
    return every


def check_config(conf: str, overrides: list[str], world_size: int):
    """The run's config composed here, as the nodes will compose it: an unknown key, a bad value or a
    batch the world size cannot split is one line now, not an error on the nodes after renting. Its
    model section is what bounds a fetch (a host's meta.json could claim any model)."""
    from launch.cli import compose_config
    from trainer.config import ConfigError

    try:
        return compose_config([f"conf={conf}", *overrides], world_size)
    except ConfigError as e:
        raise UnsafeInput(f"config error: {e} (checked here before renting)") from None


def retire_old_state(run: str) -> None:
    path = RunState.path_for(run)
    if path.exists():
        old = RunState.load(run)
        if old.live_ids() or old.creating:
            raise DriverError(f"run {run} still has instances {old.live_ids()}: `bash launch/vast_cluster.sh down "
                              f"--run {run}` first")
        os.replace(path, path.with_name(f"state.{int(time.time())}.json"))


def check_resume(path: str) -> tuple[str, str]:
    """(run name, tag) of a verified checkpoint on this machine, or an error before anything is rented."""
    resolved = (ROOT / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    if resolved.parent != (ROOT / "outputs").resolve():
        raise UnsafeInput(f"--resume {path!r}: expected outputs/RUN")
    run = check_run_name(resolved.name)
    try:
        tag = rundir.read_latest(rundir.checkpoints(resolved))
    except rundir.RunDirError as e:
        raise UnsafeInput(f"--resume {path}: {e}") from None
    if tag is None:
        raise DriverError(f"--resume {path}: no checkpoints/latest (fetch it first: `bash launch/vast_cluster.sh "
                          f"fetch --run {run}`)")
    try:
        verify(rundir.checkpoints(resolved) / tag)
    except ChecksumError as e:
        raise DriverError(f"--resume {path}: checkpoint {tag} is not complete: {e}") from None
    return run, tag


def split_argv(argv: list[str]) -> argparse.Namespace:
    overrides = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    args = parse_args(argv)
    args.overrides = args.overrides + overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = split_argv(list(sys.argv[1:] if argv is None else argv))
    with Signals() as signals:
        try:
            if args.command == "plan" or (args.dry_run and args.command in ("run", "up")):
                return plan_command(args)
            if args.command in ("run", "up"):
                return start(args, signals)
            if not args.run:
                raise UnsafeInput(f"{args.command} needs --run NAME")
            state = RunState.load(check_run_name(args.run))
            log.open(state.work / "driver.log")
            driver = Driver(args, state, signals)
            if args.command in ("status", "logs"):   # readers: no lock, no staging
                return driver.status() if args.command == "status" else driver.logs()
            with RunLock(state.work):
                return drive(driver, args.command)
        except (UnsafeInput, DriverError, VastError) as e:
            log(f"error: {e}")
            return 2 if isinstance(e, UnsafeInput) else 1
        except Interrupted:
            return signals.exit_code


def plan_command(args: argparse.Namespace) -> int:
    """`plan`: the offers `run` would pick, and what the run would take and cost. Rents nothing."""
    state, config = checked_state(args, renting=False)
    cluster, picked, made = plan_for(state, config, Provider(), args)
    if made is None:
        return 1
    if args.json:
        print(json.dumps({**made.summary(), "cluster": cluster, "offers": [m.offer for m in made.machines],
                          "machines": [dataclasses.asdict(m) for m in made.machines],
                          "estimate": dataclasses.asdict(made.estimate)}))
    else:
        print("\n".join(printable(line) for line in plan.lines(made)))
    return 0


def plan_for(state: RunState, config, provider: Provider, args: argparse.Namespace):
    """(cluster, the picked offers, the plan or None when no estimate can be made: said in one line)."""
    offers = provider.search_offers(state.gpus, state.gpu_name, args.max_dph, state.interruptible, state.disk)
    cluster, _, picked = pick_offers(offers, state.nodes)
    done = int(state.resume[4:]) if state.resume else 0
    work = plan.Workload.from_config(config, state.nodes * state.gpus, done, resume=bool(state.resume))
    try:
        return cluster, picked, plan.make_plan(picked, state.nodes, state.gpus, state.gpu_name, state.disk, work,
                                               state.interruptible, args.bid)
    except ValueError as e:
        log(f"no plan: {e}", out=True)
        return cluster, picked, None


def start(args: argparse.Namespace, signals: Signals) -> int:
    state, config = checked_state(args)
    if not args.yes and not sys.stdin.isatty():
        raise UnsafeInput("no terminal to answer `Proceed? [y/N]`: add --yes to rent without the question "
                          "(`bash launch/vast_cluster.sh plan ...` prints the cost)")
    retire_old_state(state.run)
    provider = Provider()
    cluster, picked, made = plan_for(state, config, provider, args)
    if made is None:
        raise DriverError("no plan, nothing rented: see the line above")
    print("\n".join(printable(line) for line in plan.lines(made)), flush=True)
    if not args.yes and not confirm(signals):
        log("not renting: the answer was not yes", out=True)
        return 1
    state.cluster_id, state.offers = cluster, [m.offer for m in made.machines]
    state.bids = [m.bid for m in made.machines] if state.interruptible else []
    state.rates = [m.usd_per_hour for m in made.machines]
    state.disk_rates = [m.disk_usd_per_hour for m in made.machines]
    state.total_dph, state.plan = round(made.usd_per_hour, 4), made.summary()
    state.save()
    log.open(state.work / "driver.log")
    driver = Driver(args, state, signals)
    driver._provider = provider
    with RunLock(state.work):
        return drive(driver, args.command)


def confirm(signals: Signals) -> bool:
    """`Proceed? [y/N]` on the terminal; a signal here ends the command (nothing is rented yet)."""
    with signals.interruptible():
        try:
            answer = input("Proceed? [y/N] ")
        except EOFError:
            answer = ""
    return answer.strip().lower() in ("y", "yes")


def drive(driver: Driver, command: str) -> int:
    """The commands that may spend or give back money, each inside the one teardown."""
    s, args = driver.state, driver.args
    if command == "fetch":
        with driver.signals.interruptible():
            return 0 if driver.fetcher.everything(mark=s.phase == Phase.ENDED) else 1
    if command == "down":
        code = driver.finish(args.force)
        driver.account()
        return code
    if command == "watch" and s.phase != Phase.TRAINING:
        raise DriverError(f"watch: run {s.run} is {s.phase.value}, not training (`status --run {s.run}`)")
    with driver.teardown_on_exit() as outcome:
        if command in ("run", "up"):
            driver.up()
        if command in ("run", "train"):
            driver.train()
        if command in ("up", "train") or (args.detach and command == "run"):
            outcome.keep = True
            log(f"the nodes are up{' and training' if s.phase == Phase.TRAINING else ''}. Watch: bash "
                f"launch/vast_cluster.sh status --run {s.run}  |  logs -f --run {s.run}", out=True)
            log(f"fetch: bash launch/vast_cluster.sh fetch --run {s.run}  |  tear down (fetches first): "
                f"bash launch/vast_cluster.sh down --run {s.run}"
                + (f"  |  recover from preemption: bash launch/vast_cluster.sh watch --run {s.run}"
                   if s.interruptible else ""), out=True)
            return 0
        outcome.code = recover.follow_to_end(driver)
    driver.account()
    return outcome.code
