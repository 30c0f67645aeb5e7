"""Calibration of the ``heuristic`` verifier: a logistic regression from a scored unit's features
(``heuristic.FEATURES``) to the probability that a human accepts, fit on items whose human review
outcome is known and saved as JSON, which the verifier loads (``settings.verifier_calibration``).

Training examples, one per item:
- from the object store: every manifest ``items/<id>/manifest.json`` whose item a human reviewed
  (state ACCEPTED or DISCARDED with ``reviewer`` set) after the verifier scored it (``score`` set;
  assisted-manual items go to a human unscored). Label: 1 accepted, 0 discarded. Features:
  ``HeuristicVerifier.item_features`` of what the verifier saw: the decode step's output when it
  is still stored (a reviewer may have replaced the manifest's phrases with corrected ones), else
  the manifest's phrases unless a human wrote them; the grid masks from ``grid_masks_key``.
- from the human MV decisions the studio stores (``--labels masks``): one example per mask a human
  accepted or rejected as the model proposed it, its features as a one-mask pair.
- from a JSONL file: one ``{FEATURE: number, ..., "accepted": bool}`` object per line.

Model: the features standardised (training mean 0, sd 1), an L2-regularised logistic regression
(C = 1, lbfgs), the scaling folded into the saved coefficients:
``p = sigmoid(intercept + sum_i coefficients[i] * features[i])`` on the raw features.

Metrics: ECE with ``ECE_BINS`` = 10 equal-width bins of the predicted probability over [0, 1]
(the last bin includes 1): sum over bins of (n_bin / n) * |mean p - mean label|. Brier: mean of
(p - label)^2. "before": the raw heuristic score (sigmoid(raw_logit)); "after": the fitted
calibration on its own training examples; "after_cv": out-of-fold predictions of a stratified
5-fold refit (an estimate on unseen items; null when a class has fewer than 5 examples).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from services.common.decoded import DecodeOutput
from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.jsonl import read_objects
from services.common.masks import MaskRecord
from services.common.storage import ObjectStore
from services.orchestrator.model import DECODE, Item, ItemState
from services.verifier.core import PhrasePair, check_pairs
from services.verifier.heuristic import FEATURES, FORMULA_VERSION, HeuristicVerifier
from services.verifier.step import read_grid_masks

KIND = "dataengine.verifier.calibration"
VERSION = 1  # of the file format
ECE_BINS = 10
MIN_EXAMPLES = 10  # fewer cannot say anything about 7 coefficients
FOLDS = 5
C = 1.0  # inverse L2 strength on standardised features: mild, for a few hundred reviews
MANIFEST = re.compile(r"items/[^/]+/manifest\.json")


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of probabilities ``p`` (N,) against 0/1 labels ``y`` (N,)."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    which = np.minimum((p * bins).astype(int), bins - 1)  # p = 1 goes in the last bin
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference of probabilities ``p`` (N,) and 0/1 labels ``y`` (N,)."""
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def _metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"ece": ece(p, y), "brier": brier(p, y)}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))  # clipped: exp overflows past ~709


@dataclass(frozen=True)
class Calibration:
    """A fitted map from features (in ``FEATURES`` order) to P(a human accepts).

    coefficients: one per feature, on the raw (unstandardised) features. counts: n, accepted,
    discarded of the training set. metrics: the fit's report (ECE and Brier before and after).
    """

    coefficients: tuple[float, ...]
    intercept: float
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """features: (N, len(FEATURES)) -> (N,) probabilities in [0, 1]."""
        return _sigmoid(np.asarray(features, float) @ np.asarray(self.coefficients) + self.intercept)

    def probability(self, features: np.ndarray) -> float:
        """features: (len(FEATURES),) -> a probability in [0, 1]."""
        return float(self.probabilities(np.asarray(features, float)[None, :])[0])

    def to_json(self) -> dict:
        return {"kind": KIND, "version": VERSION, "backend": "heuristic", "formula_version": FORMULA_VERSION,
                "features": list(FEATURES), "coefficients": [float(c) for c in self.coefficients],
                "intercept": float(self.intercept), "counts": dict(self.counts), "ece_bins": ECE_BINS,
                "metrics": self.metrics}

    @classmethod
    def from_json(cls, d: object, where: str) -> "Calibration":
        """Parse a calibration file's JSON; any problem is ``FailedPrecondition`` naming ``where``."""
        def bad(why: str) -> FailedPrecondition:
            return FailedPrecondition(f"verifier calibration {where}: {why}; fit it again with `dataengine calibrate`")

        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise bad(f"not a calibration file (its 'kind' is not {KIND!r})")
        if d.get("version") != VERSION or d.get("backend") != "heuristic":
            raise bad(f"format version {d.get('version')!r} for backend {d.get('backend')!r}; this verifier "
                      f"reads version {VERSION} for 'heuristic'")
        if d.get("formula_version") != FORMULA_VERSION:
            raise bad(f"fit on heuristic formula version {d.get('formula_version')!r}, this verifier "
                      f"computes version {FORMULA_VERSION}")
        names, coefficients, intercept = d.get("features"), d.get("coefficients"), d.get("intercept")
        if (not isinstance(names, list) or sorted(map(str, names)) != sorted(FEATURES)
                or len(set(names)) != len(names)):
            raise bad(f"its features are {names!r:.200}, expected {list(FEATURES)}")
        values = coefficients + [intercept] if isinstance(coefficients, list) else None
        if (values is None or len(coefficients) != len(names)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values)):
            raise bad("'coefficients' (one finite number per feature) and 'intercept' (a finite number) "
                      f"are malformed: {coefficients!r:.200}, {intercept!r:.50}")
        by_name = dict(zip(names, coefficients))
        counts = d.get("counts") if isinstance(d.get("counts"), dict) else {}
        return cls(tuple(float(by_name[f]) for f in FEATURES), float(intercept), counts,
                   d.get("metrics") if isinstance(d.get("metrics"), dict) else {})

    @classmethod
    def load(cls, path: Path | str) -> "Calibration":
        """Read a calibration file; missing, unreadable or malformed: ``FailedPrecondition`` naming it."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FailedPrecondition(f"verifier calibration {path}: cannot read it ({exc})") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise FailedPrecondition(f"verifier calibration {path} is not JSON: {exc}") from None
        return cls.from_json(doc, str(path))

    def save(self, path: Path | str) -> None:
        """Write the JSON atomically (temp file + rename): a verifier never reads half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class Examples:
    """Training examples. features: (N, len(FEATURES)) float64. accepted: (N,) bool.
    sources: examples per source ("store", "jsonl"). skipped: items left out, by reason."""

    features: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FEATURES))))
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    sources: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: Sequence["Examples"]) -> "Examples":
        out = cls()
        for part in parts:
            out.features = np.concatenate([out.features, part.features])
            out.accepted = np.concatenate([out.accepted, part.accepted])
            out.sources.update(part.sources)
            out.skipped = dict(Counter(out.skipped) + Counter(part.skipped))
        return out


def unreviewed_reason(item: Item) -> str:
    """Why a manifest's item is no training example ("" if it is one)."""
    if item.state not in (ItemState.ACCEPTED, ItemState.DISCARDED) or not item.reviewer:
        return "not reviewed by a human"
    if item.score is None:
        return "reviewed but never scored by the verifier"
    return ""


def _proposal(store: ObjectStore, item: Item) -> list[PhrasePair] | None:
    """The pairs the verifier scored: the decode output if stored, else the manifest's machine
    phrases; None when only a human's corrected phrases are left."""
    key = item.outputs.get(DECODE)
    if key:
        try:
            decoded = DecodeOutput.from_bytes(store.get(key), key)
            return [PhrasePair(p.phrase, p.masks, p.is_negative) for p in decoded.phrases]
        except NotFound:
            pass
    if any(p.provenance.startswith("human:") for p in item.phrases):
        return None
    return [PhrasePair(p.phrase, p.masks, p.is_negative) for p in item.phrases]


def _example(store: ObjectStore, item: Item, verifier: HeuristicVerifier) -> tuple[np.ndarray | None, str]:
    """(features, "") of a training item, or (None, why it is none)."""
    reason = unreviewed_reason(item)
    if reason:
        return None, reason
    try:
        pairs = _proposal(store, item)
        if pairs is None:
            return None, "phrases replaced by a human and the decode output is gone"
        try:
            grid = read_grid_masks(store, item.grid_masks_key) if item.grid_masks_key else []
        except NotFound:
            # Without them a unit that needs the grid has no features (None below), so the item is
            # left out rather than given features the verifier never saw.
            grid = []
        features = verifier.item_features(check_pairs(pairs, grid), grid)
    except InvalidInput:
        return None, "malformed decode output or masks"
    return (features, "") if features is not None else (None, "scored by rule (an ungroundable label)")


def _manifests(store: ObjectStore, skipped: Counter) -> Iterator[Item]:
    """Every item manifest in ``store``; an unreadable one is counted in ``skipped``."""
    for key in store.list("items/"):
        if not MANIFEST.fullmatch(key):
            continue
        try:
            doc = json.loads(store.get(key))
            yield Item.from_json(doc if isinstance(doc, dict) else {})
        except (ValueError, NotFound):  # InvalidInput is a ValueError; NotFound: deleted meanwhile
            skipped["malformed manifest"] += 1


def examples_from_store(store: ObjectStore, verifier: HeuristicVerifier) -> Examples:
    """One example per human-reviewed item in ``store``; ``verifier`` computes the features (it
    should be uncalibrated and configured as the deployed one, e.g. its ``top_k``)."""
    rows, labels, skipped = [], [], Counter()
    for item in _manifests(store, skipped):
        features, reason = _example(store, item, verifier)
        if features is None:
            skipped[reason] += 1
            continue
        rows.append(features)
        labels.append(item.state == ItemState.ACCEPTED)
    return Examples(np.array(rows, float).reshape(-1, len(FEATURES)), np.array(labels, bool),
                    {"store": len(rows)}, dict(skipped))


def examples_from_mask_decisions(store: ObjectStore, verifier: HeuristicVerifier) -> Examples:
    """One example per mask a human judged as the model proposed it (the studio's MV decisions,
    ``reviews[].mv`` of every manifest): the heuristic's features of that mask as its phrase's only
    mask; label: the human accepted it. Masks a human made or edited are no example of the model's
    (origin "human"); neither are audits (the first review is the label)."""
    rows, labels, skipped = [], [], Counter()
    for item in _manifests(store, skipped):
        for record in item.reviews:
            if record.kind != "review":
                continue
            for decision in record.mv:
                if decision.get("origin") != "model":
                    skipped["mask made or edited by a human"] += 1
                    continue
                try:
                    mask = MaskRecord.from_json(decision["mask"])
                    pairs = check_pairs([PhrasePair(str(decision["phrase"]), [mask], False)], [])
                    features = verifier.item_features(pairs, [])
                except (InvalidInput, KeyError, TypeError, ValueError):
                    features = None
                if features is None:
                    skipped["malformed mask decision"] += 1
                    continue
                rows.append(features)
                labels.append(bool(decision.get("accept")))
    return Examples(np.array(rows, float).reshape(-1, len(FEATURES)), np.array(labels, bool),
                    {"mask_decisions": len(rows)}, dict(skipped))


def examples_from_jsonl(path: Path) -> Examples:
    """Examples from a JSONL file of ``{FEATURE: number, ..., "accepted": bool}`` objects (blank
    lines skipped); a bad line is ``InvalidInput`` naming ``path:line``."""
    rows, labels = [], []
    for where, record in read_objects(path, "training items"):
        if not isinstance(record.get("accepted"), bool):
            raise InvalidInput(f"{where} needs an object with 'accepted' (true or false), "
                               f"got {json.dumps(record):.100}")
        row = []
        for name in FEATURES:
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInput(f"{where} needs feature {name!r} as a finite number, got {value!r:.50} "
                                   f"(features: {', '.join(FEATURES)})")
            row.append(float(value))
        rows.append(row)
        labels.append(record["accepted"])
    return Examples(np.array(rows, float).reshape(-1, len(FEATURES)), np.array(labels, bool), {"jsonl": len(rows)})


def _pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))


def fit(examples: Examples) -> tuple[Calibration, dict]:
    """The calibration and its report ({n, accepted, discarded, ece_bins, before, after, after_cv});
    ``FailedPrecondition`` for fewer than ``MIN_EXAMPLES`` examples or a single outcome."""
    x, y = examples.features, examples.accepted.astype(int)
    n, accepted = len(y), int(y.sum())
    if n < MIN_EXAMPLES:
        left_out = ", ".join(f"{k}: {v}" for k, v in sorted(examples.skipped.items()))
        raise FailedPrecondition(f"calibration needs at least {MIN_EXAMPLES} reviewed items, got {n}"
                                 + (f" (left out: {left_out})" if left_out else ""))
    if accepted in (0, n):
        raise FailedPrecondition(f"all {n} reviewed items were {'accepted' if accepted else 'discarded'}: "
                                 "a calibration needs both accepted and discarded items")
    model = _pipeline().fit(x, y)
    scaler, regression = model[0], model[-1]
    coefficients = regression.coef_[0] / scaler.scale_  # undo the standardisation
    intercept = float(regression.intercept_[0] - coefficients @ scaler.mean_)
    report: dict = {"n": n, "accepted": accepted, "discarded": n - accepted, "ece_bins": ECE_BINS,
                    "before": _metrics(_sigmoid(x[:, FEATURES.index("raw_logit")]), y)}
    calibration = Calibration(tuple(float(c) for c in coefficients), intercept,
                              {"n": n, "accepted": accepted, "discarded": n - accepted})
    report["after"] = _metrics(calibration.probabilities(x), y)
    report["after_cv"] = None
    if min(accepted, n - accepted) >= FOLDS:
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0)  # fixed: the same report every run
        held_out = cross_val_predict(_pipeline(), x, y, cv=folds, method="predict_proba")[:, 1]
        report["after_cv"] = _metrics(held_out, y)
    return Calibration(calibration.coefficients, intercept, calibration.counts, report), report
