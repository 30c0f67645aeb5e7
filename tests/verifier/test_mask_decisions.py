"""``dataengine calibrate --labels masks``: the studio's per-mask decisions (MV) as calibration
examples, made through the review desk as an annotator makes them."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from services.app.cli import app
from services.common.review import ReviewedMask, ReviewedPhrase, ReviewSubmission
from services.common.storage import LocalStore
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import MemoryIndex
from services.orchestrator.model import ItemState, PhraseResult
from services.verifier.calibration import fit
from services.app.calibration_data import examples_from_mask_decisions
from services.verifier.heuristic import FEATURES, HeuristicVerifier
from tests.orchestrator.test_review import NoDispatch, box_mask, put


def test_mask_decisions_become_examples_and_fit(tmp_path):
    store = LocalStore(tmp_path / "store" / "dataengine")  # the bucket under DATAENGINE_STORE_ROOT
    orch = Orchestrator(store, MemoryIndex(), NoDispatch(), audit_rate=0.0)
    rng = np.random.default_rng(0)
    expected = []
    for n in range(12):
        # big, confident masks accepted; small, unsure ones rejected (what the fit should learn)
        good = box_mask(2, 30, 2, 40, score=float(rng.uniform(0.85, 0.99)))
        bad = box_mask(1, 3, 1, 3, score=float(rng.uniform(0.1, 0.5)))
        put(orch, n, ItemState.REVIEW, 0.8, phrases=[PhraseResult("dog", masks=[good, bad], grounded=True)])
        item = orch.next_review("ann")
        drawn = box_mask(5, 10, 5, 10)
        orch.submit_review(ReviewSubmission(item.item_id, "ann", item.lease.token, True, [ReviewedPhrase(
            "dog", "dog", masks=[ReviewedMask(good, True, "model"), ReviewedMask(bad, False, "model"),
                                 ReviewedMask(drawn, True, "human")])]))
        expected += [True, False]
    examples = examples_from_mask_decisions(store, HeuristicVerifier())
    assert examples.accepted.tolist() == expected and examples.features.shape == (24, len(FEATURES))
    assert examples.skipped == {"mask made or edited by a human": 12} and examples.sources == {"mask_decisions": 24}
    _, report = fit(examples)
    assert report["n"] == 24 and report["accepted"] == 12 and report["after"]["brier"] < report["before"]["brier"]

    result = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "cal.json"), "--labels", "masks"],
                                env={"DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store")})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["sources"] == {"mask_decisions": 24}
    bad = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "c.json"), "--labels", "pixels"])
    assert bad.exit_code == 2 and "--labels must be" in bad.output
