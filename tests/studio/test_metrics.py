"""The studio's /metrics (issue 15), read with prometheus-client's own parser as annotators work:
active annotators, submits by decision, click latency, HTTP requests by route template and code,
and the orchestrator's counters of human decisions and expired leases (in process here)."""

from __future__ import annotations

import time
from urllib.parse import quote

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import ActiveAnnotators
from tests.studio.conftest import Studio


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the studio's /metrics."""
    answer = httpx.get(url + "/metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_annotators_work(studio: Studio):
    studio.set_lease(0.5)
    before = scrape(studio.url)
    ann = httpx.Client(base_url=studio.url, headers={"X-Annotator": "ann"}, timeout=60)
    bob = httpx.Client(base_url=studio.url, headers={"X-Annotator": quote("Zoë")}, timeout=60)
    item = ann.post("/api/next").json()
    for _ in range(2):
        assert ann.post(f"/api/items/{item['item_id']}/predict",
                        json={"points": [{"x": 90, "y": 120, "label": 1}], "multimask": True}).status_code == 200
    assert ann.post(f"/api/items/{item['item_id']}/predict", json={"points": "nope"}).status_code == 422
    assert ann.get("/api/items/no-such-item").status_code == 404
    assert ann.get("/no/such/page").status_code == 404
    time.sleep(0.6)  # ann's lease expires: bob's claim takes the item over
    taken = bob.post("/api/next").json()
    assert taken["item_id"] == item["item_id"]
    assert bob.post(f"/api/items/{taken['item_id']}/submit",
                    json={"lease_token": taken["lease"]["token"], "decision": "discard"}).status_code == 200
    after = scrape(studio.url)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "dataengine_studio_active_annotators") == 2
    assert moved("dataengine_studio_submits_total", decision="discard") == 1
    assert moved("dataengine_studio_submits_total", decision="accept") == 0
    assert moved("dataengine_studio_click_seconds_count") == 2  # the refused click never reached the decoder
    assert moved("dataengine_studio_click_seconds_sum") > 0
    predict = "/api/items/{item_id}/predict"
    assert moved("dataengine_http_requests_total", method="POST", route=predict, code="200") == 2
    assert moved("dataengine_http_requests_total", method="POST", route=predict, code="422") == 1
    assert moved("dataengine_http_requests_total", method="GET", route="/api/items/{item_id}", code="404") == 1
    assert moved("dataengine_http_requests_total", method="GET", route="unmatched", code="404") == 1
    assert moved("dataengine_http_request_seconds_count", method="POST", route=predict) == 3
    assert not any(name == "dataengine_http_requests_total" and ("route", "/no/such/page") in labels
                   for name, labels in after)  # raw paths never become series
    assert moved("dataengine_reviews_total", kind="review", decision="discard") == 1
    assert moved("dataengine_lease_expiries_total") == 1


def test_active_annotators_forget_the_idle():
    now = [100.0]
    active = ActiveAnnotators(window_s=300, clock=lambda: now[0])
    active.seen("ann")
    now[0] += 200
    active.seen("bob")
    assert active.refresh() == 2
    now[0] += 150  # ann idle for 350 s, bob for 150 s
    assert active.refresh() == 1
    active.seen("ann")
    assert active.refresh() == 2
