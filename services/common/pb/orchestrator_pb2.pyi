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
    __slots__ = ("phrase", "is_negative", "masks", "verdicts", "score", "provenance", "state")
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    IS_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    phrase: str
    is_negative: bool
    masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    verdicts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Verdict]
    score: float
    provenance: str
    state: _common_pb2.ItemState
    def __init__(self, phrase: _Optional[str] = ..., is_negative: _Optional[bool] = ..., masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., verdicts: _Optional[_Iterable[_Union[_common_pb2.Verdict, _Mapping]]] = ..., score: _Optional[float] = ..., provenance: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ItemState, str]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item_id", "source", "stage", "state", "reason", "phrases", "grid_masks", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    GRID_MASKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    source: str
    stage: _common_pb2.Stage
    state: _common_pb2.ItemState
    reason: str
    phrases: _containers.RepeatedCompositeFieldContainer[PhraseResult]
    grid_masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    score: float
    def __init__(self, item_id: _Optional[str] = ..., source: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ..., state: _Optional[_Union[_common_pb2.ItemState, str]] = ..., reason: _Optional[str] = ..., phrases: _Optional[_Iterable[_Union[PhraseResult, _Mapping]]] = ..., grid_masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., score: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("items_by_state", "items_by_stage", "queue_depths", "dead_letters")
    ITEMS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_BY_STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    items_by_state: _containers.RepeatedCompositeFieldContainer[CountByKey]
    items_by_stage: _containers.RepeatedCompositeFieldContainer[CountByKey]
    queue_depths: _containers.RepeatedCompositeFieldContainer[CountByKey]
    dead_letters: int
    def __init__(self, items_by_state: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., items_by_stage: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., queue_depths: _Optional[_Iterable[_Union[CountByKey, _Mapping]]] = ..., dead_letters: _Optional[int] = ...) -> None: ...

class NextReviewRequest(_message.Message):
    __slots__ = ("annotator", "stage")
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    annotator: str
    stage: _common_pb2.Stage
    def __init__(self, annotator: _Optional[str] = ..., stage: _Optional[_Union[_common_pb2.Stage, str]] = ...) -> None: ...

class SubmitReviewRequest(_message.Message):
    __slots__ = ("item_id", "annotator", "accept", "phrases")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    annotator: str
    accept: bool
    phrases: _containers.RepeatedCompositeFieldContainer[PhraseResult]
    def __init__(self, item_id: _Optional[str] = ..., annotator: _Optional[str] = ..., accept: _Optional[bool] = ..., phrases: _Optional[_Iterable[_Union[PhraseResult, _Mapping]]] = ...) -> None: ...

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
