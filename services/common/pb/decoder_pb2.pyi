from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("embedding_key", "points", "box", "mask_input_key", "mask_input_logits", "multimask_output", "mask_input_index")
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    MASK_INPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_INPUT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    MULTIMASK_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MASK_INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    embedding_key: str
    points: _containers.RepeatedCompositeFieldContainer[_common_pb2.Point]
    box: _common_pb2.Box
    mask_input_key: str
    mask_input_logits: bytes
    multimask_output: bool
    mask_input_index: int
    def __init__(self, embedding_key: _Optional[str] = ..., points: _Optional[_Iterable[_Union[_common_pb2.Point, _Mapping]]] = ..., box: _Optional[_Union[_common_pb2.Box, _Mapping]] = ..., mask_input_key: _Optional[str] = ..., mask_input_logits: _Optional[bytes] = ..., multimask_output: _Optional[bool] = ..., mask_input_index: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("masks", "logits_key")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_KEY_FIELD_NUMBER: _ClassVar[int]
    masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    logits_key: str
    def __init__(self, masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., logits_key: _Optional[str] = ...) -> None: ...

class AmgParams(_message.Message):
    __slots__ = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor", "min_mask_region_area")
    POINTS_PER_SIDE_FIELD_NUMBER: _ClassVar[int]
    POINTS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    PRED_IOU_THRESH_FIELD_NUMBER: _ClassVar[int]
    STABILITY_SCORE_THRESH_FIELD_NUMBER: _ClassVar[int]
    STABILITY_SCORE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BOX_NMS_THRESH_FIELD_NUMBER: _ClassVar[int]
    CROP_N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CROP_NMS_THRESH_FIELD_NUMBER: _ClassVar[int]
    CROP_OVERLAP_RATIO_FIELD_NUMBER: _ClassVar[int]
    CROP_N_POINTS_DOWNSCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    MIN_MASK_REGION_AREA_FIELD_NUMBER: _ClassVar[int]
    points_per_side: int
    points_per_batch: int
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    crop_n_layers: int
    crop_nms_thresh: float
    crop_overlap_ratio: float
    crop_n_points_downscale_factor: int
    min_mask_region_area: int
    def __init__(self, points_per_side: _Optional[int] = ..., points_per_batch: _Optional[int] = ..., pred_iou_thresh: _Optional[float] = ..., stability_score_thresh: _Optional[float] = ..., stability_score_offset: _Optional[float] = ..., box_nms_thresh: _Optional[float] = ..., crop_n_layers: _Optional[int] = ..., crop_nms_thresh: _Optional[float] = ..., crop_overlap_ratio: _Optional[float] = ..., crop_n_points_downscale_factor: _Optional[int] = ..., min_mask_region_area: _Optional[int] = ...) -> None: ...

class GenerateMasksRequest(_message.Message):
    __slots__ = ("embedding_key", "params")
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    embedding_key: str
    params: AmgParams
    def __init__(self, embedding_key: _Optional[str] = ..., params: _Optional[_Union[AmgParams, _Mapping]] = ...) -> None: ...

class GenerateMasksResponse(_message.Message):
    __slots__ = ("image_id", "masks", "masks_key")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    MASKS_KEY_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    masks_key: str
    def __init__(self, image_id: _Optional[str] = ..., masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., masks_key: _Optional[str] = ...) -> None: ...
