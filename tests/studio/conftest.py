"""A studio over a real run's output: ``dataengine run``'s embedded engine (tiny random SAM) leaves
items waiting in OUT_DIR, the studio opens it as ``dataengine studio OUT_DIR`` does, and uvicorn
serves the app on a free loopback port.

Items (queue order): ``stage2`` (semi-automatic, "dog" and "frisbee" grounded by boxes, each with
one decoder mask, and the hard negatives "wolf" and "unicorn"; verifier 0.8: the review band),
``fix`` (fully automatic, verifier 0.3: the fix queue) and ``stage1`` (assisted-manual: no masks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image, ImageDraw

from services.common.concepts import HardNegative, NounPhrase, Proposal
from services.common.settings import Settings
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.concepts import step as concepts_step
from services.concepts.core import ConceptsCore
from services.app.embedded import EmbeddedEngine
from services.orchestrator.model import PROPOSE, VERIFY, Stage
from services.studio.app import create_app
from services.app.studio_local import InProcessBackend, embedded_backend
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore
from tests.orchestrator.test_engine import GRID, ScriptedVerifier
from tests.servers import UvicornThread, grpc_loopback

H, W = 240, 320
MAX_MESSAGE = 16 << 20
BOXES = {"dog": (40.0, 60.0, 150.0, 200.0), "frisbee": (200.0, 30.0, 290.0, 90.0)}
SCORES = {"dog": 0.8, "frisbee": 0.85, "wolf": 0.5, "unicorn": 0.5, "cat": 0.3}


class GroundedConcepts:
    """Grounds each known label with its box in BOXES and proposes two hard negatives (the
    model's work, which random weights cannot do)."""

    name = "scripted"
    needs_pixels = False

    def propose(self, pixels, known_labels: Sequence[str], max_positives=0, max_negatives=0) -> Proposal:
        return Proposal([NounPhrase.at(t, 1.0, self.name, box=BOXES.get(t, (10.0, 10.0, 100.0, 100.0)))
                         for t in known_labels],
                        [HardNegative("wolf", "ontology_sibling", 0.9, self.name),
                         HardNegative("unicorn", "ontology_lookalike", 0.85, self.name)])


class PerMaskVerifier(ScriptedVerifier):
    """The scripted scores as the model backends give them: an MV verdict per mask, an EV verdict
    per phrase, a hard-negative verdict per negative."""

    def verify(self, pixels, pairs, grid_masks, checks) -> Verification:
        results = []
        for p in pairs:
            s = self.scores[p.phrase]
            if p.is_negative:
                verdicts = [Verdict("hard_negative", "absent", s, self.name, p.phrase)]
            else:
                verdicts = [Verdict("mask", "accept", s, self.name, p.phrase, [i]) for i in range(len(p.masks))]
                verdicts.append(Verdict("exhaustivity", "accept", s, self.name, p.phrase, list(range(len(p.masks)))))
            results.append(PairVerdict(p.phrase, p.is_negative, s, verdicts, len(p.masks)))
        return Verification(results, min(r.score for r in results if not r.is_negative) if pairs else 0.0)


def picture(seed: int) -> Image.Image:
    """A legible scene (a screenshot should show what an annotator sees): sky, grass, a brown
    blob where the dog's box is, a red disc where the frisbee's is."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (W, H), (150, 190, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 150, W, H), fill=(90, 150, 70))
    draw.ellipse((45, 70, 145, 195), fill=(140, 95, 55))
    draw.ellipse((110, 60, 150, 100), fill=(120, 80, 45))
    draw.ellipse((210, 35, 285, 85), fill=(210, 40, 40))
    noise = rng.integers(-12, 12, (H, W, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def make_run(out: Path, images: Path, tiny_sam) -> dict[str, str]:
    """``dataengine run``'s work on three images; returns name -> item id."""
    images.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("stage2", "fix", "stage1")):
        picture(i).save(images / f"{name}.png")
    engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=GRID), out, sam=tiny_sam)
    engine.dispatcher.handlers[PROPOSE] = concepts_step.make_handler(
        ConceptsCore(GroundedConcepts(), engine.store), engine.store)
    engine.dispatcher.handlers[VERIFY] = verifier_step.make_handler(
        VerifierCore(PerMaskVerifier(SCORES), engine.store), engine.store)
    runs = [("stage2", ["dog", "frisbee"], Stage.SEMI_AUTOMATIC), ("fix", ["cat"], Stage.FULLY_AUTOMATIC),
            ("stage1", [], Stage.ASSISTED_MANUAL)]
    results = [engine.process(images / f"{name}.png", f"{name}.png", labels, stage) for name, labels, stage in runs]
    engine.write_outputs(results)
    states = [r.state for r in results]
    assert states == ["review", "rejected", "review"], results
    return {name: r.item_id for (name, _, _), r in zip(runs, results)}


@dataclass
class Studio:
    """A running studio: ``url`` its base URL, ``backend`` the in-process backend (its
    ``orchestrator`` reads manifests), ``items`` name -> item id, ``out`` the run's OUT_DIR."""

    url: str
    app: object
    backend: InProcessBackend
    items: dict[str, str]
    out: Path

    def set_lease(self, seconds: float) -> None:
        """Leases claimed from now on last ``seconds`` (heartbeats every seconds / 5)."""
        self.backend.orchestrator.desk.lease_s = seconds  # the core behind either backend
        self.app.state.lease_s = seconds

    def manifest(self, name: str):
        return self.backend.orchestrator.load(self.items.get(name, name))


@pytest.fixture(scope="session")
def studio_template(tmp_path_factory, tiny_sam) -> tuple[Path, dict[str, str]]:
    """The run, made once; each test gets a copy of its OUT_DIR."""
    root = tmp_path_factory.mktemp("studio-run")
    return root / "out", make_run(root / "out", root / "images", tiny_sam)


@pytest.fixture
def studio_run(studio_template, tmp_path) -> tuple[Path, dict[str, str]]:
    template, items = studio_template
    out = tmp_path / "out"
    shutil.copytree(template, out)
    return out, dict(items)


@pytest.fixture
def studio(studio_run, tiny_sam, tiny_checkpoint) -> Studio:
    out, items = studio_run
    settings = Settings(model_type="tiny", checkpoint=tiny_checkpoint, audit_rate=0.0)
    backend = embedded_backend(settings, out, sam=tiny_sam)
    app = create_app(backend, settings.review_lease_s)
    with UvicornThread(app) as url:
        yield Studio(url, app, backend, items, out)


@pytest.fixture
def distributed_studio(studio: Studio) -> Studio:
    """The same run as a deployment serves it: the orchestrator and decoder cores behind real gRPC
    servers on loopback, the studio's app over the gRPC backend (as ``dataengine serve studio``)."""
    from services.decoder.servicer import add_to_server as add_decoder
    from services.orchestrator.servicer import add_to_server as add_orchestrator
    from services.studio.backend import GrpcBackend

    cores = studio.backend
    with contextlib.ExitStack() as stack:
        _, orchestrator = stack.enter_context(grpc_loopback(lambda s: add_orchestrator(s, cores.orchestrator), MAX_MESSAGE))
        _, decoder = stack.enter_context(grpc_loopback(lambda s: add_decoder(s, cores.decoder), MAX_MESSAGE))
        backend = GrpcBackend(orchestrator, decoder, cores.store, MAX_MESSAGE)
        stack.callback(backend.close)
        app = create_app(backend, studio.app.state.lease_s)
        url = stack.enter_context(UvicornThread(app))
        yield dataclasses.replace(studio, url=url, app=app)


@pytest.fixture(params=["in-process", "grpc"])
def any_studio(request) -> Studio:
    """The studio over each backend: ``dataengine studio OUT_DIR`` and the distributed stack."""
    return request.getfixturevalue("studio" if request.param == "in-process" else "distributed_studio")
