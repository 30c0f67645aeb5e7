from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("images", "known_labels", "stage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    KNOWN_LABELS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageRef]
    known_labels: _containers.RepeatedScalarFieldContainer[str]
    stage: _common_pb2.Stage
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.ImageRef, _Mapping]]] = ..., known_labels: _Optional[_Iterable[str]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("item_ids",)
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PhraseResult(_message.Message):
    __slots__ = ("phrase", "is_negative", "masks", "verdicts", "score", "provenance", "state", "exhaustive", "grounded")
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    IS_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTIVE_FIELD_NUMBER: _ClassVar[int]
    GROUNDED_FIELD_NUMBER: _ClassVar[int]
    phrase: str
    is_negative: bool
    masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    verdicts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Verdict]
    score: float
    provenance: str
    state: _common_pb2.ItemState
    exhaustive: bool
    grounded: bool
    def __init__(self, phrase: _Optional[str] = ..., is_negative: _Optional[bool] = ..., masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., verdicts: _Optional[_Iterable[_Union[_common_pb2.Verdict, _Mapping]]] = ..., score: _Optional[float] = ..., provenance: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ItemState, str]] = ..., exhaustive: _Optional[bool] = ..., grounded: _Optional[bool] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("item_id", "annotator", "token", "claimed_at", "expires_at")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    annotator: str
    token: str
    claimed_at: float
    expires_at: float
    def __init__(self, item_id: _Optional[str] = ..., annotator: _Optional[str] = ..., token: _Optional[str] = ..., claimed_at: _Optional[float] = ..., expires_at: _Optional[float] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "source", "stage", "state", "reason", "phrases", "grid_masks", "score", "image_key", "embedding_key", "height", "width", "lease", "band", "audit_of", "reviewer", "models", "failure_modes")
    class ModelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    GRID_MASKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    BAND_FIELD_NUMBER: _ClassVar[int]
    AUDIT_OF_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MODES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    source: str
    stage: _common_pb2.Stage
    state: _common_pb2.ItemState
    reason: str
    phrases: _containers.RepeatedCompositeFieldContainer[PhraseResult]
    grid_masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    score: float
    image_key: str
    embedding_key: str
    height: int
    width: int
    lease: Lease
    band: str
    audit_of: str
    reviewer: str
    models: _containers.ScalarMap[str, str]
    failure_modes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_id: _Optional[str] = ..., source: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., state: _Optional[_Union[_common_pb2.ItemState, str]] = ..., reason: _Optional[str] = ..., phrases: _Optional[_Iterable[_Union[PhraseResult, _Mapping]]] = ..., grid_masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., score: _Optional[float] = ..., image_key: _Optional[str] = ..., embedding_key: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., band: _Optional[str] = ..., audit_of: _Optional[str] = ..., reviewer: _Optional[str] = ..., models: _Optional[_Mapping[str, str]] = ..., failure_modes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetItemRequest(_message.Message):
    __slots__ = ("item_id",)
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    def __init__(self, item_id: _Optional[str] = ...) -> None: ...

class ListItemsRequest(_message.Message):
    __slots__ = ("state", "stage", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.ItemState
    stage: _common_pb2.Stage
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[_common_pb2.ItemState, str]] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountByKey(_message.Message):
    __slots__ = ("key", "count")
    KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    key: str
    count: int
    def __init__(self, key: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("items_by_state", "items_by_stage", "queue_depths", "dead_letters", "review_waiting", "review_oldest_seconds")
    ITEMS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_BY_STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_WAITING_FIELD_NUMBER: _ClassVar[int]
    REVIEW_OLDEST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    items_by_state: _containers.RepeatedCompositeFieldContainer[CountByKey]
    items_by_stage: _containers.RepeatedCompositeFieldContainer[CountByKey]
    queue_depths: _containers.RepeatedCompositeFieldContainer[CountByKey]
    dead_letters: int
    review_waiting: _containers.RepeatedCompositeFieldContainer[CountByKey]
    review_oldest_seconds: float
    def __init__(self, items_by_state: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., items_by_stage: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., queue_depths: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., dead_letters: _Optional[int] = ..., review_waiting: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., review_oldest_seconds: _Optional[float] = ...) -> None: ...

class NextReviewRequest(_message.Message):
    __slots__ = ("annotator", "stage")
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    annotator: str
    stage: _common_pb2.Stage
    def __init__(self, annotator: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ...) -> None: ...

class ReviewedMask(_message.Message):
    __slots__ = ("mask", "accept", "origin")
    MASK_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    mask: _common_pb2.Mask
    accept: bool
    origin: str
    def __init__(self, mask: _Optional[_Union[_common_pb2.Mask, _Mapping]] = ..., accept: _Optional[bool] = ..., origin: _Optional[str] = ...) -> None: ...

class ReviewedPhrase(_message.Message):
    __slots__ = ("phrase", "original_phrase", "is_negative", "masks", "exhaustive", "ungroundable", "negative_check")
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_PHRASE_FIELD_NUMBER: _ClassVar[int]
    IS_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTIVE_FIELD_NUMBER: _ClassVar[int]
    UNGROUNDABLE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CHECK_FIELD_NUMBER: _ClassVar[int]
    phrase: str
    original_phrase: str
    is_negative: bool
    masks: _containers.RepeatedCompositeFieldContainer[ReviewedMask]
    exhaustive: bool
    ungroundable: bool
    negative_check: str
    def __init__(self, phrase: _Optional[str] = ..., original_phrase: _Optional[str] = ..., is_negative: _Optional[bool] = ..., masks: _Optional[_Iterable[_Union[ReviewedMask, _Mapping]]] = ..., exhaustive: _Optional[bool] = ..., ungroundable: _Optional[bool] = ..., negative_check: _Optional[str] = ...) -> None: ...

class SubmitReviewRequest(_message.Message):
    __slots__ = ("item_id", "annotator", "accept", "phrases", "lease_token", "reviewed", "seconds_spent")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SPENT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    annotator: str
    accept: bool
    phrases: _containers.RepeatedCompositeFieldContainer[PhraseResult]
    lease_token: str
    reviewed: _containers.RepeatedCompositeFieldContainer[ReviewedPhrase]
    seconds_spent: float
    def __init__(self, item_id: _Optional[str] = ..., annotator: _Optional[str] = ..., accept: _Optional[bool] = ..., phrases: _Optional[_Iterable[_Union[PhraseResult, _Mapping]]] = ..., lease_token: _Optional[str] = ..., reviewed: _Optional[_Iterable[_Union[ReviewedPhrase, _Mapping]]] = ..., seconds_spent: _Optional[float] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("item_id", "annotator", "lease_token")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    annotator: str
    lease_token: str
    def __init__(self, item_id: _Optional[str] = ..., annotator: _Optional[str] = ..., lease_token: _Optional[str] = ...) -> None: ...

class AnnotatorStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AnnotatorFigures(_message.Message):
    __slots__ = ("annotator", "items", "masks", "seconds", "items_per_hour", "masks_per_hour", "seconds_per_item", "seconds_per_mask", "audits", "audit_decision_agreement", "audit_mask_iou")
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    MASKS_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_ITEM_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_MASK_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_DECISION_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    AUDIT_MASK_IOU_FIELD_NUMBER: _ClassVar[int]
    annotator: str
    items: int
    masks: int
    seconds: float
    items_per_hour: float
    masks_per_hour: float
    seconds_per_item: float
    seconds_per_mask: float
    audits: int
    audit_decision_agreement: float
    audit_mask_iou: float
    def __init__(self, annotator: _Optional[str] = ..., items: _Optional[int] = ..., masks: _Optional[int] = ..., seconds: _Optional[float] = ..., items_per_hour: _Optional[float] = ..., masks_per_hour: _Optional[float] = ..., seconds_per_item: _Optional[float] = ..., seconds_per_mask: _Optional[float] = ..., audits: _Optional[int] = ..., audit_decision_agreement: _Optional[float] = ..., audit_mask_iou: _Optional[float] = ...) -> None: ...

class AnnotatorStatsResponse(_message.Message):
    __slots__ = ("annotators",)
    ANNOTATORS_FIELD_NUMBER: _ClassVar[int]
    annotators: _containers.RepeatedCompositeFieldContainer[AnnotatorFigures]
    def __init__(self, annotators: _Optional[_Iterable[_Union[AnnotatorFigures, _Mapping]]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("format", "prefix")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    format: str
    prefix: str
    def __init__(self, format: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("keys", "items")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    items: int
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., items: _Optional[int] = ...) -> None: ...
