"""Helpers of the studio's browser tests: sign in, take an item, click in image pixels, read the
page's answers and rows, call the API as another annotator."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
from pycocotools import mask as mask_utils


def signin(page, url: str, name: str) -> None:
    page.goto(f"{url}/")
    page.get_by_test_id("signin-name").fill(name)
    page.get_by_test_id("signin-submit").click()
    page.get_by_test_id("annotator").filter(has_text=name).wait_for()


def take_next(page) -> dict:
    """Click Next item and wait for the item on screen; the item view the page got."""
    with page.expect_response(lambda r: r.url.endswith("/api/next")) as info:
        page.get_by_test_id("next-item").click()
    assert info.value.status == 200, info.value.text()
    view = info.value.json()
    page.wait_for_function("id => window.studio.state().item && window.studio.state().item.item_id === id "
                           "&& window.studio.state().image", arg=view["item_id"])
    return view


def at(page, x: float, y: float) -> tuple[float, float]:
    c = page.evaluate("([x, y]) => window.studio.imageToClient(x, y)", [x, y])
    return c["x"], c["y"]


def drawn(page) -> int:
    return page.evaluate("window.studio.metrics.length")


def predict_by(page, action) -> tuple[dict, dict]:
    """Run `action` (a click or a drag) and wait until the answer's mask is drawn: (request, answer)."""
    before = drawn(page)
    with page.expect_response(lambda r: "/predict" in r.url) as info:
        action()
    res = info.value
    assert res.status == 200, res.text()
    page.wait_for_function("n => window.studio.metrics.length > n", arg=before)
    return json.loads(res.request.post_data), res.json()


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def capsule(h: int, w: int, a, b, r: float) -> np.ndarray:
    """Pixels whose centre lies within r of the segment a-b (image coordinates)."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / max(1e-9, dx * dx + dy * dy), 0, 1)
    return (xx - ax - t * dx) ** 2 + (yy - ay - t * dy) ** 2 <= r * r


def drag(page, a, b, steps: int = 12) -> None:
    page.mouse.move(*at(page, *a))
    page.mouse.down()
    page.mouse.move(*at(page, *b), steps=steps)
    page.mouse.up()


def set_radius(page, r: int) -> None:
    page.evaluate("""r => { const e = document.querySelector('[data-testid=brush-radius]');
      e.value = r; e.dispatchEvent(new Event('input')); }""", r)
    assert page.get_by_test_id("brush-radius-value").inner_text() == str(r)


def phrase_row(page, phrase: str):
    return page.locator(f'[data-testid=phrase][data-phrase="{phrase}"]')


def negative_row(page, phrase: str):
    return page.locator(f'[data-testid=negative][data-phrase="{phrase}"]')


def load_item(studio, item_id: str):
    return studio.manifest(item_id)


def call(studio, annotator: str, method: str, path: str, body: dict | None = None) -> dict:
    """One API call as another annotator (outside the browser); the JSON answer."""
    headers = {"X-Annotator": annotator}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(f"{studio.url}{path}", data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as res:
        return json.loads(res.read())


def claim(studio, annotator: str) -> dict:
    """POST /api/next for another annotator (outside the browser): that item is theirs now."""
    return call(studio, annotator, "POST", "/api/next")


def open_figures(page):
    """Open the figures dialog and wait for the answer it fetched on opening; the dialog."""
    with page.expect_response(lambda r: r.url.endswith("/api/annotators")) as info:
        page.get_by_test_id("figures-open").click()
    assert info.value.status == 200, info.value.text()
    dialog = page.get_by_test_id("figures")
    page.wait_for_function("document.querySelector('[data-testid=figures]').dataset.state === 'ready'")
    assert dialog.is_visible()
    return dialog


def figures_row(page, annotator: str):
    return page.locator(f'[data-testid=figures-row][data-annotator="{annotator}"]')


# ------------------------------------------------------------------------------------------ tests
