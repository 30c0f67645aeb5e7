"""The parameters of automatic mask generation: segment-anything's SamAutomaticMaskGenerator's,
under the same names and with the same defaults, validated once at the edge."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from services.common.errors import InvalidInput
from services.common.pb import decoder_pb2

# Upper bounds that keep one request's work finite; far beyond what anyone runs
# (the official scripts use points_per_side 32-64 and at most 2 crop layers).
MAX_POINTS_PER_SIDE = 256
MAX_POINTS_PER_BATCH = 4096
MAX_CROP_N_LAYERS = 4  # layer i adds 4**i crops: 4 layers = 341 embeddings


@dataclass(frozen=True)
class AmgParams:
    """Every SamAutomaticMaskGenerator parameter but point_grids and output_mode.

    points_per_side: prompts per side of the full-image grid (points_per_side**2 prompts).
    points_per_batch: prompts decoded at once (memory, not results).
    pred_iou_thresh: keep masks with predicted IoU above this (0 disables the filter).
    stability_score_thresh: keep masks with stability score at or above this (0 disables).
    stability_score_offset: logit offset for the stability score's two thresholds.
    box_nms_thresh: box IoU for non-maximum suppression within one crop.
    crop_n_layers: extra layers of crops (layer i: (2**i)**2 crops of the image).
    crop_nms_thresh: box IoU for suppression between crops.
    crop_overlap_ratio: overlap of neighbouring crops, as a fraction of the image's short side
        (scaled down per layer).
    crop_n_points_downscale_factor: points per side in layer i: points_per_side / factor**i.
    min_mask_region_area: remove islands and holes smaller than this, in pixels (0 disables).
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        _integer(self, "points_per_side", 1, MAX_POINTS_PER_SIDE)
        _integer(self, "points_per_batch", 1, MAX_POINTS_PER_BATCH)
        _number(self, "pred_iou_thresh", -math.inf, 1.0)  # above 1: no predicted IoU passes
        _number(self, "stability_score_thresh", 0.0, 1.0)
        _number(self, "stability_score_offset", 0.0, math.inf)
        _number(self, "box_nms_thresh", 0.0, 1.0)
        _integer(self, "crop_n_layers", 0, MAX_CROP_N_LAYERS)
        _number(self, "crop_nms_thresh", 0.0, 1.0)
        _number(self, "crop_overlap_ratio", 0.0, 1.0, upper_open=True)
        _integer(self, "crop_n_points_downscale_factor", 1, MAX_POINTS_PER_SIDE)
        _integer(self, "min_mask_region_area", 0, 2**31 - 1)

    @classmethod
    def from_proto(cls, msg: decoder_pb2.AmgParams | None) -> "AmgParams":
        """Unset fields take the official defaults.

        Proto floats are float32: a value that rounds to the same float32 as the default is the
        default (so 512/1500 survives a round trip), others are read as their shortest decimal
        (0.88f -> 0.88, not 0.8799999952316284), which is what the sender typed.
        """
        if msg is None:
            return cls()
        defaults = cls()
        values = {}
        for f in fields(cls):
            if not msg.HasField(f.name):
                continue
            value = getattr(msg, f.name)
            if f.type == "float":
                default = getattr(defaults, f.name)
                value = default if np.float32(value) == np.float32(default) else _shortest(value)
            values[f.name] = value
        return cls(**values)

    def to_proto(self) -> decoder_pb2.AmgParams:
        return decoder_pb2.AmgParams(**asdict(self))

    def to_kwargs(self) -> dict:
        """Keyword arguments of segment_anything.SamAutomaticMaskGenerator (output_mode aside)."""
        return asdict(self)

    def digest(self) -> str:
        """16 hex digits identifying these parameters (part of the masks' object key)."""
        canonical = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _shortest(value: float) -> float:
    """The shortest decimal that reads back as the same float32."""
    return float(str(np.float32(value)))


def _integer(params: AmgParams, name: str, low: int, high: int) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInput(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be in [{low}, {high}], got {value}")
    object.__setattr__(params, name, int(value))


def _number(params: AmgParams, name: str, low: float, high: float, upper_open: bool = False) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidInput(f"{name} must be a number, got {value!r}")
    value = float(value)
    bracket = ")" if upper_open else "]"
    if not math.isfinite(value):
        where = "" if math.isinf(low) and math.isinf(high) else f" in [{low}, {high}{bracket}"
        raise InvalidInput(f"{name} must be a finite number{where}, got {value}")
    if value < low or value > high or (upper_open and value == high):
        raise InvalidInput(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    object.__setattr__(params, name, value)


def params_from_json(params: dict | None) -> AmgParams:
    """AmgParams from a JSON dict of its fields (missing fields take the official defaults)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidInput(f"params must be a JSON object of AmgParams fields, got {type(params).__name__}")
    try:
        return AmgParams(**params)
    except TypeError as exc:  # an unknown field name
        raise InvalidInput(f"bad AmgParams: {exc}") from None
