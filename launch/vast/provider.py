"""The provider: vast.ai through the official `vastai` SDK, and offer picking.

An answer is a success only when the HTTP status and the body both say so: the API can answer 200
with `{"success": false}`, which the SDK hands back without raising. Creates go through a client
that sends each request once: the SDK retries a timed-out request, and a second create for one offer
is answered 400 although the first may have created an instance. docs/clusters.md lists what each
call sends and raises.
"""
from __future__ import annotations

import os
from collections import defaultdict

from launch.vast.checks import check_run_name, instance_id, printable


class VastError(RuntimeError):
    """The provider refused, failed, or answered something unusable. `answered`: it replied with a
    clear refusal, so the call certainly did nothing; otherwise it may have."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


def pick_offers(offers: list[dict], nodes: int) -> tuple[int, float, list[dict]]:
    """The cheapest `nodes` offers on distinct machines of one physical cluster (for the overlay)."""
    by_cluster: dict[int, list[dict]] = defaultdict(list)
    for offer in offers:
        if isinstance(offer, dict) and offer.get("cluster_id") is not None and _price(offer) is not None:
            by_cluster[offer["cluster_id"]].append(offer)
    best = None
    for cluster, group in by_cluster.items():
        machines, picked = set(), []
        for offer in sorted(group, key=_price):
            if offer.get("machine_id") is None or offer.get("machine_id") not in machines:
                machines.add(offer.get("machine_id"))
                picked.append(offer)
        if len(picked) >= nodes:
            cost = sum(_price(o) for o in picked[:nodes])
            if best is None or cost < best[1]:
                best = (cluster, cost, picked[:nodes])
    if best is None:
        sizes = {c: len(g) for c, g in by_cluster.items()}
        raise VastError(f"no cluster offers {nodes} machines matching the search (offers per cluster: {sizes})",
                        answered=True)
    cluster, cost, picked = best
    for offer in picked:
        instance_id(offer.get("id"))
    return int(cluster), float(cost), picked


def _price(offer: dict) -> float | None:
    value = offer.get("dph_total")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


class Provider:
    """The calls the driver makes. The key comes from VAST_API_KEY or the client's key file (the SDK
    resolves it); it is never printed, written or put on a command line."""

    def __init__(self):
        from vastai import VastAI  # the [vast] extra
        url = os.environ.get("VAST_URL") or None   # the SDK reads VAST_URL once, at import
        try:
            self.sdk = VastAI(server_url=url, retry=3)
            self.once = VastAI(server_url=url, retry=1)   # creates: one request, never resent
        except RuntimeError as e:
            raise VastError(f"no vast.ai API key: set VAST_API_KEY or run `vastai set api-key` ({e})") from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # requests' HTTPError/ConnectionError/Timeout, or a reply the SDK could not read
            text = str(e)
            key = getattr(self.sdk.client, "api_key", None)
            if key:
                text = text.replace(key, "<key>")
            response = getattr(e, "response", None)
            answered = response is not None and 400 <= response.status_code < 500 and response.status_code != 429
            said = response.text[:300] if response is not None else ""   # the API's own words (msg, error)
            raise VastError(f"{what} failed: {type(e).__name__}: {printable(text[:300])} {printable(said)}".strip(),
                            answered=answered) from None

    @staticmethod
    def _confirmed(what: str, reply) -> dict:
        if not isinstance(reply, dict) or reply.get("success") is not True:
            raise VastError(f"{what}: the provider did not confirm it: {printable(str(reply)[:300])}", answered=True)
        return reply

    def search_offers(self, gpus: int, gpu_name: str, max_dph: float, interruptible: bool = False,
                      disk: float = 5.0) -> list[dict]:
        """type "bid": the interruptible offers, with their min_bid. storage: the disk the offers' dph_total
        prices (the SDK's default is 5 GB, not the disk the run rents)."""
        query = (f"cluster_id!=None num_gpus={int(gpus)} gpu_name={gpu_name} dph_total<={float(max_dph)} "
                 "rentable=true")
        offers = self._call("search offers", self.sdk.search_offers, query=query, order="dph_total",
                            type="bid" if interruptible else "on-demand", storage=float(disk))
        if not isinstance(offers, list):
            raise VastError(f"search offers returned {type(offers).__name__}, not a list")
        return offers

    def create_overlay(self, cluster_id: int, name: str) -> None:
        self._confirmed(f"create overlay {name}",
                        self._call("create overlay", self.sdk.create_overlay, int(cluster_id), check_run_name(name)))

    def delete_overlay(self, name: str) -> None:
        # check_run_name insists on a letter: the SDK sends an all-digit name as an overlay *id*
        self._confirmed(f"delete overlay {name}",
                        self._call("delete overlay", self.sdk.delete_overlay, check_run_name(name)))

    def create_instance(self, offer_id: int, image: str, disk: int, label: str, overlay: str,
                        env: dict[str, str], bid: float | None = None) -> int:
        """env: the container's environment (the provider's own mechanism), so that no key is ever on a
        command line or in a file the driver writes. bid: $/h per machine, an interruptible instance (the
        SDK sends it as the body's `price`; None: on demand)."""
        docker_env = {f"-n {check_run_name(overlay)}": "1", **env}
        price = None if bid is None else float(bid)
        reply = self._call(f"create instance from offer {offer_id}", self.once.create_instance, int(offer_id),
                           image=image, disk=disk, label=check_run_name(label), env=docker_env, ssh=True, direct=True,
                           price=price)
        self._confirmed(f"create instance from offer {offer_id}", reply)
        if "new_contract" not in reply:
            raise VastError(f"create instance from offer {offer_id}: no new_contract in {printable(str(reply)[:200])}")
        return instance_id(reply["new_contract"])

    def instances(self) -> list[dict]:
        """Every instance of the account, all pages (the SDK follows next_token)."""
        rows = self._call("show instances", self.sdk.show_instances)
        if not isinstance(rows, list):
            raise VastError(f"show instances returned {type(rows).__name__}, not a list")
        return [r for r in rows if isinstance(r, dict)]

    def destroy_instance(self, inst_id: int) -> None:
        self._confirmed(f"destroy instance {inst_id}",
                        self._call(f"destroy instance {inst_id}", self.sdk.destroy_instance, instance_id(inst_id)))
