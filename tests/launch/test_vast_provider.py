"""launch/vast/provider.py: the real `vastai` SDK against the stand-in of the vast.ai REST API
(tests/fakes/vast_api.py), so that what counts as a success, what is sent once, and what is read
whole is checked against the client's real requests and the API's documented answers."""
from __future__ import annotations

import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from vast_api import StandIn  # noqa: E402

from launch.vast.checks import UnsafeInput  # noqa: E402
from launch.vast.provider import Provider, VastError  # noqa: E402

KEY = "vast-key-PROVIDER-0123456789abcdef"
ASKS = r"/api/v0/asks/\d+/"


@pytest.fixture
def api(tmp_path, monkeypatch):
    with StandIn(tmp_path / "cloud", KEY, "ssh-ed25519 AAAA test") as standin:
        monkeypatch.setenv("VAST_URL", standin.url)
        monkeypatch.setenv("VAST_API_KEY", KEY)
        yield standin


def _create(provider: Provider, offer: int = 101) -> int:
    return provider.create_instance(offer, "img", 10, "run-a", "run-a", {})


def test_a_200_answer_saying_success_false_is_a_failure(api):
    """HTTP 200 with {"success": false}: the SDK hands the body back without raising; the provider
    raises, and the instance is still listed (it bills)."""
    provider = Provider()
    inst = _create(provider)
    api.soft_failures[("DELETE", rf"/api/v0/instances/{inst}/")] = True
    with pytest.raises(VastError, match=f"destroy instance {inst}: the provider did not confirm it"):
        provider.destroy_instance(inst)
    assert [r["id"] for r in provider.instances()] == [inst]
    api.soft_failures[("POST", r"/api/v0/overlay/")] = True
    with pytest.raises(VastError, match="create overlay run-b: the provider did not confirm it"):
        provider.create_overlay(7, "run-b")
    api.soft_failures.clear()
    provider.destroy_instance(inst)
    assert provider.instances() == []


def test_a_create_is_sent_once_and_a_lost_answer_is_not_a_refusal(api):
    """The first answer is lost (a 504 although the instance was made): the SDK would send the create
    again (and the second would be refused, hiding the first); the provider sends it once and raises
    an error that says the create may have happened."""
    api.create_answers[1] = (504, "Gateway Time-out")
    provider = Provider()
    with pytest.raises(VastError) as caught:
        _create(provider)
    assert not caught.value.answered   # "maybe created": the teardown looks for it by label
    assert len(api.calls("PUT", ASKS)) == 1 and api.alive() == [5001]
    assert [r["label"] for r in provider.instances()] == ["run-a"]


def test_an_offer_taken_between_search_and_create_is_a_clear_refusal(api):
    api.taken_offers.add(101)
    provider = Provider()
    assert 101 in [o["id"] for o in provider.search_offers(2, "H100_SXM", 20)]
    with pytest.raises(VastError) as caught:
        _create(provider)
    assert caught.value.answered and "no_such_ask" in str(caught.value) and api.alive() == []


def test_the_listing_is_read_whole_across_pages_and_rate_limits(api):
    """60 instances on pages of 25, with a 429 on the way: every one is listed, so a destroy is
    confirmed only by a complete listing."""
    api.offers += [dict(api.offers[0], id=1000 + i, machine_id=1000 + i) for i in range(60)]
    provider = Provider()
    ids = [_create(provider, 1000 + i) for i in range(60)]
    api.page_size = 25
    api.rate_limits[("GET", r"/api/v1/instances/")] = 1
    assert sorted(r["id"] for r in provider.instances()) == ids
    assert len(api.calls("GET", r"/api/v1/instances/")) >= 4   # the 429, then three pages


def test_an_all_digit_overlay_name_never_reaches_the_sdk(api):
    """The SDK's delete_overlay reads an all-digit name as an overlay id: it could delete another run's."""
    with pytest.raises(UnsafeInput, match="--run '4242'"):
        Provider().delete_overlay("4242")
    assert api.calls("DELETE") == []
