"""Build the SA-Co evaluation cases of this folder and, given the official evaluator, record its
figures in expected.json.

    python tests/verifier/data/saco_eval/make_cases.py                      # cases only
    python tests/verifier/data/saco_eval/make_cases.py --official SAM3_DIR  # and expected.json

SAM3_DIR: a checkout of facebookresearch/sam3 (``sam3/eval/cgf1_eval.py`` is imported from it; it
needs numpy, scipy, pycocotools and tqdm), or a folder holding a copy of ``cgf1_eval.py``.
Every case is deterministic (fixed shapes, seeded random ones): running this again writes the same
files. Masks are 32x32 (H x W) compressed RLE.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

HERE = Path(__file__).resolve().parent
H = W = 32


def rect(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """HxW uint8 mask, 1 on rows y0:y1 and columns x0:x1."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [H, W], "counts": r["counts"].decode("ascii")}


class Gt:
    """One annotator's SA-Co/Gold-style file being built."""

    def __init__(self) -> None:
        self.images, self.annotations = [], []

    def pair(self, pair_id: int, text: str, masks=(), exhaustive: int = 1, crowd=(), segs=()) -> None:
        self.images.append({"id": pair_id, "file_name": f"img_{pair_id}.jpg", "text_input": text,
                            "height": H, "width": W, "is_instance_exhaustive": exhaustive,
                            "is_pixel_exhaustive": exhaustive})
        for m, is_crowd in [(m, 0) for m in masks] + [(m, 1) for m in crowd]:
            self._ann(pair_id, rle(m), is_crowd)
        for seg in segs:  # raw segmentations (polygons, uncompressed RLE)
            self._ann(pair_id, seg, 0)

    def _ann(self, pair_id: int, seg, is_crowd: int) -> None:
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": pair_id, "category_id": 1,
                                 "iscrowd": is_crowd, "segmentation": seg})

    def doc(self) -> dict:
        return {"info": {"description": "synthetic SA-Co/Gold-style case"}, "images": self.images,
                "annotations": self.annotations, "categories": [{"id": 1, "name": "object"}]}


def pred(pair_id: int, m: np.ndarray, score: float) -> dict:
    """A COCO result as SAM 3's PredictionDumper writes it, bbox (XYWH pixels) included: with
    several GT files the official evaluator fails on results without one under numpy >= 1.25
    (its loadRes compares the ndarray bbox it added for the first annotator with [])."""
    seg = rle(m)
    bbox = [float(v) for v in mask_utils.toBbox(seg)]
    return {"image_id": pair_id, "category_id": 1, "segmentation": seg, "bbox": bbox, "score": score}


def case_perfect():
    a = Gt()
    a.pair(1, "dog", [rect(2, 2, 12, 12), rect(20, 18, 30, 30)])
    a.pair(2, "red cup", [disc(16, 16, 6)])
    a.pair(3, "zebra")
    a.pair(4, "blue car")
    preds = [pred(1, rect(20, 18, 30, 30), 0.8), pred(1, rect(2, 2, 12, 12), 0.95), pred(2, disc(16, 16, 6), 0.9)]
    return [a], preds


def case_misses_false_positives():
    a = Gt()
    a.pair(1, "apple", [rect(0, 0, 10, 10), rect(12, 12, 22, 22), rect(24, 0, 32, 8)])
    # Hungarian vs greedy: d1 fits g1 best, but d1->g2 with d2->g1 has the larger summed IoU.
    a.pair(2, "book", [rect(0, 0, 10, 10), rect(0, 4, 10, 14)])
    a.pair(3, "cat")
    a.pair(4, "window", [rect(5, 5, 25, 25)])
    a.pair(5, "giraffe")
    a.pair(6, "chair", [rect(8, 8, 20, 20)])
    preds = [pred(1, rect(0, 0, 10, 10), 0.9), pred(1, rect(12, 15, 22, 25), 0.7),  # IoU 0.54: TP at 0.5 only
             pred(2, rect(0, 1, 10, 11), 0.8), pred(2, rect(0, 0, 10, 7), 0.6),
             pred(3, rect(3, 3, 9, 9), 0.85),  # on a negative
             pred(6, rect(8, 8, 20, 20), 0.99), pred(6, rect(24, 24, 30, 30), 0.55)]
    return [a], preds


def case_annotators():
    gts = [Gt(), Gt(), Gt()]
    exact, shifted = rect(4, 4, 16, 16), rect(6, 7, 18, 19)
    # 1: annotator b drew what was predicted; a shifted it; c split it in two.
    for gt, masks in zip(gts, [[shifted], [exact], [rect(4, 4, 16, 10), rect(4, 10, 16, 16)]]):
        gt.pair(1, "pillow", masks)
    # 2: c calls it a negative and nothing is predicted: the true negative wins.
    for gt, masks in zip(gts, [[exact], [shifted], []]):
        gt.pair(2, "lamp", masks)
    # 3: a is the favourable one.
    for gt, masks in zip(gts, [[disc(16, 16, 7)], [disc(12, 12, 7)], [disc(16, 16, 7), rect(0, 0, 5, 5)]]):
        gt.pair(3, "orange", masks)
    # 4: all agree: a tie, the first file is kept.
    for gt in gts:
        gt.pair(4, "plate", [rect(20, 20, 30, 30)])
    # 5: a says negative, b and c positive; the prediction matches c better.
    for gt, masks in zip(gts, [[], [rect(0, 0, 8, 8)], [rect(0, 0, 12, 12)]]):
        gt.pair(5, "shoe", masks)
    # 6: negative for all, with a false positive.
    for gt in gts:
        gt.pair(6, "piano")
    # 7: b calls it a negative, nothing predicted; a and c positive.
    for gt, masks in zip(gts, [[exact], [], [exact]]):
        gt.pair(7, "bottle", masks)
    # 8: a is a true negative (kept first), later annotators only have misses.
    for gt, masks in zip(gts, [[], [exact], [shifted]]):
        gt.pair(8, "kite", masks)
    preds = [pred(1, exact, 0.9), pred(3, disc(16, 16, 7), 0.8), pred(4, rect(20, 20, 29, 30), 0.7),
             pred(5, rect(0, 0, 12, 12), 0.65), pred(6, rect(10, 10, 20, 20), 0.75)]
    return gts, preds


def case_not_exhaustive():
    a, b = Gt(), Gt()
    for gt in (a, b):
        gt.pair(1, "tree", [rect(0, 0, 16, 8)])
    a.pair(2, "leaf", [rect(0, 0, 4, 4)], exhaustive=0)  # left out: not exhaustive in the first file
    b.pair(2, "leaf", [rect(0, 0, 4, 4)])
    a.pair(3, "branch", [rect(10, 10, 20, 20)])  # left out: not exhaustive in the second file
    b.pair(3, "branch", [rect(10, 10, 20, 20)], exhaustive=0)
    for gt in (a, b):
        gt.pair(4, "bird")
        gt.pair(5, "nest", exhaustive=0)  # left out, negative
    preds = [pred(1, rect(0, 0, 16, 8), 0.9),
             pred(2, rect(20, 20, 30, 30), 0.9), pred(2, rect(25, 0, 30, 5), 0.9),
             pred(3, rect(0, 20, 5, 30), 0.95), pred(5, rect(0, 0, 30, 30), 0.99)]
    return [a, b], preds


def case_empty_predictions():
    a, b = Gt(), Gt()
    for gt in (a, b):
        gt.pair(1, "horse", [rect(2, 2, 20, 20)])
        gt.pair(2, "rider")
        gt.pair(3, "saddle", [rect(10, 10, 14, 20), rect(0, 0, 3, 3)])
    return [a, b], []


def case_score_threshold():
    a = Gt()
    a.pair(1, "wheel", [rect(0, 0, 10, 10)])
    a.pair(2, "mirror")
    a.pair(3, "door", [rect(10, 10, 30, 20)])
    a.pair(4, "roof")
    a.pair(5, "seat", [rect(20, 0, 30, 10)])
    preds = [pred(1, rect(0, 0, 10, 10), 0.49999),  # dropped: the pair is a miss
             pred(2, rect(0, 0, 10, 10), 0.4), pred(2, rect(5, 5, 15, 15), 0.1),  # dropped: a true negative
             pred(3, rect(10, 10, 30, 20), 0.5), pred(3, rect(0, 0, 5, 5), 0.50001),  # both kept
             pred(4, rect(0, 0, 8, 8), 0.5),  # kept: a false positive
             pred(5, rect(20, 0, 30, 10), 1.0), pred(5, rect(20, 0, 30, 9), 0.3)]
    return [a], preds


def case_formats_crowd():
    a = Gt()
    # Polygons (x, y pixel coordinates) and uncompressed RLE, as COCO allows in ground truth.
    a.pair(1, "kite", segs=[[[2.0, 2.0, 14.0, 2.0, 14.0, 12.0, 2.0, 12.0]]])
    tri = rect(16, 16, 28, 28)
    a.pair(2, "sail", segs=[{"size": [H, W], "counts": _runs(tri)}])
    a.pair(3, "crowd of people", crowd=[rect(0, 0, 32, 16)])  # only a crowd segment: scored as negative
    a.pair(4, "flag", [rect(4, 20, 10, 30)], crowd=[rect(12, 0, 32, 32)])  # crowd segment ignored
    a.pair(5, "anchor")
    preds = [pred(1, rect(2, 2, 15, 13), 0.9),
             pred(2, tri, 0.8),
             pred(3, rect(0, 0, 32, 16), 0.9),
             pred(4, rect(4, 20, 10, 30), 0.9),
             pred(4, rect(14, 2, 24, 12), 0.9)]
    return [a], preds


def _runs(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = np.asfortranarray(m).ravel(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return runs


def _random_shape(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        y, x = rng.integers(0, 24, 2)
        h, w = rng.integers(3, 10, 2)
        return rect(y, x, y + h, x + w)
    return disc(*rng.uniform(4, 28, 2), rng.uniform(2, 7))


def _jitter(rng: np.random.Generator, m: np.ndarray) -> np.ndarray:
    dy, dx = rng.integers(-1, 2, 2)
    return np.roll(np.roll(m, dy, 0), dx, 1)


def case_random(seed: int, annotators: int, pairs: int = 24):
    rng = np.random.default_rng(seed)
    gts = [Gt() for _ in range(annotators)]
    preds = []
    for pid in range(1, pairs + 1):
        truth = [_random_shape(rng) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
        exhaustive = [int(rng.random() > 0.1) for _ in gts]
        for gt, ex in zip(gts, exhaustive):
            masks = [_jitter(rng, m) for m in truth if rng.random() > 0.15]
            if rng.random() < 0.1:
                masks.append(_random_shape(rng))
            gt.pair(pid, f"thing {pid}", masks, exhaustive=ex)
        for m in truth:
            if rng.random() < 0.8:
                preds.append(pred(pid, _jitter(rng, m), round(float(rng.uniform(0.2, 1.0)), 5)))
        for _ in range(rng.poisson(0.6)):
            preds.append(pred(pid, _random_shape(rng), round(float(rng.uniform(0.0, 1.0)), 5)))
    order = rng.permutation(len(preds))  # predictions in no particular order, as files come
    return gts, [preds[i] for i in order]


CASES = {
    "perfect": case_perfect,
    "misses_false_positives": case_misses_false_positives,
    "annotators": case_annotators,
    "not_exhaustive": case_not_exhaustive,
    "empty_predictions": case_empty_predictions,
    "score_threshold": case_score_threshold,
    "formats_crowd": case_formats_crowd,
    "random_3_annotators": lambda: case_random(0, 3),
    "random_1_annotator": lambda: case_random(1, 1),
}


def _dump(obj, path: Path) -> None:
    """JSON with one list element per line: small, and a diff shows which pair changed."""
    def block(value):
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return "[\n" + ",\n".join(json.dumps(v, separators=(",", ":")) for v in value) + "\n]"
        return json.dumps(value, separators=(",", ":"))
    if isinstance(obj, dict):
        text = "{\n" + ",\n".join(f"{json.dumps(k)}: {block(v)}" for k, v in obj.items()) + "\n}\n"
    else:
        text = block(obj) + "\n"
    path.write_text(text)


def write_cases(out: Path = HERE) -> dict[str, dict]:
    """Write every case's files into ``out``; returns {case: {"gt": [names], "pred": name}}."""
    files = {}
    for name, build in CASES.items():
        gts, preds = build()
        gt_names = [f"{name}_gt_{chr(ord('a') + i)}.json" for i in range(len(gts))]
        for gt, gt_name in zip(gts, gt_names):
            _dump(gt.doc(), out / gt_name)
        _dump(preds, out / f"{name}_pred.json")
        files[name] = {"gt": gt_names, "pred": f"{name}_pred.json"}
    return files


def official_figures(official: Path, files: dict[str, dict]) -> dict[str, dict]:
    sys.path.insert(0, str(official))
    try:
        from sam3.eval.cgf1_eval import CGF1Evaluator
    except ImportError:
        from cgf1_eval import CGF1Evaluator
    out = {}
    for name, case in files.items():
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = CGF1Evaluator([str(HERE / g) for g in case["gt"]], iou_type="segm")
            result = evaluator.evaluate(str(HERE / case["pred"]))
        out[name] = {k.removeprefix("cgF1_eval_segm_"): v for k, v in result.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="sam3 checkout, or a folder with cgf1_eval.py")
    parser.add_argument("--commit", default="", help="the official commit, recorded in expected.json")
    args = parser.parse_args()
    files = write_cases()
    if args.official is None:
        return
    figures = official_figures(args.official, files)
    commit = args.commit or "COMMIT"
    expected = {
        "note": ("Figures of the official SA-Co evaluator, sam3/eval/cgf1_eval.py (CGF1Evaluator, iou_type='segm') "
                 "of facebookresearch/sam3, on each case's files; metric names without the "
                 "'cgF1_eval_segm_' prefix. -1 is the official value of an undefined metric "
                 "(positive_macro_F1 with no predicted positive pair)."),
        "official_commit": args.commit,
        "command": (f"git show {commit}:sam3/eval/cgf1_eval.py > DIR/cgf1_eval.py; python "
                    f"tests/verifier/data/saco_eval/make_cases.py --official DIR --commit {commit} "
                    "(or --official a sam3 checkout at that commit)"),
        "packages": {m: metadata.version(m) for m in ("numpy", "scipy", "pycocotools")},
        "cases": {name: {**files[name], "metrics": figures[name]} for name in files},
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
