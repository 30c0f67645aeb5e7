"""Exports from manifests: COCO (pycocotools round trip), per-image SA-1B, SA-Co pairs."""

import hashlib
import io
import json
import logging

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from services.common.errors import InvalidInput
from services.common.masks import MaskRecord, encode_rle, sa1b_document
from services.common.verdicts import Verdict
from services.orchestrator import exports
from services.orchestrator.model import Item, ItemState, PhraseResult, item_id_for, manifest_key

S = ItemState
H, W = 24, 32


def mask(y0: int, x0: int, h: int = 6, w: int = 8) -> MaskRecord:
    """A rectangle mask in an HxW image, as the decoder would record it."""
    m = np.zeros((H, W), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return MaskRecord(segmentation=encode_rle(m), bbox=[x0, y0, w, h], area=int(m.sum()), predicted_iou=0.9,
                      stability_score=0.95, point_coords=[[x0 + 1.0, y0 + 1.0]], crop_box=[0, 0, W, H])


def positive(text: str, *masks: MaskRecord, score: float = 0.9) -> PhraseResult:
    return PhraseResult(text, masks=list(masks), grounded=bool(masks), score=score, provenance="sam-tiny",
                        state=S.ACCEPTED, verdicts=[Verdict("mask", "accept", score, phrase=text)])


def negative(text: str) -> PhraseResult:
    return PhraseResult(text, is_negative=True, score=0.8, provenance="verifier", state=S.ACCEPTED)


def save(store, source: str, phrases=(), state: S = S.ACCEPTED, grid_masks_key: str = "") -> Item:
    image_id = hashlib.sha256(source.encode()).hexdigest()
    item = Item(item_id=item_id_for(source, image_id), source=source, image_key=f"images/{image_id}",
                image_id=image_id, state=state, height=H, width=W, phrases=list(phrases),
                grid_masks_key=grid_masks_key)
    store.put(manifest_key(item.item_id), json.dumps(item.to_json()).encode())
    return item


@pytest.fixture
def dataset(local_store):
    """Three accepted images (masks, a negative, image-level labels only) and one in review."""
    save(local_store, "a/dogs.jpg", [positive("dog", mask(0, 0), mask(10, 12)), positive("cat", mask(2, 20)),
                                     negative("zebra")])
    save(local_store, "b/cat.jpg", [positive("cat", mask(5, 5), score=0.7), positive("tree")])
    save(local_store, "c/sky.jpg", [positive("sky")])
    save(local_store, "d/later.jpg", [positive("bird", mask(1, 1))], state=S.REVIEW)
    return local_store


def coco_of(store, states=None):
    buf = io.StringIO()
    summary = exports.write_coco(store, buf, states)
    return json.loads(buf.getvalue()), summary


def test_coco_loads_in_pycocotools_and_evaluates_to_ap_one_against_itself(dataset, tmp_path):
    path = tmp_path / "coco.json"
    summary = exports.export(dataset, "coco", path, states={S.ACCEPTED})
    gt = COCO(str(path))
    detections = [dict(ann) for ann in gt.dataset["annotations"]]  # each carries its phrase's score
    evaluator = COCOeval(gt, gt.loadRes(detections), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)
    assert summary.to_json() == {"items": 3, "images": 3, "annotations": 4, "phrases": 6, "skipped": 0}
    assert all(isinstance(a["segmentation"]["counts"], str) for a in gt.dataset["annotations"])


def test_coco_categories_are_sorted_positive_phrases_and_only_grounded_masks_annotate(dataset):
    doc, _ = coco_of(dataset, {S.ACCEPTED})
    assert [(c["id"], c["name"]) for c in doc["categories"]] == [(1, "cat"), (2, "dog"), (3, "sky"), (4, "tree")]
    names = {c["id"]: c["name"] for c in doc["categories"]}
    by_image = {img["id"]: img for img in doc["images"]}
    annotated = sorted((by_image[a["image_id"]]["file_name"], names[a["category_id"]]) for a in doc["annotations"])
    assert annotated == [("a/dogs.jpg", "cat"), ("a/dogs.jpg", "dog"), ("a/dogs.jpg", "dog"), ("b/cat.jpg", "cat")]
    sky = next(img for img in doc["images"] if img["file_name"] == "c/sky.jpg")  # listed without annotations
    assert (sky["height"], sky["width"], sky["image_level_labels"]) == (H, W, ["sky"])
    dogs = next(img for img in doc["images"] if img["file_name"] == "a/dogs.jpg")
    assert dogs["negative_phrases"] == ["zebra"] and dogs["image_level_labels"] == []
    assert "image-level labels" in doc["info"]["note"]
    assert (doc["info"]["image_level_labels"], doc["info"]["negative_phrases"]) == (2, 1)
    assert {a["score"] for a in doc["annotations"]} == {0.9, 0.7}  # the phrase's score
    assert [a["id"] for a in doc["annotations"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("states, sources", [
    ({S.ACCEPTED}, ["a/dogs.jpg", "b/cat.jpg", "c/sky.jpg"]),
    ({S.REVIEW}, ["d/later.jpg"]),
    (None, ["a/dogs.jpg", "b/cat.jpg", "c/sky.jpg", "d/later.jpg"]),   # None: every item
    (set(), []),                                                      # nothing asked, an empty but valid file
])
def test_states_choose_the_items(dataset, states, sources):
    doc, summary = coco_of(dataset, states)
    assert sorted(img["file_name"] for img in doc["images"]) == sources
    assert summary.items == len(sources)


def test_saco_has_one_record_per_pair_including_negatives_and_image_level_labels(dataset):
    buf = io.StringIO()
    summary = exports.write_saco(dataset, buf, {S.ACCEPTED})
    doc = json.loads(buf.getvalue())
    pairs = {(r["image"]["source"], r["phrase"]): r for r in doc["pairs"]}
    assert sorted(pairs) == [("a/dogs.jpg", "cat"), ("a/dogs.jpg", "dog"), ("a/dogs.jpg", "zebra"),
                             ("b/cat.jpg", "cat"), ("b/cat.jpg", "tree"), ("c/sky.jpg", "sky")]
    zebra, tree, dog = pairs["a/dogs.jpg", "zebra"], pairs["b/cat.jpg", "tree"], pairs["a/dogs.jpg", "dog"]
    assert (zebra["is_negative"], zebra["masks"], zebra["grounded"]) == (True, [], False)
    assert (tree["is_negative"], tree["masks"], tree["grounded"]) == (False, [], False)
    assert dog["grounded"] and len(dog["masks"]) == 2 and dog["masks"][1]["bbox"] == [12.0, 10.0, 8.0, 6.0]
    assert (dog["stage"], dog["state"], dog["provenance"], dog["score"]) == ("FULLY_AUTOMATIC", "ACCEPTED",
                                                                          "sam-tiny", 0.9)
    assert dog["verdicts"][0]["check"] == "mask" and dog["image"]["height"] == H
    assert summary.to_json() == {"items": 3, "images": 3, "annotations": 4, "phrases": 6, "skipped": 0}
    assert doc["info"]["phrases"] == 6


def test_sa1b_writes_one_file_per_item_with_disambiguated_stems(local_store, tmp_path):
    grid = [mask(0, 0), mask(8, 8)]
    local_store.put("masks/m/x/p.json", json.dumps(sa1b_document("x", (H, W), grid)).encode())
    first = save(local_store, "one/photo.jpg", grid_masks_key="masks/m/x/p.json")
    second = save(local_store, "two/photo.jpg")          # same stem, no grid masks
    save(local_store, "inline")
    first, second = sorted([first, second], key=lambda i: i.item_id)  # manifest order decides who keeps it
    summary = exports.write_sa1b(local_store, tmp_path / "sa1b")
    files = sorted(p.name for p in (tmp_path / "sa1b").iterdir())
    assert files == sorted(["photo.json", f"photo-{second.item_id[:8]}.json", "inline.json"])
    plain = json.loads((tmp_path / "sa1b" / "photo.json").read_text())
    suffixed = json.loads((tmp_path / "sa1b" / f"photo-{second.item_id[:8]}.json").read_text())
    assert plain["image"]["item_id"] == first.item_id and suffixed["image"]["item_id"] == second.item_id
    docs = {d["image"]["file_name"]: d for d in (plain, suffixed)}
    assert len(docs["one/photo.jpg"]["annotations"]) == 2 and docs["two/photo.jpg"]["annotations"] == []
    assert (docs["two/photo.jpg"]["image"]["height"], docs["two/photo.jpg"]["image"]["width"]) == (H, W)
    assert (summary.items, summary.images, summary.annotations) == (3, 3, 2)


def test_exports_into_minio_under_a_prefix(minio_store):
    minio_store.put("masks/m/x/p.json", json.dumps(sa1b_document("x", (H, W), [mask(0, 0)])).encode())
    save(minio_store, "photo.jpg", [positive("dog", mask(0, 0)), negative("cat")], grid_masks_key="masks/m/x/p.json")
    save(minio_store, "sub/photo.jpg", [positive("dog")])
    keys, summary = exports.export_to_store(minio_store, "sa1b", "exports/run1/")
    assert len(keys) == 2 and "exports/run1/photo.json" in keys and summary.images == 2
    docs = {d["image"]["file_name"]: d for d in (json.loads(minio_store.get(k)) for k in keys)}
    assert docs["photo.jpg"]["annotations"][0]["area"] == 48 and docs["sub/photo.jpg"]["annotations"] == []
    keys, summary = exports.export_to_store(minio_store, "COCO", "exports/run1")
    doc = json.loads(minio_store.get(keys[0]))
    assert keys == ["exports/run1/coco.json"] and len(doc["annotations"]) == 1 and len(doc["images"]) == 2
    keys, _ = exports.export_to_store(minio_store, "saco", "exports/run1")
    assert len(json.loads(minio_store.get(keys[0]))["pairs"]) == 3
    assert len(list(exports.iter_items(minio_store))) == 2        # exports are never read as manifests


def test_malformed_manifests_are_skipped_counted_and_logged(dataset, caplog):
    dataset.put("items/notjson/manifest.json", b"{not json")
    dataset.put("items/alist/manifest.json", b"[1, 2]")
    dataset.put("items/noid/manifest.json", json.dumps({"source": "x", "state": "ACCEPTED"}).encode())
    dataset.put("items/badutf/manifest.json", b"\xff\xfe")
    dataset.put("items/notjson/decode.json", b"ignored: not a manifest")
    with caplog.at_level(logging.WARNING, logger="services.orchestrator.exports"):
        doc, summary = coco_of(dataset)
    assert summary.skipped == 4 and summary.items == 4 and doc["info"]["skipped_manifests"] == 4
    assert sum("unreadable manifest" in r.message for r in caplog.records) == 4


def test_missing_grid_masks_document_skips_the_item(local_store, tmp_path):
    save(local_store, "gone.jpg", grid_masks_key="masks/m/x/gone.json")
    summary = exports.write_sa1b(local_store, tmp_path / "out")
    assert (summary.skipped, summary.images) == (1, 0) and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("call, match", [
    (lambda store, tmp: exports.export(store, "voc", tmp / "x.json"), "'voc'"),          # names the format
    (lambda store, tmp: exports.export_to_store(store, "yolo", "out"), "'yolo'"),
    (lambda store, tmp: exports.export_to_store(store, "coco", "items/x"), "manifests"),  # would mix with manifests
    (lambda store, tmp: exports.export_to_store(store, "coco", "/exports/x"), "absolute"),  # refused, not mended
    (lambda store, tmp: exports.export_to_store(store, "coco", "exports/../up"), "'..'"),
])
def test_bad_format_or_prefix_is_invalid_input(local_store, tmp_path, call, match):
    with pytest.raises(InvalidInput, match=match):
        call(local_store, tmp_path)


def test_failed_file_export_leaves_no_file(dataset, tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setitem(exports.FILE_WRITERS, "saco", boom)
    with pytest.raises(RuntimeError):
        exports.export(dataset, "saco", tmp_path / "saco.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bucket"]  # the store's folder only
