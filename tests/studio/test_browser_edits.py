"""The studio page in real chromium: phrase edits (rename, a refused clash, select on the image,
delete and undo, ungroundable, exhaustivity, a new hard negative) then a discard; a skipped item
waits behind the others for its skipper, and the figures dialog counts what was submitted."""

from __future__ import annotations

import json

import numpy as np

from tests.studio.browser import chromium, screenshot, watch_console  # noqa: F401  (fixture)
from tests.studio.pages import (
    signin, take_next, at, predict_by, decode, phrase_row, negative_row, load_item, call, claim, open_figures, figures_row)


def test_phrase_edits_then_discard(studio, chromium):  # noqa: F811
    """Rename, ungroundable, add a hard negative, select a mask on the image and delete it (undone),
    submit; then discard the next item."""
    page = chromium.page()
    errors: list[str] = []
    watch_console(page, errors)
    signin(page, studio.url, "dora")
    view = take_next(page)
    h, w = view["height"], view["width"]
    dog, frisbee = (next(p for p in view["phrases"] if p["phrase"] == name) for name in ("dog", "frisbee"))

    # rename "dog" to "puppy" (the pencil, Enter)
    phrase_row(page, "dog").get_by_test_id("phrase-rename").click()
    page.get_by_test_id("phrase-rename-input").fill("brown puppy")
    page.get_by_test_id("phrase-rename-input").press("Enter")
    phrase_row(page, "brown puppy").wait_for()
    # a clash is refused with a message
    phrase_row(page, "frisbee").get_by_test_id("phrase-rename").click()
    page.get_by_test_id("phrase-rename-input").fill("brown puppy")
    page.get_by_test_id("phrase-rename-input").press("Enter")
    assert "already" in page.get_by_test_id("status").inner_text()
    assert phrase_row(page, "frisbee").count() == 1

    # select the frisbee's mask on the image (V + click on one of its pixels), Delete, then undo
    fr = decode(frisbee["masks"][0]["rle"])
    dg = decode(dog["masks"][0]["rle"])
    ys, xs = np.nonzero(fr & ~dg)
    page.keyboard.press("v")
    page.mouse.click(*at(page, xs[len(xs) // 2] + 0.5, ys[len(ys) // 2] + 0.5))
    frow = phrase_row(page, "frisbee")
    assert "selected" in frow.locator("[data-testid=mask]").first.get_attribute("class")
    page.keyboard.press("Delete")
    assert frow.locator("[data-testid=mask]").count() == 0
    page.keyboard.press("Control+z")
    assert frow.locator("[data-testid=mask]").count() == 1
    page.get_by_test_id("undo").click()  # undo the rename too, then redo it with the button
    phrase_row(page, "dog").wait_for()
    page.get_by_test_id("redo").click()
    phrase_row(page, "brown puppy").wait_for()

    # frisbee ungroundable; EV "no" on the puppy; a hard negative added
    frow.get_by_test_id("phrase-ungroundable").check()
    phrase_row(page, "brown puppy").get_by_test_id("ev-no").click()
    page.get_by_test_id("add-negative-input").fill("cat")
    page.get_by_test_id("add-negative").click()
    negative_row(page, "cat").wait_for()
    # hide all masks and show them again; opacity
    page.get_by_test_id("toggle-all").uncheck()
    assert page.locator("[data-testid=phrase-visible]:checked").count() == 0
    page.get_by_test_id("toggle-all").check()
    with page.expect_response(lambda r: r.url.endswith("/submit")) as info:
        page.get_by_test_id("submit").click()
    assert info.value.status == 200, info.value.text()
    sent = {p["phrase"]: p for p in json.loads(info.value.request.post_data)["phrases"]}
    assert sent["brown puppy"]["original_phrase"] == "dog" and sent["brown puppy"]["exhaustive"] is False
    assert sent["frisbee"]["ungroundable"] is True
    assert sent["cat"] == {"phrase": "cat", "original_phrase": None, "is_negative": True, "exhaustive": None,
                           "ungroundable": False, "negative_check": None, "masks": []}
    item = load_item(studio, view["item_id"])
    kept = {p.phrase: p for p in item.phrases}
    assert "frisbee" not in kept and "dog" not in kept  # ungroundable: not in the dataset; renamed
    assert [m.segmentation["counts"] for m in kept["brown puppy"].masks] == [dog["masks"][0]["rle"]["counts"]]
    assert kept["brown puppy"].exhaustive is False and kept["cat"].is_negative
    record = item.reviews[-1]
    assert {(e["phrase"], e["original_phrase"]) for e in record.mv} == {("brown puppy", "dog"), ("frisbee", "frisbee")}
    assert any(e["phrase"] == "frisbee" and e["ungroundable"] for e in record.ev)

    # the next item (the fix queue's) opened by itself: discard it
    page.wait_for_function("id => window.studio.state().item && window.studio.state().item.item_id === id",
                           arg=studio.items["fix"])
    with page.expect_response(lambda r: r.url.endswith("/submit")) as info:
        page.get_by_test_id("discard").click()
    assert info.value.status == 200, info.value.text()
    assert json.loads(info.value.request.post_data)["decision"] == "discard"
    assert load_item(studio, studio.items["fix"]).state.name == "DISCARDED"
    assert not [e for e in errors if "409" not in e and "404" not in e], errors


def test_a_skipped_item_waits_behind_the_others_and_figures_count_the_work(studio, chromium):  # noqa: F811
    errors: list[str] = []
    releases: list[str] = []
    page = chromium.page()
    watch_console(page, errors)
    page.on("request", lambda r: releases.append(r.url) if r.url.endswith("/release") else None)
    signin(page, studio.url, "erin")

    # erin skips the first item (S): the next one is another item
    first = take_next(page)
    assert first["item_id"] == studio.items["stage2"]
    with page.expect_response(lambda r: r.url.endswith("/release")) as info:
        page.keyboard.press("s")
    assert info.value.status == 200, info.value.text()
    page.get_by_test_id("empty-state").wait_for()
    second = take_next(page)
    assert second["item_id"] != first["item_id"], "a skipped item must not come straight back"
    assert second["item_id"] == studio.items["fix"]
    # for everyone else the skipped item keeps its place (first); frank discards it
    frank = claim(studio, "frank")
    assert frank["item_id"] == first["item_id"]
    call(studio, "frank", "POST", f"/api/items/{frank['item_id']}/submit",
         {"lease_token": frank["lease"]["token"], "decision": "discard"})

    # the figures before erin submits anything: frank's row only; the studio's keys wait while it is open
    dialog = open_figures(page)
    assert figures_row(page, "erin").count() == 0
    assert figures_row(page, "frank").get_attribute("data-me") is None
    page.keyboard.press("s")  # not a skip: the dialog is modal
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("window.studio.state().item.item_id") == second["item_id"]

    # erin submits the fix item with one more mask made by a click
    h, w = second["height"], second["width"]
    target = next(p for p in second["phrases"] if not p["is_negative"])["phrase"]
    phrase_row(page, target).locator("[data-testid=phrase-name]").click()
    predict_by(page, lambda: page.mouse.click(*at(page, w * 0.3, h * 0.6)))
    page.keyboard.press("Enter")
    with page.expect_response(lambda r: r.url.endswith("/submit")) as info:
        page.keyboard.press("Shift+Enter")
    assert info.value.status == 200, info.value.text()
    sent = json.loads(info.value.request.post_data)
    masks = sum(m["decision"] == "accept" for p in sent["phrases"] if not p["is_negative"] and not p["ungroundable"]
                for m in p["masks"])
    assert masks >= 1
    page.wait_for_function("id => window.studio.state().item && window.studio.state().item.item_id === id",
                           arg=studio.items["stage1"])  # the next item opened by itself

    # the figures, fetched again on opening: erin's row (highlighted) counts one item and her masks
    dialog = open_figures(page)
    row = figures_row(page, "erin")
    assert row.get_attribute("data-me") == "true" and "me" in row.get_attribute("class").split()
    assert row.get_by_test_id("fig-items").inner_text() == "1"
    assert row.get_by_test_id("fig-masks").inner_text() == str(masks)
    (mine,) = [f for f in call(studio, "erin", "GET", "/api/annotators")["annotators"] if f["annotator"] == "erin"]
    assert mine["items"] == 1 and mine["masks"] == masks
    assert row.get_by_test_id("fig-items-per-hour").inner_text() == f"{mine['items_per_hour']:.1f}"
    assert row.get_by_test_id("fig-masks-per-hour").inner_text() == f"{mine['masks_per_hour']:.1f}"
    assert row.get_by_test_id("fig-seconds-per-mask").inner_text() == f"{mine['seconds_per_mask']:.1f}"
    assert row.get_by_test_id("fig-audit-agreement").inner_text() == "–"  # no audits yet
    other = figures_row(page, "frank")
    assert other.get_attribute("data-me") is None and "me" not in (other.get_attribute("class") or "").split()
    assert other.get_by_test_id("fig-items").inner_text() == "1"
    assert other.get_by_test_id("fig-masks").inner_text() == "0"
    screenshot(page, "08-figures")
    # audited work (none in this run: answered by the page's route): agreement as a percentage
    audited = dict(mine, annotator="erin", audits=2, audit_decision_agreement=0.875, audit_mask_iou=0.8)
    page.route("**/api/annotators", lambda r: r.fulfill(json={"annotators": [audited]}))
    page.get_by_test_id("figures-refresh").click()
    page.wait_for_function("document.querySelector('[data-testid=figures-row] [data-testid=fig-audits]')"
                           ".textContent === '2'")
    assert row.get_by_test_id("fig-audit-agreement").inner_text() == "87.5 %"
    assert row.get_by_test_id("fig-audit-iou").inner_text() == "0.80"
    assert figures_row(page, "frank").count() == 0
    page.unroute("**/api/annotators")
    page.get_by_test_id("figures-close").click()
    dialog.wait_for(state="hidden")
    assert len(releases) == 1, releases
    assert not [e for e in errors if "409" not in e and "404" not in e], errors
