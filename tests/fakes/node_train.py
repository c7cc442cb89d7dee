"""A stand-in for launch/train.py on a rented node (no GPU here): one process per "node" that writes
metrics.jsonl (node 0) and checkpoints in the trainer's layout, and stops like the trainer does.

Layout, as trainer/ writes it: outputs/RUN/checkpoints/stepNNNNNNNN/ holds this node's ranks' files
(zero_pp_rank_R_mp_rank_00_optim_states.pt) plus a copy of mp_rank_00_model_states.pt; meta.json,
identical on every node, lists every file of the whole checkpoint with its sha256 and size; then
`latest` names the tag, on every node. SIGTERM: save at the next step, exit 0. Resume (resume=auto):
from `latest` when every file meta.json lists is on this node (the real trainer needs that to convert
a checkpoint for another world size). Nodes agree on each step through files in $FAKE_SYNC_DIR (the
real ranks all-reduce their stop flag). Overrides read: train.max_steps, train.ckpt_every; the
environment (the tests set it on the laptop, and the fake ssh passes it on): FAKE_STEP_S (seconds a
step takes), FAKE_FAIL_AT (exit 1 at that step), FAKE_STOP_DELAY (seconds a stop request waits
before it is acted on, like a long step or a slow save). No fake.* override: the driver composes
the run's config before renting and refuses keys the trainer does not know.
"""
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())   # the node's copy of the project
from trainer.checksums import verify  # noqa: E402
from trainer.rundir import atomic_write  # noqa: E402

args = sys.argv[1:]
settings = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
run_dir = Path(settings["run_dir"])
max_steps = int(settings.get("train.max_steps", 30))
ckpt_every = int(settings.get("train.ckpt_every", 5))
fail_at = int(os.environ.get("FAKE_FAIL_AT", 0))
stop_delay = float(os.environ.get("FAKE_STOP_DELAY", 0))
node, nodes = int(os.environ["FAKE_NODE_RANK"]), int(os.environ["FAKE_NODES"])
slots, offset, world = int(os.environ["FAKE_SLOTS"]), int(os.environ["FAKE_RANK_OFFSET"]), int(os.environ["FAKE_WORLD"])
step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
sync = Path(os.environ["FAKE_SYNC_DIR"]) / os.environ["FAKE_SESSION"]
sync.mkdir(parents=True, exist_ok=True)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / f"argv.node{node}.json").write_text(json.dumps(args))
(run_dir / "config.yaml").write_text(f"train:\n  max_steps: {max_steps}\n")
if node == 0:   # rank 0's other run files, as the trainer and wandb's offline mode lay them out
    (run_dir / "tensorboard").mkdir(exist_ok=True)
    (run_dir / "tensorboard" / f"events.out.tfevents.{int(time.time())}.node0.1.0").write_bytes(os.urandom(64))
    (run_dir / "wandb" / "offline-run-1-abc" / "files").mkdir(parents=True, exist_ok=True)
    (run_dir / "wandb" / "offline-run-1-abc" / "run-abc.wandb").write_bytes(os.urandom(32))
stop = {"signal": None}
signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal="SIGTERM", at=time.time()))


def agree(step: int, flag: bool) -> bool:
    """Every node's flag for `step`; True when any is set (an all-reduce, through files)."""
    atomic_write(sync / f"{step}.{node}", "1" if flag else "0")  # a peer never reads a half-written mark
    deadline = time.time() + 120
    while True:
        marks = [sync / f"{step}.{k}" for k in range(nodes)]
        if all(m.exists() for m in marks):
            return any(m.read_text() == "1" for m in marks)
        if time.time() > deadline:
            sys.exit(f"node {node}: peers never reached step {step}")
        time.sleep(0.01)


def contents(step: int, copy: int) -> dict[str, bytes]:
    """Every file of the checkpoint; the model states as node `copy` writes them (torch.save stamps each
    copy with an id of its own, so the nodes' copies differ: meta.json lists each)."""
    files = {"mp_rank_00_model_states.pt": f"model step {step} world {world} copy {copy}\n".encode() * 40}
    for rank in range(world):
        files[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = f"optim rank {rank} step {step}\n".encode() * 60
    return files


def sums(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def save(step: int):
    tag = f"step{step:08d}"
    tag_dir = run_dir / "checkpoints" / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    every = contents(step, node)
    mine = ["mp_rank_00_model_states.pt"] + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                             for r in range(offset, offset + slots)]
    for name in mine:
        (tag_dir / name).write_bytes(every[name])
    agree(step * 1000 + 1, False)   # every node's files are on disk
    meta = {"step": step, "world_size": world, "zero_stage": 2,
            "files": {n: [sums(b)] for n, b in sorted(every.items())}}
    meta["files"]["mp_rank_00_model_states.pt"] = [sums(contents(step, k)["mp_rank_00_model_states.pt"])
                                                   for k in range(nodes)]
    atomic_write(tag_dir / "meta.json", json.dumps(meta, indent=1))
    atomic_write(run_dir / "checkpoints" / "latest", tag)
    print(f"node {node}: saved checkpoint {tag}", flush=True)


start = 0
latest = run_dir / "checkpoints" / "latest"
if latest.exists():
    tag = latest.read_text().strip()
    meta = verify(run_dir / "checkpoints" / tag)   # every file of the checkpoint must be here
    start = meta["step"]
    if meta["world_size"] != world:   # the trainer converts it for this world size inside the checkpoint
        (run_dir / "checkpoints" / tag / "universal" / "zero").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints" / tag / "universal" / "zero" / "converted.pt").write_bytes(b"universal")
    print(f"node {node}: resumed from {tag} (written by {meta['world_size']} ranks, now {world})", flush=True)
for step in range(start + 1, max_steps + 1):
    time.sleep(step_s)
    if step == fail_at:
        sys.exit(f"node {node}: failing at step {step} (FAKE_FAIL_AT)")
    stopping = agree(step, stop["signal"] is not None and time.time() >= stop["at"] + stop_delay)
    if node == 0:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "tokens": step * 1000, "loss": 4.0 / step, "lr": 1e-3,
                                "tokens_per_s": 20000.0}) + "\n")
        print(f"step {step}: loss {4.0 / step:.4f}", flush=True)
    if stopping or step % ckpt_every == 0 or step == max_steps:
        save(step)
    if stopping:
        print(f"node {node}: stop requested: saved at step {step}", flush=True)
        sys.exit(0)
