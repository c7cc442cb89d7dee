"""`plan` and the question before renting, against the stand-in API with the real `vastai` SDK (the
world of tests/fakes/harness.py): what a run will cost and take, the cost checked against what the
stand-in bills for the planned hours; `Proceed? [y/N]` answered on a real pseudo-terminal; and the
measured tokens/s of a finished run, which later plans read first."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from harness import SECRET  # noqa: E402

from launch.vast import plan  # noqa: E402

pytestmark = [pytest.mark.processes, pytest.mark.cluster,
              pytest.mark.skipif(__import__("shutil").which("ssh-keygen") is None,
                                 reason="ssh-keygen missing (`make test-cluster` installs openssh-client)")]


def _bid_offers(world) -> None:
    for offer in world.api.offers:   # vast.ai's bid offers: a min_bid below the on-demand price
        offer["min_bid"] = round(offer["dph_total"] * 0.45, 4)


def _plan(world, *extra) -> dict:
    proc = world.driver("plan", "--json", *world.args(*extra)[2:])   # the same flags `run` takes
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.no_nodes
@pytest.mark.parametrize("interruptible", [False, True])
def test_plan_rents_nothing_and_costs_what_the_standin_bills(world, interruptible):
    """`plan` only searches; renting its offers (with the real SDK, at its bids) for its hours bills
    exactly its GPU-and-disk cost in the stand-in."""
    _bid_offers(world)
    extra = ("--interruptible",) if interruptible else ()
    made = _plan(world, *extra)
    api = world.api
    assert [r["method"] for r in api.requests] == ["POST"] and api.alive() == []
    assert made["hours"] > 0 and made["usd"] == pytest.approx(made["machine_usd"])   # no bandwidth priced
    from vastai import VastAI
    sdk = VastAI(api_key=SECRET, server_url=api.url, retry=1)
    for m in made["machines"]:
        sdk.create_instance(m["offer"], image="img", disk=100, label=world.run_name, price=m["bid"])
    creates = api.calls("PUT", r"/api/v0/asks/\d+/")
    assert [c["body"]["price"] for c in creates] == [m["bid"] for m in made["machines"]]
    assert all((c["body"]["price"] is not None) == interruptible for c in creates)
    start = min(row["start_date"] for row in api.instances.values())
    billed = api.billed_usd(now=start + made["hours"] * 3600)
    assert billed == pytest.approx(made["machine_usd"], abs=1e-3)
    if interruptible:   # the bid is min_bid + 20%, and the disk bills beside it
        offers = {o["id"]: o for o in api.offers}
        for m in made["machines"]:
            assert m["bid"] == pytest.approx(offers[m["offer"]]["min_bid"] * (1 + plan.BID_MARGIN), abs=1e-4)
            assert m["usd_per_hour"] == pytest.approx(m["bid"] + 0.1 * 100 / 720)
    for inst in api.alive():
        sdk.destroy_instance(inst)
    assert api.alive() == []


@pytest.mark.no_nodes
def test_the_plan_says_where_its_tokens_per_s_come_from(world):
    """wiki_full on H100 SXM: the measured row of that GPU and model shape, as is; on an A100 (no row):
    scaled by peak bf16 FLOP/s, and the plan says so."""
    table = json.loads(plan.DATA.read_text())["measured"]
    rows = [r for r in table if r["gpu"] == "H100 SXM" and r["model"]["n_layer"] == 12 and not r["compile"]]
    argv = ("--nodes", "1", "--gpus", "8", "--conf", "wiki_full")
    proc = world.driver("plan", *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"tokens/s per GPU: {rows[0]['tokens_per_s_per_gpu']:,.0f}; measured on H100 SXM" in proc.stdout
    assert "38,000 steps x 524,288 tokens (512 sequences of 1024)" in proc.stdout
    for offer in world.api.offers:
        offer["gpu_name"] = "A100 SXM4"
    scaled = world.driver("plan", *argv, "--gpu-name", "A100_SXM4")
    assert scaled.returncode == 0, scaled.stderr[-2000:]
    expected = rows[0]["tokens_per_s_per_gpu"] * 312 / 989   # trainer/peaks.py: A100 312, H100 SXM 989 TFLOP/s
    assert f"tokens/s per GPU: {expected:,.0f}" in scaled.stdout
    assert "scaled from H100 SXM bf16 by peak FLOP/s (989 -> 312 TFLOP/s in bf16)" in scaled.stdout
    assert "assuming the same MFU" in scaled.stdout
    assert world.api.calls("PUT") == []


@pytest.mark.no_nodes
def test_without_a_terminal_run_asks_for_yes_and_sends_nothing(world):
    args = [a for a in world.args() if a != "--yes"]
    proc = world.driver(*args, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "add --yes" in lines[0], proc.stderr
    assert world.api.requests == []


def _on_a_terminal(world, argv: list[str], answer: bytes, timeout: float = 120) -> tuple[int, str]:
    """The driver with a pseudo-terminal as its stdin/stdout/stderr; `answer` typed at the question."""
    main, child = pty.openpty()
    proc = subprocess.Popen(["bash", "launch/vast_cluster.sh", *argv], cwd=ROOT, env=world.env, stdin=child,
                            stdout=child, stderr=child, start_new_session=True)
    os.close(child)
    out, asked, deadline = b"", False, time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:   # the child closed the terminal
                break
            out += chunk
        if not asked and b"Proceed? [y/N]" in out:
            os.write(main, answer)
            asked = True
        if proc.poll() is not None and not ready:
            break
    code = proc.wait(timeout=10)
    os.close(main)
    return code, out.decode(errors="replace")


@pytest.mark.no_nodes
def test_on_a_terminal_no_rents_nothing(world):
    code, out = _on_a_terminal(world, [a for a in world.args() if a != "--yes"], b"n\n")
    assert code == 1 and "not renting: the answer was not yes" in out, out[-2000:]
    assert "total $" in out.split("Proceed?")[0]   # the plan came before the question
    assert world.api.calls("PUT") == [] and world.api.alive() == []


def test_on_a_terminal_yes_runs_then_sets_the_plan_against_what_happened(world):
    """Answered y: the run goes through; at its end the plan's hours and dollars beside what happened,
    and its measured tokens/s per GPU in the local table, which the next plan reads first."""
    code, out = _on_a_terminal(world, [a for a in world.args(steps=12) if a != "--yes"], b"y\n")
    assert code == 0, out[-3000:]
    assert "happened:" in out and "in all:" in out
    table = world.tmp / "laptop" / ".cache" / "shakespeare_transformer" / "measured_throughput.jsonl"   # $HOME
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["world_size"] == 4 and world.run_name in rows[0]["source"]
    metrics = [json.loads(line) for line in (world.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(metrics[-1]["tokens_per_s"] / 4)
    later = _plan(world)
    assert later["tokens_per_s_per_gpu"] == rows[0]["tokens_per_s_per_gpu"]
    assert later["estimate"]["source"].startswith("measured here on H100 SXM")
    status = world.driver("status", "--run", world.run_name)
    assert "plan:" in status.stdout and "happened:" in status.stdout, status.stdout
    world.assert_clean(out)
