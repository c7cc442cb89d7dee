"""A stand-in for the vast.ai REST API on 127.0.0.1, for running the real `vastai` package offline.

It answers the requests the SDK sends (paths and answer shapes checked against vastai 1.9.1: see
VAST-NOTES.md) and records every one, so tests can check what was created, joined, destroyed and
deleted, and that each request carried the key. Creating an instance also makes its "disk": a
folder that the fake ssh (tests/fakes/ssh) runs commands in, listed in a registry file.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class StandIn:
    def __init__(self, base: Path, api_key: str, user_pub: str, gpus: int = 2):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.registry = self.base / "nodes.json"
        self.api_key = api_key
        self.user_pub = user_pub
        self.lock = threading.RLock()
        self.requests: list[dict] = []
        self.offers = [
            {"id": 101, "cluster_id": 7, "machine_id": 1, "dph_total": 10.0, "num_gpus": gpus, "gpu_name": "H100 SXM"},
            {"id": 102, "cluster_id": 7, "machine_id": 2, "dph_total": 11.0, "num_gpus": gpus, "gpu_name": "H100 SXM"},
            {"id": 103, "cluster_id": 7, "machine_id": 3, "dph_total": 12.5, "num_gpus": gpus, "gpu_name": "H100 SXM"},
            {"id": 201, "cluster_id": 9, "machine_id": 4, "dph_total": 1.0, "num_gpus": gpus, "gpu_name": "H100 SXM"},
        ]
        self.instances: dict[int, dict] = {}
        self.instance_keys: dict[int, str] = {}
        self.overlays: dict[str, dict] = {}
        self.next_id = 5001
        # failure knobs, set by tests
        self.fail_create_at: int | None = None     # the n-th create (1-based) answers 400
        self.create_delay = 0.0                    # seconds between creating an instance and answering
        self.destroy_fails: set[int] | bool = set()
        self.destroy_refuses: set[int] = set()     # ids whose DELETE answers 200 {"success": false}
        self.loading_listings = 0                  # listings that still show new instances as "loading"
        self.row_patch: dict[int, dict] = {}       # create number -> fields replaced in that instance's row
        self.node_faults: dict[int, dict] = {}     # create number -> fault for the fake ssh
        self.creates = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
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
        return [r["answer"]["new_contract"] for r in self.calls("PUT", r"/api/v0/asks/\d+/") if r.get("status") == 200]

    def destroyed(self) -> list[int]:
        return [int(r["path"].split("/")[-2]) for r in self.calls("DELETE", r"/api/v0/instances/\d+/")
                if r["status"] == 200 and r["answer"].get("success")]

    def alive(self) -> list[int]:
        with self.lock:
            return sorted(self.instances)

    def node_dir(self, inst: int) -> Path:
        return self.base / f"i{inst}"

    # --- node registry for the fake ssh -----------------------------------------------------------------
    def _write_registry(self):
        with self.lock:
            nodes = {}
            for inst, row in self.instances.items():
                nodes[f"127.0.0.1:{self._port(inst)}"] = {
                    "id": inst, "dir": str(self.node_dir(inst)), "state": row["actual_status"],
                    "env": {"CONTAINER_ID": str(inst), "CONTAINER_API_KEY": self.instance_keys[inst],
                            "VAST_URL": self.url},
                    "fault": row.get("_fault") or {}}
            tmp = self.registry.with_suffix(".tmp")
            tmp.write_text(json.dumps(nodes))
            os.replace(tmp, self.registry)

    @staticmethod
    def _port(inst: int) -> int:
        return 40000 + inst % 10000

    def _row(self, inst: int, offer: dict, body: dict) -> dict:
        port = self._port(inst)
        env = body.get("env") or {}
        return {"id": inst, "label": body.get("label"), "actual_status": "loading", "intended_status": "running",
                "public_ipaddr": "127.0.0.1", "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]},
                "ssh_host": "127.0.0.1", "ssh_port": port, "num_gpus": offer["num_gpus"],
                "gpu_name": offer["gpu_name"], "dph_total": offer["dph_total"], "cluster_id": offer["cluster_id"],
                "machine_id": offer["machine_id"], "start_date": time.time(), "image_uuid": body.get("image"),
                "extra_env": [[k, v] for k, v in env.items()], "local_ipaddrs": f"10.0.0.{inst % 250} 172.17.0.2"}

    # --- request handling ------------------------------------------------------------------------------------
    def _handle(self, method: str, raw_path: str, headers, body: dict) -> tuple[int, object]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        auth = headers.get("Authorization")
        record = {"method": method, "path": path, "query": query, "body": body, "auth": auth, "t": time.time()}
        with self.lock:
            self.requests.append(record)
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        own = m and method == "PUT" and int(m.group(1)) in self.instance_keys \
            and auth == f"Bearer {self.instance_keys[int(m.group(1))]}"
        record["key"] = "user" if auth == f"Bearer {self.api_key}" else ("instance" if own else None)
        if record["key"] is None:
            status, answer = 401, {"error": "invalid_key", "msg": "bad or missing API key"}
        else:
            status, answer = self._route(method, path, body, record)
        record.update(status=status, answer=answer)
        return status, answer

    def _route(self, method: str, path: str, body: dict, record: dict) -> tuple[int, object]:
        if method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": [dict(o) for o in self.offers]}
        m = re.fullmatch(r"/api/v0/asks/(\d+)/", path)
        if method == "PUT" and m:
            return self._create(int(m.group(1)), body)
        if method == "GET" and path == "/api/v1/instances/":
            with self.lock:
                rows = []
                for inst in sorted(self.instances):
                    row = self.instances[inst]
                    if row["actual_status"] == "loading" and self.loading_listings <= 0:
                        row["actual_status"] = "running"
                    rows.append({k: v for k, v in row.items() if not k.startswith("_")})
                self.loading_listings -= 1
            self._write_registry()
            return 200, {"instances": rows, "next_token": None, "total_instances": len(rows)}
        m = re.fullmatch(r"/api/v0/instances/(\d+)/", path)
        if m:
            inst = int(m.group(1))
            with self.lock:
                if inst not in self.instances:
                    return 404, {"success": False, "error": "no_such_instance", "msg": f"no instance {inst}"}
                if method == "DELETE":
                    if self.destroy_fails is True or inst in self.destroy_fails:
                        return 500, {"success": False, "msg": "destroy failed (stand-in)"}
                    if inst in self.destroy_refuses:
                        return 200, {"success": False, "msg": "destroy refused (stand-in)"}
                    del self.instances[inst]
                    self._write_registry()
                    return 200, {"success": True}
                if method == "PUT" and body.get("state") in ("stopped", "running"):
                    self.instances[inst]["actual_status"] = "stopped" if body["state"] == "stopped" else "running"
                    self._write_registry()
                    return 200, {"success": True}
        if path == "/api/v0/overlay/":
            with self.lock:
                if method == "POST":
                    name = body.get("name")
                    if name in self.overlays:
                        return 400, {"success": False, "msg": f"overlay {name} exists"}
                    self.overlays[name] = {"name": name, "cluster_id": body.get("cluster_id"), "instances": []}
                    return 200, {"success": True, "msg": "created overlay"}
                if method == "PUT":
                    self.overlays[body["name"]]["instances"].append(body["instance_id"])
                    return 200, {"success": True}
                if method == "DELETE":
                    name = body.get("overlay_name")
                    if name not in self.overlays:
                        return 404, {"success": False, "msg": f"no overlay {name}"}
                    del self.overlays[name]
                    return 200, {"success": True}
                if method == "GET":
                    return 200, list(self.overlays.values())
        return 404, {"success": False, "msg": f"stand-in: no route {method} {path}"}

    def _create(self, offer_id: int, body: dict) -> tuple[int, object]:
        with self.lock:
            self.creates += 1
            number = self.creates
            if self.fail_create_at == number:
                return 400, {"success": False, "error": "no_capacity", "msg": "offer 'taken' (stand-in)"}
            offer = next((o for o in self.offers if o["id"] == offer_id), None)
            if offer is None:
                return 404, {"success": False, "msg": f"no offer {offer_id}"}
            inst = self.next_id
            self.next_id += 1
            row = self._row(inst, offer, body)
            row.update(self.row_patch.get(number, {}))
            row["_fault"] = self.node_faults.get(number)
            self.instances[inst] = row
            self.instance_keys[inst] = f"instance-key-{inst}-{os.urandom(4).hex()}"
            overlay = next((k[3:] for k in (body.get("env") or {}) if k.startswith("-n ")), None)
            if overlay in self.overlays:
                self.overlays[overlay]["instances"].append(inst)
            disk = self.node_dir(inst)
            (disk / ".ssh").mkdir(parents=True, exist_ok=True)
            (disk / ".ssh" / "authorized_keys").write_text(self.user_pub)
            self._write_registry()
        time.sleep(self.create_delay)   # the instance exists; its reply comes late
        return 200, {"success": True, "new_contract": inst}

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
                status, answer = standin._handle(self.command, self.path, self.headers, body)
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass   # the client went away (Ctrl-C during a late reply)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args):
                pass

        return Handler
