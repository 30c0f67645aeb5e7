"""AmgParams: the official defaults, validation that names the field, proto round trips."""

from __future__ import annotations

import inspect
import math

import pytest
from segment_anything import SamAutomaticMaskGenerator

from services.common.errors import InvalidInput
from services.common.pb import decoder_pb2
from services.common.sam_models import build_sam_tiny
from services.common.amg_params import AmgParams


def test_defaults_are_the_official_ones():
    official = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    for name, value in AmgParams().to_kwargs().items():
        assert official[name].default == value, name


def test_kwargs_build_the_official_generator():
    params = AmgParams(points_per_side=4, crop_n_layers=1, min_mask_region_area=10)
    generator = SamAutomaticMaskGenerator(build_sam_tiny(), **params.to_kwargs())
    assert generator.crop_n_layers == 1 and generator.min_mask_region_area == 10


@pytest.mark.parametrize("field, value, expected", [
    ("points_per_side", 0, "[1, 256]"),                  # no grid at all
    ("points_per_side", 1000, "[1, 256]"),               # unbounded work
    ("points_per_side", 2.5, "integer"),                 # not an integer
    ("points_per_side", True, "integer"),                # bools are not counts
    ("points_per_batch", 0, "[1, 4096]"),
    ("pred_iou_thresh", math.nan, "finite"),             # NaN compares false with everything
    ("pred_iou_thresh", math.inf, "finite"),
    ("pred_iou_thresh", "0.5", "number"),                # a string is not a threshold
    ("pred_iou_thresh", 1.5, "[-inf, 1.0]"),              # no predicted IoU passes above 1
    ("stability_score_thresh", 1.5, "[0.0, 1.0]"),       # a score is an IoU
    ("stability_score_thresh", -0.1, "[0.0, 1.0]"),
    ("stability_score_offset", -1.0, "[0.0, inf]"),
    ("box_nms_thresh", 1.01, "[0.0, 1.0]"),
    ("crop_n_layers", -1, "[0, 4]"),
    ("crop_n_layers", 5, "[0, 4]"),                      # 4**5 crops
    ("crop_nms_thresh", math.nan, "finite"),
    ("crop_overlap_ratio", 1.0, "[0.0, 1.0)"),           # crops would not shrink
    ("crop_n_points_downscale_factor", 0, "[1, 256]"),   # division by zero upstream
    ("min_mask_region_area", -5, "[0, 2147483647]"),
])
def test_invalid_values_name_the_field_range_and_value(field, value, expected):
    with pytest.raises(InvalidInput) as info:
        AmgParams(**{field: value})
    message = str(info.value)
    assert field in message and expected in message and repr(value).strip("'") in message


@pytest.mark.parametrize("params", [
    AmgParams(),                                                   # all defaults
    AmgParams(points_per_side=16, pred_iou_thresh=0.5, stability_score_thresh=0.8,
              crop_n_layers=2, crop_overlap_ratio=0.25, min_mask_region_area=100),
    AmgParams(pred_iou_thresh=0.0, stability_score_thresh=0.0),     # filters off
    AmgParams(pred_iou_thresh=0.88, stability_score_offset=0.3, box_nms_thresh=0.55),
])
def test_proto_round_trip(params):
    assert AmgParams.from_proto(params.to_proto()) == params


@pytest.mark.parametrize("msg, expected", [
    (None, AmgParams()),                                               # no message at all
    (decoder_pb2.AmgParams(), AmgParams()),                            # every field unset
    (decoder_pb2.AmgParams(points_per_side=8), AmgParams(points_per_side=8)),
    (decoder_pb2.AmgParams(pred_iou_thresh=0.0), AmgParams(pred_iou_thresh=0.0)),  # set to 0 != unset
    (decoder_pb2.AmgParams(pred_iou_thresh=0.86), AmgParams(pred_iou_thresh=0.86)),  # float32 -> 0.86
])
def test_from_proto(msg, expected):
    assert AmgParams.from_proto(msg) == expected


def test_from_proto_validates():
    with pytest.raises(InvalidInput, match="points_per_side"):
        AmgParams.from_proto(decoder_pb2.AmgParams(points_per_side=-3))


def test_digest_is_stable_and_tells_params_apart():
    assert AmgParams().digest() == AmgParams().digest()
    assert len(AmgParams().digest()) == 16
    assert AmgParams().digest() != AmgParams(points_per_side=16).digest()
    assert AmgParams().digest() == AmgParams.from_proto(AmgParams().to_proto()).digest()
