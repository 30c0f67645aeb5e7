"""Every instance of every phrase through the engine (issue 16): a phrase with three instances is
three masks from proposal through decode, verify, routing and every export; each mask says which
model made it; a grounding backend's own masks are kept, and a stub returning the true masks of a
synthetic image yields COCO annotations that COCOeval scores at AP 1.0 (the plumbing, not a model)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from services.common.concepts import HardNegative, Instance, NounPhrase, Proposal
from services.common.masks import encode_rle
from services.orchestrator import exports
from services.orchestrator.model import ItemState
from tests.orchestrator.test_engine import make_engine  # noqa: F401

H, W = 64, 96
DOGS = [(4, 6, 20, 22), (30, 8, 50, 26), (60, 30, 90, 60)]  # XYXY of three white squares


def truth(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


class TrueInstances:
    """A grounding backend stubbed to the truth: "dog" with the three squares' masks (as SAM 3
    gives them), "ball" with two boxes for the decoder to segment, "sky" unlocated, one negative."""

    name = "true-instances"
    needs_pixels = False

    def propose(self, pixels, known_labels: Sequence[str], max_positives=0, max_negatives=0) -> Proposal:
        dogs = tuple(Instance(box=tuple(float(v) for v in b), score=0.9 - 0.1 * i, mask=encode_rle(truth(b)),
                              source="sam3:stub") for i, b in enumerate(DOGS))
        balls = (Instance(box=(2.0, 40.0, 12.0, 50.0), score=0.8, source="owlv2:stub"),
                 Instance(box=(70.0, 2.0, 80.0, 12.0), score=0.7, source="owlv2:stub"))
        return Proposal([NounPhrase("dog", 0.9, self.name, dogs), NounPhrase("ball", 0.8, self.name, balls),
                         NounPhrase("sky", 0.5, self.name)], [HardNegative("wolf", "model", 0.5, self.name)])


@pytest.fixture
def image(tmp_path):
    pixels = np.zeros((H, W, 3), np.uint8)
    for b in DOGS:
        pixels[truth(b)] = 255
    path = tmp_path / "dogs.png"
    Image.fromarray(pixels).save(path)
    return path


def test_three_instances_stay_three_masks_through_every_stage_and_export(make_engine, image, tmp_path):
    engine = make_engine(concepts=TrueInstances(), out=tmp_path / "out")
    result = engine.process(image, "dogs.png", ["dog"])
    item = engine.orchestrator.load(result.item_id)
    assert item.state in (ItemState.ACCEPTED, ItemState.REVIEW, ItemState.REJECTED), item.state
    phrases = {p.phrase: p for p in item.phrases}
    dog, ball, sky = phrases["dog"], phrases["ball"], phrases["sky"]

    # decode: the backend's masks kept as they are, boxes segmented by the decoder, each says who
    assert [m.source for m in dog.masks] == ["sam3:stub"] * 3
    assert [m.decode().tolist() for m in dog.masks] == [truth(b).tolist() for b in DOGS]
    assert [m.predicted_iou for m in dog.masks] == pytest.approx([0.9, 0.8, 0.7])
    assert len(ball.masks) == 2 and all(m.source.startswith("sam1:tiny") for m in ball.masks)
    assert sky.masks == [] and not sky.grounded and phrases["wolf"].is_negative

    # verify: one mask verdict per instance mask; the pair's score the mean of them (heuristic)
    mask_verdicts = [v for v in dog.verdicts if v.check == "mask"]
    assert len(mask_verdicts) == 3
    assert dog.score == pytest.approx(np.mean([v.score for v in mask_verdicts]))
    # routing: the pair with its three masks is routed by its own score (0.9, 0.8, 0.7: the mean 0.8 -> review)
    assert dog.score == pytest.approx(0.8) and dog.state == ItemState.REVIEW and result.masks == 5  # 3 dogs, 2 balls

    # exports: COCO one annotation per instance, SA-Co one pair with all its masks, SA-1B the grid
    paths = {fmt: tmp_path / "exports" / fmt for fmt in exports.FORMATS}
    for fmt, path in paths.items():
        path.parent.mkdir(exist_ok=True)
        exports.export(engine.store, fmt, path, None)  # every state: the item's own is the verifier's call
    coco = json.loads(paths["coco"].read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_phrase = {}
    for ann in coco["annotations"]:
        by_phrase.setdefault(names[ann["category_id"]], []).append(ann)
    assert {k: len(v) for k, v in by_phrase.items()} == {"dog": 3, "ball": 2}
    assert {a["source"] for a in by_phrase["dog"]} == {"sam3:stub"}
    saco = json.loads(paths["saco"].read_text())
    pairs = {p["phrase"]: p for p in saco["pairs"]}
    assert len(pairs["dog"]["masks"]) == 3 and len(pairs["ball"]["masks"]) == 2
    assert [m["source"] for m in pairs["dog"]["masks"]] == ["sam3:stub"] * 3
    [sa1b] = list(paths["sa1b"].glob("*.json"))
    grid = json.loads(sa1b.read_text())["annotations"]
    assert grid == json.loads(engine.store.get(item.grid_masks_key))["annotations"]  # the grid, unchanged
    assert grid and all("source" not in a for a in grid)  # SA-1B records as the official ones

    # COCOeval of the exported dog annotations against the truth: AP 1.0
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": H, "width": W}], "categories": [{"id": 1, "name": "dog"}],
                  "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                   "segmentation": encode_rle(truth(b)), "area": int(truth(b).sum()),
                                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for i, b in enumerate(DOGS)]}
    gt.createIndex()
    dt = gt.loadRes([{"image_id": 1, "category_id": 1, "segmentation": a["segmentation"], "score": a["score"]}
                     for a in by_phrase["dog"]])
    ev = COCOeval(gt, dt, "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP at IoU .50:.95


class Garbage:
    """A grounding backend whose instances are wrong for the image: set ``instance`` per test."""

    name = "garbage"
    needs_pixels = False
    instance: Instance

    def propose(self, pixels, known_labels, max_positives=0, max_negatives=0) -> Proposal:
        return Proposal([NounPhrase("dog", 0.9, self.name, (Instance(box=(4.0, 6.0, 20.0, 22.0)), self.instance))])


@pytest.mark.parametrize("instance, reason", [
    (Instance(mask=encode_rle(np.ones((10, 10), bool)), source="sam3:stub"),
     "phrase 'dog' instance 1 mask from sam3:stub is 10x10 (H x W) but the image is 64x96"),
    (Instance(box=(200.0, 200.0, 300.0, 300.0), source="owlv2:stub"), "phrase 'dog' instance 1: "),
])
def test_an_instance_wrong_for_the_image_fails_the_item_naming_it(make_engine, image, tmp_path, instance, reason):
    backend = Garbage()
    backend.instance = instance
    engine = make_engine(concepts=backend, out=tmp_path / "out")
    result = engine.process(image, "dogs.png", ["dog"])
    assert result.state == "failed" and reason in result.reason, result
