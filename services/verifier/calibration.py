"""Calibration of the ``heuristic`` verifier: logistic regressions from a scored unit's features
(``heuristic.FEATURES``) to the probability that a human accepts, fit on human decisions and saved
as one JSON file, which the verifier loads (``settings.verifier_calibration``). Training examples
come from ``calibration_data``.

One model per check (``MODEL_CHECKS``), because each answers another human question about another
unit, and pooling them would fit none:
- "item": P(a human accepts the item), from item outcomes (accepted / discarded) and JSONL records;
  the unit is the one that sets the item's raw score. Applied to pair and item scores (routing).
- "mask": P(a human accepts this mask), from the studio's per-mask MV decisions; applied to the
  heuristic's mask verdicts.
- "exhaustivity": P(a human says the phrase is exhaustive), from the per-phrase EV decisions on the
  labels the heuristic gave an exhaustivity verdict (scored from the grid); applied to those verdicts.
A check without its own model uses the next of ``FALLBACK`` the file has (what a one-model file
did for every score), so a file fit on item outcomes alone scores exactly as version 1 did.

Model: the features standardised (training mean 0, sd 1), an L2-regularised logistic regression
(C = 1, lbfgs), the scaling folded into the saved coefficients:
``p = sigmoid(intercept + sum_i coefficients[i] * features[i])`` on the raw features.

Evaluation (``fit_all``): the examples of each check are split by item id (``splits.held_out``:
sha256 of the id below ``holdout``; all examples of an item on one side). The model is fit on the
training split; the report gives n, ECE and Brier "before" (the raw heuristic score,
sigmoid(raw_logit)) and "after" (the fitted model) on the held-out split, and on the training split
(with "after_cv", out-of-fold predictions of a stratified 5-fold refit). The saved model is then
refit on all examples of the check (training and held out), so the deployed model has seen every
decision; the held-out figures are those of its training-split twin.

Metrics: ECE with ``ECE_BINS`` = 10 equal-width bins of the predicted probability over [0, 1]
(the last bin includes 1): sum over bins of (n_bin / n) * |mean p - mean label|. Brier: mean of
(p - label)^2.

File format version 2: ``models`` {check: {coefficients, intercept, counts, metrics}}. Version 1
(one model at the top level) is still read, as the "item" model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.splits import held_out
from services.verifier.heuristic import FEATURES, FORMULA_VERSION

KIND = "dataengine.verifier.calibration"
VERSION = 2  # of the file format; 1 (one model) is still read
ECE_BINS = 10
MIN_EXAMPLES = 10  # fewer cannot say anything about 7 coefficients
FOLDS = 5
C = 1.0  # inverse L2 strength on standardised features: mild, for a few hundred reviews
HOLDOUT = 0.2  # share of items held out by default
MODEL_CHECKS = ("item", "mask", "exhaustivity")
# check -> the models it may be scored with, best first
FALLBACK = {"item": ("item", "mask"), "mask": ("mask", "item"), "exhaustivity": ("exhaustivity", "item", "mask")}
# check -> (what its examples are, its positive label, its negative label), for reports and errors
VOCABULARY = {"item": ("reviewed items", "accepted", "discarded"),
              "mask": ("mask decisions", "accepted", "rejected"),
              "exhaustivity": ("phrase decisions", "exhaustive", "not exhaustive")}
SPLIT = "sha256(item id) below the holdout fraction is held out (services/common/splits.py)"
SAVED = "refit on all examples of its check (training and held out)"


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


def _raw(features: np.ndarray) -> np.ndarray:
    """The heuristic's own score of each row of ``features`` (N, len(FEATURES)): (N,) in [0, 1]."""
    return _sigmoid(features[:, FEATURES.index("raw_logit")])


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Calibration:
    """One fitted map from features (in ``FEATURES`` order) to P(a human accepts).

    coefficients: one per feature, on the raw (unstandardised) features. counts: n, accepted,
    discarded of the examples it was fit on. metrics: the fit's report.
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
        """The model's part of a file: coefficients in ``FEATURES`` order."""
        return {"coefficients": [float(c) for c in self.coefficients], "intercept": float(self.intercept),
                "counts": dict(self.counts), "metrics": self.metrics}

    @classmethod
    def from_json(cls, d: dict, names: list, bad) -> "Calibration":
        """A model from its JSON, coefficients in the order of ``names`` (the file's features);
        ``bad(why)`` makes the error."""
        coefficients, intercept = d.get("coefficients"), d.get("intercept")
        if (not isinstance(coefficients, list) or len(coefficients) != len(names)
                or not all(_finite(v) for v in coefficients + [intercept])):
            raise bad("'coefficients' (one finite number per feature) and 'intercept' (a finite number) "
                      f"are malformed: {coefficients!r:.200}, {intercept!r:.50}")
        by_name = dict(zip(names, coefficients))
        return cls(tuple(float(by_name[f]) for f in FEATURES), float(intercept),
                   d.get("counts") if isinstance(d.get("counts"), dict) else {},
                   d.get("metrics") if isinstance(d.get("metrics"), dict) else {})


@dataclass(frozen=True)
class CalibrationFile:
    """What ``dataengine calibrate`` writes and the verifier loads: one ``Calibration`` per check
    of ``MODEL_CHECKS`` it was fit for (at least one). metrics: the fit's report. version: the
    file format it was read from."""

    models: dict[str, Calibration]
    metrics: dict = field(default_factory=dict)
    version: int = VERSION

    def model_for(self, check: str) -> str:
        """The name of the model that scores ``check`` ("item", "mask" or "exhaustivity")."""
        return next(name for name in FALLBACK[check] if name in self.models)

    def probability(self, features: np.ndarray, check: str) -> float:
        """P(a human accepts) of a unit with ``features`` (len(FEATURES),) scored for ``check``."""
        return self.models[self.model_for(check)].probability(features)

    def to_json(self) -> dict:
        return {"kind": KIND, "version": VERSION, "backend": "heuristic", "formula_version": FORMULA_VERSION,
                "features": list(FEATURES), "ece_bins": ECE_BINS,
                "models": {name: model.to_json() for name, model in self.models.items()}, "metrics": self.metrics}

    @classmethod
    def from_json(cls, d: object, where: str) -> "CalibrationFile":
        """Parse a calibration file's JSON (format 1 or 2); any problem is ``FailedPrecondition``
        naming ``where``."""
        def bad(why: str) -> FailedPrecondition:
            return FailedPrecondition(f"verifier calibration {where}: {why}; fit it again with `dataengine calibrate`")

        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise bad(f"not a calibration file (its 'kind' is not {KIND!r})")
        if d.get("version") not in (1, VERSION) or d.get("backend") != "heuristic":
            raise bad(f"format version {d.get('version')!r} for backend {d.get('backend')!r}; this verifier "
                      f"reads versions 1 and {VERSION} for 'heuristic'")
        if d.get("formula_version") != FORMULA_VERSION:
            raise bad(f"fit on heuristic formula version {d.get('formula_version')!r}, this verifier "
                      f"computes version {FORMULA_VERSION}")
        names = d.get("features")
        if (not isinstance(names, list) or sorted(map(str, names)) != sorted(FEATURES)
                or len(set(names)) != len(names)):
            raise bad(f"its features are {names!r:.200}, expected {list(FEATURES)}")
        metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
        if d["version"] == 1:  # one model for every score: the "item" model, which every check falls back to
            return cls({"item": Calibration.from_json(d, names, bad)}, metrics, 1)
        models = d.get("models")
        if not isinstance(models, dict) or not models or not set(models) <= set(MODEL_CHECKS):
            raise bad(f"'models' must map some of {list(MODEL_CHECKS)} to models, got {models!r:.200}")
        parsed = {}
        for name, model in models.items():
            if not isinstance(model, dict):
                raise bad(f"model {name!r} is not an object")
            parsed[name] = Calibration.from_json(model, names, lambda why, n=name: bad(f"model {n!r}: {why}"))
        return cls(parsed, metrics, VERSION)

    @classmethod
    def load(cls, path: Path | str) -> "CalibrationFile":
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
        """Write the JSON (format ``VERSION``) atomically (temp file + rename): a verifier never
        reads half a file."""
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
    """Training examples of one check. features: (N, len(FEATURES)) float64. accepted: (N,) bool.
    item_ids: (N,) str, the item each example came from (None: "#<row>", one item per row).
    sources: examples per source ("store", "jsonl", "mask_decisions", "phrase_decisions").
    skipped: candidates left out, by reason."""

    features: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FEATURES))))
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    sources: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    item_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.item_ids is None:
            self.item_ids = np.array([f"#{i}" for i in range(len(self.accepted))], dtype=object)
        self.item_ids = np.asarray(self.item_ids, dtype=object).reshape(-1)
        if not len(self.features) == len(self.accepted) == len(self.item_ids):
            raise ValueError(f"examples need as many feature rows, labels and item ids, got "
                             f"{len(self.features)}, {len(self.accepted)}, {len(self.item_ids)}")

    def take(self, rows: np.ndarray) -> "Examples":
        """The examples where the (N,) bool ``rows`` is true (sources and skipped not carried)."""
        return Examples(self.features[rows], self.accepted[rows], item_ids=self.item_ids[rows])

    @classmethod
    def concat(cls, parts: Sequence["Examples"]) -> "Examples":
        out = cls()
        for part in parts:
            out.features = np.concatenate([out.features, part.features])
            out.accepted = np.concatenate([out.accepted, part.accepted])
            out.item_ids = np.concatenate([out.item_ids, part.item_ids])
            out.sources.update(part.sources)
            out.skipped = dict(Counter(out.skipped) + Counter(part.skipped))
        return out


def _pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))


def fit(examples: Examples, check: str = "item") -> tuple[Calibration, dict]:
    """One model on all of ``examples`` and its report ({n, accepted, discarded, ece_bins, before,
    after, after_cv}, all on these examples); ``FailedPrecondition`` for fewer than
    ``MIN_EXAMPLES`` examples or a single outcome. check: names the examples in errors."""
    what, yes, no = VOCABULARY[check]
    x, y = examples.features, examples.accepted.astype(int)
    n, accepted = len(y), int(y.sum())
    if n < MIN_EXAMPLES:
        left_out = ", ".join(f"{k}: {v}" for k, v in sorted(examples.skipped.items()))
        raise FailedPrecondition(f"calibration needs at least {MIN_EXAMPLES} {what}, got {n}"
                                 + (f" (left out: {left_out})" if left_out else ""))
    if accepted in (0, n):
        raise FailedPrecondition(f"all {n} {what} were {yes if accepted else no}: "
                                 f"a calibration needs both {yes} and {no} ones")
    model = _pipeline().fit(x, y)
    scaler, regression = model[0], model[-1]
    coefficients = regression.coef_[0] / scaler.scale_  # undo the standardisation
    intercept = float(regression.intercept_[0] - coefficients @ scaler.mean_)
    counts = {"n": n, "accepted": accepted, "discarded": n - accepted}
    report: dict = {**counts, "ece_bins": ECE_BINS, "before": _metrics(_raw(x), y)}
    calibration = Calibration(tuple(float(c) for c in coefficients), intercept, counts)
    report["after"] = _metrics(calibration.probabilities(x), y)
    report["after_cv"] = None
    if min(accepted, n - accepted) >= FOLDS:
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=0)  # fixed: the same report every run
        out_of_fold = cross_val_predict(_pipeline(), x, y, cv=folds, method="predict_proba")[:, 1]
        report["after_cv"] = _metrics(out_of_fold, y)
    return Calibration(calibration.coefficients, intercept, counts, report), report


def fit_check(examples: Examples, check: str, holdout: float = HOLDOUT) -> tuple[Calibration, dict]:
    """The saved model of one check and its report {n, accepted, discarded, train: ``fit``'s report
    on the training split, held_out: {n, accepted, discarded, before, after} or None when
    ``holdout`` is 0, sources, skipped}. ``FailedPrecondition`` naming the counts when a split is
    too small or one-sided."""
    if not 0.0 <= holdout < 1.0:  # also rejects NaN
        raise InvalidInput(f"holdout must be in [0, 1), got {holdout}")
    what, yes, no = VOCABULARY[check]
    y = examples.accepted
    counts = {"n": len(y), "accepted": int(y.sum()), "discarded": int(len(y) - y.sum())}
    report: dict = {**counts, "sources": dict(examples.sources), "skipped": dict(examples.skipped)}
    if holdout == 0.0:
        saved, report["train"] = fit(examples, check)
        return saved, {**report, "held_out": None}
    if len(y) < MIN_EXAMPLES:
        fit(examples, check)  # raises the plain "too few" error, before any split is talked about
    rows = np.array([held_out(str(i), holdout) for i in examples.item_ids], bool)
    train, test = examples.take(~rows), examples.take(rows)
    n_test, yes_test = len(test.accepted), int(test.accepted.sum())
    split = f"{n_test} of {len(y)} held out by --holdout {holdout:g}"
    if len(train.accepted) < MIN_EXAMPLES:
        raise FailedPrecondition(f"calibration needs at least {MIN_EXAMPLES} {what} in the training split, got "
                                 f"{len(train.accepted)} ({split}); review more items or lower --holdout")
    if yes_test in (0, n_test):
        side = "no examples" if n_test == 0 else f"only {yes if yes_test else no} ones"
        raise FailedPrecondition(f"the held-out split of the {what} ({split}) has {side}: it cannot measure "
                                 "calibration; review more items, raise --holdout, or give --holdout 0 to fit "
                                 "without a held-out check")
    trained, report["train"] = fit(train, check)
    report["held_out"] = {"n": n_test, "accepted": yes_test, "discarded": n_test - yes_test,
                          "before": _metrics(_raw(test.features), test.accepted),
                          "after": _metrics(trained.probabilities(test.features), test.accepted)}
    saved, _ = fit(examples, check)
    return Calibration(saved.coefficients, saved.intercept, saved.counts, report), report


def fit_all(examples: dict[str, Examples], holdout: float = HOLDOUT,
            required: Sequence[str] = ()) -> tuple[CalibrationFile, dict]:
    """A model per check of ``examples`` (keys in ``MODEL_CHECKS``) and the report {ece_bins,
    holdout, split, saved, checks: {check: ``fit_check``'s report}, not_fit: {check: why},
    applies: {check: the model that scores it}}. A check that cannot be fit is left out (its
    verdicts fall back, ``FALLBACK``) unless it is ``required``; ``FailedPrecondition`` when it
    is, or when no check can be fit."""
    unknown = sorted(set(examples) - set(MODEL_CHECKS))
    if unknown:
        raise ValueError(f"unknown calibration checks {unknown}; use {', '.join(MODEL_CHECKS)}")
    models, checks, not_fit = {}, {}, {}
    for check in (c for c in MODEL_CHECKS if c in examples):
        try:
            models[check], checks[check] = fit_check(examples[check], check, holdout)
        except FailedPrecondition as exc:
            if check in required:
                raise FailedPrecondition(f"{check} model: {exc}") from None
            not_fit[check] = str(exc)
    if not models:
        raise FailedPrecondition("no calibration model could be fit: "
                                 + "; ".join(f"{check} model: {why}" for check, why in not_fit.items()))
    report = {"ece_bins": ECE_BINS, "holdout": holdout, "split": SPLIT, "saved": SAVED, "checks": checks,
              "not_fit": not_fit}
    calibration = CalibrationFile(models, report)
    report["applies"] = {check: calibration.model_for(check) for check in MODEL_CHECKS}
    return CalibrationFile(models, report), report
