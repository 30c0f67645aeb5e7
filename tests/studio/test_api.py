"""The studio's HTTP API over both backends: in process (``dataengine studio OUT_DIR``) and gRPC
(real orchestrator and decoder servers over loopback, as ``dataengine serve studio`` in a
deployment); the annotator's loop end to end, and every bad request a 4xx naming the problem."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from services.common.masks import decode_rle, encode_rle
from tests.studio.conftest import H, W, Studio



@pytest.fixture
def api(any_studio: Studio):
    """(studio, base URL of its app), over each backend."""
    return any_studio, any_studio.url


def client(url: str, name: str | None = "ann") -> httpx.Client:
    headers = {"X-Annotator": quote(name)} if name else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def box_rle(y0, y1, x0, x1) -> dict:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return encode_rle(m)


def test_the_annotator_loop_end_to_end(api):
    studio, url = api
    ann, bob = client(url, "ann"), client(url, "Zoë Ünal")  # a name beyond Latin-1, percent-encoded
    assert ann.post("/api/signin", json={"name": "ann"}).json() == {"annotator": "ann"}
    assert ann.get("/api/queue").json() == {"waiting": 3, "bands": {"review": 1, "fix": 1, "audit": 0, "stage1": 1}}

    item = ann.post("/api/next").json()
    assert item["item_id"] == studio.items["stage2"] and item["band"] == "review" and item["score"] == 0.8
    assert item["stage"] == "semi_automatic" and item["state"] == "review" and (item["height"], item["width"]) == (H, W)
    assert item["lease"]["annotator"] == "ann" and item["lease"]["heartbeat_s"] == 120
    phrases = {p["phrase"]: p for p in item["phrases"]}
    assert set(phrases) == {"dog", "frisbee", "wolf", "unicorn"}
    assert phrases["wolf"]["is_negative"] and not phrases["wolf"]["masks"]
    dog = phrases["dog"]
    assert len(dog["masks"]) == 1 and dog["masks"][0]["rle"]["size"] == [H, W] and dog["score"] == 0.8
    assert dog["masks"][0]["mv_score"] == 0.8 and dog["masks"][0]["mv_choice"] == "accept"
    assert ann.post("/api/next").json()["lease"]["token"] == item["lease"]["token"]  # the same claim
    assert bob.post("/api/next").json()["item_id"] == studio.items["fix"]  # never ann's
    assert ann.get("/api/queue").json()["waiting"] == 1

    image = ann.get(item["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"

    token = item["lease"]["token"]
    # a click, its three candidates, then the second one fed back with a box
    first = ann.post(f"/api/items/{item['item_id']}/predict",
                     json={"points": [{"x": 90, "y": 120, "label": 1}], "multimask": True})
    assert first.status_code == 200, first.text
    answer = first.json()
    assert len(answer["candidates"]) == 3 and answer["logits_key"].startswith("logits/")
    assert answer["timings_ms"]["total"] > 0 and "total;dur=" in first.headers["server-timing"]
    ious = [c["predicted_iou"] for c in answer["candidates"]]
    assert ious == sorted(ious, reverse=True)
    second = ann.post(f"/api/items/{item['item_id']}/predict", json={
        "points": [{"x": 90, "y": 120, "label": 1}, {"x": 20, "y": 20, "label": 0}],
        "box": {"x0": 40, "y0": 60, "x1": 150, "y1": 200},
        "mask_input": {"logits_key": answer["logits_key"], "index": 1}, "multimask": False}).json()
    (chosen,) = second["candidates"]
    assert decode_rle(chosen["rle"]).shape == (H, W)

    lease = ann.post(f"/api/items/{item['item_id']}/heartbeat", json={"lease_token": token}).json()
    assert lease["expires_at"] >= item["lease"]["expires_at"]
    frisbee_mask = phrases["frisbee"]["masks"][0]
    drawn = box_rle(100, 140, 20, 60)
    body = {"lease_token": token, "decision": "accept", "seconds_spent": 33.0, "phrases": [
        {"phrase": "dog", "original_phrase": "dog", "exhaustive": True,
         "masks": [{"rle": dog["masks"][0]["rle"], "decision": "reject", "origin": "model"},
                   {"rle": chosen["rle"], "decision": "accept", "origin": "human",
                    "predicted_iou": chosen["predicted_iou"], "point_coords": [[90, 120]]}]},
        {"phrase": "flying disc", "original_phrase": "frisbee", "exhaustive": False,
         "masks": [{"rle": frisbee_mask["rle"], "decision": "accept", "origin": "model"}]},
        {"phrase": "wolf", "original_phrase": "wolf", "is_negative": True, "negative_check": "absent"},
        {"phrase": "unicorn", "original_phrase": "unicorn", "negative_check": "present", "exhaustive": True,
         "masks": [{"rle": drawn, "decision": "accept", "origin": "human"}]},
        {"phrase": "ball", "is_negative": True}]}
    done = ann.post(f"/api/items/{item['item_id']}/submit", json=body)
    assert done.status_code == 200, done.text
    assert done.json() == {"item_id": item["item_id"], "state": "accepted", "audit": False}

    stored = studio.manifest("stage2")
    assert stored.reviewer == "ann" and stored.lease is None
    got = {p.phrase: p for p in stored.phrases}
    assert list(got) == ["dog", "flying disc", "wolf", "unicorn", "ball"]
    assert [m.segmentation for m in got["dog"].masks] == [chosen["rle"]]
    assert got["dog"].provenance == "human:ann" and got["dog"].exhaustive is True
    assert got["unicorn"].masks[0].segmentation == drawn and not got["unicorn"].is_negative
    assert got["wolf"].is_negative and got["ball"].is_negative
    (record,) = stored.reviews
    assert [(m["phrase"], m["accept"], m["origin"]) for m in record.mv] == [
        ("dog", False, "model"), ("dog", True, "human"), ("flying disc", True, "model"), ("unicorn", True, "human")]
    assert record.mv[0]["model_score"] == pytest.approx(0.8) and record.client_seconds == 33.0
    assert record.negatives == [{"phrase": "wolf", "check": "absent"}, {"phrase": "unicorn", "check": "present"}]

    figures = ann.get("/api/annotators").json()["annotators"]
    assert [(f["annotator"], f["items"], f["masks"]) for f in figures] == [("ann", 1, 3)]
    # the same submit again: the lease is gone
    again = ann.post(f"/api/items/{item['item_id']}/submit", json=body)
    assert again.status_code == 409 and "is gone" in again.json()["detail"]

    # bob skips his item; ann gets it, discards it; the stage-1 item is next
    bob_item = bob.post("/api/next").json()
    assert bob.post(f"/api/items/{bob_item['item_id']}/release",
                    json={"lease_token": bob_item["lease"]["token"]}).json() == {"released": True}
    fix = ann.post("/api/next").json()
    assert fix["item_id"] == studio.items["fix"] and fix["band"] == "fix"
    assert ann.post(f"/api/items/{fix['item_id']}/submit", json={"lease_token": fix["lease"]["token"],
                                                                  "decision": "discard"}).json()["state"] == "discarded"
    stage1 = bob.post("/api/next").json()
    assert stage1["band"] == "stage1" and stage1["phrases"] == [] and stage1["score"] is None
    assert ann.post("/api/next").status_code == 404


def test_dataengine_refresh_exports_the_human_work(studio: Studio):
    from typer.testing import CliRunner

    from services.app.cli import app as cli

    ann = client(studio.url)
    item = ann.post("/api/next").json()
    mask = box_rle(10, 50, 10, 50)
    ann.post(f"/api/items/{item['item_id']}/submit", json={
        "lease_token": item["lease"]["token"], "decision": "accept",
        "phrases": [{"phrase": "dog", "original_phrase": "dog", "exhaustive": True,
                     "masks": [{"rle": mask, "origin": "human"}]},
                    {"phrase": "wolf", "original_phrase": "wolf", "is_negative": True, "negative_check": "absent"}]})
    result = CliRunner().invoke(cli, ["refresh", str(studio.out)])
    assert result.exit_code == 0, result.output
    coco = json.loads((studio.out / "coco.json").read_text())
    image = next(i for i in coco["images"] if i["item_id"] == item["item_id"])
    (annotation,) = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    assert annotation["segmentation"] == mask and annotation["bbox"] == [10.0, 10.0, 40.0, 40.0]
    saco = json.loads((studio.out / "saco.json").read_text())
    pairs = {p["phrase"]: p for p in saco["pairs"] if p["image"]["item_id"] == item["item_id"]}
    assert pairs["dog"]["provenance"] == "human:ann" and pairs["dog"]["is_instance_exhaustive"] is True
    assert pairs["wolf"]["is_negative"] and pairs["wolf"]["provenance"] == "human:ann"
    report = json.loads((studio.out / "report.json").read_text())
    assert {r["file"]: r["state"] for r in report["items"]}["stage2.png"] == "accepted"


def claim(c: httpx.Client) -> tuple[str, str]:
    item = c.post("/api/next").json()
    return item["item_id"], item["lease"]["token"]


@pytest.mark.parametrize("name, send, status, detail", [
    ("no identity", lambda c, i, t: client(c.base_url, None).post("/api/next"), 401, "sign in first"),
    ("bad name", lambda c, i, t: client(c.base_url, "a/b\\c").post("/api/next"), 401, "annotator name"),
    ("sign-in too long", lambda c, i, t: c.post("/api/signin", json={"name": "x" * 65}), 422, "at most 64"),
    ("malformed JSON", lambda c, i, t: c.post(f"/api/items/{i}/submit", content=b"{nope",
                                               headers={"content-type": "application/json"}), 422, "JSON"),
    ("wrong type", lambda c, i, t: c.post(f"/api/items/{i}/submit",
                                           json={"lease_token": t, "decision": 1}), 422, "decision"),
    ("unknown field", lambda c, i, t: c.post(f"/api/items/{i}/submit",
                                              json={"lease_token": t, "decision": "accept", "acept": 1}),
     422, "acept"),
    ("mask of the wrong size", lambda c, i, t: c.post(f"/api/items/{i}/submit", json={
        "lease_token": t, "decision": "accept",
        "phrases": [{"phrase": "dog", "masks": [{"rle": encode_rle(np.ones((10, 12), bool))}]}]}),
     400, "is 10x12 (H x W) but the image is 240x320"),
    ("RLE that does not tile", lambda c, i, t: c.post(f"/api/items/{i}/submit", json={
        "lease_token": t, "decision": "accept",
        "phrases": [{"phrase": "dog", "masks": [{"rle": {"size": [H, W], "counts": "0"}}]}]}),
     400, "not 240x320"),
    ("forged lease", lambda c, i, t: c.post(f"/api/items/{i}/submit", json={"lease_token": "forged",
                                                                             "decision": "accept"}),
     409, "lease"),
    ("unknown item", lambda c, i, t: c.post(f"/api/items/{'0' * 24}/heartbeat", json={"lease_token": t}),
     404, "not found"),
    ("unsafe item id", lambda c, i, t: c.get("/api/items/..%5C..%5Cetc/image"), 400, "bad item id"),
    ("point outside", lambda c, i, t: c.post(f"/api/items/{i}/predict",
                                              json={"points": [{"x": 999, "y": 5, "label": 1}]}),
     400, "outside the image"),
    ("NaN point", lambda c, i, t: c.post(f"/api/items/{i}/predict", content=b'{"points": [{"x": NaN, "y": 1}]}',
                                          headers={"content-type": "application/json"}), 422, "finite"),
    ("empty prompt", lambda c, i, t: c.post(f"/api/items/{i}/predict", json={"points": []}), 400, "empty prompt"),
    ("label 2", lambda c, i, t: c.post(f"/api/items/{i}/predict", json={"points": [{"x": 1, "y": 1, "label": 2}]}),
     422, "label"),
    ("foreign logits", lambda c, i, t: c.post(f"/api/items/{i}/predict", json={
        "points": [{"x": 1, "y": 1}], "mask_input": {"logits_key": "logits/other/x.npy"}}),
     400, "not a logits key of this image"),
])
def test_bad_requests_are_4xx_naming_the_problem(studio: Studio, name, send, status, detail):
    c = client(studio.url)
    item_id, token = claim(c)
    reply = send(c, item_id, token)
    assert reply.status_code == status, (name, reply.status_code, reply.text)
    assert detail in json.dumps(reply.json()["detail"]), (name, reply.text)
    after = studio.backend.orchestrator.load(item_id)
    assert after.state.name == "REVIEW" and not after.reviews  # nothing changed
    assert c.post("/api/next").json()["lease"]["token"] == token  # the claim still holds


def test_the_schema_documents_every_route(studio: Studio):
    schema = httpx.get(f"{studio.url}/openapi.json").json()
    assert {"/api/signin", "/api/queue", "/api/next", "/api/items/{item_id}", "/api/items/{item_id}/image",
            "/api/items/{item_id}/heartbeat", "/api/items/{item_id}/release", "/api/items/{item_id}/predict",
            "/api/items/{item_id}/submit", "/api/annotators"} <= set(schema["paths"])
    submit = schema["components"]["schemas"]["SubmitIn"]
    assert submit["additionalProperties"] is False and "decision" in submit["required"]
