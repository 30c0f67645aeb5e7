from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ASSISTED_MANUAL: _ClassVar[Stage]
    STAGE_SEMI_AUTOMATIC: _ClassVar[Stage]
    STAGE_FULLY_AUTOMATIC: _ClassVar[Stage]

class ItemState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_STATE_UNSPECIFIED: _ClassVar[ItemState]
    ITEM_STATE_INGESTED: _ClassVar[ItemState]
    ITEM_STATE_EMBEDDED: _ClassVar[ItemState]
    ITEM_STATE_CONCEPTS_PROPOSED: _ClassVar[ItemState]
    ITEM_STATE_MASKS_DECODED: _ClassVar[ItemState]
    ITEM_STATE_VERIFIED: _ClassVar[ItemState]
    ITEM_STATE_ACCEPTED: _ClassVar[ItemState]
    ITEM_STATE_REVIEW: _ClassVar[ItemState]
    ITEM_STATE_REJECTED: _ClassVar[ItemState]
    ITEM_STATE_DISCARDED: _ClassVar[ItemState]
    ITEM_STATE_FAILED: _ClassVar[ItemState]
STAGE_UNSPECIFIED: Stage
STAGE_ASSISTED_MANUAL: Stage
STAGE_SEMI_AUTOMATIC: Stage
STAGE_FULLY_AUTOMATIC: Stage
ITEM_STATE_UNSPECIFIED: ItemState
ITEM_STATE_INGESTED: ItemState
ITEM_STATE_EMBEDDED: ItemState
ITEM_STATE_CONCEPTS_PROPOSED: ItemState
ITEM_STATE_MASKS_DECODED: ItemState
ITEM_STATE_VERIFIED: ItemState
ITEM_STATE_ACCEPTED: ItemState
ITEM_STATE_REVIEW: ItemState
ITEM_STATE_REJECTED: ItemState
ITEM_STATE_DISCARDED: ItemState
ITEM_STATE_FAILED: ItemState

class ImageRef(_message.Message):
    __slots__ = ("data", "key", "filename")
    DATA_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    key: str
    filename: str
    def __init__(self, data: _Optional[bytes] = ..., key: _Optional[str] = ..., filename: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y", "label")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    label: int
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., label: _Optional[int] = ...) -> None: ...

class EmbeddingRef(_message.Message):
    __slots__ = ("key", "model_id", "image_id", "original_height", "original_width", "input_height", "input_width", "crop_box")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CROP_BOX_FIELD_NUMBER: _ClassVar[int]
    key: str
    model_id: str
    image_id: str
    original_height: int
    original_width: int
    input_height: int
    input_width: int
    crop_box: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., model_id: _Optional[str] = ..., image_id: _Optional[str] = ..., original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., crop_box: _Optional[_Iterable[int]] = ...) -> None: ...

class Rle(_message.Message):
    __slots__ = ("size", "counts")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    size: _containers.RepeatedScalarFieldContainer[int]
    counts: str
    def __init__(self, size: _Optional[_Iterable[int]] = ..., counts: _Optional[str] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box", "source")
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    BBOX_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_IOU_FIELD_NUMBER: _ClassVar[int]
    STABILITY_SCORE_FIELD_NUMBER: _ClassVar[int]
    POINT_COORDS_FIELD_NUMBER: _ClassVar[int]
    CROP_BOX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    segmentation: Rle
    bbox: _containers.RepeatedScalarFieldContainer[float]
    area: int
    predicted_iou: float
    stability_score: float
    point_coords: _containers.RepeatedCompositeFieldContainer[Point]
    crop_box: _containers.RepeatedScalarFieldContainer[float]
    source: str
    def __init__(self, segmentation: _Optional[_Union[Rle, _Mapping]] = ..., bbox: _Optional[_Iterable[float]] = ..., area: _Optional[int] = ..., predicted_iou: _Optional[float] = ..., stability_score: _Optional[float] = ..., point_coords: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., crop_box: _Optional[_Iterable[float]] = ..., source: _Optional[str] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("box", "point", "score", "mask", "source")
    BOX_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    box: Box
    point: Point
    score: float
    mask: Rle
    source: str
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., point: _Optional[_Union[Point, _Mapping]] = ..., score: _Optional[float] = ..., mask: _Optional[_Union[Rle, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class NounPhrase(_message.Message):
    __slots__ = ("text", "score", "source", "box", "point", "instances")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    POINT_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    source: str
    box: Box
    point: Point
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., point: _Optional[_Union[Point, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class HardNegative(_message.Message):
    __slots__ = ("text", "reason", "score", "source")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    reason: str
    score: float
    source: str
    def __init__(self, text: _Optional[str] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("check", "choice", "score", "source", "phrase", "mask_indices")
    CHECK_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    MASK_INDICES_FIELD_NUMBER: _ClassVar[int]
    check: str
    choice: str
    score: float
    source: str
    phrase: str
    mask_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, check: _Optional[str] = ..., choice: _Optional[str] = ..., score: _Optional[float] = ..., source: _Optional[str] = ..., phrase: _Optional[str] = ..., mask_indices: _Optional[_Iterable[int]] = ...) -> None: ...
