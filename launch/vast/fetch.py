"""Bringing the run home: the newest checkpoint from every node (each holds its own ranks' files),
verified against its meta.json, and the rest of the run dir (metrics, logs, TensorBoard events,
config, wandb's offline files), verified against the manifest node0 packs with it. Everything a node
sends is untrusted: members are checked by name and kind, and each fetch is bounded in size."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from launch.vast.checks import SAFE_FILE, printable
from launch.vast.state import DriverError, RunState
from launch.vast.transport import Transport, log
from trainer import rundir
from trainer.checksums import META, ChecksumError, SizeBounds, size_bounds, verify

RUN_FILES_MAX_BYTES = 8 << 30   # metrics, logs, events and wandb files of one run: far below this


class Fetcher:
    def __init__(self, state: RunState, transport: Transport, args):
        self.state = state
        self.transport = transport
        self.args = args
        self.lost: set[int] = set()

    @property
    def local(self) -> Path:
        return rundir.checkpoints(self.state.run_dir)

    def everything(self, mark: bool, lost: tuple[int, ...] = ()) -> bool:
        """The run files and the newest checkpoint. True when both are here and verified; then, with
        `mark`, the nodes are told so: once training has ended, that mark lets their guards destroy them
        without waiting out the grace period, so it comes last, and only from the teardown. `lost`: nodes
        whose machines are gone (confirmed by the caller): not asked, and their share not waited for."""
        self.lost = set(lost)
        files = self.run_files()
        complete = self.checkpoint() and files
        if complete and mark:
            self.mark_fetched(self.state.fetched or "none")   # "none": the run's files, and no checkpoint yet
        return complete

    def nodes(self) -> list[int]:
        """The nodes (by index, node0 first) whose instances still exist and are not lost: a node its guard
        destroyed has nothing more to give."""
        destroyed = {i.id for i in self.state.instances if i.destroyed}
        return [k for k, inst in enumerate(self.state.node_ids()) if inst not in destroyed and k not in self.lost]

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint(self) -> bool:
        """The newest checkpoint on the nodes, here and verified (or none exists yet)."""
        s, nodes = self.state, self.nodes()
        latest, failed = {}, []
        for k in nodes:   # a node's `latest` moves only once every node has written that checkpoint
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
        s.seen_latest = max(tag, s.seen_latest or "")
        if s.fetched != tag:
            for k in (k for k in nodes if k not in failed):
                try:
                    self.with_retries(f"node{k}: fetch {tag}", lambda k=k: self.checkpoint_from(k, tag))
                except DriverError as e:
                    failed.append(k)
                    log(f"node{k}: fetching {tag} failed: {e}; going on with the other nodes")
        return self.accept(tag, failed)

    def accept(self, tag: str, failed: list[int]) -> bool:
        s = self.state
        try:
            verify(self.local / tag)
        except ChecksumError as e:
            log(f"checkpoint {tag} is not complete here: {e}" + (f" (nodes {failed} failed)" if failed else ""))
            s.fetch_failed = tag
            s.save()
            if self.lost and not failed:   # what is missing went with the lost machines
                self.give_up_on(tag)
                return True
            return False
        if s.fetched != tag:
            rundir.atomic_write(self.local / rundir.LATEST, tag)
            s.fetched, s.fetch_failed = tag, None
            s.save()
            log(f"checkpoint {tag} fetched from {len(self.nodes())} nodes and verified: "
                f"{rundir.checkpoints(rundir.named(s.run)) / tag}")
        return not failed

    def give_up_on(self, tag: str) -> None:
        s = self.state
        lost = sorted(self.lost)
        s.lost_work = {"nodes": [s.node_ids()[k] for k in lost], "newest": tag, "last_good": s.fetched}
        s.save()
        names = ", ".join(f"node{k} (instance {s.node_ids()[k]}, {s.instance(s.node_ids()[k]).status})" for k in lost)
        log(f"{names}: its machine is gone, and its share of {tag} with it: the newest checkpoint that can be "
            f"brought home is {s.fetched or 'none'}", out=True)

    def mark_fetched(self, tag: str) -> None:
        for k in self.nodes():   # the guards wait for this before destroying their nodes
            try:
                self.transport.agent(k, "fetched", "--run", self.state.run, "--tag", tag)
            except DriverError as e:
                log(f"node{k}: could not mark {tag} fetched ({e}): its guard waits out the grace period")

    def latest_on(self, k: int) -> str | None:
        command = f"cat {rundir.checkpoints(rundir.named(self.state.run)) / rundir.LATEST} 2>/dev/null || true"
        tag = self.transport.run(k, self.transport.in_dir(command)).stdout.decode(errors="replace").strip()
        if tag and not rundir.is_tag(tag):
            raise DriverError(f"node{k}: its checkpoints/latest names {printable(tag[:80])!r}, not a checkpoint")
        return tag or None

    def checkpoint_from(self, k: int, tag: str) -> None:
        """Node k's share of `tag`: regular files with checkpoint-like names directly inside `tag/` are
        taken, sub-folders (a universal/ conversion made on the node) skipped, anything else refused."""
        staging = self.staging(f"node{k}")
        received: list[str] = []
        bounds = self.bounds()

        def accept(member, source) -> int:
            parts = member.name.rstrip("/").split("/")
            if parts[0] == tag and ".." not in parts and (member.isdir() or len(parts) > 2):
                return 0
            if not (member.isfile() and len(parts) == 2 and parts[0] == tag and SAFE_FILE.fullmatch(parts[1])):
                raise DriverError(f"node{k}: unexpected entry {printable(member.name)!r} in the checkpoint archive")
            if bounds and member.size > bounds.of(parts[1]):
                raise DriverError(f"node{k}: {tag}/{printable(parts[1])} is {member.size} bytes; a checkpoint of "
                                  f"this model holds no such file over {bounds.of(parts[1])} bytes: fetch stopped")
            received.append(parts[1])
            return copy_stream(source, staging / parts[1])

        command = self.transport.in_dir(f"tar -cf - -C {rundir.checkpoints(rundir.named(self.state.run))} {tag}")
        total = bounds.total if bounds else self.args.fetch_max_gb * (1 << 30)
        self.transport.receive(k, command, accept, total)
        target = self.local / tag
        target.mkdir(parents=True, exist_ok=True)
        meta = staging / META
        if meta.exists() and (target / META).exists() and meta.read_bytes() != (target / META).read_bytes():
            raise DriverError(f"node{k}: its {tag}/{META} differs from another node's")
        for name in received:
            os.replace(staging / name, target / name)
        log(f"node{k}: {tag}: {len(received)} files")

    def bounds(self) -> SizeBounds | None:
        """The most each file of one of this run's checkpoints may weigh, from the model config composed
        on this laptop (trainer/checksums.size_bounds)."""
        s = self.state
        if not s.model:
            return None
        return size_bounds(s.model, len(s.node_ids()) * s.gpus, s.zero_stage, precision=s.precision)

    # --- the rest of the run dir ----------------------------------------------------------------------------
    def run_files(self) -> bool:
        """node0's run dir without checkpoints (metrics.jsonl, config.yaml, tensorboard/, wandb/), and
        every node's cluster/ logs into cluster/nodeK/. True when every node's pack arrived verified."""
        ok = True
        for k in self.nodes():
            try:
                self.with_retries(f"node{k}: run files", lambda k=k: self.run_files_from(k))
            except DriverError as e:
                log(f"node{k}: fetching the run files failed: {e}")
                ok = False
        return ok

    def run_files_from(self, k: int) -> None:
        s = self.state
        staging = self.staging(f"files{k}")
        received: dict[str, str] = {}
        manifest: dict = {}

        def accept(member, source) -> int:
            name = member.name
            parts = name.split("/")
            if member.isdir():
                return 0
            if name == ".manifest.json" and member.isfile():
                manifest.update(json.loads(source.read(1 << 24) or b"{}"))
                return member.size
            if not member.isfile() or any(not SAFE_FILE.fullmatch(p) for p in parts):
                raise DriverError(f"node{k}: unexpected entry {printable(name)!r} in the run files")
            received[name] = ""
            return copy_stream(source, staging / name)

        mode = ["--cluster-only"] if k else []
        command = self.transport.in_dir(f"python3 launch/vast/pack.py --run {s.run} " + " ".join(mode))
        self.transport.receive(k, command, accept, RUN_FILES_MAX_BYTES)
        self.check_manifest(k, staging, received, manifest)
        for name in received:
            local = self.place(k, name)
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, local)
        log(f"node{k}: {len(received)} run files (metrics, logs, events, config) verified")

    def check_manifest(self, k: int, staging: Path, received: dict, manifest: dict) -> None:
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != set(received):
            raise DriverError(f"node{k}: the run files do not match their manifest")
        for name, (size, digest) in files.items():
            data = (staging / name).read_bytes()
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise DriverError(f"node{k}: {printable(name)} arrived damaged (size or sha256 differ)")

    def place(self, k: int, name: str) -> Path:
        """Where a node's run file goes here: cluster/ is this laptop's own, so a node's goes to cluster/nodeK/."""
        if name.startswith("cluster/"):
            return self.state.work / f"node{k}" / name.split("/", 1)[1]
        return self.state.run_dir / name

    # --- shared ---------------------------------------------------------------------------------------------
    def staging(self, name: str) -> Path:
        """A staging folder of this process's own (the run lock keeps other commands out; the pid keeps a
        stale folder of a killed one apart)."""
        path = self.state.work / "incoming" / f"{name}.{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def with_retries(self, what: str, fn):
        delay = self.args.fetch_backoff
        for attempt in range(1, self.args.fetch_attempts + 1):
            try:
                return fn()
            except (DriverError, OSError) as e:   # OSError: this laptop's disk (full, a file in the way)
                if attempt == self.args.fetch_attempts:
                    raise DriverError(f"{what}: {e}") from None
                log(f"{what}: attempt {attempt} failed ({str(e)[:200]}); retrying in {delay:.1f}s")
                time.sleep(delay)
                delay *= 2


def copy_stream(source, target: Path) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "wb") as out:
        while block := source.read(1 << 20):
            out.write(block)
            written += len(block)
    return written
