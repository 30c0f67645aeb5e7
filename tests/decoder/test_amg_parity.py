"""Parity with segment-anything: our automatic generation returns SamAutomaticMaskGenerator's masks,
and PromptDecoder computes what the official prompt encoder + mask decoder compute.

Both generators read the same stored (fp16-rounded) embeddings: the official one through its own
predictor, whose set_image is patched to load the stored features of the crop being processed
instead of running the image encoder. So any difference comes from the generation code alone.

Random weights give degenerate masks (speckle over the whole image, all boxes equal, nothing near
the default thresholds), which would leave NMS, crops and the filters untested. So the tests give
the tiny model a structure: features are a code per region of a synthetic label image, the mask
upscaling maps each embedding cell to a flat block, and the binarisation threshold sits inside the
logits' range. Masks then are unions of regions, of many sizes and boxes, and the thresholds are
picked from the observed scores so that some masks pass each filter and some do not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from services.common.embedding import StoredEmbedding
from services.common.errors import FailedPrecondition
from services.common.masks import MaskRecord
from services.common.sam_models import load_sam
from services.decoder import amg
from services.common.amg_params import AmgParams
from services.decoder.prompt_decoder import PromptDecoder
from tests.decoder.builders import official_predictor

H, W = 300, 400
STABILITY_OFFSET = 0.1  # the structured logits span ~0.5..1.6; the official 1.0 would span them all


@pytest.fixture(scope="module")
def sam(tiny_checkpoint):
    loaded = load_sam("tiny", tiny_checkpoint)
    decoder = loaded.model.mask_decoder
    with torch.no_grad():
        for conv in (decoder.output_upscaling[0], decoder.output_upscaling[3]):
            conv.weight.copy_(conv.weight[:, :, :1, :1].expand_as(conv.weight))  # flat 2x2 blocks
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(20.0)
            mlp.layers[-1].bias.mul_(20.0)
    loaded.model.mask_threshold = 1.05
    return loaded


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """HxW int64: 8 overlapping discs on a background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.zeros((H, W), np.int64)
    for k in range(1, 9):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.08, 0.25) * min(H, W)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
    return out


def region_embedding(sam, labels: np.ndarray, box) -> StoredEmbedding:
    """The crop ``box`` of ``labels`` as an embedding: each 16-pixel cell of the encoder's padded
    input frame gets its region's code (background = padding = region 0)."""
    codebook = np.random.default_rng(1).normal(0, 3, (int(labels.max()) + 1, 32)).astype(np.float32)
    x0, y0, x1, y1 = box
    crop = torch.from_numpy(labels[y0:y1, x0:x1])[None, None].float()
    ih, iw = ResizeLongestSide.get_preprocess_shape(y1 - y0, x1 - x0, 1024)
    cells = F.pad(F.interpolate(crop, (ih, iw), mode="nearest"), (0, 1024 - iw, 0, 1024 - ih))
    cells = F.interpolate(cells, (64, 64), mode="nearest")[0, 0].long().numpy()
    features = codebook[cells].transpose(2, 0, 1)[None].astype(np.float16)
    return StoredEmbedding(features, sam.encoder_id, "img", (y1 - y0, x1 - x0), (ih, iw), tuple(box))


def embeddings_for(sam, labels, params: AmgParams) -> dict:
    return {box: region_embedding(sam, labels, box) for box in amg.crop_boxes((H, W), params)}


def official_generate(sam, embeddings: dict, params: AmgParams) -> list[dict]:
    """SamAutomaticMaskGenerator on the stored embeddings of each crop."""
    generator = SamAutomaticMaskGenerator(sam.model, output_mode="coco_rle", **params.to_kwargs())
    process_crop, current = generator._process_crop, {}

    def process_crop_of(image, crop_box, layer_idx, orig_size):
        current["box"] = tuple(crop_box)
        return process_crop(image, crop_box, layer_idx, orig_size)

    def set_image(image, image_format="RGB"):
        stored = official_predictor(sam, embeddings[current["box"]])
        for name in ("features", "original_size", "input_size", "is_image_set"):
            setattr(generator.predictor, name, getattr(stored, name))

    generator._process_crop = process_crop_of
    generator.predictor.set_image = set_image
    return generator.generate(np.zeros((H, W, 3), np.uint8))  # pixels are never read


def between(values, q: float) -> float:
    """A threshold halfway between two observed values near quantile q (never on one)."""
    values = np.unique(np.asarray(values)[np.isfinite(values)])
    i = min(max(int(q * len(values)), 1), len(values) - 1)
    return float((values[i - 1] + values[i]) / 2)


def assert_same_masks(official: list[dict], ours: list[MaskRecord]) -> None:
    assert len(ours) == len(official)
    if not ours:
        return
    theirs = [a["segmentation"] for a in official]
    mine = [r.segmentation for r in ours]
    iou = mask_utils.iou(mine, theirs, [0] * len(theirs))  # ours x official
    for i, rec in enumerate(ours):
        j = int(np.argmax(iou[i]))
        ref = official[j]
        assert iou[i, j] >= 0.99
        assert abs(rec.predicted_iou - ref["predicted_iou"]) <= 1e-4
        assert abs(rec.stability_score - ref["stability_score"]) <= 1e-4
        assert np.allclose(rec.bbox, ref["bbox"], atol=1) and abs(rec.area - ref["area"]) <= 0.01 * ref["area"]
        assert rec.point_coords == ref["point_coords"] and rec.crop_box == ref["crop_box"]
    assert len({int(np.argmax(row)) for row in iou}) == len(ours)  # a one-to-one matching


@pytest.fixture(scope="module")
def observed(sam, labels):
    """Predicted IoU and stability of every candidate (crops included), no filters."""
    params = AmgParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       stability_score_offset=STABILITY_OFFSET, box_nms_thresh=1.0,
                       crop_n_layers=1, crop_nms_thresh=1.0)
    records = amg.generate(sam.model, embeddings_for(sam, labels, params), (H, W), params)
    return (np.array([r.predicted_iou for r in records]), np.array([r.stability_score for r in records]))


CASES = {
    # the official default grid (32 x 32) and NMS, only the thresholds moved into range
    "default_grid": dict(points_per_side=32),
    # one layer of 4 crops, each with its own embedding
    "crop_layer": dict(points_per_side=4, crop_n_layers=1),
    # small islands and holes removed, then NMS again
    "min_region_area": dict(points_per_side=4, crop_n_layers=1, min_mask_region_area=800),
    # fewer prompts per batch than the grid has per crop: batching must not matter
    "small_batches": dict(points_per_side=4, points_per_batch=5),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_official(sam, labels, observed, case):
    ious, stability = observed
    params = AmgParams(pred_iou_thresh=between(ious, 0.3), stability_score_thresh=between(stability, 0.3),
                       stability_score_offset=STABILITY_OFFSET, **CASES[case])
    embeddings = embeddings_for(sam, labels, params)
    official = official_generate(sam, embeddings, params)
    ours = amg.generate(sam.model, embeddings, (H, W), params)
    assert len(ours) > 0
    assert_same_masks(official, ours)
    if params.points_per_side <= 8:  # (unfiltered, the full grid would upsample all 3072 candidates)
        # the thresholds filter: with them off, more masks come out
        unfiltered = dataclasses.replace(params, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        assert len(amg.generate(sam.model, embeddings, (H, W), unfiltered)) > len(ours)


def test_crop_boxes_are_the_official_ones():
    params = AmgParams(crop_n_layers=2, crop_overlap_ratio=0.2)
    boxes = amg.crop_boxes((1500, 2250), params)
    assert boxes[0] == (0, 0, 2250, 1500) and len(boxes) == 1 + 4 + 16
    assert all(0 <= x0 < x1 <= 2250 and 0 <= y0 < y1 <= 1500 for x0, y0, x1, y1 in boxes)


def test_missing_crop_embedding_is_a_failed_precondition(sam, labels):
    params = AmgParams(points_per_side=4, crop_n_layers=1)
    embeddings = embeddings_for(sam, labels, params)
    del embeddings[amg.crop_boxes((H, W), params)[2]]
    with pytest.raises(FailedPrecondition, match="no embedding for crop box"):
        amg.generate(sam.model, embeddings, (H, W), params)


def test_embedding_of_another_model_is_a_failed_precondition(sam, labels):
    params = AmgParams(points_per_side=4)
    emb = region_embedding(sam, labels, (0, 0, W, H))
    wide = dataclasses.replace(emb, features=np.zeros((1, 256, 64, 64), np.float16))
    with pytest.raises(FailedPrecondition, match="another model"):
        amg.generate(sam.model, {(0, 0, W, H): wide}, (H, W), params)


# -- PromptDecoder against the official 256-dim modules -------------------------------------------

class _DecoderOnly(torch.nn.Module):
    """vit_b's prompt encoder and mask decoder (the same for vit_l and vit_h), random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                            input_image_size=(1024, 1024), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256,
            iou_head_depth=3, iou_head_hidden_dim=256)


@pytest.fixture(scope="module")
def decoder_only():
    torch.manual_seed(0)
    model = _DecoderOnly().eval()
    with torch.no_grad():  # larger than the default init, so the prompts matter
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model, torch.randn(1, 256, 64, 64)


def _official(model, features, points, labels, boxes, mask_input, multimask):
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=(points, labels) if points is not None else None,
                                             boxes=boxes, masks=mask_input)
        return model.mask_decoder(image_embeddings=features, image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)


_PTS = torch.tensor([[[100.0, 200.0]], [[700.0, 300.0]], [[512.5, 900.25]]], dtype=torch.float64)


@pytest.mark.parametrize("points, labels, boxes, mask_input, multimask", [
    (_PTS, torch.ones(3, 1, dtype=torch.int), None, None, True),                  # the AMG grid case
    (torch.tensor([[[10.0, 20.0], [300.0, 400.0]]]), torch.tensor([[1, 0]]), None, None, True),  # fg + bg
    (None, None, torch.tensor([[50.0, 60.0, 500.0, 700.0]]), None, False),         # a box alone
    (torch.tensor([[[200.0, 200.0]]]), torch.tensor([[1]]), torch.tensor([[50.0, 60.0, 500.0, 700.0]]),
     torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(3)), False),  # point+box+mask
])
def test_prompt_decoder_matches_official_modules(decoder_only, points, labels, boxes, mask_input, multimask):
    model, features = decoder_only
    ref_masks, ref_iou = _official(model, features, points, labels, boxes, mask_input, multimask)
    masks, iou = PromptDecoder(model, features)(points, labels, boxes, mask_input, multimask)
    assert masks.shape == ref_masks.shape and iou.shape == ref_iou.shape
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou, ref_iou, atol=1e-4, rtol=0)


def test_prompt_decoder_upscales_selected_rows_alike(decoder_only):
    model, features = decoder_only
    decoder = PromptDecoder(model, features)
    decoded = decoder.transform(_PTS, torch.ones(3, 1, dtype=torch.int))
    every = decoder.masks(decoded)
    for rows in ([1], [0, 2]):
        torch.testing.assert_close(decoder.masks(decoded, rows=torch.tensor(rows)), every[rows],
                                   atol=1e-6, rtol=0)
