"""A stand-in for the vast.ai REST API on 127.0.0.1, for running the real `vastai` package offline.

It answers the requests the SDK (vastai 1.9.1) sends, records every one, and can be told to answer
the way the real API does when things go wrong. Creating an instance also makes its "disk": a folder
that the fake ssh (tests/fakes/ssh) runs commands in, listed in a registry file.

Checked against: the SDK's source (vastai 1.9.1, site-packages/vastai: api/client.py, api/instances.py,
api/offers.py, api/clusters.py, api/keys.py, sdk.py) and vast.ai's own reference (the vast-ai/docs
repository, snapshot of 2026-08-07: api-reference/openapi/yaml/*.yaml, api-reference/permissions.mdx,
api-reference/rate-limits-and-errors.mdx, api-reference/hello-world.mdx, sdk/python/reference/*.mdx).

Endpoints (paths under the server URL; the SDK puts every key in `Authorization: Bearer KEY`)
------------------------------------------------------------------------------------------------
POST /api/v0/bundles/                       search offers
    SDK: sdk.py VastAI.search_offers -> api/offers.py search_offers. Body: the parsed query as JSON,
    e.g. {"num_gpus": {"eq": "2"}, "gpu_name": {"eq": "H100 SXM"}, "rentable": {"eq": true},
    "order": [["dph_total", "asc"]], "type": "on-demand", "allocated_storage": 5.0}.
    200 {"offers": [...]}. The SDK returns r.json()["offers"]: a 200 without "offers" (such as
    {"success": false}) raises KeyError in the SDK. Offers rented here (a live instance) and
    `taken_offers` are left out when the query asks rentable=true.
    Docs: api-reference/openapi/yaml/search_offers.yaml (200 {"offers"}, 400 {"error","msg"}).
PUT /api/v0/asks/{offer_id}/                create instance
    SDK: api/instances.py create_instance -> build_create_instance_payload, create_instance_from_payload.
    Body: {"client_id": "me", "image", "env": {NAME: VALUE, "-n OVERLAY": "1"}, "price", "disk",
    "label", "extra", "onstart", "image_login", "python_utf8", "lang_utf8", "use_jupyter_lab",
    "jupyter_dir", "force", "cancel_unavail", "template_hash_id", "user", "runtype"?, "args"?}.
    200 {"success": true, "new_contract": ID, "instance_api_key": KEY}.
    An offer that is gone (rented, or in `taken_offers`, or unknown): 404 {"success": false,
    "error": "invalid_args", "msg": "error 404/3603: no_such_ask Instance type by id N is not
    available.", "ask_id": N}; with cancel_unavail true, 410 {"error": "no_such_ask", ...}.
    Docs: api-reference/openapi/yaml/create_instance.yaml (200, 400, 401, 403, 404, 410, 429);
    instance_api_key: api-reference/hello-world.mdx.
GET /api/v1/instances/                      show instances (one page)
    SDK: api/instances.py show_instances -> show_instances_v1. Query (each value JSON-encoded by
    VastClient._build_url): select_filters={} , order_by=[{"col": "id", "dir": "asc"}], limit=25,
    after_token=<the previous page's next_token> (the SDK sends no select_cols: full rows).
    200 {"success": true, "instances_found": n, "total_instances": N, "label_counts": {...},
    "next_token": TOKEN or null, "instances": [row, ...]}; 400 {"error": "invalid_token"} for a
    bad after_token, {"error": "invalid_request"} for a filter on a computed column. The SDK reads
    row["start_date"] (a number) and row["extra_env"] (a list of pairs) and raises without them.
    Docs: api-reference/openapi/yaml/show_instances.yaml (limit max 25, <= 0 read as 5; keyset
    cursor; row schema); states: sdk/python/reference/show-instances.mdx.
GET /api/v0/instances/{id}/                 show instance
    SDK: api/instances.py show_instance (query owner=me). 200 {"instances": row or null}.
    Docs: api-reference/hello-world.mdx (the answer's shape).
PUT /api/v0/instances/{id}/                 manage instance: {"state": "stopped"|"running"} or {"label": L}
    SDK: api/instances.py stop_instance, start_instance, label_instance; the node-side guard sends
    it with urllib. 200 {"success": true}; 400 for another body; 404 for no such instance.
    Docs: api-reference/openapi/yaml/manage_instance.yaml.
DELETE /api/v0/instances/{id}/              destroy instance
    SDK: api/instances.py destroy_instance (body {}); the node-side guard sends it with urllib.
    200 {"success": true, "msg": ...}; 404 {"success": false, "error": "not_found", "msg":
    "Instance not found"}. Docs: api-reference/openapi/yaml/destroy_instance.yaml.
POST /api/v0/overlay/  {"cluster_id", "name"}          create overlay -> 200 {"success": true, "msg"}
PUT /api/v0/overlay/   {"name", "instance_id"}         join overlay   -> 200 {"success": true}
DELETE /api/v0/overlay/ {"overlay_name"} or {"overlay_id"}  delete overlay -> 200 {"success": true}
GET /api/v0/overlay/                                   show overlays  -> 200 [overlay, ...]
    SDK: api/clusters.py create_overlay, join_overlay, delete_overlay (int(name) first: an all-digit
    name is sent as overlay_id), show_overlays. Not in the docs (no REST page for overlays; the SDK
    reference pages only name the methods): bodies taken from the SDK source, answers and error
    statuses (400 name taken, 404 no such overlay) are this stand-in's own.
POST /api/v0/auth/apikeys/  {"name", "permissions"?, "key_params"?}   create api key
    SDK: api/keys.py create_api_key. 200 {"id", "key", "permissions"}; 400 {"success": false,
    "error": "invalid_permissions", "msg"} when permissions is not an object with a top-level "api".
    Docs: api-reference/openapi/yaml/create_api_key.yaml, api-reference/permissions.mdx.
GET /api/v0/auth/apikeys/                    show api keys -> 200 {"apikeys": [{"id", "user_id", "name",
    "rights", "key_params", "created_at"}]} (the key itself is not listed). SDK: api/keys.py
    show_api_keys; VastAI.show_api_keys unwraps "apikeys". Docs: .../show_api_keys.yaml.
DELETE /api/v0/auth/apikeys/{id}/            delete api key -> 200 "Successfully Deleted API Key" (a JSON
    string); 404 {"msg": "API Key not found."}. SDK: api/keys.py delete_api_key.
    Docs: .../delete_api_key.yaml.
GET /api/v0/users/current/                  show user (the CLI's auth check; not sent by the SDK calls
    above) -> 200 {"id", "username", "email", "credit"}. Docs: api-reference/authentication.mdx.

Who may call what
-----------------
- The account key (`api_key`) may call everything.
- An instance's own key (`instance_keys[ID]`, in the node's environment as CONTAINER_API_KEY, and in
  the create's answer as instance_api_key) may show, start, stop and destroy that instance only
  ("it can only start, stop, or destroy that specific instance": api-reference/hello-world.mdx).
- A key made by POST /api/v0/auth/apikeys/ holds the permissions it was made with, in the format of
  api-reference/permissions.mdx: {"api": {CATEGORY: {}, CATEGORY: {OPERATION: {"constraints":
  {PARAM: {"eq"|"lte"|"gte": VALUE}}}}}}. An empty category grants every endpoint of it; a category
  naming operations grants those operations only, each where its constraints hold. Categories are
  the documented ones (misc: search offers; instance_read: show instances; instance_write: create,
  manage, destroy; user_read: show api keys, show user; user_write: create and delete api keys).
  The only documented operation name is "api.instance.request_logs"; the ones used here follow it
  but are this stand-in's own (see ROUTES), and the only PARAM is the path's "id". An omitted
  "permissions" makes a full-access key (the console's default). Overlays are put under
  instance_read/instance_write by guess.
- No key, an unknown key, a deleted key: 401 {"success": false, "error": "auth_error", "msg":
  "Invalid user key"}. A known key without the permission: 403 {"success": false, "error":
  "forbidden", "msg"}. The docs say a scoped key lacking a permission gets "401 Unauthorized or 403
  Forbidden" (api-reference/authentication.mdx) without saying which: 403 is this stand-in's choice.

Rate limits: 429 with a plain-text body "API requests too frequent endpoint threshold=1.0" and no
Retry-After header (api-reference/rate-limits-and-errors.mdx: "The API does not currently set
standard rate-limit headers"); the SDK retries 429, 502, 503 and 504 (honouring Retry-After when
present) and connection errors and timeouts, `retry` attempts in all (api/client.py VastClient._request).
"""
from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

# (method, path pattern: its group, if any, is the call's "id" parameter, permission category, operation name)
ROUTES = [
    ("POST", r"/api/v0/bundles/", "misc", "api.search.offers"),
    ("PUT", r"/api/v0/asks/(\d+)/", "instance_write", "api.instance.create"),
    ("GET", r"/api/v1/instances/", "instance_read", "api.instances.show"),
    ("GET", r"/api/v0/instances/(\d+)/", "instance_read", "api.instance.show"),
    ("PUT", r"/api/v0/instances/(\d+)/", "instance_write", "api.instance.manage"),
    ("DELETE", r"/api/v0/instances/(\d+)/", "instance_write", "api.instance.destroy"),
    ("POST", r"/api/v0/overlay/", "instance_write", "api.overlay.create"),
    ("PUT", r"/api/v0/overlay/", "instance_write", "api.overlay.join"),
    ("DELETE", r"/api/v0/overlay/", "instance_write", "api.overlay.delete"),
    ("GET", r"/api/v0/overlay/", "instance_read", "api.overlay.show"),
    ("POST", r"/api/v0/auth/apikeys/", "user_write", "api.apikey.create"),
    ("GET", r"/api/v0/auth/apikeys/", "user_read", "api.apikey.show"),
    ("DELETE", r"/api/v0/auth/apikeys/(\d+)/", "user_write", "api.apikey.delete"),
    ("GET", r"/api/v0/users/current/?", "user_read", "api.user.show"),
]
CATEGORIES = {"instance_read", "instance_write", "user_read", "user_write", "billing_read", "billing_write",
              "machine_read", "machine_write", "misc", "team_read", "team_write"}
STATUSES = (None, "loading", "running", "stopped", "frozen", "exited", "rebooting", "unknown", "offline")
COMPUTED = {"dph_total", "num_gpus", "duration", "dph_base", "storage_cost"}   # not filterable (400)
RATE_LIMITED = "API requests too frequent endpoint threshold=1.0"
HOURS_PER_MONTH = 30 * 24


class StandIn:
    def __init__(self, base: Path, api_key: str, user_pub: str, gpus: int = 2, lab=None):
        self.base = Path(base)
        # tests/lab's hosts: each create boots one (its ssh address in the row, CONTAINER_* in its PID 1's
        # environment), each destroy ends it and its disk; the API listens on the lab's laptop network
        self.lab = lab
        self.host_disk_mb: dict[int, int] = {}     # create number -> its host's /workspace as a tmpfs of N MB
        self.base.mkdir(parents=True, exist_ok=True)
        self.registry = self.base / "nodes.json"
        self.api_key = api_key
        self.user_pub = user_pub
        self.lock = threading.RLock()
        self.requests: list[dict] = []
        # storage_cost: $ per GB per month of disk, billed from creation until destroyed (the docs' offer field)
        self.offers = [
            {"id": 101, "cluster_id": 7, "machine_id": 1, "dph_total": 10.0, "num_gpus": gpus, "gpu_name": "H100 SXM",
             "storage_cost": 0.1, "rentable": True},
            {"id": 102, "cluster_id": 7, "machine_id": 2, "dph_total": 11.0, "num_gpus": gpus, "gpu_name": "H100 SXM",
             "storage_cost": 0.1, "rentable": True},
            {"id": 103, "cluster_id": 7, "machine_id": 3, "dph_total": 12.5, "num_gpus": gpus, "gpu_name": "H100 SXM",
             "storage_cost": 0.1, "rentable": True},
            {"id": 201, "cluster_id": 9, "machine_id": 4, "dph_total": 1.0, "num_gpus": gpus, "gpu_name": "H100 SXM",
             "storage_cost": 0.1, "rentable": True},
        ]
        self.instances: dict[int, dict] = {}       # id -> row (keys starting with "_" are the stand-in's own)
        self.instance_keys: dict[int, str] = {}    # id -> that instance's own key (CONTAINER_API_KEY)
        self.overlays: dict[str, dict] = {}        # name -> {"overlay_id", "name", "cluster_id", "instances"}
        self.api_keys: dict[int, dict] = {}        # id -> {"id", "key", "name", "permissions", "key_params", ...}
        self.next_id = 5001
        self.next_key_id = 9001
        self.next_overlay_id = 301
        self.creates = 0                           # PUT /asks/ requests so far; "create number" = its 1-based rank
        self.listings = 0                          # show-instances listings so far (first pages only)

        # --- knobs, set by tests (a "create number" counts every PUT /asks/ request, retries included) ---
        # the n-th create (1-based) answers 400 {"success": false, "error": "invalid_args"} and creates nothing
        self.fail_create_at: int | None = None
        # seconds between creating an instance and answering, for every create / for create number n
        self.create_delay = 0.0
        self.create_delays: dict[int, float] = {}
        # create number -> (status, body) answered INSTEAD of the success, although the instance was
        # created (a lost reply): {1: (504, "Gateway Time-out")} (the SDK re-sends a 504: that is create 2)
        self.create_answers: dict[int, tuple[int, object]] = {}
        # offer ids that search still lists but create answers 404 no_such_ask (taken between search and create)
        self.taken_offers: set[int] = set()
        # instance ids (or True: all) whose DELETE answers 500 {"success": false} and destroys nothing
        self.destroy_fails: set[int] | bool = set()
        # listings that still show new instances as "loading" (when no status sequence is set)
        self.loading_listings = 0
        # create number -> listings that do not show the instance yet (it exists and bills meanwhile)
        self.hidden_listings: dict[int, int] = {}
        # create number -> the states the instance shows on successive listings, the last one kept: each a
        # value of actual_status (STATUSES: None, "loading", "running", "stopped", "frozen", "exited", "rebooting",
        # "unknown", "offline"; cur_state follows: "stopped" for stopped, else "running") or a dict of
        # fields, e.g. [None, "loading", "unknown", "running", {"actual_status": "exited", "cur_state": "unloaded"}]
        self.status_sequences: dict[int, list] = {}
        # create number -> fields replaced in that instance's row (odd values: {"ports": [], "ssh_port": "x"});
        # a patched "ports" shows in every state, otherwise ports is null until the instance runs
        self.row_patch: dict[int, dict] = {}
        self.node_faults: dict[int, dict] = {}     # create number -> fault for the fake ssh
        # (METHOD or None for any, path regex) -> answers of HTTP 200 {"success": false, ...} still to give
        # (an int) or True for always; the call does nothing: {("DELETE", r"/api/v0/instances/5001/"): True}
        self.soft_failures: dict[tuple[str | None, str], int | bool] = {}
        # (METHOD or None, path regex) -> N: the next N matching requests answer 429 (plain text), or a
        # list of statuses to answer in turn, e.g. [429, 502, 503]; then normal answers
        self.rate_limits: dict[tuple[str | None, str], int | list[int]] = {}
        # Retry-After header (seconds) on those answers; the real API sends none (None)
        self.retry_after: float | None = None
        # rows per page of GET /api/v1/instances/ (the API's maximum is 25; the SDK asks for 25)
        self.page_size = 25

        # billing: id -> {"dph": $/h while its contract runs, "storage": $/h always, "events": [(t, state)]}
        # with state "running" (GPU and disk billed), "stopped" (disk only), "gone" (nothing)
        self.bills: dict[int, dict] = {}
        if lab is None:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        else:
            self.server = lab.in_laptop(lambda: ThreadingHTTPServer((lab.address, 0), self._handler()))
        self.url = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        # a short poll: shutdown() waits for the loop's next look (0.5 s by default, in every test)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self._write_registry()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # --- views for tests ------------------------------------------------------------------------------
    def calls(self, method: str | None = None, path: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if (method is None or r["method"] == method)
                    and (path is None or re.fullmatch(path, r["path"]))]

    def created(self) -> list[int]:
        """Instance ids whose create the client was told about (HTTP 200 with new_contract)."""
        return [r["answer"]["new_contract"] for r in self.calls("PUT", r"/api/v0/asks/\d+/")
                if r.get("status") == 200 and isinstance(r.get("answer"), dict) and "new_contract" in r["answer"]]

    def destroyed(self) -> list[int]:
        """Instance ids that a DELETE really destroyed (HTTP 200 and success true)."""
        return [int(r["path"].split("/")[-2]) for r in self.calls("DELETE", r"/api/v0/instances/\d+/")
                if r.get("status") == 200 and isinstance(r.get("answer"), dict) and r["answer"].get("success")]

    def alive(self) -> list[int]:
        with self.lock:
            return sorted(self.instances)

    def node_dir(self, inst: int) -> Path:
        return self.base / f"i{inst}"

    def billed_usd(self, now: float | None = None) -> float:
        """What the account has been charged so far (up to `now`): for every instance created here, its dph_total
        x the hours its contract ran (cur_state "running", from creation: whatever actual_status shows, so
        loading, frozen and unknown hours count; the docs say only that running and frozen bill the GPU),
        plus, while stopped (cur_state "stopped"), only its disk: storage_cost $/GB/month x disk GB / 720 h.
        Nothing after destroy, or after a status sequence sets cur_state "unloaded"."""
        now = time.time() if now is None else now
        total = 0.0
        with self.lock:
            for bill in self.bills.values():
                events = bill["events"] + [(now, "gone")]
                for (start, state), (end, _) in zip(events, events[1:]):
                    hours = max(0.0, min(end, now) - start) / 3600
                    rate = {"running": bill["dph"], "stopped": bill["storage"]}.get(state, 0.0)
                    total += hours * rate
        return total

    def preempt(self, inst: int, status: str = "stopped") -> None:
        """An interruptible instance outbid: the host stops it (`stopped`, or `exited`), its disk bills on
        (cur_state "stopped"), and its ssh refuses. The test kills its processes, as the host would."""
        with self.lock:
            self.instances[inst].pop("_sequence", None)
            self._apply(inst, {"actual_status": status, "cur_state": "stopped"})
            if self.instances[inst].get("_host") is not None:   # a lab host: its container stops
                self.instances[inst]["_host"].kill()
        self._write_registry()

    # --- node registry for the fake ssh -----------------------------------------------------------------
    def _write_registry(self):
        with self.lock:
            nodes = {}
            for inst, row in self.instances.items():
                env = {k: str(v) for k, v in (row.get("_env") or {}).items()}
                env.update({"CONTAINER_ID": str(inst), "CONTAINER_API_KEY": self.instance_keys.get(inst, ""),
                            "VAST_URL": self.url})
                nodes[f"127.0.0.1:{self._port(inst)}"] = {
                    "id": inst, "dir": str(self.node_dir(inst)), "state": row.get("actual_status"),
                    "env": env, "fault": row.get("_fault") or {}}
            tmp = self.registry.with_suffix(".tmp")
            tmp.write_text(json.dumps(nodes))
            os.replace(tmp, self.registry)

    @staticmethod
    def _port(inst: int) -> int:
        return 40000 + inst % 10000

    def _row(self, inst: int, offer: dict, body: dict) -> dict:
        port = self._port(inst)
        env = body.get("env") or {}
        disk = float(body.get("disk") or 10)
        storage_hour = float(offer.get("storage_cost") or 0) * disk / HOURS_PER_MONTH
        return {"id": inst, "label": body.get("label"), "actual_status": "loading", "cur_state": "running",
                "intended_status": "running", "next_state": "running", "status_msg": None,
                "public_ipaddr": "127.0.0.1", "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]},
                "ssh_host": "127.0.0.1", "ssh_port": port, "ssh_idx": "1", "num_gpus": offer["num_gpus"],
                "gpu_name": offer["gpu_name"], "dph_base": offer["dph_total"], "dph_total": offer["dph_total"],
                "cluster_id": offer.get("cluster_id"), "machine_id": offer.get("machine_id"),
                "host_id": offer.get("host_id", offer.get("machine_id")), "start_date": time.time(),
                "end_date": None, "image_uuid": body.get("image"), "image_runtype": body.get("runtype"),
                "onstart": body.get("onstart"), "extra_env": [[k, v] for k, v in env.items()],
                "local_ipaddrs": f"10.0.0.{inst % 250} 172.17.0.2", "disk_space": disk,
                "storage_cost": offer.get("storage_cost"), "storage_total_cost": storage_hour,
                "is_bid": body.get("price") is not None, "min_bid": None, "direct_port_start": port,
                "direct_port_end": port, "direct_port_count": 1, "volume_info": []}

    # --- billing and states -----------------------------------------------------------------------------------
    def _bill(self, inst: int, state: str):
        bill = self.bills.get(inst)
        if bill is not None and bill["events"][-1][1] != state:
            bill["events"].append((time.time(), state))

    def _apply(self, inst: int, step):
        """Set one state of a status sequence (or of a manage call) on an instance's row, and bill it."""
        row = self.instances[inst]
        if isinstance(step, dict):
            row.update(step)
            if "cur_state" not in step and "actual_status" in step:
                row["cur_state"] = "stopped" if step["actual_status"] == "stopped" else "running"
        else:
            row["actual_status"] = step
            row["cur_state"] = "stopped" if step == "stopped" else "running"
        self._bill(inst, {"running": "running", "stopped": "stopped"}.get(row.get("cur_state"), "gone"))

    def _advance(self):
        """A new listing: every instance moves one step along its status sequence (or out of "loading")."""
        self.listings += 1
        for inst, row in self.instances.items():
            if self._hidden(row):
                continue
            sequence = row.get("_sequence")
            if sequence:
                self._apply(inst, sequence.pop(0) if len(sequence) > 1 else sequence[0])
            elif row.get("actual_status") == "loading" and self.loading_listings <= 0:
                row["actual_status"] = "running"
        self.loading_listings -= 1

    def _hidden(self, row: dict) -> bool:
        return self.listings <= row.get("_hidden_until", -1)

    # --- permissions ---------------------------------------------------------------------------------------------
    @staticmethod
    def _allows(permissions, category: str, operation: str, params: dict) -> bool:
        """Whether a key's permissions (api-reference/permissions.mdx) allow an operation with these parameters."""
        if permissions is None:
            return True
        grant = (permissions.get("api") or {}).get(category) if isinstance(permissions, dict) else None
        if grant is None:
            return False
        if not grant:
            return True
        rule = grant.get(operation)
        if rule is None:
            return False
        for param, ops in ((rule or {}).get("constraints") or {}).items():
            value = params.get(param)
            if value is None:
                return False
            for op, bound in ops.items():
                try:
                    ok = {"eq": value == bound, "lte": value <= bound, "gte": value >= bound}[op]
                except (KeyError, TypeError):
                    ok = False
                if not ok:
                    return False
        return True

    def _identity(self, auth: str | None) -> tuple[str | None, object]:
        """(who, permissions) for an Authorization header: ("user", None) is the account key (everything)."""
        if not auth or not auth.startswith("Bearer "):
            return None, None
        key = auth[len("Bearer "):]
        if key == self.api_key:
            return "user", None
        for inst, own in self.instance_keys.items():
            if key == own:
                only = {"constraints": {"id": {"eq": inst}}}
                return "instance", {"api": {"instance_read": {"api.instance.show": only},
                                            "instance_write": {"api.instance.manage": only,
                                                               "api.instance.destroy": only}}}
        for entry in self.api_keys.values():
            if key == entry["key"] and entry.get("deleted_at") is None:
                return f"apikey:{entry['id']}", entry["permissions"]
        return None, None

    # --- request handling ------------------------------------------------------------------------------------
    @staticmethod
    def _matches(knobs: dict, method: str, path: str):
        for (m, pattern) in knobs:
            if (m is None or m == method) and re.fullmatch(pattern, path):
                return (m, pattern)
        return None

    def _handle(self, method: str, raw_path: str, headers, body) -> tuple[int, object, dict]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        auth = headers.get("Authorization")
        record = {"method": method, "path": path, "query": query, "body": body, "auth": auth, "t": time.time()}
        extra: dict[str, str] = {}
        with self.lock:
            self.requests.append(record)
            hit = self._matches(self.rate_limits, method, path)
            if hit is not None:
                left = self.rate_limits[hit]
                if isinstance(left, list):
                    status = left.pop(0)
                    if not left:
                        del self.rate_limits[hit]
                else:
                    status = 429
                    if left <= 1:
                        del self.rate_limits[hit]
                    else:
                        self.rate_limits[hit] = left - 1
                record["key"] = self._identity(auth)[0]
                if self.retry_after is not None:
                    extra["Retry-After"] = str(self.retry_after)
                answer = RATE_LIMITED if status == 429 else f"{status} Bad Gateway (stand-in)"
                record.update(status=status, answer=answer)
                return status, answer, extra
            status, answer = self._authorize(method, path, auth, record)
            if status is None:
                soft = self._matches(self.soft_failures, method, path)
                if soft is not None:
                    left = self.soft_failures[soft]
                    if left is not True:
                        if left <= 1:
                            del self.soft_failures[soft]
                        else:
                            self.soft_failures[soft] = left - 1
                    status, answer = 200, {"success": False, "error": "stand_in_failure",
                                           "msg": f"{method} {path} did not succeed (stand-in)"}
                else:
                    status, answer = self._route(method, path, query, body, record)
            delay = record.pop("_delay", 0.0)
            if not delay:
                record.update(status=status, answer=answer)
        if delay:   # whatever the request did is done; its reply (and its record's status) comes late
            time.sleep(delay)
            with self.lock:
                record.update(status=status, answer=answer)
        return status, answer, extra

    def _authorize(self, method: str, path: str, auth: str | None, record: dict) -> tuple[int | None, object]:
        route = next(((cat, op, m) for (verb, pattern, cat, op) in ROUTES
                      if verb == method and (m := re.fullmatch(pattern, path))), None)
        who, permissions = self._identity(auth)
        record["key"] = who
        if who is None:
            return 401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}
        if route is None:
            return None, None   # answered 404 by _route
        category, operation, m = route
        params = {"id": int(m.group(1))} if m.groups() else {}
        if not self._allows(permissions, category, operation, params):
            return 403, {"success": False, "error": "forbidden",
                         "msg": f"this API key lacks the permission {category}/{operation} for {params or 'this call'}"}
        return None, None

    def _route(self, method: str, path: str, query: dict, body, record: dict) -> tuple[int, object]:
        body = body if isinstance(body, dict) else {}
        if method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": self._search(body)}
        m = re.fullmatch(r"/api/v0/asks/(\d+)/", path)
        if method == "PUT" and m:
            return self._create(int(m.group(1)), body, record)
        if method == "GET" and path == "/api/v1/instances/":
            return self._list(query)
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        if m:
            return self._instance(method, int(m.group(1)), body)
        if path == "/api/v0/overlay/":
            return self._overlay(method, body)
        if path == "/api/v0/auth/apikeys/" or re.fullmatch(r"/api/v0/auth/apikeys/\d+/", path):
            return self._apikeys(method, path, body)
        if method == "GET" and re.fullmatch(r"/api/v0/users/current/?", path):
            return 200, {"id": 1, "username": "standin", "email": "standin@example.invalid", "credit": 100.0}
        return 404, {"success": False, "msg": f"stand-in: no route {method} {path}"}

    def _taken(self, offer_id: int) -> bool:
        rented = {row.get("_offer") for row in self.instances.values()}
        return offer_id in self.taken_offers or offer_id in rented

    def _search(self, query: dict) -> list[dict]:
        rentable_only = (query.get("rentable") or {}).get("eq") in (True, "true", "True")
        rented = {row.get("_offer") for row in self.instances.values()}
        return [dict(o) for o in self.offers if not (rentable_only and o["id"] in rented)]

    def _create(self, offer_id: int, body: dict, record: dict) -> tuple[int, object]:
        self.creates += 1
        number = self.creates
        record["create_number"] = number
        record["_delay"] = self.create_delays.get(number, self.create_delay)
        if self.fail_create_at == number:
            record["_delay"] = 0.0
            return 400, {"success": False, "error": "invalid_args", "msg": "offer 'taken' (stand-in)"}
        offer = next((o for o in self.offers if o["id"] == offer_id), None)
        if offer is None or self._taken(offer_id):
            record["_delay"] = 0.0
            if body.get("cancel_unavail") and offer is not None:
                return 410, {"success": False, "error": "no_such_ask", "ask_id": offer_id,
                             "msg": f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available."}
            return 404, {"success": False, "error": "invalid_args", "ask_id": offer_id,
                         "msg": f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available."}
        inst = self.next_id
        self.next_id += 1
        row = self._row(inst, offer, body)
        patch = self.row_patch.get(number, {})
        row.update(patch)
        row["_patched"] = set(patch)
        row["_fault"] = self.node_faults.get(number)
        row["_offer"] = offer_id
        row["_env"] = {k: v for k, v in (body.get("env") or {}).items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)}
        if self.hidden_listings.get(number):
            row["_hidden_until"] = self.listings + self.hidden_listings[number]
        if number in self.status_sequences:
            row["_sequence"] = list(self.status_sequences[number])
            row["actual_status"] = None   # provisioning, until the first listing takes the first step
        self.instances[inst] = row
        self.instance_keys[inst] = f"instance-key-{inst}-{os.urandom(4).hex()}"
        self.bills[inst] = {"dph": float(row.get("dph_total") or 0),
                            "storage": float(row.get("storage_total_cost") or 0),
                            "events": [(row["start_date"], "running")]}
        if body.get("price") is not None:   # interruptible: its bid while it runs, plus its disk
            self.bills[inst]["dph"] = float(body["price"]) + self.bills[inst]["storage"]
        overlay = next((k[3:] for k in (body.get("env") or {}) if k.startswith("-n ")), None)
        if overlay in self.overlays:
            self.overlays[overlay].setdefault("instances", []).append(inst)
        if self.lab is not None:
            self._boot(inst, row, number)
        else:
            disk = self.node_dir(inst)
            (disk / ".ssh").mkdir(parents=True, exist_ok=True)
            (disk / ".ssh" / "authorized_keys").write_text(self.user_pub)
            self._write_registry()
        if number in self.create_answers:
            return self.create_answers[number]
        return 200, {"success": True, "new_contract": inst, "instance_api_key": self.instance_keys[inst]}

    def _boot(self, inst: int, row: dict, number: int) -> None:
        """A lab host for the instance: the account's key authorized, the instance's own key in its
        container's environment, its address where vast.ai lists the direct route (port 22)."""
        host = self.lab.boot(self.user_pub, {"CONTAINER_ID": str(inst), "CONTAINER_API_KEY": self.instance_keys[inst]},
                             workspace_mb=self.host_disk_mb.get(number))
        row.update({"_host": host, "public_ipaddr": host.addr, "ssh_host": host.addr, "ssh_port": 22,
                    "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "22"}]}, "local_ipaddrs": host.addr,
                    "direct_port_start": 22, "direct_port_end": 22})

    def host(self, inst: int):
        """The lab host behind an instance."""
        return self.instances[inst]["_host"]

    def host_fails(self, inst: int, states=("exited", "offline")) -> None:
        """The machine under an instance goes away: every process on its host ends at once, and the
        listings show `states` in turn (the last one kept), as when a host fails or is reclaimed."""
        with self.lock:
            row = self.instances[inst]
            row["_host"].kill()
            row["_sequence"] = list(states)

    def _list(self, query: dict) -> tuple[int, object]:
        def arg(name, default):
            raw = query.get(name, [None])[0]
            if raw is None:
                return default
            try:
                return json.loads(raw)
            except ValueError:
                return raw
        token = query.get("after_token", [None])[0]
        if token is None:
            self._advance()
            self._write_registry()
        filters = arg("select_filters", {}) or {}
        order = arg("order_by", [{"col": "id", "dir": "asc"}]) or []
        try:
            limit = int(arg("limit", 25))
        except (TypeError, ValueError):
            return 400, {"error": "invalid_request", "msg": "Error in query parameters: limit"}
        limit = min(5 if limit <= 0 else limit, 25, self.page_size)
        if not isinstance(filters, dict) or not isinstance(order, list):
            return 400, {"error": "invalid_request", "msg": "Error in query parameters"}
        for col in filters:
            if col in COMPUTED:
                return 400, {"error": "invalid_request",
                             "msg": f"Error in query parameters: {col} is not a valid search key"}
        cols = [(o.get("col"), o.get("dir") == "desc") for o in order if isinstance(o, dict) and o.get("col") != "id"]
        cols.append(("id", any(o.get("col") == "id" and o.get("dir") == "desc" for o in order if isinstance(o, dict))))
        rows = [self._public(row) for row in self.instances.values() if not self._hidden(row)]
        rows = [r for r in rows if all(self._keep(r.get(col), ops) for col, ops in filters.items())]

        def key(row):   # ascending tuple; a descending number is negated, a descending string is left as is
            return tuple((row.get(c) is not None, -row[c] if desc and isinstance(row.get(c), (int, float))
                          else row.get(c) if row.get(c) is not None else 0) for c, desc in cols)
        try:
            rows.sort(key=key)
        except TypeError:
            return 400, {"error": "invalid_request", "msg": "Error in query parameters: order_by"}
        if token is not None:
            try:
                after = json.loads(base64.b64decode(token, validate=True))["values"]
                mark = key({c: after[c] for c, _ in cols})
            except (ValueError, KeyError, TypeError):
                return 400, {"error": "invalid_token", "msg": "invalid after_token"}
            rows = [r for r in rows if key(r) > mark]
        page, more = rows[:limit], len(rows) > limit
        next_token = None
        if more:
            last = page[-1]
            next_token = base64.b64encode(json.dumps({"values": {c: last.get(c) for c, _ in cols}}).encode()).decode()
        total = [r for r in (self._public(row) for row in self.instances.values() if not self._hidden(row))]
        labels: dict[str, int] = {}
        for r in total:
            labels[r.get("label") or ""] = labels.get(r.get("label") or "", 0) + 1
        return 200, {"success": True, "instances_found": len(page), "total_instances": len(total),
                     "label_counts": labels, "next_token": next_token, "instances": page}

    @staticmethod
    def _keep(value, ops) -> bool:
        if not isinstance(ops, dict):
            return value == ops
        for op, bound in ops.items():
            try:
                ok = {"eq": lambda: value == bound, "neq": lambda: value != bound, "gt": lambda: value > bound,
                      "gte": lambda: value >= bound, "lt": lambda: value < bound, "lte": lambda: value <= bound,
                      "in": lambda: value in bound, "notin": lambda: value not in bound}[op]()
            except (KeyError, TypeError):
                ok = False
            if not ok:
                return False
        return True

    @staticmethod
    def _public(row: dict) -> dict:
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        if out.get("actual_status") != "running" and "ports" not in row.get("_patched", ()):
            out["ports"] = None   # "Only present on running instances" (show_instances.yaml)
        return out

    def _instance(self, method: str, inst: int, body: dict) -> tuple[int, object]:
        if method == "GET":
            row = self.instances.get(inst)
            return 200, {"instances": self._public(row) if row is not None else None}
        if inst not in self.instances:
            return 404, {"success": False, "error": "not_found", "msg": "Instance not found"}
        if method == "DELETE":
            if self.destroy_fails is True or inst in self.destroy_fails:
                return 500, {"success": False, "msg": "destroy failed (stand-in)"}
            row = self.instances.pop(inst)
            if row.get("_host") is not None:
                self.lab.destroy(row["_host"])
            self._bill(inst, "gone")
            for overlay in self.overlays.values():
                if inst in (overlay.get("instances") or []):
                    overlay["instances"].remove(inst)
            self._write_registry()
            return 200, {"success": True, "msg": "Instance destroyed successfully"}
        if method == "PUT" and body.get("state") in ("stopped", "running"):
            row = self.instances[inst]
            row.pop("_sequence", None)
            row["intended_status"] = row["next_state"] = body["state"]
            self._apply(inst, body["state"])
            self._write_registry()
            return 200, {"success": True}
        if method == "PUT" and isinstance(body.get("label"), str) and "state" not in body:
            self.instances[inst]["label"] = body["label"]
            return 200, {"success": True}
        return 400, {"success": False, "error": "invalid_args", "msg": f"stand-in: unsupported {method} body {body}"}

    def _overlay(self, method: str, body: dict) -> tuple[int, object]:
        if method == "POST":
            name = body.get("name")
            if name in self.overlays:
                return 400, {"success": False, "msg": f"overlay {name} exists"}
            self.overlays[name] = {"overlay_id": self.next_overlay_id, "name": name,
                                   "cluster_id": body.get("cluster_id"), "internal_subnet": "10.0.0.0/24",
                                   "instances": []}
            self.next_overlay_id += 1
            return 200, {"success": True, "msg": "created overlay"}
        if method == "PUT":
            overlay = self.overlays.get(body.get("name"))
            if overlay is None:
                return 404, {"success": False, "msg": f"no overlay {body.get('name')}"}
            overlay.setdefault("instances", []).append(body.get("instance_id"))
            return 200, {"success": True}
        if method == "DELETE":
            if "overlay_id" in body:
                name = next((k for k, v in self.overlays.items() if v.get("overlay_id") == body["overlay_id"]), None)
            else:
                name = body.get("overlay_name")
            if name not in self.overlays:
                return 404, {"success": False, "msg": f"no overlay {body.get('overlay_name', body.get('overlay_id'))}"}
            del self.overlays[name]
            return 200, {"success": True}
        if method == "GET":
            return 200, list(self.overlays.values())
        return 404, {"success": False, "msg": f"stand-in: no route {method} /api/v0/overlay/"}

    def _apikeys(self, method: str, path: str, body: dict) -> tuple[int, object]:
        if method == "POST" and path == "/api/v0/auth/apikeys/":
            permissions = body.get("permissions")
            if "permissions" in body and not (isinstance(permissions, dict) and isinstance(permissions.get("api"), dict)
                                              and set(permissions["api"]) <= CATEGORIES
                                              and all(isinstance(v, dict) for v in permissions["api"].values())):
                return 400, {"success": False, "error": "invalid_permissions", "msg": "Invalid permission format"}
            entry = {"id": self.next_key_id, "key": f"scoped-key-{self.next_key_id}-{os.urandom(8).hex()}",
                     "name": body.get("name"), "permissions": permissions, "key_params": body.get("key_params"),
                     "created_at": time.time(), "deleted_at": None}
            self.next_key_id += 1
            self.api_keys[entry["id"]] = entry
            return 200, {"id": entry["id"], "key": entry["key"], "permissions": permissions}
        if method == "GET" and path == "/api/v0/auth/apikeys/":
            return 200, {"apikeys": [{"id": e["id"], "user_id": 1, "name": e["name"], "rights": e["permissions"],
                                      "key_params": e["key_params"], "created_at": e["created_at"]}
                                     for e in self.api_keys.values() if e["deleted_at"] is None]}
        m = re.fullmatch(r"/api/v0/auth/apikeys/(\d+)/", path)
        if method == "DELETE" and m:
            entry = self.api_keys.get(int(m.group(1)))
            if entry is None or entry["deleted_at"] is not None:
                return 404, {"msg": "API Key not found."}
            entry["deleted_at"] = time.time()
            return 200, "Successfully Deleted API Key"
        return 404, {"success": False, "msg": f"stand-in: no route {method} {path}"}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                status, answer, headers = standin._handle(self.command, self.path, self.headers, body)
                if isinstance(answer, str) and status != 200:
                    data, kind = answer.encode(), "text/plain"
                else:
                    data, kind = json.dumps(answer).encode(), "application/json"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass   # the client went away (a timeout, or Ctrl-C during a late reply)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args):
                pass

        return Handler
