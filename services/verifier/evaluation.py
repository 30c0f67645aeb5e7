"""SA-Co benchmark metrics for promptable concept segmentation (cgF1, IL_MCC, pmF1, ...), computed
by the rules of the official evaluator of the SAM 3 release (``sam3/eval/cgf1_eval.py`` in
facebookresearch/sam3), so that both give the same figures on the same files.

Inputs
- Ground truth: one or more SA-Co/Gold JSON files, one per annotator. COCO-derived: each
  ``images`` entry is an image–noun-phrase pair (``id``, ``height``, ``width``, ``text_input``,
  ``is_instance_exhaustive``); ``annotations`` are its instance masks (``image_id``, ``id``,
  ``segmentation`` as RLE or polygons, ``iscrowd``, ``category_id``); a pair without annotations
  is a negative. ``categories`` only for COCO compatibility.
- Predictions: the COCO results format, a list of ``{"image_id": PAIR_ID, "segmentation":
  {"size": [H, W], "counts": RLE}, "score": float, "category_id": int}``.

Rules (those of the official evaluator)
1. Pairs scored: those of the first GT file whose ``is_instance_exhaustive`` is true and is not
   false in any other GT file. Predictions for other pairs are ignored.
2. Predictions with ``score < SCORE_THRESHOLD`` (0.5) are dropped; so are GT masks with
   ``iscrowd`` 1 (a crowd segment neither matches nor is missed).
3. Per pair and annotator: predictions are matched one-to-one to GT masks by the assignment that
   maximises the summed mask IoU (Hungarian); at each IoU threshold t of 0.50:0.05:0.95 a matched
   couple with IoU >= t is a true positive, FP = #predictions - TP, FN = #GT masks - TP.
   Image level: a pair is positive when it has GT masks, predicted positive when it has a kept
   prediction (IL TP, FP, TN, FN).
4. Several annotators ("oracle"): per pair the most favourable annotator is kept, the one whose
   local F1 (mean over the thresholds) is highest; on a tie the earlier file. An annotator under
   whom the pair is a true negative (no GT masks, no kept predictions) always wins.
5. Totals over pairs, per threshold, with the official epsilons: precision = TP / (TP + FP + 1e-4),
   recall = TP / (TP + FN + 1e-4), F1 = 2PR / (P + R + 1e-4); positive_micro_* use only the FPs of
   positive pairs; IL_MCC = (TP TN - FP FN) / (sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) + 1e-6) on the
   image-level counts; cgF1 = positive_micro_F1 * IL_MCC; positive_macro_F1 = the mean local F1 of
   the pairs both positive and predicted positive. Each per-threshold metric is reported as
   the mean over the 10 thresholds (``NAME``) and at 0.5 and 0.75 (``NAME@0.5``, ``NAME@0.75``).

Output (``evaluate``): each per-threshold metric of rule 5 (also positive_macro_F1 and
positive_micro_precision, as the official summary has them; None where the official prints -1),
the IL_* metrics, ``IL_counts``, the box-level ``TP/FP/FN@0.5``, and how many pairs and predictions
were evaluated. Predictions need no ``bbox``.

Stricter than the official code, which silently drops or crashes on these: annotations or
predictions naming a category not in a GT file's ``categories``, a prediction for a pair no GT
file has, an evaluated pair missing from another annotator's file, mask sizes that disagree with
their pair's or annotators disagreeing on a pair's size, duplicate ids. Each is an ``InvalidInput``
naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from services.common.errors import InvalidInput
from services.common.masks import rle_runs

SCORE_THRESHOLD = 0.5
# The official thresholds, built the same way (pycocotools' Params): equality tests on them are exact.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REPORTED_THRESHOLDS = (0.5, 0.75)
EPS, IL_EPS = 1e-4, 1e-6  # the official evaluator's, in the box-level and image-level ratios
PER_THRESHOLD = ("cgF1", "precision", "recall", "F1", "positive_macro_F1", "positive_micro_F1",
                 "positive_micro_precision")
IMAGE_LEVEL = ("IL_precision", "IL_recall", "IL_F1", "IL_FPR", "IL_MCC")


@dataclass
class GtPair:
    """One image–noun-phrase pair of one annotator. masks: its non-crowd instance masks as
    compressed RLE (``size`` [H, W]), in file order; crowd: how many crowd masks were dropped."""

    pair_id: int
    height: int
    width: int
    exhaustive: bool
    text: str | None = None
    masks: list[dict] = field(default_factory=list)
    crowd: int = 0


@dataclass
class GroundTruth:
    """One annotator's GT file: pairs by id (file order) and the category ids it declares."""

    path: str
    pairs: dict[int, GtPair]
    categories: frozenset[int]

    @classmethod
    def load(cls, path: Path | str) -> "GroundTruth":
        doc = _read_json(path, "ground truth")
        if not isinstance(doc, dict):
            raise InvalidInput(f"ground truth {path}: expected a JSON object with 'images', 'annotations' and "
                               f"'categories', got {type(doc).__name__}")
        images, annotations, categories = (_list(doc, key, path) for key in ("images", "annotations", "categories"))
        category_ids = frozenset(_int(c.get("id") if isinstance(c, dict) else None, f"{path}: categories[{i}].id")
                                 for i, c in enumerate(categories))
        pairs: dict[int, GtPair] = {}
        for i, image in enumerate(images):
            where = f"{path}: images[{i}]"
            if not isinstance(image, dict):
                raise InvalidInput(f"{where} must be an object, got {image!r:.80}")
            pair = GtPair(_int(image.get("id"), f"{where}.id"), _int(image.get("height"), f"{where}.height", 1),
                          _int(image.get("width"), f"{where}.width", 1),
                          _flag(image.get("is_instance_exhaustive"), f"{where}.is_instance_exhaustive"),
                          _text_input(image.get("text_input"), f"{where}.text_input"))
            if pair.pair_id in pairs:
                raise InvalidInput(f"{where}.id: pair id {pair.pair_id} appears twice")
            pairs[pair.pair_id] = pair
        seen: set[int] = set()
        for i, ann in enumerate(annotations):
            where = f"{path}: annotations[{i}]"
            if not isinstance(ann, dict):
                raise InvalidInput(f"{where} must be an object, got {ann!r:.80}")
            ann_id = _int(ann.get("id"), f"{where}.id")
            if ann_id in seen:
                raise InvalidInput(f"{where}.id: annotation id {ann_id} appears twice")
            seen.add(ann_id)
            pair = pairs.get(_int(ann.get("image_id"), f"{where}.image_id"))
            if pair is None:
                raise InvalidInput(f"{where}.image_id: {ann['image_id']} is not the id of an entry in 'images'")
            _check_category(ann, category_ids, where, path)
            rle = _gt_rle(ann.get("segmentation"), pair, f"{where}.segmentation")
            if _flag(ann.get("iscrowd", 0), f"{where}.iscrowd"):
                pair.crowd += 1
            else:
                pair.masks.append(rle)
        return cls(str(path), pairs, category_ids)


def load_predictions(path: Path | str, gts: Sequence[GroundTruth]) -> dict[int, list[tuple[dict, float]]]:
    """Predictions by pair id: (compressed RLE, score) in file order, checked against ``gts``."""
    doc = _read_json(path, "predictions")
    if not isinstance(doc, list):
        raise InvalidInput(f"predictions {path}: expected a JSON list of COCO results "
                           f"({{image_id, segmentation, score, category_id}}), got {type(doc).__name__}")
    by_pair: dict[int, list[tuple[dict, float]]] = {}
    for i, pred in enumerate(doc):
        where = f"{path}: [{i}]"
        if not isinstance(pred, dict):
            raise InvalidInput(f"{where} must be an object, got {pred!r:.80}")
        pair_id = _int(pred.get("image_id"), f"{where}.image_id")
        pair = next((gt.pairs[pair_id] for gt in gts if pair_id in gt.pairs), None)
        if pair is None:
            raise InvalidInput(f"{where}.image_id: {pair_id} is not a pair of the ground truth "
                               f"({', '.join(gt.path for gt in gts)})")
        score = pred.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InvalidInput(f"{where}.score must be a finite number, got {score!r:.50}")
        if "segmentation" not in pred:
            raise InvalidInput(f"{where}.segmentation is missing: mask predictions need an RLE mask")
        seg = pred["segmentation"]
        if not isinstance(seg, dict):
            raise InvalidInput(f"{where}.segmentation must be an RLE object {{size, counts}}, got {seg!r:.80}")
        if "category_id" in pred:
            for gt in gts:
                _check_category(pred, gt.categories, where, gt.path)
        by_pair.setdefault(pair_id, []).append((_rle(seg, pair, f"{where}.segmentation"), float(score)))
    return by_pair


@dataclass
class PairScore:
    """A pair scored against one annotator. tp, fp, fn: (T,) int64 counts per IoU threshold, None
    for a true negative (no GT masks, no kept predictions). f1: (T,) local F1, None likewise."""

    positive: bool
    predicted: bool
    tp: np.ndarray | None = None
    fp: np.ndarray | None = None
    fn: np.ndarray | None = None
    f1: np.ndarray | None = None


def score_pair(gt_masks: list[dict], predictions: list[tuple[dict, float]]) -> PairScore:
    """Score one pair: GT masks (compressed RLE) against predictions ((RLE, score), unsorted)."""
    dt = [rle for rle, score in predictions if score >= SCORE_THRESHOLD]
    n_gt, n_dt, t = len(gt_masks), len(dt), len(IOU_THRESHOLDS)
    if n_gt == 0 and n_dt == 0:
        return PairScore(False, False)
    if n_dt == 0:
        zeros = np.zeros(t, np.int64)
        return PairScore(True, False, zeros, zeros.copy(), np.full(t, n_gt, np.int64), zeros.astype(float))
    matched = np.zeros(0)
    if n_gt:
        ious = np.asarray(mask_utils.iou(dt, gt_masks, [0] * n_gt), dtype=np.float64).reshape(n_dt, n_gt)
        rows, cols = linear_sum_assignment(-ious)
        matched = ious[rows, cols]
    tp = np.array([(matched >= thr).sum() for thr in IOU_THRESHOLDS], np.int64)
    fp, fn = n_dt - tp, n_gt - tp
    precision, recall = tp / (tp + fp + EPS), tp / (tp + fn + EPS)
    return PairScore(n_gt > 0, True, tp, fp, fn, 2 * precision * recall / (precision + recall + EPS))


def most_favourable(scores: Sequence[PairScore]) -> PairScore:
    """The annotator's score kept for a pair (rule 4): highest mean local F1, the earlier on a tie,
    a true negative over anything."""
    best = scores[0]
    for current in scores[1:]:
        if best.f1 is not None and current.f1 is not None:
            if current.f1.mean() > best.f1.mean():
                best = current
        elif current.f1 is None:
            best = current
    return best


def accumulate(scores: Sequence[PairScore]) -> dict[str, float | None]:
    """The metrics of the kept pair scores (rule 5): per-threshold ones as their mean over the
    thresholds and at 0.5 and 0.75, image-level ones as one number; positive_macro_F1 is None
    when no positive pair has a prediction."""
    t = len(IOU_THRESHOLDS)
    tp, fp, fn, pm_fp, f1_sum = (np.zeros(t, np.int64), np.zeros(t, np.int64), np.zeros(t, np.int64),
                                 np.zeros(t, np.int64), np.zeros(t))
    il = {"TP": 0, "FP": 0, "TN": 0, "FN": 0}
    f1_count = 0
    for s in scores:
        key = ("T" if s.positive == s.predicted else "F") + ("P" if s.predicted else "N")
        il[key] += 1
        if s.tp is None:
            continue
        tp, fp, fn = tp + s.tp, fp + s.fp, fn + s.fn
        if s.positive:
            pm_fp, f1_sum = pm_fp + s.fp, f1_sum + s.f1
            f1_count += s.predicted
    precision, pm_precision = tp / (tp + fp + EPS), tp / (tp + pm_fp + EPS)
    recall = tp / (tp + fn + EPS)
    per_threshold = {
        "precision": precision, "recall": recall, "positive_micro_precision": pm_precision,
        "F1": 2 * precision * recall / (precision + recall + EPS),
        "positive_micro_F1": 2 * pm_precision * recall / (pm_precision + recall + EPS),
        "positive_macro_F1": f1_sum / f1_count if f1_count else None}
    il_tp, il_fp, il_tn, il_fn = il["TP"], il["FP"], il["TN"], il["FN"]
    il_recall, il_precision = il_tp / (il_tp + il_fn + IL_EPS), il_tp / (il_tp + il_fp + IL_EPS)
    mcc = float(il_tp * il_tn - il_fp * il_fn) / (
        (float(il_tp + il_fp) * float(il_tp + il_fn) * float(il_tn + il_fp) * float(il_tn + il_fn)) ** 0.5 + IL_EPS)
    per_threshold["cgF1"] = per_threshold["positive_micro_F1"] * mcc
    out: dict[str, float | None] = {}
    for name in PER_THRESHOLD:
        values = per_threshold[name]
        out[name] = None if values is None else float(np.mean(values))
        for thr in REPORTED_THRESHOLDS:
            out[f"{name}@{thr}"] = None if values is None else float(values[IOU_THRESHOLDS == thr][0])
    out.update({"IL_precision": il_precision, "IL_recall": il_recall,
                "IL_F1": 2 * il_precision * il_recall / (il_precision + il_recall + IL_EPS),
                "IL_FPR": il_fp / (il_fp + il_tn + IL_EPS), "IL_MCC": mcc})
    return {k: (None if v is None else float(v)) for k, v in out.items()} | {
        "IL_counts": il, "TP@0.5": int(tp[0]), "FP@0.5": int(fp[0]), "FN@0.5": int(fn[0])}


def evaluation_pairs(gts: Sequence[GroundTruth]) -> list[int]:
    """The ids of the pairs scored (rule 1), in the first file's order; a scored pair missing from
    another annotator's file, or of another size there, is ``InvalidInput``."""
    first = gts[0]
    excluded = {pid for gt in gts[1:] for pid, p in gt.pairs.items() if not p.exhaustive}
    chosen = [pid for pid, p in first.pairs.items() if p.exhaustive and pid not in excluded]
    for gt in gts[1:]:
        for pid in chosen:
            other, pair = gt.pairs.get(pid), first.pairs[pid]
            if other is None:
                raise InvalidInput(f"ground truth {gt.path}: pair {pid} of {first.path} is missing from 'images' "
                                   "(every annotator's file must list the same pairs)")
            if (other.height, other.width) != (pair.height, pair.width):
                raise InvalidInput(f"ground truth {gt.path}: pair {pid} is {other.height}x{other.width}, "
                                   f"{pair.height}x{pair.width} in {first.path}")
    return chosen


def evaluate(gt_paths: Sequence[Path | str], pred_path: Path | str) -> dict:
    """The SA-Co metrics of ``pred_path`` against annotators ``gt_paths`` (module docstring), with
    the counts of pairs and predictions used."""
    if not gt_paths:
        raise InvalidInput("evaluation needs at least one ground-truth file")
    gts = [GroundTruth.load(p) for p in gt_paths]
    predictions = load_predictions(pred_path, gts)
    pair_ids = evaluation_pairs(gts)
    if not pair_ids:
        raise InvalidInput(f"ground truth {gts[0].path} has no exhaustively annotated pair to evaluate "
                           "(is_instance_exhaustive true in every file)")
    kept = [most_favourable([score_pair(gt.pairs[pid].masks, predictions.get(pid, [])) for gt in gts])
            for pid in pair_ids]
    chosen = set(pair_ids)
    metrics = accumulate(kept)
    metrics.update({
        "annotators": len(gts), "pairs_evaluated": len(pair_ids),
        "pairs_not_exhaustive": len(gts[0].pairs) - len(pair_ids),
        "predictions": sum(len(v) for v in predictions.values()),
        "predictions_evaluated": sum(len(v) for pid, v in predictions.items() if pid in chosen),
        "score_threshold": SCORE_THRESHOLD})
    return metrics


# ---- parsing helpers -------------------------------------------------------------------------

def _read_json(path: Path | str, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc}") from None
    except ValueError as exc:
        raise InvalidInput(f"{what} {path} is not JSON: {exc}") from None


def _list(doc: dict, key: str, path: Path | str) -> list:
    value = doc.get(key, [] if key == "annotations" else None)  # no annotations: every pair negative
    if not isinstance(value, list):
        raise InvalidInput(f"ground truth {path}: '{key}' must be a list, got {value!r:.80}")
    return value


def _int(value: object, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        wanted = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise InvalidInput(f"{where} must be {wanted}, got {value!r:.50}")
    return value


def _text_input(value: object, where: str) -> str:
    """The pair's noun phrase: SA-Co/Gold names one per pair; a file without is not SA-Co (plain
    COCO ground truth, say), whose figures would mean nothing here."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{where} must be the pair's noun phrase, got {value!r:.50} (an SA-Co/Gold file "
                           "names one per images entry)")
    return value


def _flag(value: object, where: str) -> bool:
    if value not in (0, 1) or isinstance(value, float):  # True/False compare equal to 1/0
        raise InvalidInput(f"{where} must be 0, 1, true or false, got {value!r:.50}")
    return bool(value)


def _check_category(ann: dict, categories: frozenset[int], where: str, path: object) -> None:
    category = _int(ann.get("category_id"), f"{where}.category_id")
    if category not in categories:
        raise InvalidInput(f"{where}.category_id: {category} is not in the categories of {path} "
                           f"({sorted(categories)}); the official evaluator would silently drop it")


def _rle(seg: dict, pair: GtPair, where: str) -> dict:
    """A compressed RLE of an RLE object (``counts`` a string, or a list of run lengths) whose
    ``size`` is its pair's [height, width]."""
    size, counts = seg.get("size"), seg.get("counts")
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise InvalidInput(f"{where}.size must be [height, width], got {size!r:.50}")
    if size != [pair.height, pair.width]:
        raise InvalidInput(f"{where}.size {size} disagrees with pair {pair.pair_id}'s height and width "
                           f"[{pair.height}, {pair.width}]")
    if isinstance(counts, str):
        try:  # pycocotools would score a string that does not tile the mask as garbage, silently
            rle_runs({"size": size, "counts": counts})
        except InvalidInput as exc:
            raise InvalidInput(f"{where}.counts is not a compressed RLE of {size[0]}x{size[1]}: {exc}") from None
        return {"size": size, "counts": counts}
    if (isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
            and sum(counts) == size[0] * size[1]):
        return mask_utils.frPyObjects(seg, *size)
    raise InvalidInput(f"{where}.counts must be a compressed RLE string or run lengths summing to "
                       f"{size[0] * size[1]}, got {counts!r:.50}")


def _gt_rle(seg: object, pair: GtPair, where: str) -> dict:
    """A GT segmentation (RLE object, or polygons as lists of x, y pixel coordinates) as
    compressed RLE, the way pycocotools' ``annToRLE`` converts it."""
    if isinstance(seg, dict):
        return _rle(seg, pair, where)
    if (isinstance(seg, list) and seg and all(
            isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly)
            for poly in seg)):
        return mask_utils.merge(mask_utils.frPyObjects(seg, pair.height, pair.width))
    raise InvalidInput(f"{where} must be an RLE object {{size, counts}} or a list of polygons "
                       f"[x1, y1, x2, y2, ...] (at least 3 points), got {seg!r:.80}")
