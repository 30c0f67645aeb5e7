"""The typed input of an interactive Predict, validated once at the edge."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidInput
from services.common.pb import decoder_pb2

LOW_RES = 256  # SAM's low-res mask side, pixels
MASK_INPUT_BYTES = LOW_RES * LOW_RES * 4  # 1x256x256 float32
MAX_POINTS = 256  # far beyond any human session; bounds the work one request can ask for


def _finite(values, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise InvalidInput(f"{what} has a non-finite coordinate: {values.tolist()}")


@dataclass(frozen=True)
class Prompt:
    """One interactive prompt against one stored embedding.

    points: Nx2 float32 XY pixels in the frame of the embedded image (the full image, or the crop
        for a crop embedding). labels: N int32, 1 foreground, 0 background.
    box: 4 float32 XYXY pixels in the same frame, or None.
    mask_input: 1x256x256 float32 low-res logits (inline), or None.
    mask_input_key: object key of an earlier Predict's logits, or None.
    mask_input_index: which of that Predict's masks (best first) to feed back; 0 its best.
    multimask_output: three masks instead of one.

    Points and boxes outside the image are rejected rather than clipped: a click outside the
    picture is a client bug, and clipping would answer it with a confident mask at the border.
    The edges are inside: 0 <= x <= W and 0 <= y <= H (continuous pixel coordinates).
    """

    embedding_key: str
    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    mask_input_key: str | None = None
    multimask_output: bool = True
    mask_input_index: int = 0

    def __post_init__(self) -> None:
        if not self.embedding_key:
            raise InvalidInput("embedding_key is empty")
        if self.points.ndim != 2 or self.points.shape[1] != 2 or self.labels.shape != (len(self.points),):
            raise InvalidInput(f"points must be Nx2 with N labels, got {self.points.shape} points and "
                               f"{self.labels.shape} labels")
        if len(self.points) > MAX_POINTS:
            raise InvalidInput(f"{len(self.points)} points; at most {MAX_POINTS} per prompt")
        for i, (point, label) in enumerate(zip(self.points, self.labels)):
            _finite(point, f"point {i}")
            if label not in (0, 1):
                raise InvalidInput(f"point {i} has label {int(label)}; labels must be 1 (foreground) "
                                   "or 0 (background)")
        if self.box is not None:
            _finite(self.box, "box")
            x0, y0, x1, y1 = self.box.tolist()
            if x1 < x0 or y1 < y0:
                raise InvalidInput(f"box ({x0}, {y0}, {x1}, {y1}) has x1 < x0 or y1 < y0; boxes are XYXY")
        if self.mask_input is not None:
            if self.mask_input.shape != (1, LOW_RES, LOW_RES):
                raise InvalidInput(f"mask_input must be 1x{LOW_RES}x{LOW_RES}, got {self.mask_input.shape}")
            if not np.all(np.isfinite(self.mask_input)):
                raise InvalidInput("mask_input_logits contains NaN or infinite values")
        if self.mask_input is not None and self.mask_input_key:
            raise InvalidInput("give mask_input_logits or mask_input_key, not both")
        if self.mask_input_index < 0 or (self.mask_input_index and not self.mask_input_key):
            raise InvalidInput(f"mask_input_index {self.mask_input_index} needs a mask_input_key and must be >= 0")
        if len(self.points) == 0 and self.box is None and not self.has_mask_input:
            raise InvalidInput("empty prompt: give at least one point, a box or a mask input")

    @property
    def has_mask_input(self) -> bool:
        return self.mask_input is not None or bool(self.mask_input_key)

    def check_within(self, size: tuple[int, int]) -> None:
        """Raise InvalidInput for a point or box outside an image of ``size`` (H, W) pixels."""
        h, w = size
        for i, (x, y) in enumerate(self.points.tolist()):
            if not (0 <= x <= w and 0 <= y <= h):
                raise InvalidInput(f"point {i} at ({x:g}, {y:g}) is outside the image of {w}x{h} pixels "
                                   f"(W x H); points must lie in [0, {w}] x [0, {h}]")
        if self.box is not None:
            x0, y0, x1, y1 = self.box.tolist()
            if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
                raise InvalidInput(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the image of {w}x{h} "
                                   f"pixels (W x H)")

    def digest(self) -> str:
        """A stable id of this prompt (with its embedding), used in the logits key."""
        h = hashlib.sha256()
        h.update(self.embedding_key.encode())
        h.update(np.ascontiguousarray(self.points, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int32).tobytes())
        h.update(b"box" + (np.asarray(self.box, np.float32).tobytes() if self.box is not None else b""))
        h.update(b"mask" + (self.mask_input.tobytes() if self.mask_input is not None else b""))
        h.update(b"key" + (self.mask_input_key or "").encode() + b"#%d" % self.mask_input_index)
        h.update(b"multi" if self.multimask_output else b"single")
        return h.hexdigest()[:32]

    @classmethod
    def from_proto(cls, request: decoder_pb2.PredictRequest) -> "Prompt":
        points = np.array([[p.x, p.y] for p in request.points], dtype=np.float32).reshape(-1, 2)
        labels = np.array([p.label for p in request.points], dtype=np.int32)
        box = None
        if request.HasField("box"):
            b = request.box
            box = np.array([b.x0, b.y0, b.x1, b.y1], dtype=np.float32)
        mask_input, mask_input_key = None, None
        which = request.WhichOneof("mask_input")
        if which == "mask_input_logits":
            data = request.mask_input_logits
            if len(data) != MASK_INPUT_BYTES:
                raise InvalidInput(f"mask_input_logits has {len(data)} bytes; expected 1x{LOW_RES}x{LOW_RES} "
                                   f"float32 little-endian = {MASK_INPUT_BYTES} bytes")
            mask_input = np.frombuffer(data, dtype="<f4").reshape(1, LOW_RES, LOW_RES).astype(np.float32)
        elif which == "mask_input_key":
            if not request.mask_input_key:
                raise InvalidInput("mask_input_key is set but empty")
            mask_input_key = request.mask_input_key
        return cls(embedding_key=request.embedding_key, points=points, labels=labels, box=box,
                   mask_input=mask_input, mask_input_key=mask_input_key,
                   multimask_output=request.multimask_output, mask_input_index=request.mask_input_index)
