"""The driver's steps for the user's commands (up, train, follow, status, logs), and the one teardown
every exit of a paid command goes through; signals as one context manager. launch/vast/cli.py reads
the command line and picks the steps."""
from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from launch.vast import plan
from launch.vast.checks import UnsafeInput, check_tag, printable
from launch.vast.fetch import Fetcher
from launch.vast.provider import Provider, VastError
from launch.vast.provision import GONE, LOST, Provisioner
from launch.vast.state import DriverError, Phase, RunState
from launch.vast.transport import Transport, log
from trainer import rundir
from trainer.checksums import ChecksumError

DEFAULT_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel"   # torch 2.6: setup.py's torch>=2.6 keeps it
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


class Interrupted(BaseException):
    """A signal inside an interruptible step: unwind to the teardown (BaseException: no `except
    Exception` in the SDK or requests can swallow it)."""


class Signals:
    """Ctrl-C, SIGTERM, SIGHUP, counted. Inside `interruptible()` (renting, set-up, starting training)
    the first one unwinds to the teardown; elsewhere they are only counted, and the step that waits
    reads the count: while training is followed the first asks the ranks to save and stop, and every
    later one only shortens the waits. No signal ever skips the fetch or destroys unfetched work."""

    def __init__(self):
        self.count = 0
        self.first: int | None = None
        self.raising = False

    def __enter__(self):
        self.saved = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    @contextmanager
    def interruptible(self):
        self.raising = True
        try:
            if self.count:
                raise Interrupted(signal.Signals(self.first).name)
            yield
        finally:
            self.raising = False

    def hurry(self) -> bool:
        return self.count >= 2

    def _handle(self, signum, frame):
        self.count += 1
        self.first = self.first or signum
        name = signal.Signals(signum).name
        if self.raising:
            self.raising = False
            log(f"{name}: stopping; tearing down what this run rented")
            raise Interrupted(name)
        log(f"{name}: noted" + (" (the waits are shortened; unfetched work is still fetched before any destroy)"
                                 if self.count >= 2 else ""))

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(self.first, 1)


class Outcome:
    """What a paid command ends with: its exit code, and whether the nodes stay up (detached)."""

    def __init__(self):
        self.code = 0
        self.keep = False


class Driver:
    def __init__(self, args: argparse.Namespace, state: RunState, signals: Signals):
        self.args = args
        self.state = state
        self.signals = signals
        self._provider: Provider | None = None
        self.transport = Transport(state.work, state.remote_dir)
        self.fetcher = Fetcher(state, self.transport, args)
        self.last_seen: dict = {}   # node0's last status: the step a preemption interrupted
        self.first_seen_gone: dict[int, float] = {}   # instance -> the first listing that read it gone

    @property
    def provider(self) -> Provider:
        if self._provider is None:
            self._provider = Provider()
        return self._provider

    @property
    def provisioner(self) -> Provisioner:
        return Provisioner(self.state, self.provider, self.transport, self.args)

    # --- the teardown ------------------------------------------------------------------------------------
    @contextmanager
    def teardown_on_exit(self):
        """From the first paid call on, every way out but kill -9 ends in finish(): any exception (a
        bug included) and any signal."""
        outcome = Outcome()
        try:
            yield outcome
        except Interrupted:
            outcome.code = self.signals.exit_code
        except BaseException as e:  # noqa: BLE001 - whatever went wrong, the teardown runs
            known = (DriverError, VastError, UnsafeInput, ChecksumError, OSError, subprocess.SubprocessError)
            log(f"error: {e}" if isinstance(e, known) else f"error: {type(e).__name__}: {e}")
            outcome.code = 1
        if not outcome.keep:
            outcome.code = self.finish(force=False) or outcome.code

    def finish(self, force: bool) -> int:
        """Fetch, destroy, confirm by listing, one verdict. 0: nothing is left; 1: nothing is left, but a
        machine that is gone took its share of the newest checkpoint; 4: kept, because work on the nodes is
        not here (`down --force` gives it up); 3: something survives, named."""
        s = self.state
        if not s.paid:
            s.phase = Phase.DOWN
            s.save()
            return 0
        try:
            self.provisioner.refresh()   # nodes whose guards destroyed them need no fetch, and cannot give one
        except Exception as e:  # noqa: BLE001 - a failed look is no reason to skip the fetch or the destroy
            log(f"listing instances failed: {type(e).__name__}: {e}")
        if s.phase in (Phase.TRAINING, Phase.ENDED) and s.live_ids() and not self.fetch_for_teardown():
            if not force:
                log(f"NOT destroying instances {s.live_ids()}: the run's newest work on the nodes is not here and "
                    f"verified (they keep billing; {self.guards_end()}). Retry: bash "
                    f"launch/vast_cluster.sh fetch --run {s.run}; or give it up: bash launch/vast_cluster.sh down "
                    f"--run {s.run} --force")
                return 4
            log("destroying without the newest work (--force)")
        left = self.provisioner.destroy_all(self.signals.hurry)
        s.phase = Phase.DOWN
        s.save()
        if s.fetched:
            log(f"newest checkpoint here: {rundir.checkpoints(rundir.named(s.run)) / s.fetched}")
        if s.lost_work:
            log(f"work lost with instances {s.lost_work['nodes']}: {s.lost_work['newest']} could not be completed; "
                f"resume from {s.lost_work['last_good'] or 'the start'}: bash launch/vast_cluster.sh run --resume "
                f"outputs/{s.run} ...", out=True)
        if left:
            ids = " ".join(str(i) for i in s.live_ids())
            log(f"STILL BILLING after the teardown: {'; '.join(left)}. Run: bash launch/vast_cluster.sh down --run "
                f"{s.run}" + (f"   (or: vastai destroy instance ID -y for {ids})" if ids else "")
                + "; check https://cloud.vast.ai/instances/")
            return 3
        log(f"every instance of run {s.run} is destroyed (confirmed: the listing no longer shows them)")
        return 1 if s.lost_work else 0

    def guards_end(self) -> str:
        """When the nodes' guards destroy them by themselves, in words."""
        s = self.state
        cap = time.strftime("%H:%M", time.localtime(s.created_at + (s.cap_hours() or 0) * 3600))
        if s.phase == Phase.ENDED:
            grace = time.strftime("%H:%M", time.localtime(time.time() + s.grace_minutes * 60))
            return f"their guards destroy them by about {grace}, {s.grace_minutes:g} min after training ended"
        return f"their guards destroy them {s.grace_minutes:g} min after training ends, or at the cap ({cap})"

    def fetch_for_teardown(self) -> bool:
        try:
            if self.fetcher.everything(mark=True):
                return True
            lost = self.lost_nodes()
            return bool(lost) and self.fetcher.everything(mark=True, lost=tuple(lost))
        except Exception as e:  # noqa: BLE001 - any failure here is a failed fetch, never the end of the teardown
            log(f"fetch failed: {type(e).__name__}: {e}")
            return False

    def lost_nodes(self) -> list[int]:
        """Nodes whose machine is gone with its disk: listed exited, offline or unknown (or no more) in
        `confirm_polls` fresh listings, `poll` apart. Waiting for them would keep every other node billing
        for files that cannot come back; a failed listing confirms nothing."""
        s = self.state

        def gone() -> list[int]:
            return [k for k, i in enumerate(s.node_ids()) if (inst := s.instance(i)) is not None
                    and (inst.destroyed or inst.status in LOST)]

        lost = gone()
        for _ in range(self.args.confirm_polls if lost else 0):
            time.sleep(self.args.poll)
            if self.provisioner.refresh() is None:
                return []
            lost = [k for k in lost if k in gone()]
        return lost

    # --- up, train ------------------------------------------------------------------------------------------
    def up(self) -> None:
        s = self.state
        log(f"run {s.run}: from now on, `bash launch/vast_cluster.sh down --run {s.run}` tears it down from any "
            "terminal", out=True)
        with self.signals.interruptible():
            provisioner = self.provisioner
            provisioner.rent()
            nodes = provisioner.connect(provisioner.wait_running())
            provisioner.set_up(nodes)

    def train(self) -> None:
        s = self.state
        with self.signals.interruptible():
            path = f"outputs/{s.run}/cluster/train.cmd"
            self.transport.run(0, self.transport.in_dir(f"mkdir -p outputs/{s.run}/cluster && cat > {path}"),
                               stdin=self.train_command().encode())
            for k in range(len(s.node_ids())):
                self.transport.agent(k, "training-started", "--run", s.run)
            s.phase, s.train_started = Phase.TRAINING, time.time()   # before: a signal from here on still fetches
            s.save()
            started = self.transport.agent(0, "start", "--run", s.run, "--cmd-file", path)
        log(f"training started on node0 (pid {started.get('pid')}), detached: it goes on without this terminal")

    def train_command(self) -> str:
        """The command node0 runs detached. Overrides are quoted for pdsh's remote shell (inner) and for
        node0's shell (outer); check_override already refused what no quoting makes safe."""
        s = self.state
        inner = [f"conf={s.conf}", f"run_dir={rundir.named(s.run)}", f"train.cost_per_hour={s.total_dph}",
                 "resume=auto", *s.overrides]
        args = " ".join(shlex.quote(shlex.quote(o)) for o in inner)
        return (f'export PDSH_SSH_ARGS_APPEND="-F $HOME/.ssh/{s.run}_config"\n'
                f".venv/bin/deepspeed --hostfile hostfile --launcher pdsh --no_ssh_check "
                f"--master_addr {s.master_addr} launch/train.py {args}\n")

    # --- follow --------------------------------------------------------------------------------------------
    def follow(self, fetch: bool = True, owner: bool = True, watch_nodes: bool = False) -> dict:
        """Until training ends on node0: print its log, fetch each new checkpoint. For the run that owns
        the nodes (`owner`), the first signal asks the ranks to save and stop, the second ends that wait;
        for a reader (`logs -f`), a signal ends the reading. `watch_nodes` (interruptible runs): the
        listing is read at every poll too, since a preempted worker leaves node0 answering while its
        ranks wait for the lost peer."""
        s = self.state
        stop_deadline, gone, last, listed = None, {}, {}, {}
        while True:
            if owner and self.signals.count and stop_deadline is None:
                self.stop_ranks()
                stop_deadline = time.time() + self.args.stop_wait
            if not owner and self.signals.count:
                return {"state": "reader stopped"}
            if stop_deadline and (self.signals.hurry() or time.time() > stop_deadline):
                log("not waiting for the final checkpoint; fetching what the nodes hold")
                return last
            try:
                last = self.transport.agent(0, "status", "--run", s.run, "--log-from", str(s.log_offset), timeout=60)
            except DriverError as e:
                if self.nodes_gone(gone):
                    return {"state": "gone", "statuses": gone}
                log(f"status: {e} (retrying)")
                time.sleep(self.args.poll)
                continue
            gone.clear()
            self.last_seen = last
            self.show_progress(last, fetch)
            if last.get("state") not in ("running", "not started"):
                return last
            if watch_nodes and not self.signals.count and self.nodes_gone(listed):
                return {"state": "gone", "statuses": listed}
            time.sleep(self.args.poll)

    def show_progress(self, last: dict, fetch: bool) -> None:
        s = self.state
        for line in str(last.get("log") or "").splitlines():
            log(line, out=True)
        if isinstance(last.get("log_end"), int):
            s.log_offset = last["log_end"]
        newest = last.get("latest")
        if fetch and isinstance(newest, str) and newest not in (s.fetched, s.fetch_failed):
            check_tag(newest)
            self.fetcher.checkpoint()   # a failed tag is retried at the next checkpoint and at the teardown
        s.save()

    def nodes_gone(self, seen: dict) -> bool:
        """True once some node's instance has read as not coming back (exited, stopped, offline, unknown,
        or missing) in `confirm_polls` listings in a row: one odd poll is not a dead node."""
        try:
            rows = {r.get("id"): r for r in self.provider.instances()}
        except VastError as e:
            log(f"listing instances failed: {e}")
            return False
        for inst in self.state.node_ids():
            status = (rows.get(inst) or {}).get("actual_status", "missing")
            bad = status in GONE or inst not in rows
            seen[inst] = (status, seen.get(inst, (None, 0))[1] + 1 if bad else 0)
            if bad and seen[inst][1] == 1:
                self.first_seen_gone[inst] = time.time()   # a preempted node bills only its disk from about here
        worst = max(count for _, count in seen.values())
        if worst:
            log(f"node states: { {i: st for i, (st, _) in seen.items()} } ({worst}/{self.args.confirm_polls})")
        return worst >= self.args.confirm_polls

    def stop_ranks(self) -> None:
        for k in range(len(self.state.node_ids())):
            try:
                result = self.transport.agent(k, "stop", "--run", self.state.run)
                log(f"node{k}: SIGTERM to ranks {result.get('signalled')}")
            except DriverError as e:
                log(f"node{k}: could not signal the ranks: {e}")

    def outcome(self, last: dict) -> int:
        """The exit code training's end deserves, logged in words."""
        s = self.state
        state, guard = last.get("state"), last.get("guard") or {}
        s.phase = Phase.ENDED
        if state == "gone":
            s.outcome = f"gone: {last.get('statuses')}"
            log(f"a node's instance is gone ({last.get('statuses')}): fetching what exists, then destroying")
        elif guard.get("event") == "cap" and s.cap_reached():
            s.outcome = "stopped at the budget cap"
            log(f"the nodes stopped training at the budget cap ({s.cap_text()}): fetching, then destroying")
        elif state == "succeeded":
            s.outcome = "succeeded"
        elif state == "lost":
            s.outcome = "lost"
            log("training on node0 is not running and left no exit code (a container restart, or killed): "
                "a failure; fetching what exists")
        else:
            s.outcome = f"failed (exit {last.get('exit')})" if last else "stopped"
            if last.get("exit") not in (0, None):
                log(f"training failed on node0 (exit {last.get('exit')}); the checkpoints so far are fetched "
                    "before the nodes are destroyed")
        s.save()
        if self.signals.count:
            return self.signals.exit_code
        return 0 if s.outcome in ("succeeded", "stopped at the budget cap") else 1

    # --- the plan against what happened ---------------------------------------------------------------------
    def against_plan(self) -> list[str]:
        """The plan's hours and dollars beside those so far (or in all, once down); each preemption."""
        s = self.state
        if not s.paid:
            return []
        end = s.ended_at or time.time()
        hours, spent = (end - s.created_at) / 3600, s.spent_usd(end)
        so_far = "in all" if s.ended_at else "so far"
        out = [f"{so_far}: {hours:.2f} h since renting, spent about ${spent:.2f} (each instance's $/h from its "
               "create to its destroy)"]
        if s.plan:
            out.append(f"plan: {s.plan['hours']:.2f} h, ${s.plan['usd']:.2f} at ${s.plan['usd_per_hour']:.4f}/h "
                       f"({s.plan['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU expected); "
                       f"happened: {hours / s.plan['hours']:.0%} of the time, {spent / s.plan['usd']:.0%} of the "
                       "dollars" if s.plan.get("hours") and s.plan.get("usd") else "plan: no figures")
        for k, p in enumerate(s.preemptions, 1):
            out.append(f"preemption {k}: at {time.strftime('%H:%M:%S', time.localtime(p['at']))}, step "
                       f"{p['step']}; resumed from step {p['resumed_from']}, {p['lost_steps']} steps lost "
                       f"({p['lost_s']:.0f} s of work); recovery {p.get('recovery_s', 0):.0f} s, "
                       f"${p.get('recovery_usd', 0):.4f}")
        return out

    def account(self) -> None:
        """After the teardown: the plan against what happened, and the run's measured tokens/s per GPU
        into the local table that later plans read first (launch/vast/plan.py)."""
        s = self.state
        if s.phase != Phase.DOWN or s.live_ids():
            return
        if s.ended_at is None:
            s.ended_at = time.time()
            s.save()
        for line in self.against_plan():
            log(line, out=True)
        recorded = s.work / "throughput.recorded"
        if recorded.exists() or not s.model:
            return
        per_gpu = plan.measured_per_gpu(s.run_dir, s.nodes * s.gpus)
        if per_gpu is None:
            return
        train = s.model
        row = plan.Measured(gpu=s.gpu_name.replace("_", " "), shape=plan.Shape(
            train["n_layer"], train["n_head"], train["d_model"], train["block_size"]), precision=s.precision,
            tokens_per_s_per_gpu=round(per_gpu, 1), source=f"run {s.run} on vast.ai, "
            f"{time.strftime('%Y-%m-%d', time.localtime(s.created_at))}, {s.nodes} x {s.gpus} GPUs",
            compile="train.compile=true" in s.overrides, world_size=s.nodes * s.gpus)
        path = plan.record(row)
        recorded.write_text(str(path))
        log(f"measured {per_gpu:,.0f} tokens/s per GPU: added to {path}, which later plans read first", out=True)

    # --- status, logs ------------------------------------------------------------------------------------
    def status(self) -> int:
        s = self.state
        print(f"run {s.run}: phase {s.phase.value}, instances {s.live_ids()}, ${s.total_dph}/h, cap {s.cap_text()}"
              + (f", interruptible (bids {s.bids} $/h), renting {s.generation + 1}" if s.interruptible else ""))
        for line in self.against_plan():
            print(line)
        print(f"fetched and verified here: {s.fetched or 'nothing yet'}")
        if s.phase not in (Phase.TRAINING, Phase.ENDED) or not s.live_ids():
            return 0
        try:
            # an offset past any log: the status without its text
            st = self.transport.agent(0, "status", "--run", s.run, "--log-from", str(10 ** 17))
        except DriverError as e:
            return self.status_unreachable(e)
        print(f"training {st.get('state')}" + (f" (exit {st.get('exit')})" if st.get("exit") is not None else "")
              + f"; latest checkpoint on the nodes: {st.get('latest') or 'none'}")
        metrics = st.get("metrics") if isinstance(st.get("metrics"), dict) else {}
        if metrics:
            elapsed = time.time() - (st.get("started") or time.time())
            eta = ""
            if st.get("max_steps") and metrics.get("step"):
                rate = metrics["step"] / max(elapsed, 1e-9)
                eta = f", ETA {(st['max_steps'] - metrics['step']) / rate / 60:.1f} min" if rate > 0 else ""
            print(printable(f"step {metrics.get('step')}, loss {metrics.get('loss')}, tokens/s "
                           f"{metrics.get('tokens_per_s', 0):.0f}, training for {elapsed / 60:.1f} min{eta}"))
        if st.get("guard"):
            print(printable(f"guard: {st['guard']}"))
        return 0 if st.get("state") in ("running", "succeeded") else 1

    def status_unreachable(self, error: Exception) -> int:
        print(f"node0 unreachable: {error}")
        try:
            rows = {r.get("id"): r.get("actual_status") for r in self.provider.instances()}
        except VastError as e:
            print(f"the provider could not be asked either: {e}")
            return 1
        states = {i: rows.get(i, "gone") for i in self.state.live_ids()}
        print(printable(f"instances: {states}"))
        print(f"stopped or offline instances keep billing their disks. Fetch and destroy: bash launch/vast_cluster.sh "
              f"down --run {self.state.run}   (give unfetched work up: add --force)")
        return 1

    def logs(self) -> int:
        if not self.args.follow:
            st = self.transport.agent(0, "status", "--run", self.state.run, "--log-from", "0")
            sys.stdout.write(printable(str(st.get("log", ""))))
            return 0
        self.state.log_offset = 0
        last = self.follow(fetch=False, owner=False)
        if last.get("state") == "reader stopped":
            return self.signals.exit_code
        return 0 if last.get("state") == "succeeded" else 1
