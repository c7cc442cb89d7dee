"""The stand-in vast.ai API (tests/fakes/vast_api.py) as the REAL `vastai` SDK (1.9.1) sees it: each
misbehaviour the driver must survive reaches the SDK the way the real API's would (a 200 that is not a
success, a 429 the SDK retries, pages, states, a taken offer, a reply that never comes), and scoped keys
are refused where vast.ai's permission format says they should be."""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import pytest
import requests
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from vast_api import StandIn  # noqa: E402

vastai = pytest.importorskip("vastai")

KEY = "account-key-0123456789"


@pytest.fixture
def api(tmp_path):
    with StandIn(tmp_path / "cloud", KEY, "ssh-ed25519 AAAA test") as stand_in:
        stand_in.offers += [{"id": 104 + k, "cluster_id": 7, "machine_id": 10 + k, "dph_total": 2.0, "num_gpus": 2,
                             "gpu_name": "H100 SXM", "storage_cost": 0.1, "rentable": True} for k in range(4)]
        yield stand_in


def sdk(api: StandIn, retry: int = 3, key: str = KEY, timeout: float | None = None):
    client = vastai.VastAI(api_key=key, server_url=api.url, retry=retry)
    if timeout is not None:
        client.client.timeout = timeout   # VastClient's per-request timeout (120 s by default)
    return client


def create(client, offer: int, **kw) -> dict:
    return client.create_instance(offer, image="img", disk=20, label="run-a", env={"-n run-a": "1"}, ssh=True,
                                  direct=True, **kw)


def test_paging_returns_every_row_across_pages(api):
    api.page_size = 2
    client = sdk(api)
    ids = [create(client, offer)["new_contract"] for offer in (101, 102, 103, 104, 105)]
    rows = client.show_instances()
    assert [r["id"] for r in rows] == ids
    pages = api.calls("GET", "/api/v1/instances/")
    assert len(pages) == 3
    assert "after_token" not in pages[0]["query"] and all("after_token" in p["query"] for p in pages[1:])
    assert json.loads(pages[0]["query"]["limit"][0]) == 25 and json.loads(pages[0]["query"]["select_filters"][0]) == {}
    assert all(isinstance(r["extra_env"], dict) and "duration" in r for r in rows)   # what the SDK adds
    assert api.listings == 1   # one listing, three pages


def test_a_429_is_retried_by_the_sdk_and_the_last_one_raises(api):
    api.rate_limits[("POST", "/api/v0/bundles/")] = 2
    offers = sdk(api).search_offers(query="num_gpus=2 rentable=true", order="dph_total")
    assert len(offers) == 8 and [c["status"] for c in api.calls("POST", "/api/v0/bundles/")] == [429, 429, 200]
    api.rate_limits[("GET", "/api/v1/instances/")] = [429, 502, 503]   # three attempts with retry=3: all fail
    with pytest.raises(requests.HTTPError) as err:
        sdk(api).show_instances()
    assert err.value.response.status_code == 503 and len(api.calls("GET", "/api/v1/instances/")) == 3
    api.rate_limits[("POST", "/api/v0/bundles/")] = 1   # retry=1: a single attempt, the 429 comes back raised
    with pytest.raises(requests.HTTPError) as err:
        sdk(api, retry=1).search_offers(query="num_gpus=2")
    assert err.value.response.status_code == 429 and "too frequent" in err.value.response.text
    api.rate_limits[("POST", "/api/v0/bundles/")] = 1   # the real API sends no Retry-After; the SDK honours one
    api.retry_after = 0.6
    started = time.monotonic()
    assert sdk(api).search_offers(query="num_gpus=2")
    assert time.monotonic() - started >= 0.6


def test_success_false_comes_back_as_a_200_body_and_nothing_happens(api):
    client = sdk(api)
    inst = create(client, 101)["new_contract"]
    api.soft_failures[("DELETE", rf"/api/v0/instances/{inst}/")] = 1
    api.soft_failures[("POST", "/api/v0/overlay/")] = True
    api.soft_failures[(None, "/api/v0/bundles/")] = 1
    assert client.destroy_instance(inst)["success"] is False   # no exception: the SDK hands the body back
    assert api.alive() == [inst] and api.destroyed() == []
    assert client.create_overlay(7, "run-a")["success"] is False and api.overlays == {}
    with pytest.raises(KeyError):   # search reads r.json()["offers"]: a 200 without offers is a KeyError
        client.search_offers(query="num_gpus=2")
    assert client.destroy_instance(inst)["success"] is True and api.destroyed() == [inst]


def test_a_create_whose_reply_is_late_is_sent_again_by_the_sdks_retry(api):
    """The reply comes after the client's timeout: with retry=3 the SDK sends the create again, which finds
    the offer taken (404 no_such_ask) and raises; with retry=1 it is sent once and the timeout raises.
    Either way the first create made an instance, which only a listing shows."""
    api.create_delays = {1: 5.0, 3: 5.0}   # replies long after the client gave up (the server does not wait)
    with pytest.raises(requests.HTTPError) as err:
        create(sdk(api, retry=3, timeout=0.3), 101)
    assert err.value.response.status_code == 404 and "no_such_ask" in err.value.response.json()["msg"]
    assert [c["path"] for c in api.calls("PUT", r"/api/v0/asks/\d+/")] == ["/api/v0/asks/101/"] * 2
    assert api.alive() == [5001]
    with pytest.raises(requests.exceptions.Timeout):
        create(sdk(api, retry=1, timeout=0.3), 102)
    assert len(api.calls("PUT", "/api/v0/asks/102/")) == 1 and api.alive() == [5001, 5002]
    assert api.created() == []   # no create reply reached a client
    assert {r["id"] for r in sdk(api).show_instances()} == {5001, 5002}


def test_an_offer_taken_between_search_and_create(api):
    client = sdk(api)
    api.taken_offers.add(101)
    assert 101 in [o["id"] for o in client.search_offers(query="num_gpus=2 rentable=true")]
    with pytest.raises(requests.HTTPError) as err:
        create(client, 101)
    assert err.value.response.status_code == 404
    assert err.value.response.json() == {"success": False, "error": "invalid_args", "ask_id": 101,
                                         "msg": "error 404/3603: no_such_ask Instance type by id 101 is not available."}
    create(client, 102)
    assert 102 not in [o["id"] for o in client.search_offers(query="num_gpus=2 rentable=true")]   # rented
    with pytest.raises(requests.HTTPError) as err:
        create(client, 102, cancel_unavail=True)
    assert err.value.response.status_code == 410


def test_an_instance_that_appears_late(api):
    """The create's reply is a 504 (the SDK with retry=1 raises it) but the instance exists; the first two
    listings do not show it yet."""
    api.create_answers = {1: (504, "Gateway Time-out")}
    api.hidden_listings = {1: 2}
    client = sdk(api, retry=1)
    with pytest.raises(requests.HTTPError):
        create(client, 101)
    assert [len(client.show_instances()) for _ in range(3)] == [0, 0, 1]


def test_status_sequences_advance_once_per_listing(api):
    api.page_size = 1
    api.status_sequences = {1: [None, "loading", "unknown", "running", "frozen", "rebooting", "offline", "exited",
                                "stopped", {"actual_status": "stopped", "cur_state": "unloaded"}]}
    client = sdk(api)
    first, second = create(client, 101)["new_contract"], create(client, 102)["new_contract"]
    seen = []
    for _ in range(11):
        rows = {r["id"]: r for r in client.show_instances()}
        assert rows[second]["actual_status"] == "running"
        seen.append((rows[first]["actual_status"], rows[first]["cur_state"], rows[first]["ports"] is None))
    assert seen == [(None, "running", True), ("loading", "running", True), ("unknown", "running", True),
                    ("running", "running", False), ("frozen", "running", True), ("rebooting", "running", True),
                    ("offline", "running", True), ("exited", "running", True), ("stopped", "stopped", True),
                    ("stopped", "unloaded", True), ("stopped", "unloaded", True)]


def test_odd_field_values_reach_the_client(api):
    api.row_patch = {1: {"ports": ["22/tcp"], "ssh_port": "not a port"}, 2: {"ports": None}}
    client = sdk(api)
    create(client, 101)
    create(client, 102)
    rows = client.show_instances()
    assert rows[0]["ports"] == ["22/tcp"] and rows[0]["ssh_port"] == "not a port" and rows[1]["ports"] is None


def _raw(api: StandIn, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, object]:
    """A request as the node-side guard sends it: urllib, no SDK."""
    req = urllib.request.Request(api.url + path, method=method, data=json.dumps(body or {}).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_scoped_key_is_refused_outside_its_permissions(api):
    account = sdk(api)
    mine, other = create(account, 101)["new_contract"], create(account, 102)["new_contract"]
    only = {"constraints": {"id": {"eq": mine}}}
    made = account.create_api_key("guard", {"api": {"instance_read": {}, "instance_write": {
        "api.instance.destroy": only, "api.instance.manage": only}}})
    assert set(made) == {"id", "key", "permissions"}
    assert [k["name"] for k in account.show_api_keys()] == ["guard"]
    guard = sdk(api, key=made["key"])
    for call in (lambda: guard.search_offers(query="num_gpus=2"), lambda: create(guard, 103),
                 lambda: guard.destroy_instance(other), lambda: guard.create_api_key("more", None)):
        with pytest.raises(requests.HTTPError) as err:
            call()
        assert err.value.response.status_code == 403
    assert {r["id"] for r in guard.show_instances()} == {mine, other}   # instance_read: {} grants every listing
    assert _raw(api, "PUT", f"/api/v0/instances/{mine}/", made["key"], {"state": "stopped"}) == (200, {"success": True})
    assert _raw(api, "DELETE", f"/api/v0/instances/{other}/", made["key"])[0] == 403
    assert _raw(api, "DELETE", f"/api/v0/instances/{mine}/", made["key"])[1]["success"] is True
    assert api.alive() == [other]
    assert account.delete_api_key(made["id"]) == "Successfully Deleted API Key"
    with pytest.raises(requests.HTTPError) as err:
        guard.show_instances()
    assert err.value.response.status_code == 401 and err.value.response.json()["error"] == "auth_error"
    with pytest.raises(requests.HTTPError) as err:   # not the documented format: no top-level "api"
        account.create_api_key("bad", {"instance_write": {}})
    assert err.value.response.status_code == 400 and err.value.response.json()["error"] == "invalid_permissions"


def test_an_instances_own_key_reaches_only_that_instance(api):
    account = sdk(api)
    first = create(account, 101)
    second = create(account, 102)["new_contract"]
    key = first["instance_api_key"]
    assert key == api.instance_keys[first["new_contract"]]
    assert _raw(api, "DELETE", f"/api/v0/instances/{second}/", key)[0] == 403
    assert _raw(api, "GET", "/api/v1/instances/", key)[0] == 403
    assert _raw(api, "DELETE", f"/api/v0/instances/{first['new_contract']}/", key)[0] == 200
    assert api.alive() == [second] and api.calls("DELETE")[-1]["key"] == "instance"


def test_billing_counts_running_hours_and_a_stopped_disk(api):
    client = sdk(api)
    inst = create(client, 101)["new_contract"]   # $10/h, 20 GB at $0.1/GB/month
    client.stop_instance(inst)
    started, stopped = (t for t, _ in api.bills[inst]["events"])
    later = stopped + 7200
    disk_hour = 0.1 * 20 / 720
    assert api.billed_usd(now=later) == pytest.approx(10 * (stopped - started) / 3600 + disk_hour * 2)
    client.destroy_instance(inst)
    gone = api.bills[inst]["events"][-1][0]
    assert api.billed_usd(now=gone + 10 ** 6) == pytest.approx(api.billed_usd(now=gone))
    assert time.time() >= gone
