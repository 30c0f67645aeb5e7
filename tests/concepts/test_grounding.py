"""Grounding backends (issue 16): SAM 3, Grounding DINO and OWLv2, tiny random models saved by the
tests and loaded from their directories through the real code path; each finds instances per
phrase in the image's pixels, SAM 3 with masks; garbage from a backend is a model-output error
naming the field; with a vocabulary a backend proposes the phrases it finds."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from services.common.concepts import Instance, NounPhrase, Proposal
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.mllm import ModelOutputError
from services.common.settings import Settings
from services.concepts.core import ConceptsCore
from services.concepts.grounding import GROUNDERS, Detections, GroundingParams, checked_instances
from tests.common.image_cases import png
from tests.grounding_models import save_tiny_grounding_dino, save_tiny_owlv2, save_tiny_sam3
from tests.orchestrator.test_engine import make_engine  # noqa: F401

H, W = 80, 120
BUILDERS = {"sam3": save_tiny_sam3, "grounding_dino": save_tiny_grounding_dino, "owlv2": save_tiny_owlv2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a busy 2-core machine: one thread is ~100x faster than two spin-waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grounding")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def grounded_core(store, name: str, model_dir, **more) -> ConceptsCore:
    settings = Settings(grounding_backend=name, grounding_model_dir=model_dir, grounding_threshold=0.0, **more)
    return ConceptsCore("labels", store, settings=settings)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_backend_grounds_every_phrase_from_its_directory(local_store, model_dirs, name):
    local_store.put("in/a.png", png(H, W))
    core = grounded_core(local_store, name, model_dirs[name], grounding_max_instances=4)
    proposal = core.propose("in/a.png", ["dog", "red car"])
    assert [p.text for p in proposal.phrases] == ["dog", "red car"]
    found = [i for p in proposal.phrases for i in p.instances]
    assert found, "a threshold of 0 keeps some detection"
    source = f"{name}:{model_dirs[name]}"
    for phrase in proposal.phrases:
        assert len(phrase.instances) <= 4
        scores = [i.score for i in phrase.instances]
        assert scores == sorted(scores, reverse=True)  # best first
        for inst in phrase.instances:
            assert inst.source == source
            x0, y0, x1, y1 = inst.box
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H  # clipped to the image
            if name == "sam3":
                assert inst.mask["size"] == [H, W]  # SAM 3's own mask, at the image's size
            else:
                assert inst.mask is None  # the decoder will segment the box
    again = core.propose("in/a.png", ["dog", "red car"])
    assert again == proposal  # loaded once, deterministic


def test_sam3_masks_travel_to_the_item_and_boxes_are_decoded(make_engine, model_dirs, tmp_path):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(image)
    for name, made_by in (("sam3", "sam3:"), ("owlv2", "sam1:tiny")):
        engine = make_engine(out=tmp_path / name, grounding_backend=name, grounding_model_dir=model_dirs[name],
                             grounding_threshold=0.0, grounding_max_instances=3)
        result = engine.process(image, "a.png", ["dog"])
        dog = {p.phrase: p for p in engine.orchestrator.load(result.item_id).phrases}["dog"]
        assert 1 <= len(dog.masks) <= 3, (name, result)
        assert all(m.source.startswith(made_by) for m in dog.masks), (name, [m.source for m in dog.masks])


def params(threshold=0.0) -> GroundingParams:
    return GroundingParams(threshold=threshold, nms_iou=0.5, max_instances=10)


@pytest.mark.parametrize("det, message", [
    (Detections(np.array([[0, 0, np.nan, 5]]), np.array([0.5])), "box 0 is not finite"),
    (Detections(np.array([[0, 0, 5, 5]]), np.array([np.nan])), "score 0 is not finite"),
    (Detections(np.array([[0, 0, 5, 5]]), np.array([1.5])), "score 0 is 1.5, outside [0, 1]"),
    (Detections(np.array([[200, 10, 230, 20]]), np.array([0.9])), "box 0 [200.0, 10.0, 230.0, 20.0] lies outside the 80x120 image"),
    (Detections(np.array([[0, 0, 5, 5]]), np.array([0.9]), np.ones((1, 10, 10), bool)),
     "masks are 1x10x10, expected 1x80x120"),
    (Detections(np.array([0, 0, 5, 5]), np.array([0.9])), "boxes are (4,) and scores (1,)"),
])
def test_garbage_from_a_backend_is_a_model_output_error_naming_the_field(det, message):
    with pytest.raises(ModelOutputError, match=f"owlv2 output for 'dog': {re.escape(message)}"):
        checked_instances(det, (H, W), params(), "owlv2:x", "owlv2 output for 'dog'")


def test_detections_are_thresholded_clipped_and_suppressed():
    boxes = np.array([[-5, 0, 20, 20], [0, 0, 19, 21], [50, 50, 60, 60], [70, 10, 71.5, 10.5], [30, 30, 40, 40]])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    found = checked_instances(Detections(boxes, scores), (H, W), params(threshold=0.2), "x", "x")
    # box 0 clipped; box 1 suppressed by it (IoU > 0.5); box 3 under a pixel high; box 4 under the threshold
    assert [(i.box, i.score) for i in found] == [((0.0, 0.0, 20.0, 20.0), 0.9), ((50.0, 50.0, 60.0, 60.0), 0.7)]


class FindsCats:
    """A grounding backend that sees cats only (two of them)."""

    name, source = "stub", "stub:cats"

    def detect(self, pixels, phrases):
        cats = Detections(np.array([[1.0, 1.0, 30.0, 30.0], [60.0, 10.0, 100.0, 50.0]]), np.array([0.9, 0.6]))
        none = Detections(np.zeros((0, 4)), np.zeros(0))
        return [cats if p == "cat" else none for p in phrases]


def test_with_a_vocabulary_the_backend_proposes_what_it_finds(local_store, monkeypatch):
    monkeypatch.setitem(GROUNDERS, "stub", lambda settings: FindsCats())
    local_store.put("in/a.png", png(H, W))
    core = ConceptsCore("ontology", local_store, settings=Settings(grounding_backend="stub", grounding_vocabulary=True))
    proposal = core.propose("in/a.png", ["dog"])
    dog, cat = proposal.phrases[:2]
    assert (dog.text, dog.instances) == ("dog", ())  # known, not found: an image-level label
    assert (cat.text, cat.score, cat.source) == ("cat", 0.9, "stub:cats")
    assert [i.box for i in cat.instances] == [(1.0, 1.0, 30.0, 30.0), (60.0, 10.0, 100.0, 50.0)]
    assert "cat" not in {n.text for n in proposal.hard_negatives}  # the ontology's guess, outweighed
    assert "cat" in {n.text for n in ConceptsCore("ontology", local_store).propose("in/a.png", ["dog"]).hard_negatives}
    # without the vocabulary it only grounds what was proposed
    plain = ConceptsCore("ontology", local_store, settings=Settings(grounding_backend="stub")).propose("in/a.png", ["dog"])
    assert [p.text for p in plain.phrases] == ["dog"]


def test_grounding_configuration_errors_name_the_setting(local_store, tmp_path):
    local_store.put("in/a.png", png(H, W))
    for settings, error, message in [
        (Settings(grounding_backend="yolo"), InvalidInput, "unknown grounding backend 'yolo'"),
        (Settings(grounding_backend="owlv2"), FailedPrecondition, "needs DATAENGINE_GROUNDING_MODEL_DIR"),
        (Settings(grounding_backend="owlv2", grounding_model_dir=tmp_path / "none"), FailedPrecondition, "is not a directory"),
        (Settings(grounding_backend="sam3", grounding_model_dir=tmp_path), FailedPrecondition, "holds no Sam3Model"),
    ]:
        with pytest.raises(error, match=message):
            ConceptsCore("labels", local_store, settings=settings).propose("in/a.png", ["dog"])


def test_instances_found_replace_the_concepts_backends_own(local_store, monkeypatch):
    from services.concepts.grounding import ground_proposal

    proposal = Proposal([NounPhrase("cat", 0.5, "mllm", (Instance(box=(0.0, 0.0, 5.0, 5.0)),)), NounPhrase("dog")])
    pixels = np.zeros((H, W, 3), np.uint8)
    grounded = ground_proposal(FindsCats(), params(), pixels, proposal)
    assert [len(p.instances) for p in grounded.phrases] == [2, 0]
    assert grounded.phrases[0].source == "mllm" and grounded.phrases[0].instances[0].source == "stub:cats"


def test_the_run_and_concepts_commands_take_the_grounding_backend(model_dirs, tmp_path, tiny_checkpoint, monkeypatch):
    """`dataengine concepts IMAGE --grounding owlv2 --grounding-model-dir DIR` and `dataengine run ...
    --grounding sam3 --grounding-model-dir DIR`: the instances come from that model."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from services.app.cli import app
    from services.common.storage import LocalStore
    from services.app.embedded import STORE_DIR
    from services.orchestrator.model import Item, manifest_key

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(photos / "a.png")
    shown = CliRunner().invoke(app, ["concepts", str(photos / "a.png"), "--label", "dog", "--grounding", "owlv2",
                                     "--grounding-model-dir", str(model_dirs["owlv2"])])
    assert shown.exit_code == 0, shown.output
    [dog] = json.loads(shown.stdout)["phrases"]
    assert dog["instances"] and {i["source"] for i in dog["instances"]} == {f"owlv2:{model_dirs['owlv2']}"}

    out = tmp_path / "out"
    monkeypatch.setenv("DATAENGINE_GROUNDING_THRESHOLD", "0")  # random SAM 3 weights score about 0.25
    ran = CliRunner().invoke(app, ["run", str(photos), "--out", str(out), "--model-type", "tiny", "--checkpoint",
                                   str(tiny_checkpoint), "--label", "dog", "--stage", "2", "--grounding", "sam3",
                                   "--grounding-model-dir", str(model_dirs["sam3"]),
                                   "--amg-params", '{"points_per_side": 4}'])
    assert ran.exit_code == 0, ran.output
    [row] = json.loads((out / "report.json").read_text())["items"]
    assert row["state"] in ("review", "rejected"), row  # stage 2: every item to a human
    item = Item.from_json(json.loads(LocalStore(out / STORE_DIR).get(manifest_key(row["item_id"]))))
    dog = {p.phrase: p for p in item.phrases}["dog"]
    assert dog.masks and {m.source for m in dog.masks} == {f"sam3:{model_dirs['sam3']}"}
    bad = CliRunner().invoke(app, ["concepts", str(photos / "a.png"), "--label", "dog", "--grounding", "yolo"])
    assert bad.exit_code == 2 and "unknown grounding backend 'yolo'" in bad.output
