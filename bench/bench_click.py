"""Click -> mask drawn on screen, in the real browser, against a studio over a vit_b-sized SAM.

A `dataengine run` over one synthetic image (stage 1: no proposals, masks by clicks) with a
random-weight vit_b checkpoint (the decoder's cost does not depend on the weights), the studio's
app over it (in process, uvicorn on loopback), and headless Debian chromium driven by Playwright: an
annotator adds a phrase and makes masks by clicks (positive and negative points, sometimes another
candidate chosen, Enter to accept, Esc for the next object), each click waiting for its mask on the
canvas. The page times every click itself (performance.now): click -> answer -> decode (RLE) ->
overlay -> canvas draw, and the next animation frame; the answer's timings_ms / Server-Timing
split the server's share (decoder and its parts, total).

    .venv/bin/python bench/bench_click.py --clicks 120 [--height 1500 --width 2250] [--model-type vit_b] [--think-ms 300]

Prints p50/p90/p99 and where the time goes, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.models import bench_checkpoint  # noqa: E402
from services.common.sam_models import load_sam  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.app.embedded import EmbeddedEngine  # noqa: E402
from services.orchestrator.model import Stage  # noqa: E402
from services.studio.app import create_app  # noqa: E402
from services.app.studio_local import embedded_backend  # noqa: E402
from tests.servers import UvicornThread  # noqa: E402
from tests.studio.browser import chromium_missing, launched  # noqa: E402

GRID = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}  # stage 1's grid: small


def percentiles(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": len(a)}


def scene(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), (150, 190, 230))
    d = ImageDraw.Draw(img)
    d.rectangle((0, int(h * 0.6), w, h), fill=(90, 150, 70))
    for _ in range(12):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.12) * min(h, w)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(30, 230, 3)))
    noise = rng.integers(-10, 10, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def session(url: str, clicks: int, warmup: int, h: int, w: int, seed: int, think_ms: int) -> list[dict]:
    """The scripted annotator; the page's per-click figures (window.studio.metrics)."""
    rng = np.random.default_rng(seed)
    with launched() as browser:
        page = browser.page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/")
        page.get_by_test_id("signin-name").fill("bench")
        page.get_by_test_id("signin-submit").click()
        page.get_by_test_id("next-item").click()
        page.wait_for_function("window.studio.state().item && window.studio.state().image", timeout=60_000)
        page.get_by_test_id("add-phrase-input").fill("object")
        page.get_by_test_id("add-phrase").click()

        def client(x: float, y: float) -> tuple[float, float]:
            c = page.evaluate("([x, y]) => window.studio.imageToClient(x, y)", [x, y])
            return c["x"], c["y"]

        done = 0
        centre = None
        in_object = 0
        while done < warmup + clicks:
            if centre is None or in_object >= rng.integers(2, 6):
                if centre is not None:  # finish the object: accept the mask (or clear), next object
                    page.keyboard.press("Enter" if rng.random() < 0.7 else "Escape")
                    page.keyboard.press("Escape")
                centre = rng.uniform([0.05 * w, 0.05 * h], [0.95 * w, 0.95 * h])
                in_object = 0
            if in_object == 0:
                x, y, button = centre[0], centre[1], "left"
            else:
                dx, dy = rng.normal(0, 0.04 * min(h, w), 2)
                x, y = float(np.clip(centre[0] + dx, 1, w - 2)), float(np.clip(centre[1] + dy, 1, h - 2))
                button = "right" if rng.random() < 0.3 else "left"
            page.wait_for_timeout(think_ms)  # an annotator looks at the mask before the next click
            before = page.evaluate("window.studio.metrics.length")
            page.mouse.click(*client(x, y), button=button)
            # Polled every 100 ms, not on every animation frame: rAF polling keeps the software
            # compositor busy and takes CPU from the decoder on this 2-core machine (the page times
            # each click itself, so the polling interval does not enter the figures).
            page.wait_for_function("n => window.studio.metrics.length > n", arg=before, polling=100, timeout=60_000)
            done += 1
            in_object += 1
            if rng.random() < 0.25:
                page.keyboard.press(str(int(rng.integers(1, 4))))  # another candidate: fed back next click
        page.wait_for_timeout(100)  # the last frame's timestamp
        metrics = page.evaluate("window.studio.metrics")
        if errors:
            raise RuntimeError(f"page errors: {errors}")
    return metrics[warmup:]


def http_only(url: str, clicks: int, warmup: int, h: int, w: int, seed: int) -> dict:
    """The same kind of click (one point, three candidates) over HTTP with no browser running: the
    server's share as a deployment sees it, where the browser runs on the annotator's machine and
    does not compete with the decoder for this machine's two cores."""
    rng = np.random.default_rng(seed + 1)
    # The browser's annotator still holds the item: asking as them hands it back.
    with httpx.Client(base_url=url, headers={"X-Annotator": "bench"}, timeout=60) as client:
        item = client.post("/api/next").json()["item_id"]
        trips, decoder, total = [], [], []
        for i in range(warmup + clicks):
            body = {"points": [{"x": float(rng.uniform(0, w)), "y": float(rng.uniform(0, h)), "label": 1}]}
            t0 = time.perf_counter()
            answer = client.post(f"/api/items/{item}/predict", json=body).json()
            if i >= warmup:
                trips.append((time.perf_counter() - t0) * 1000)
                decoder.append(answer["timings_ms"]["decoder"])
                total.append(answer["timings_ms"]["total"])
    return {"round_trip_ms": percentiles(trips), "server_total_ms_p50": float(np.median(total)),
            "decoder_ms_p50": float(np.median(decoder))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: a random-weight checkpoint built once in --work-dir")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dataengine-bench")
    parser.add_argument("--height", type=int, default=1500, help="image height, pixels")
    parser.add_argument("--width", type=int, default=2250, help="image width, pixels")
    parser.add_argument("--clicks", type=int, default=120, help="clicks measured (at least 100 for a p99)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think-ms", type=int, default=300,
                        help="pause before each click, as an annotator looks at the last mask (the page's "
                             "thumbnails and autosave run then); 0: click as soon as the mask is drawn")
    args = parser.parse_args()
    reason = chromium_missing()
    if reason:
        sys.exit(f"bench_click needs the browser: {reason}")

    checkpoint = bench_checkpoint(args.model_type, args.checkpoint, args.work_dir, args.seed)
    sam = load_sam(args.model_type, checkpoint, "cpu")
    settings = Settings(model_type=args.model_type, checkpoint=checkpoint, amg_params=GRID, audit_rate=0.0)

    with tempfile.TemporaryDirectory() as tmp:
        out, image = Path(tmp) / "out", Path(tmp) / "bench.jpg"
        scene(args.height, args.width, args.seed).save(image, quality=90)
        print(f"embedding a {args.height}x{args.width} image with {args.model_type} ...", flush=True)
        t0 = time.perf_counter()
        result = EmbeddedEngine(settings, out, sam=sam).process(image, "bench.jpg", [], Stage.ASSISTED_MANUAL)
        if result.state != "review":
            sys.exit(f"the run left the item {result.state}: {result}")
        print(f"  {time.perf_counter() - t0:.1f} s; studio and browser ...", flush=True)
        backend = embedded_backend(settings, out, sam=sam)
        with UvicornThread(create_app(backend, 600.0)) as url:
            metrics = session(url, args.clicks, args.warmup, args.height, args.width, args.seed, args.think_ms)
            alone = http_only(url, args.clicks, args.warmup, args.height, args.width, args.seed)

    drawn = percentiles([m["click_to_drawn_ms"] for m in metrics])
    frame = percentiles([m["click_to_frame_ms"] for m in metrics if "click_to_frame_ms" in m])

    def med(values) -> float:
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else float("nan")

    server_parts = sorted({k for m in metrics for k in m["timings_ms"]})
    server = {k: med([m["timings_ms"].get(k) for m in metrics]) for k in server_parts}
    breakdown = {
        "http_round_trip": med([m["http_ms"] for m in metrics]),
        **{f"server_{k}": v for k, v in server.items()},
        "http_transport_and_json": med([m["http_ms"] - m["timings_ms"].get("total", 0.0) for m in metrics]),
        "browser_rle_decode": med([m["decode_ms"] for m in metrics]),
        "browser_overlay": med([m["overlay_ms"] for m in metrics]),
        "browser_canvas_draw": med([m["draw_ms"] for m in metrics]),
        "browser_decode_and_draw": med([m["client_ms"] for m in metrics]),
        "browser_before_request": med([m["click_to_response_ms"] - m["http_ms"] for m in metrics]),
        "rle_chars_3_candidates": med([m["rle_chars"] for m in metrics]),
    }
    print(f"click -> mask drawn, {args.model_type} decoder (random weights), image {args.height}x{args.width} "
          f"(HxW), 3 candidates per click, {drawn['n']} clicks after {args.warmup} warm-up, {args.think_ms} ms "
          "between a mask drawn and the next click, headless chromium")
    print(f"  drawn (after the canvas draw): p50 {drawn['p50']:.1f} ms   p90 {drawn['p90']:.1f} ms   "
          f"p99 {drawn['p99']:.1f} ms   mean {drawn['mean']:.1f} ms")
    if frame["n"]:
        print(f"  next animation frame:          p50 {frame['p50']:.1f} ms   p90 {frame['p90']:.1f} ms   "
              f"p99 {frame['p99']:.1f} ms")
    print("  where the time goes (median ms per click):")
    for name, ms in breakdown.items():
        print(f"    {name:28s} {ms:9.2f}")
    trip = alone["round_trip_ms"]
    print(f"  the same clicks over HTTP with no browser on this machine: round trip p50 {trip['p50']:.1f} ms   "
          f"p99 {trip['p99']:.1f} ms (server {alone['server_total_ms_p50']:.1f}, decoder {alone['decoder_ms_p50']:.1f})")
    print("  (random weights give speckled masks: their RLE is far longer than a real SAM mask's, so RLE, "
          "transfer and decode are upper bounds here)")
    print(json.dumps({"bench": "click", "model_type": args.model_type, "height": args.height, "width": args.width,
                      "think_ms": args.think_ms,
                      "clicks": drawn["n"], "click_to_drawn_ms": drawn, "click_to_frame_ms": frame,
                      "breakdown_ms": breakdown, "http_only": alone}))


if __name__ == "__main__":
    main()
