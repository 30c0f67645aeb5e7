"""The studio's HTTP bodies (pydantic, so the OpenAPI schema documents them) and their conversion to
and from the engine's containers. Types are strict and unknown fields refused: a typo in a
client's field name is a 422 naming it, not a silently ignored decision."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from services.common.masks import MaskRecord
from services.common.pb import common_pb2, decoder_pb2, orchestrator_pb2 as pb
from services.common.review import Lease, ReviewedMask, ReviewedPhrase, ReviewSubmission

Side = Annotated[int, Field(ge=1, le=65536)]
Text = Annotated[str, Field(min_length=1, max_length=200)]
Token = Annotated[str, Field(min_length=1, max_length=128)]
STATES = {v: k.removeprefix("ITEM_STATE_").lower() for k, v in common_pb2.ItemState.items()}
STAGES = {v: k.removeprefix("STAGE_").lower() for k, v in common_pb2.Stage.items()}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SignIn(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    token: Annotated[str, Field(min_length=1, max_length=512)] | None = None


class LeaseBody(Body):
    lease_token: Token


class PointIn(Body):
    x: FiniteFloat
    y: FiniteFloat
    label: Literal[0, 1] = 1


class BoxIn(Body):
    x0: FiniteFloat
    y0: FiniteFloat
    x1: FiniteFloat
    y1: FiniteFloat


class MaskInput(Body):
    logits_key: Annotated[str, Field(min_length=1, max_length=512)]
    index: Annotated[int, Field(ge=0, le=2)] = 0


class PredictIn(Body):
    # Accepted, not checked: a click changes nothing stored, and a check would cost every click a
    # manifest read. The submit is what a lease guards.
    lease_token: Token | None = None
    points: Annotated[list[PointIn], Field(max_length=256)] = []
    box: BoxIn | None = None
    mask_input: MaskInput | None = None
    multimask: bool = True


class Rle(Body):
    size: Annotated[list[Side], Field(min_length=2, max_length=2, description="[H, W] pixels")]
    counts: Annotated[str, Field(min_length=1, max_length=4_000_000)]


class MaskIn(Body):
    rle: Rle
    decision: Literal["accept", "reject"] = "accept"
    origin: Literal["model", "human"] = "human"
    # SAM's own figures for a mask it made (a predicted IoU can stray outside [0, 1]: it is clipped)
    predicted_iou: FiniteFloat = 0.0
    stability_score: FiniteFloat = 0.0
    point_coords: Annotated[list[Annotated[list[FiniteFloat], Field(min_length=2, max_length=2)]],
                            Field(max_length=256, description="[[x, y], ...] prompt points, pixels")] = []


class PhraseIn(Body):
    phrase: Text
    original_phrase: Text | None = None
    is_negative: bool = False
    exhaustive: bool | None = None
    ungroundable: bool = False
    negative_check: Literal["absent", "present"] | None = None
    masks: Annotated[list[MaskIn], Field(max_length=1024)] = []


class SubmitIn(Body):
    lease_token: Token
    decision: Literal["accept", "discard"]
    phrases: Annotated[list[PhraseIn], Field(max_length=256)] = []
    seconds_spent: Annotated[float, Field(ge=0.0, le=1e7, allow_inf_nan=False)] = 0.0

    def to_submission(self, item_id: str, annotator: str) -> ReviewSubmission:
        phrases = [ReviewedPhrase(
            phrase=p.phrase, original_phrase=p.original_phrase or "", is_negative=p.is_negative,
            exhaustive=p.exhaustive, ungroundable=p.ungroundable, negative_check=p.negative_check or "",
            masks=[ReviewedMask(MaskRecord(segmentation={"size": list(m.rle.size), "counts": m.rle.counts},
                                           bbox=[], area=0, predicted_iou=m.predicted_iou,
                                           stability_score=m.stability_score,
                                           point_coords=[list(c) for c in m.point_coords]),
                                m.decision == "accept", m.origin) for m in p.masks]) for p in self.phrases]
        return ReviewSubmission(item_id, annotator, self.lease_token, self.decision == "accept", phrases,
                                self.seconds_spent)


def predict_request(embedding_key: str, body: PredictIn) -> decoder_pb2.PredictRequest:
    request = decoder_pb2.PredictRequest(
        embedding_key=embedding_key, multimask_output=body.multimask,
        points=[common_pb2.Point(x=p.x, y=p.y, label=p.label) for p in body.points])
    if body.box is not None:
        request.box.CopyFrom(common_pb2.Box(x0=body.box.x0, y0=body.box.y0, x1=body.box.x1, y1=body.box.y1))
    if body.mask_input is not None:
        request.mask_input_key = body.mask_input.logits_key
        request.mask_input_index = body.mask_input.index
    return request


def mask_json(m: common_pb2.Mask) -> dict:
    return {"rle": {"size": list(m.segmentation.size), "counts": m.segmentation.counts}, "bbox": list(m.bbox),
            "area": m.area, "predicted_iou": round(m.predicted_iou, 4), "stability_score": round(m.stability_score, 4),
            "point_coords": [[p.x, p.y] for p in m.point_coords]}


def lease_json(lease: Lease, lease_s: float) -> dict:
    return {**lease.to_json(), "lease_s": lease_s, "heartbeat_s": max(1.0, round(lease_s / 5, 1))}


def phrase_json(p: pb.PhraseResult) -> dict:
    mv: dict[int, tuple[str, float]] = {}
    ev = None
    for v in p.verdicts:
        if v.check == "mask":
            for i in v.mask_indices:
                mv[i] = (v.choice, v.score)
        elif v.check == "exhaustivity":
            ev = (v.choice, v.score)
    masks = []
    for i, m in enumerate(p.masks):
        choice, score = mv.get(i, (None, None))
        masks.append({**mask_json(m), "mv_choice": choice, "mv_score": None if score is None else round(score, 4)})
    return {"phrase": p.phrase, "is_negative": p.is_negative, "grounded": p.grounded, "score": round(p.score, 4),
            "state": STATES.get(p.state, "unspecified"), "provenance": p.provenance,
            "exhaustive": p.exhaustive if p.HasField("exhaustive") else None,
            "ev_choice": ev[0] if ev else None, "ev_score": round(ev[1], 4) if ev else None,
            "verdicts": [{"check": v.check, "choice": v.choice, "score": round(v.score, 4), "source": v.source,
                          "mask_indices": list(v.mask_indices)} for v in p.verdicts],
            "masks": masks}


def item_json(item: pb.Item, lease_s: float) -> dict:
    """The page's view of an item (API.md); ``lease`` only when the item carries the caller's."""
    return {"item_id": item.item_id, "source": item.source, "stage": STAGES.get(item.stage, "unspecified"),
            "state": STATES.get(item.state, "unspecified"), "reason": item.reason,
            "score": round(item.score, 4) if item.band != "stage1" else None, "band": item.band,
            "width": item.width, "height": item.height, "image_url": f"/api/items/{item.item_id}/image",
            "lease": lease_json(Lease.from_proto(item.lease), lease_s) if item.HasField("lease") else None,
            "phrases": [phrase_json(p) for p in item.phrases], "audit_of": item.audit_of or None,
            "reviewer": item.reviewer or None, "failure_modes": list(item.failure_modes)}
