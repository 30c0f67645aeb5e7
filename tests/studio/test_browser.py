"""The studio page in real chromium against a running studio over a real engine (tiny random SAM).

An annotator signs in, takes an item, adds a mask by clicks (a point, another candidate, a box fed
the chosen candidate back), erases part of it, paints a mask with the brush, rejects a model mask,
marks a hard negative present and submits: the manifest then holds exactly what the page sent.
Two browser contexts never share an item; an expired lease is handed to the other annotator and the
first one's submit is refused with the banner shown and the work kept in localStorage. Phrase edits,
skipping and the figures dialog: test_browser_edits.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.studio.browser import chromium, screenshot, watch_console  # noqa: F401  (fixture)
from tests.studio.pages import (
    signin, take_next, at, predict_by, decode, capsule, drag, set_radius, phrase_row, negative_row, load_item, claim)



def test_an_annotator_fixes_an_item_and_the_manifest_holds_exactly_that(any_studio, chromium):  # noqa: F811
    studio = any_studio  # in process and over gRPC servers (the distributed stack)
    errors: list[str] = []
    page = chromium.page()
    watch_console(page, errors)
    page.goto(f"{studio.url}/")
    page.get_by_test_id("signin-view").wait_for()
    screenshot(page, "01-signin")
    signin(page, studio.url, "alice")
    assert page.evaluate("sessionStorage.getItem('studio.annotator')") == "alice"
    page.wait_for_function("document.querySelector('[data-testid=queue-waiting]').textContent.trim() !== '–'")

    view = take_next(page)
    assert view["stage"] != "assisted_manual", "the fixture's first item should be a stage-2 item"
    h, w = view["height"], view["width"]
    positives = [p for p in view["phrases"] if not p["is_negative"] and p["masks"]]
    negatives = [p for p in view["phrases"] if p["is_negative"]]
    assert positives and negatives, "the stage-2 item needs masks and hard negatives"
    assert page.get_by_test_id("info-stage").inner_text() == view["stage"]
    assert page.get_by_test_id("info-state").inner_text() == view["state"]
    assert view["failure_modes"], "the verifier sent it to a human: active mining says why"
    assert page.get_by_test_id("info-why").inner_text() == ", ".join(m.replace("_", " ") for m in view["failure_modes"])
    assert page.locator("[data-testid=phrase]").count() == len([p for p in view["phrases"] if not p["is_negative"]])
    assert page.locator("[data-testid=negative]").count() == len(negatives)
    screenshot(page, "02-item")

    target = positives[0]["phrase"]
    phrase_row(page, target).locator("[data-testid=phrase-name]").click()
    assert page.get_by_test_id("prompt-target").inner_text() == target

    # a positive point: three candidates drawn
    p1 = (w * 0.45, h * 0.5)
    req1, ans1 = predict_by(page, lambda: page.mouse.click(*at(page, *p1)))
    assert req1["points"] == [{"x": pytest.approx(p1[0], abs=0.6), "y": pytest.approx(p1[1], abs=0.6), "label": 1}]
    assert req1["mask_input"] is None and req1["box"] is None and req1["multimask"] is True
    assert len(ans1["candidates"]) == 3
    page.get_by_test_id("candidate-2").wait_for()
    # another candidate (key 2), then a box: the box's request feeds that choice back
    page.keyboard.press("2")
    assert page.get_by_test_id("candidate-1").get_attribute("aria-pressed") == "true"
    page.keyboard.press("b")
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.85)
    req2, ans2 = predict_by(page, lambda: drag(page, box[:2], box[2:]))
    assert req2["mask_input"] == {"logits_key": ans1["logits_key"], "index": 1}
    assert req2["box"] == {"x0": pytest.approx(box[0], abs=0.6), "y0": pytest.approx(box[1], abs=0.6),
                           "x1": pytest.approx(box[2], abs=0.6), "y1": pytest.approx(box[3], abs=0.6)}
    assert len(req2["points"]) == 1
    # pick the third candidate (or the first non-empty one) by clicking its thumbnail, accept it (Enter)
    pick = 2 if decode(ans2["candidates"][2]["rle"]).any() else next(
        i for i, c in enumerate(ans2["candidates"]) if decode(c["rle"]).any())
    chosen = ans2["candidates"][pick]
    page.get_by_test_id(f"candidate-{pick}").click()
    assert page.get_by_test_id(f"candidate-{pick}").get_attribute("aria-pressed") == "true"
    screenshot(page, "03-candidates")
    page.keyboard.press("Enter")
    row = phrase_row(page, target)
    n_masks = len(positives[0]["masks"]) + 1
    assert row.locator("[data-testid=mask]").count() == n_masks
    new_row = row.locator("[data-testid=mask]").nth(n_masks - 1)
    assert new_row.get_attribute("data-origin") == "human"
    assert "selected" in new_row.get_attribute("class")

    # erase a stripe across the new mask with the eraser
    cand = decode(chosen["rle"])
    ys, xs = np.nonzero(cand)
    y_mid = float(np.median(ys)) + 0.5
    row_x = xs[ys == int(y_mid)]
    a, b = (float(row_x.min()), y_mid), (float(row_x.max()) + 1.0, y_mid)
    page.keyboard.press("e")
    radius = 4
    set_radius(page, radius)
    drag(page, a, b)
    screenshot(page, "04-erased")

    # reject the first model mask of the phrase; EV: the phrase is exhaustive now
    row.locator("[data-testid=mask]").first.locator("[data-testid=mask-reject]").click()
    assert row.locator("[data-testid=mask]").first.get_attribute("data-decision") == "reject"
    row.locator("[data-testid=ev-yes]").click()

    # hard negatives: the first one is present (then a positive to mask: paint it with the brush),
    # the others confirmed absent
    present = negatives[0]["phrase"]
    negative_row(page, present).locator("[data-testid=neg-present]").click()
    prow = phrase_row(page, present)
    prow.wait_for()
    assert prow.locator("[data-testid=was-negative]").count() == 1
    for n in negatives[1:]:
        negative_row(page, n["phrase"]).locator("[data-testid=neg-absent]").click()
    page.keyboard.press("x")
    set_radius(page, 6)
    paint_a, paint_b = (w * 0.15, h * 0.3), (w * 0.35, h * 0.3)
    drag(page, paint_a, paint_b)
    assert prow.locator("[data-testid=mask]").count() == 1

    # undo/redo round trip of the last edit (the painted mask)
    page.keyboard.press("Control+z")
    assert prow.locator("[data-testid=mask]").count() == 0
    page.keyboard.press("Control+Shift+z")
    assert prow.locator("[data-testid=mask]").count() == 1
    page.mouse.move(*at(page, w * 0.5, h * 0.95))
    screenshot(page, "05-edited")

    # what the page holds for the new mask: the chosen candidate less the stripe
    body = page.evaluate("window.studio.submitBody()")
    sent = {p["phrase"]: p for p in body}
    human = sent[target]["masks"][-1]
    got = decode(human["rle"])
    inner = capsule(h, w, a, b, radius - 1.0)
    outer = capsule(h, w, a, b, radius + 1.5)
    assert not got[inner].any(), "the eraser left pixels in its path"
    assert np.array_equal(got[~outer], cand[~outer]), "the eraser changed pixels away from its path"
    assert (cand & inner).any(), "the stripe crossed the mask"
    painted = decode(sent[present]["masks"][0]["rle"])
    assert painted[capsule(h, w, paint_a, paint_b, 5.0)].all()
    assert not painted[~capsule(h, w, paint_a, paint_b, 7.5)].any()

    # submit (Shift+Enter)
    with page.expect_response(lambda r: r.url.endswith("/submit")) as info:
        page.keyboard.press("Shift+Enter")
    assert info.value.status == 200, info.value.text()
    submitted = json.loads(info.value.request.post_data)
    assert submitted["decision"] == "accept" and submitted["lease_token"] == view["lease"]["token"]
    assert submitted["seconds_spent"] > 0
    assert submitted["phrases"] == body
    page.wait_for_function("id => !window.studio.state().item || window.studio.state().item.item_id !== id",
                           arg=view["item_id"])
    assert page.evaluate("id => Object.keys(localStorage).filter(k => k.endsWith(id))", view["item_id"]) == []

    # the manifest holds exactly that
    item = load_item(studio, view["item_id"])
    assert item.state.name == "ACCEPTED"
    record = item.reviews[-1]
    assert record.annotator == "alice" and record.accept and record.kind == "review"
    assert math.isclose(record.client_seconds, submitted["seconds_spent"], abs_tol=0.01)
    kept = {p.phrase: p for p in item.phrases}
    model_masks = positives[0]["masks"]
    assert [m.segmentation["counts"] for m in kept[target].masks] == (
        [m["rle"]["counts"] for m in model_masks[1:]] + [human["rle"]["counts"]])
    assert not kept[target].is_negative and kept[target].exhaustive is True
    assert not kept[present].is_negative
    assert [m.segmentation["counts"] for m in kept[present].masks] == [sent[present]["masks"][0]["rle"]["counts"]]
    for n in negatives[1:]:
        assert kept[n["phrase"]].is_negative and kept[n["phrase"]].masks == []
    mv = {(e["phrase"], e["mask"]["segmentation"]["counts"]): e for e in record.mv}
    rejected = mv[(target, model_masks[0]["rle"]["counts"])]
    assert rejected["accept"] is False and rejected["origin"] == "model"
    added = mv[(target, human["rle"]["counts"])]
    assert added["accept"] is True and added["origin"] == "human"
    assert {e["phrase"]: e["check"] for e in record.negatives} == (
        {present: "present"} | {n["phrase"]: "absent" for n in negatives[1:]})
    assert any(e["phrase"] == target and e["exhaustive"] is True for e in record.ev)
    assert not [e for e in errors if "409" not in e and "404" not in e], errors


def test_two_annotators_never_see_the_same_item(studio, chromium):  # noqa: F811
    alice, bob = chromium.page(), chromium.page()
    signin(alice, studio.url, "alice")
    signin(bob, studio.url, "bob")
    a = take_next(alice)
    b = take_next(bob)
    assert a["item_id"] != b["item_id"]
    assert a["lease"]["annotator"] == "alice" and b["lease"]["annotator"] == "bob"
    assert alice.evaluate("sessionStorage.getItem('studio.annotator')") == "alice"
    assert bob.evaluate("sessionStorage.getItem('studio.annotator')") == "bob"
    # a reload hands back the item held (not another)
    alice.reload()
    alice.wait_for_function("id => window.studio.state().item && window.studio.state().item.item_id === id",
                            arg=a["item_id"])
    # skip releases it
    with alice.expect_response(lambda r: r.url.endswith("/release")) as info:
        alice.keyboard.press("s")
    assert info.value.status == 200
    alice.get_by_test_id("empty-state").wait_for()


def test_stage1_item_masks_made_by_clicks(any_studio, chromium):  # noqa: F811
    studio = any_studio  # in process and over gRPC servers (the distributed stack)
    # stage-1 items come last in the queue: two other annotators hold the items before it
    held = {claim(studio, "xavier")["item_id"], claim(studio, "yvonne")["item_id"]}
    assert studio.items["stage1"] not in held
    page = chromium.page()
    signin(page, studio.url, "carol")
    view = take_next(page)
    assert view["item_id"] == studio.items["stage1"] and view["stage"] == "assisted_manual"
    assert view["phrases"] == []
    page.get_by_test_id("no-phrases").wait_for()
    page.get_by_test_id("add-phrase-input").fill("mug")
    page.get_by_test_id("add-phrase").click()
    assert page.get_by_test_id("prompt-target").inner_text() == "mug"
    h, w = view["height"], view["width"]
    _, ans = predict_by(page, lambda: page.mouse.click(*at(page, w / 2, h / 2)))
    predict_by(page, lambda: page.mouse.click(*at(page, w / 4, h / 4), button="right"))
    page.keyboard.press("Enter")
    assert phrase_row(page, "mug").locator("[data-testid=mask]").count() == 1
    page.get_by_test_id("add-negative-input").fill("teapot")
    page.get_by_test_id("add-negative").click()
    assert negative_row(page, "teapot").count() == 1
    screenshot(page, "06-stage1")
    with page.expect_response(lambda r: r.url.endswith("/submit")) as info:
        page.get_by_test_id("submit").click()
    assert info.value.status == 200, info.value.text()
    sent = json.loads(info.value.request.post_data)["phrases"]
    assert [(p["phrase"], p["original_phrase"], p["is_negative"]) for p in sent] == [
        ("mug", None, False), ("teapot", None, True)]
    item = load_item(studio, view["item_id"])
    assert item.state.name == "ACCEPTED"
    assert {p.phrase: p.is_negative for p in item.phrases} == {"mug": False, "teapot": True}
    assert item.phrases[0].masks[0].segmentation["counts"] == sent[0]["masks"][0]["rle"]["counts"]


def test_an_expired_lease_goes_to_the_other_annotator_and_the_first_keeps_the_work(studio, chromium):  # noqa: F811
    studio.set_lease(2.0)
    alice, bob = chromium.page(), chromium.page()
    signin(alice, studio.url, "alice")
    signin(bob, studio.url, "bob")
    a = take_next(alice)
    alice.evaluate("clearInterval(window.studio.state().heartbeat)")  # alice walks away: no heartbeats
    first = alice.locator("[data-testid=mask]").first
    first.locator("[data-testid=mask-reject]").click()
    alice.wait_for_function("id => Object.keys(localStorage).some(k => k.endsWith(id))", arg=a["item_id"])
    alice.wait_for_timeout(2500)
    b = take_next(bob)
    assert b["item_id"] == a["item_id"], "the expired item goes to the next annotator"
    with alice.expect_response(lambda r: r.url.endswith("/submit")) as info:
        alice.get_by_test_id("submit").click()
    assert info.value.status == 409
    banner = alice.get_by_test_id("lease-banner")
    banner.wait_for()
    assert "expired" in banner.inner_text() and "kept" in banner.inner_text()
    screenshot(alice, "07-lease-lost")
    kept = alice.evaluate("id => JSON.parse(localStorage.getItem('studio.work.alice.' + id))", a["item_id"])
    assert kept and kept["item_id"] == a["item_id"]
    assert any(m["decision"] == "reject" for p in kept["phrases"] for m in p["masks"])
    # the work is still on screen
    assert alice.locator("[data-testid=mask]").first.get_attribute("data-decision") == "reject"
