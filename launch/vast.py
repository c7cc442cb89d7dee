"""JSON handling for launch/vast_cluster.sh: pick offers, read contract ids, check instance states.

    python -m launch.vast pick-offers --nodes N < offers.json      -> "CLUSTER_ID TOTAL_DPH OFFER..."
    python -m launch.vast contract-id < create_output              -> the new instance id
    python -m launch.vast all-running --ids 1,2 < instances.json   -> exit 0 when all are running
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


class VastError(ValueError):
    pass


def pick_offers(offers: list[dict], nodes: int) -> tuple[int, float, list[dict]]:
    """The cheapest `nodes` offers that share one physical cluster (for the overlay network)."""
    by_cluster: dict[int, list[dict]] = defaultdict(list)
    for offer in offers:
        if offer.get("cluster_id") is not None:
            by_cluster[offer["cluster_id"]].append(offer)
    best = None
    for cluster, group in by_cluster.items():
        machines, picked = set(), []
        for offer in sorted(group, key=lambda o: o["dph_total"]):
            if offer.get("machine_id") not in machines or offer.get("machine_id") is None:
                machines.add(offer.get("machine_id"))
                picked.append(offer)
        if len(picked) >= nodes:
            cost = sum(o["dph_total"] for o in picked[:nodes])
            if best is None or cost < best[1]:
                best = (cluster, cost, picked[:nodes])
    if best is None:
        sizes = {c: len(g) for c, g in by_cluster.items()}
        raise VastError(f"no cluster offers {nodes} machines matching the search (offers per cluster: {sizes})")
    return best


def contract_id(text: str) -> int:
    """The id in `vastai create instance` output: {"success": true, "new_contract": ID} (JSON or Python repr)."""
    cleaned = text.strip().replace("'", '"').replace("True", "true").replace("False", "false")
    start = cleaned.find("{")
    try:
        data = json.loads(cleaned[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not data or not data.get("success") or "new_contract" not in data:
        raise VastError(f"create instance did not succeed: {text.strip()[:300]!r}")
    return int(data["new_contract"])


def states(instances: list[dict], ids: list[int]) -> dict[int, str]:
    found = {i.get("id"): i.get("actual_status") or "unknown" for i in instances}
    return {i: found.get(i, "missing") for i in ids}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.vast")
    sub = p.add_subparsers(dest="cmd", required=True)
    po = sub.add_parser("pick-offers")
    po.add_argument("--nodes", type=int, required=True)
    sub.add_parser("contract-id")
    ar = sub.add_parser("all-running")
    ar.add_argument("--ids", required=True)
    args = p.parse_args(argv)
    text = sys.stdin.read()
    try:
        if args.cmd == "contract-id":
            print(contract_id(text))
            return 0
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VastError(f"vastai printed no JSON ({e}): {text.strip()[:200]!r}") from None
        if args.cmd == "pick-offers":
            cluster, cost, offers = pick_offers(data if isinstance(data, list) else data.get("offers", []),
                                                args.nodes)
            print(cluster, f"{cost:.4f}", *[o["id"] for o in offers])
            return 0
        ids = [int(i) for i in args.ids.split(",") if i]
        st = states(data if isinstance(data, list) else data.get("instances", []), ids)
        print(" ".join(f"{i}:{s}" for i, s in st.items()))
        return 0 if all(s == "running" for s in st.values()) else 1
    except VastError as e:
        print(f"launch.vast: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
