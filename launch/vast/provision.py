"""Renting and giving back: offers, creates, waiting for the nodes, their set-up, and the teardown's
destroy-and-confirm. Every id is in the run state the moment it exists; an instance counts as
destroyed only when a listing no longer shows it."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from launch import cluster
from launch.vast import plan
from launch.vast.checks import FORWARDED_SECRETS, UnsafeInput, check_env, instance_id
from launch.vast.provider import Provider, VastError, pick_offers
from launch.vast.state import ROOT, DriverError, Instance, Phase, RunState
from launch.vast.transport import Transport, log, tar_bytes
from trainer import rundir

# actual_status values of a node that is not coming back by itself (vast.ai's documented states)
GONE = {"exited", "stopped", "offline", "unknown"}
# of those, a machine whose disk cannot be read any more (a stopped instance's can: start it)
LOST = GONE - {"stopped"}


class Provisioner:
    def __init__(self, state: RunState, provider: Provider, transport: Transport, args):
        self.state = state
        self.provider = provider
        self.transport = transport
        self.args = args

    # --- renting ------------------------------------------------------------------------------------
    def rent(self) -> None:
        """Offers, the overlay, one create per node; each recorded as it happens."""
        s, a = self.state, self.args
        taken = [r.get("id") for r in self.provider.instances() if r.get("label") == s.run]
        if taken:
            raise DriverError(f"instances {taken} already carry the label {s.run!r}: refusing to rent more under it "
                              "(pick another --run, or tear those down)")
        if not s.offers:   # `run` and `up` picked them for the plan the user accepted; a recovery picks anew
            self.pick(self.provider.search_offers(s.gpus, s.gpu_name, a.max_dph, s.interruptible, s.disk), s.nodes)
        log(f"cluster {s.cluster_id}: {s.nodes} x {s.gpus} {s.gpu_name}, offers {s.offers}"
            + (f", bids {s.bids} $/h" if s.interruptible else ""))
        log(f"total cost: ${s.total_dph:.4f}/h for {s.nodes} nodes ({s.nodes * s.gpus} GPUs), from now until "
            f"`down`; budget cap {s.cap_text()} ({s.cap_hours() or 0:.2f} h)", out=True)
        s.phase, s.paid = Phase.RENTING, True   # from here on, teardown also sweeps by label
        s.generation_started = time.time()
        if not s.generation:
            s.created_at = s.generation_started   # the budget's clock starts with the first paid call
        s.save()
        self.provider.create_overlay(s.cluster_id, s.run)
        s.overlay = s.run
        s.save()
        env = {k: os.environ[k] for k in FORWARDED_SECRETS if os.environ.get(k)}
        for k, offer in enumerate(s.offers):
            self.create(offer, env, s.bids[k] if s.interruptible else None, s.rates[k], s.disk_rates[k])

    def pick(self, offers: list[dict], nodes: int) -> None:
        """The offers to rent, with the bid and the $/h of each (launch/vast/plan.py prices them)."""
        s = self.state
        cluster_id, _, picked = pick_offers(offers, nodes)
        priced = plan.machines(picked, s.disk, s.interruptible, getattr(self.args, "bid", None))
        s.cluster_id, s.offers = cluster_id, [m.offer for m in priced]
        s.bids = [m.bid for m in priced] if s.interruptible else []
        s.rates = [m.usd_per_hour for m in priced]
        s.disk_rates = [m.disk_usd_per_hour for m in priced]
        s.total_dph = round(sum(s.rates), 4)

    def create(self, offer: int, env: dict[str, str], bid: float | None, rate: float, disk_rate: float) -> None:
        s = self.state
        s.creating.append(offer)   # sent, answer not yet read: teardown looks for it by label
        s.save()
        try:
            new_id = self.provider.create_instance(offer, self.args.image, s.disk, s.run, s.run, env, bid=bid)
        except VastError as e:
            if e.answered:   # a clear refusal of our only request (creates are never resent)
                s.creating.remove(offer)
                s.save()
            raise
        s.instances.append(Instance(id=new_id, offer=offer, generation=s.generation, usd_per_hour=rate,
                                    disk_usd_per_hour=disk_rate, created=time.time()))
        s.creating.remove(offer)
        s.save()
        log(f"created instance {new_id} from offer {offer}")

    def wait_running(self) -> list[dict]:
        """Until every node is `running` in the listing; their validated rows, node0 first."""
        ids, deadline = self.state.node_ids(), time.time() + self.args.timeout
        while True:
            rows = {r.get("id"): r for r in self.provider.instances()}
            states = {i: (rows.get(i) or {}).get("actual_status") or "not yet" for i in ids}
            if all(v == "running" for v in states.values()):
                return [rows[i] for i in ids]
            if time.time() > deadline:
                raise DriverError(f"timed out after {self.args.timeout}s waiting for instances to run: {states}")
            log(f"waiting for instances: {states}")
            time.sleep(self.args.poll)

    def connect(self, rows: list[dict]) -> list[cluster.Node]:
        s, deadline = self.state, time.time() + self.args.timeout
        try:
            nodes = cluster.nodes_from_vast(rows, ids=s.node_ids())
        except cluster.ClusterError as e:
            raise DriverError(str(e)) from None
        cluster.write(nodes, s.work, s.ssh_key, known_hosts=str(s.work / "known_hosts"))
        for k in range(len(nodes)):
            while (proc := self.transport.run(k, "true", timeout=60, check=False)).returncode != 0:
                error = proc.stderr.decode(errors="replace").strip()[-500:]
                if time.time() > deadline:
                    raise DriverError(f"timed out after {self.args.timeout}s waiting for ssh to node{k} "
                                      f"(instance {s.node_ids()[k]}); last ssh error: {error or proc.returncode}")
                log(f"waiting for ssh to node{k}")
                time.sleep(self.args.poll)
        return nodes

    # --- the nodes' set-up ---------------------------------------------------------------------------
    def set_up(self, nodes: list[cluster.Node]) -> None:
        s = self.state
        s.phase = Phase.SETTING_UP
        s.save()
        s.master_addr = self.master_address()
        s.save()
        log(f"master address {s.master_addr} (node0's {s.net_dev})")
        key = s.work / f"{s.run}_key"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", s.run, "-f", str(key)], check=True,
                           capture_output=True, start_new_session=True)
        public, project = (s.work / f"{s.run}_key.pub").read_bytes(), project_tar()
        remote = shlex.quote(s.remote_dir)

        def one(k: int):
            self.transport.run(k, "mkdir -p ~/.ssh && chmod 700 ~/.ssh && cat >> ~/.ssh/authorized_keys",
                               stdin=public)
            self.transport.run(k, f"mkdir -p {remote} && tar -xf - -C {remote}", stdin=project)
            self.arm_guard(k)
            try:
                self.transport.run(k, self.transport.in_dir(self.setup_command()), timeout=3 * 3600)
            except DriverError as e:
                raise DriverError(self.full_disk(k) or str(e)) from None
            log(f"node{k}: code, guard, set-up and data ready")

        parallel(one, range(len(nodes)))
        self.head_files(nodes, key)
        if s.resume:
            self.upload_checkpoint()
        s.phase = Phase.UP
        s.save()

    def full_disk(self, k: int) -> str | None:
        """After a failed set-up: one line when node k's disk is full (its own logs of the failure may be
        cut short for that very reason), else None."""
        try:
            probe = self.transport.run(k, f"df -Pk {shlex.quote(self.state.remote_dir)} | tail -n 1", timeout=30,
                                       check=False)
        except DriverError:   # the set-up's own error is reported instead
            return None
        fields = probe.stdout.decode(errors="replace").split()
        if probe.returncode != 0 or len(fields) < 6 or not all(re.fullmatch(r"[0-9]{1,20}", f) for f in fields[1:4]):
            return None
        size_mb, free_mb = int(fields[1]) / 1024, int(fields[3]) / 1024
        if free_mb > max(16.0, size_mb * 0.01):
            return None
        return (f"node{k}: set-up failed with its disk full: {free_mb:.0f} MB free of {size_mb:.0f} MB on "
                f"{fields[5]} (No space left on device): rent a larger disk (--disk GB, now {self.state.disk})")

    def arm_guard(self, k: int) -> None:
        """The node's own money guard, from before its set-up: at the cap, or a grace period after
        training ends, it destroys its instance, with or without this laptop."""
        s = self.state
        # a recovery's nodes get what is left of the cap, from their own renting on
        started, hours = ((s.created_at, s.cap_hours()) if not s.generation
                          else (s.generation_started, s.hours_left()))
        reply = self.transport.agent(
            k, "guard", "--run", s.run, "--instance", str(s.node_ids()[k]), "--started", str(started),
            "--usd-per-hour", str(s.total_dph), "--max-hours", str(max(hours or 0.0, 1e-3)),
            "--grace", str(s.grace_minutes * 60), "--wait", str(self.args.stop_wait),
            "--poll", str(min(30.0, self.args.poll)),
            "--api-url", os.environ.get("VAST_URL") or "https://console.vast.ai", "--detach")
        log(f"node{k}: guard armed (pid {reply.get('guard')}): destroys the instance at the cap or "
            f"{s.grace_minutes:g} min after training ends")

    def master_address(self) -> str:
        dev = self.state.net_dev
        code = ("import fcntl,socket,struct,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"  # SIOCGIFADDR
                "a=fcntl.ioctl(s.fileno(),0x8915,struct.pack('256s',sys.argv[1].encode()[:15]));"
                "print(socket.inet_ntoa(a[20:24]))")
        out = self.transport.run(0, f"python3 -c {shlex.quote(code)} {shlex.quote(dev)}").stdout
        out = out.decode(errors="replace")
        try:
            return cluster.check_host("node0", dev, out.strip().splitlines()[-1])
        except (cluster.ClusterError, IndexError):
            raise DriverError(f"node0: could not read the address of {dev}: {out[-200:]!r}") from None

    def setup_command(self) -> str:
        s = self.state
        if self.args.node_setup:
            return self.args.node_setup
        data = " ".join(shlex.quote(o) for o in s.overrides if o.startswith(("data.", "data=")))
        setup_log = f"outputs/{s.run}/cluster/setup.log"
        return (f"mkdir -p outputs/{s.run}/cluster && {{ make setup-node && .venv/bin/python launch/prepare.py "
                f"conf={s.conf} {data} && {{ command -v pdsh || {{ apt-get update -qq && "
                f"apt-get install -y -qq pdsh; }}; }}; }} > {setup_log} 2>&1 || {{ tail -n 30 {setup_log}; exit 1; }}")

    def head_files(self, nodes: list[cluster.Node], key) -> None:
        """node0 starts the launcher: it gets the per-run key, its ssh config, the hostfile, .deepspeed_env."""
        s = self.state
        files = cluster.write(nodes, s.work / "head", f"~/.ssh/{s.run}_key", s.master_addr,
                              pythonpath=s.remote_dir, known_hosts=f"~/.ssh/{s.run}_known_hosts")
        check_env(dict(line.split("=", 1) for line in files[".deepspeed_env"].read_text().splitlines()))
        bundle = tar_bytes({f"{s.run}_key": key, f"{s.run}_config": files["ssh_config"]})
        self.transport.run(0, f"tar -xf - -C ~/.ssh && chmod 600 ~/.ssh/{s.run}_key ~/.ssh/{s.run}_config",
                           stdin=bundle)
        bundle = tar_bytes({"hostfile": files["hostfile"], ".deepspeed_env": files[".deepspeed_env"]})
        self.transport.run(0, self.transport.in_dir("tar -xf -"), stdin=bundle)

    def upload_checkpoint(self) -> None:
        """Every file of the checkpoint to every node: each converts it for this world size itself."""
        s = self.state
        source, target = rundir.checkpoints(s.run_dir), rundir.checkpoints(rundir.named(s.run))
        data = tar_bytes({s.resume: source / s.resume, rundir.LATEST: source / rundir.LATEST})

        def one(k: int):
            self.transport.run(k, self.transport.in_dir(f"mkdir -p {target} && tar -xf - -C {target}"), stdin=data,
                               timeout=3600)
            log(f"node{k}: checkpoint {s.resume} uploaded")

        parallel(one, range(len(s.node_ids())))

    # --- giving back ------------------------------------------------------------------------------------
    def destroy_all(self, hurry) -> list[str]:
        """Destroy every recorded id and every instance carrying the run's label, until a listing shows
        none of them, waiting a while for creates that got no answer; then the overlay and the key.
        `hurry()`: a second signal shortens the waits. Returns what survives, described."""
        s, a = self.state, self.args
        deadline = time.time() + a.destroy_retry
        late_until = time.time() + min(a.destroy_retry, a.late_create_wait)
        delay = min(1.0, a.poll * 3)
        while True:
            try:
                listed = self.sweep()
            except Exception as e:  # noqa: BLE001 - nothing ends the teardown early: the next round retries
                log(f"teardown: {type(e).__name__}: {e} (retrying)")
                listed = False
            waiting_late = s.creating and time.time() < late_until and not hurry()
            if listed and not s.live_ids() and not waiting_late:
                break
            if time.time() > deadline or (hurry() and listed is not None and not s.live_ids()):
                break
            time.sleep(min(delay, max(0.0, deadline - time.time())))
            delay = min(delay * 2, 30)
        self.give_back_extras()
        left = [f"instance {i}" for i in s.live_ids()]
        left += [f"a create for offer {o} got no answer and no instance labelled {s.run} appeared" for o in s.creating]
        if s.overlay and not s.overlay_deleted:
            left.append(f"overlay {s.overlay}")
        return left

    def sweep(self) -> bool:
        """One round: list, adopt instances labelled with the run, destroy what the list still shows,
        mark destroyed what it no longer shows. Returns whether the list was read."""
        present = self.refresh()
        if present is None:
            return False
        for inst in self.state.instances:
            if not inst.destroyed:
                try:
                    self.provider.destroy_instance(inst.id)
                    inst.gone_at = inst.gone_at or time.time()   # billing ends at the destroy the provider confirmed
                    log(f"asked to destroy instance {inst.id}")
                except VastError as e:
                    log(f"destroy {inst.id}: {e}")
        return True

    def refresh(self) -> set[int] | None:
        """List the account's instances: adopt those labelled with the run, mark destroyed those the
        listing no longer shows. The ids listed, or None when the listing failed."""
        s = self.state
        try:
            rows = self.provider.instances()
        except VastError as e:
            log(f"listing instances failed: {e}")
            return None
        present = set()
        for row in rows:
            try:
                present.add(instance_id(row.get("id")))
            except UnsafeInput:
                continue
            if (known := s.instance(int(row["id"]))) is not None:
                status = row.get("actual_status")
                known.status = status if isinstance(status, str) and status.isalpha() else None
            if row.get("label") == s.run and s.instance(int(row["id"])) is None:
                rate = row.get("dph_total") if isinstance(row.get("dph_total"), (int, float)) else 0.0
                s.instances.append(Instance(id=int(row["id"]), by_label=True, generation=s.generation,
                                            usd_per_hour=float(rate), created=time.time()))
                if s.creating:
                    s.creating.pop(0)
                log(f"instance {row['id']} carries this run's label but was not recorded (a create whose answer was "
                    "lost): destroying it too")
        for inst in s.instances:
            if not inst.destroyed and inst.id not in present:
                inst.destroyed = True   # the listing no longer shows it: this is what "destroyed" means
                inst.gone_at = inst.gone_at or time.time()
                log(f"instance {inst.id} is gone from the listing")
        s.save()
        return present

    def give_back_extras(self) -> None:
        s = self.state
        if s.overlay and not s.overlay_deleted:
            try:
                self.provider.delete_overlay(s.overlay)
                s.overlay_deleted = True
                log(f"deleted overlay {s.overlay}")
            except Exception as e:  # noqa: BLE001 - reported in the verdict, never the end of the teardown
                log(f"delete overlay {s.overlay}: {e}")
        s.save()
        for suffix in ("_key", "_key.pub"):
            (s.work / f"{s.run}{suffix}").unlink(missing_ok=True)
        self.transport.end_sessions()


def parallel(fn, items) -> None:
    """fn(k) for every node at once; every node's error is reported. On a signal the teardown starts at
    once: the pool is not waited for (a node's `make setup` can take minutes)."""
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        errors = []
        for future in [pool.submit(fn, k) for k in items]:
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 - each node's failure is reported, none hides another
                errors.append(e)
        if errors:
            raise DriverError("; ".join(str(e) for e in errors))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def project_tar() -> bytes:
    """The git-tracked files only, as they are in the working tree: untracked files (.env, keys,
    outputs) never leave this machine."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    names = sorted(n for n in listed.decode().split("\0") if n)
    return tar_bytes({n: ROOT / n for n in names if (ROOT / n).is_file() and not (ROOT / n).is_symlink()})
