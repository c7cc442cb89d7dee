"""vast.ai for the cluster driver: the official `vastai` SDK behind a small Provider, offer picking,
and the checks the user's strings and the provider's ids pass before they reach a file, an ssh config
or a command line (hostnames and ports: launch/cluster.py, which writes the ssh config).

The SDK (`from vastai import VastAI`) is used, not the CLI: the 1.9.1 CLI has its overlay commands
switched off and prints Python reprs, while the SDK calls the REST API and returns its JSON.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from collections import defaultdict

RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")   # the client keeps `-n NAME` only in [a-z0-9-]
CONF_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
# Hydra overrides travel through two shells (ssh to node0, then pdsh to every node, where DeepSpeed
# quotes only arguments holding a space): these characters are refused outright; the rest are quoted.
OVERRIDE = re.compile(r"^[A-Za-z0-9_+~][^\s;&|$`\\<>()!#'\"]*$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:,=+@%-]*$")   # exported unquoted by DeepSpeed's ssh launchers


class VastError(RuntimeError):
    """The provider refused or returned something unusable; names the call or the instance. `answered`:
    the provider replied (an HTTP error), so the call certainly did nothing; otherwise it may have."""

    def __init__(self, message: str, answered: bool = False):
        super().__init__(message)
        self.answered = answered


class UnsafeInput(ValueError):
    """A string from the provider or the command line that must not reach a shell, file or config."""


def new_run_name(now: float | None = None) -> str:
    return time.strftime("st-%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)


def check_run_name(name: str) -> str:
    if not isinstance(name, str) or not RUN_NAME.match(name):
        raise UnsafeInput(f"--run {name!r}: a run name is 1-63 of a-z, 0-9 and '-', starting with a letter or "
                          "digit (it names the overlay network, whose name the client drops otherwise, and "
                          "the folder outputs/RUN)")
    return name


def check_conf(name: str) -> str:
    if not isinstance(name, str) or not CONF_NAME.match(name):
        raise UnsafeInput(f"--conf {name!r}: a preset name is made of a-z, 0-9 and '_' (see conf/*.yaml)")
    return name


def check_override(text: str) -> str:
    if not OVERRIDE.match(text) or not ("=" in text or text.startswith("~")):
        raise UnsafeInput(f"override {text!r}: an override is KEY=VALUE without spaces or any of "
                          "; & | $ ` \\ < > ( ) ! # ' \" (it is re-read by a shell on every node)")
    return text


def check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not ENV_KEY.match(key) or not isinstance(value, str) or not ENV_VALUE.match(value):
            raise UnsafeInput(f".deepspeed_env: {key}={value!r}: keys are shell names, values only "
                              "letters, digits and _ . / : , = + @ % - (DeepSpeed exports them unquoted)")
    return env


# what the laptop forwards to the nodes' environment when it is set there
FORWARDED_SECRETS = ("WANDB_API_KEY",)


def check_secrets(secrets: dict[str, str]) -> dict[str, str]:
    for key, value in secrets.items():
        if key not in FORWARDED_SECRETS or not re.fullmatch(r"[A-Za-z0-9_.:=+/-]{1,200}", value or ""):
            raise UnsafeInput(f"{key}: not a key this driver forwards, or its value has characters no API key has "
                              "(it is not shown)")
    return secrets


def instance_id(value) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise UnsafeInput(f"instance id {value!r} is not a whole number")
    number = int(value)
    if number <= 0:
        raise UnsafeInput(f"instance id {value!r} is not positive")
    return number


def pick_offers(offers: list[dict], nodes: int) -> tuple[int, float, list[dict]]:
    """The cheapest `nodes` offers on distinct machines of one physical cluster (for the overlay)."""
    by_cluster: dict[int, list[dict]] = defaultdict(list)
    for offer in offers:
        if offer.get("cluster_id") is not None:
            by_cluster[offer["cluster_id"]].append(offer)
    best = None
    for cluster, group in by_cluster.items():
        machines, picked = set(), []
        for offer in sorted(group, key=lambda o: o["dph_total"]):
            if offer.get("machine_id") is None or offer.get("machine_id") not in machines:
                machines.add(offer.get("machine_id"))
                picked.append(offer)
        if len(picked) >= nodes:
            cost = sum(o["dph_total"] for o in picked[:nodes])
            if best is None or cost < best[1]:
                best = (cluster, cost, picked[:nodes])
    if best is None:
        sizes = {c: len(g) for c, g in by_cluster.items()}
        raise VastError(f"no cluster offers {nodes} machines matching the search (offers per cluster: {sizes})")
    cluster, cost, picked = best
    for offer in picked:
        instance_id(offer.get("id"))
    return int(cluster), float(cost), picked


class Provider:
    """The calls the driver makes, through the SDK. The key comes from VAST_API_KEY or the client's key
    file (the SDK resolves it); it is never printed, written or put on a command line."""

    def __init__(self):
        from vastai import VastAI  # the [vast] extra
        try:
            # the SDK reads VAST_URL once, at import; read it here too, so the driver follows it
            self.sdk = VastAI(server_url=os.environ.get("VAST_URL") or None, retry=3)
        except RuntimeError as e:
            raise VastError(f"no vast.ai API key: set VAST_API_KEY or run `vastai set api-key` ({e})") from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VastError:
            raise
        except Exception as e:  # requests' HTTPError/ConnectionError, or a reply the SDK could not read
            text = str(e)
            key = getattr(self.sdk.client, "api_key", None)
            if key:
                text = text.replace(key, "<key>")
            answered = getattr(e, "response", None) is not None and e.response.status_code < 500
            raise VastError(f"{what} failed: {type(e).__name__}: {text[:300]}", answered=answered) from None

    def search_offers(self, gpus: int, gpu_name: str, max_dph: float) -> list[dict]:
        query = (f"cluster_id!=None num_gpus={int(gpus)} gpu_name={gpu_name} dph_total<={float(max_dph)} "
                 "rentable=true")
        offers = self._call("search offers", self.sdk.search_offers, query=query, order="dph_total")
        if not isinstance(offers, list):
            raise VastError(f"search offers returned {type(offers).__name__}, not a list")
        return offers

    def create_overlay(self, cluster_id: int, name: str) -> dict:
        return self._call("create overlay", self.sdk.create_overlay, int(cluster_id), check_run_name(name))

    def delete_overlay(self, name: str) -> dict:
        return self._call("delete overlay", self.sdk.delete_overlay, check_run_name(name))

    def create_instance(self, offer_id: int, image: str, disk: int, label: str, overlay: str,
                        secrets: dict[str, str] | None = None) -> int:
        """secrets: environment variables for the container (the provider's own mechanism), such as
        WANDB_API_KEY, so that no key is ever on a command line or in a file the driver writes."""
        env = {f"-n {check_run_name(overlay)}": "1", **check_secrets(secrets or {})}
        reply = self._call(f"create instance from offer {offer_id}", self.sdk.create_instance, int(offer_id),
                           image=image, disk=disk, label=check_run_name(label), env=env, ssh=True, direct=True)
        if not isinstance(reply, dict) or not reply.get("success") or "new_contract" not in reply:
            raise VastError(f"create instance from offer {offer_id} did not succeed: {str(reply)[:300]}")
        return instance_id(reply["new_contract"])

    def instances(self) -> list[dict]:
        rows = self._call("show instances", self.sdk.show_instances)
        if not isinstance(rows, list):
            raise VastError(f"show instances returned {type(rows).__name__}, not a list")
        return [r for r in rows if isinstance(r, dict)]

    def destroy_instance(self, inst_id: int) -> None:
        self._call(f"destroy instance {inst_id}", self.sdk.destroy_instance, instance_id(inst_id))
