"""Following a run to its end, and for an interruptible run (`--interruptible`), recovering from
preemption by itself: when the provider stops a node (outbid: `stopped` or `exited` in the listing),
fetch what exists, destroy every node, rent replacements (from --nodes down to --nodes-min, waiting
for offers while the budget lasts), and resume from the newest checkpoint verified here; until
training ends or the budget is spent. Each preemption is recorded (when, at which step, the work
lost, what the recovery cost) in the run state, in metrics.jsonl and in TensorBoard."""
from __future__ import annotations

import json
import time

from launch.vast.provider import VastError, pick_offers
from launch.vast.provision import GONE
from launch.vast.state import Phase
from launch.vast.transport import log, tar_bytes
from trainer import rundir

PREEMPTED = {"stopped", "exited"}   # vast.ai's states of an outbid interruptible instance


def follow_to_end(driver) -> int:
    """Follow training to its end; an interruptible run recovers from each preemption on the way."""
    s = driver.state
    while True:
        last = driver.follow(watch_nodes=s.interruptible)
        if not s.interruptible or driver.signals.count or not preempted(driver, last):
            return driver.outcome(last)
        if not recover(driver):
            return driver.outcome(last)


def preempted(driver, last: dict) -> bool:
    """A node gone, or training ended badly while the listing shows a node stopped or exited; not the
    budget cap, which the guards enforce on purpose."""
    if (last.get("guard") or {}).get("event") == "cap" or last.get("state") == "succeeded":
        return False
    if last.get("state") == "gone":
        return True
    try:
        rows = {r.get("id"): r.get("actual_status") for r in driver.provider.instances()}
    except VastError as e:
        log(f"listing instances failed: {e}")
        return False
    return any(rows.get(i) in PREEMPTED or i not in rows for i in driver.state.node_ids())


def recover(driver) -> bool:
    """Fetch, destroy, rent anew, resume. False when it cannot go on (budget spent, a signal, a
    teardown that left something): the caller ends the run through the usual teardown."""
    s, started = driver.state, time.time()
    step = (driver.last_seen.get("metrics") or {}).get("step") or 0
    mark_stopped(driver, started)
    log(f"preemption: a node of renting {s.generation + 1} is stopped, at about step {step}: fetching what "
        "exists, destroying every node, renting replacements", out=True)
    fetch_what_exists(driver)
    left = driver.provisioner.destroy_all(driver.signals.hurry)
    if left:
        log(f"not renting replacements: {'; '.join(left)} still there")
        return False
    resumed_from = int(s.fetched[4:]) if s.fetched else 0
    lost = max(0, int(step) - resumed_from)
    event = {"at": started, "step": int(step), "resumed_from": resumed_from, "lost_steps": lost,
             "lost_s": lost * step_seconds(driver, int(step), started), "nodes_before": s.nodes,
             "usd_before": s.spent_usd(started)}
    s.preemptions.append(event)
    s.save()
    for attempt in range(3):   # an offer taken between the search and the create: search again
        if not rent_replacements(driver):
            return False
        try:
            driver.up()
            break
        except VastError as e:
            if not e.answered or attempt == 2 or driver.provisioner.destroy_all(driver.signals.hurry):
                raise
            log(f"renting replacements failed: {e}; searching again")
    now = time.time()   # the new nodes hold the code, the data and the checkpoint: training starts now
    event.update(recovery_s=now - started, nodes_after=s.nodes,
                 recovery_usd=s.spent_usd(now) - event["usd_before"]
                 + event["lost_s"] * s.total_dph / 3600)   # the new nodes pay for the steps done again
    s.save()
    history(driver, event)
    driver.train()
    log(f"recovered on {s.nodes} nodes from step {resumed_from}: {lost} steps lost, recovery took "
        f"{event['recovery_s']:.0f} s and cost about ${event['recovery_usd']:.4f}", out=True)
    return True


def step_seconds(driver, step: int, now: float) -> float:
    """A step's time as measured on the preempted nodes: the trainer's step_time_s, else the steps this
    renting trained over the time it trained (start-up included: an upper bound), else the plan's."""
    s = driver.state
    measured = (driver.last_seen.get("metrics") or {}).get("step_time_s")
    if isinstance(measured, (int, float)) and measured > 0:
        return float(measured)
    first = s.preemptions[-1]["resumed_from"] if s.preemptions else (int(s.resume[4:]) if s.resume else 0)
    if s.train_started and step > first:
        return (now - s.train_started) / (step - first)
    return float(s.plan.get("step_seconds") or 0.0)


def mark_stopped(driver, now: float) -> None:
    """A stopped node bills only its disk from here on (recorded so the cost account follows billing)."""
    try:
        rows = {r.get("id"): r.get("actual_status") for r in driver.provider.instances()}
    except VastError:
        return
    for inst in driver.state.instances:
        if not inst.destroyed and rows.get(inst.id) in GONE and inst.stopped_at is None:
            inst.stopped_at = driver.first_seen_gone.get(inst.id, now)


def fetch_what_exists(driver) -> None:
    try:
        driver.fetcher.everything(mark=False)
    except Exception as e:  # noqa: BLE001 - a stopped node cannot give its share: what arrived is kept
        log(f"fetch failed: {type(e).__name__}: {e}")
    log(f"newest checkpoint verified here: {driver.state.fetched or 'none: training starts over'}")


def rent_replacements(driver) -> bool:
    """Offers for --nodes, else fewer down to --nodes-min; none: wait and search again while the
    budget lasts. The picked offers go into the state for the next renting."""
    s, a = driver.state, driver.args
    while True:
        left = s.hours_left()
        if left is not None and left * 3600 < a.timeout:   # not even time to set the nodes up
            log(f"the budget ({s.cap_text()}) is spent or nearly: not renting replacements", out=True)
            return False
        if driver.signals.count:
            return False
        try:
            offers = driver.provider.search_offers(s.gpus, s.gpu_name, a.max_dph, True, s.disk)
        except VastError as e:
            offers = []
            log(f"search offers failed: {e}")
        for count in range(s.nodes, s.nodes_min - 1, -1):
            try:
                pick_offers(offers, count)
            except VastError:
                continue
            if not fits(driver, count):
                continue
            next_renting(driver, offers, count)
            return True
        wait = max(a.poll * 6, 1.0)
        log(f"no cluster offers {s.nodes_min}-{s.nodes} machines now: searching again in {wait:.0f} s")
        time.sleep(wait)


def fits(driver, count: int) -> bool:
    """The run's config composes for this many nodes (a fixed train.global_batch may not split)."""
    from launch.vast.checks import UnsafeInput
    from launch.vast.cli import check_config  # Hydra: composed only when a recovery needs it

    s = driver.state
    try:
        check_config(s.conf, s.overrides, count * s.gpus)
    except UnsafeInput as e:
        log(f"not {count} nodes: {e}")
        return False
    return True


def next_renting(driver, offers: list[dict], count: int) -> None:
    s = driver.state
    s.generation += 1
    s.nodes = count
    driver.provisioner.pick(offers, count)
    s.overlay, s.overlay_deleted, s.master_addr = None, False, None
    s.log_offset, s.fetch_failed, s.resume = 0, None, s.fetched
    s.phase, s.outcome = Phase.RENTING, None
    (s.work / "known_hosts").unlink(missing_ok=True)   # a reused address has a new host key
    s.save()
    log(f"renting {s.generation + 1}: {count} nodes at ${s.total_dph:.4f}/h (bids {s.bids} $/h)", out=True)


def history(driver, event: dict) -> None:
    """The preemption in metrics.jsonl and TensorBoard here, at the step training resumes from (the
    trainer keeps what was logged up to there and appends); node0 gets them before training starts."""
    s = driver.state
    metrics = rundir.metrics_path(s.run_dir)
    record = {"step": event["resumed_from"], "event": "preemption", "at": event["at"],
              "preempted_step": event["step"], "lost_steps": event["lost_steps"], "lost_s": event["lost_s"],
              "recovery_s": event["recovery_s"], "recovery_usd": event["recovery_usd"]}
    s.run_dir.mkdir(parents=True, exist_ok=True)
    with open(metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    tensorboard(s.run_dir / "tensorboard", event)
    files = {name: s.run_dir / name for name in (rundir.METRICS, "tensorboard") if (s.run_dir / name).exists()}
    if not files:
        return
    target = rundir.named(s.run)
    driver.transport.run(0, driver.transport.in_dir(f"mkdir -p {target} && tar -xf - -C {target}"),
                         stdin=tar_bytes(files), timeout=600)


def tensorboard(folder, event: dict) -> None:
    """Scalars under preemption/ at the resumed step (TensorBoard hides a resumed run's later steps)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        log("tensorboard is not installed here: the preemption is in metrics.jsonl and state.json only")
        return
    folder.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(folder), filename_suffix=".preemptions")
    values = [Summary.Value(tag=f"preemption/{name}", simple_value=float(event[key]))
              for name, key in (("at_step", "step"), ("lost_steps", "lost_steps"), ("lost_s", "lost_s"),
                                ("recovery_s", "recovery_s"), ("recovery_usd", "recovery_usd"))]
    writer.add_event(Event(wall_time=event["at"], step=event["resumed_from"], summary=Summary(value=values)))
    writer.close()

