from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PhraseMasks(_message.Message):
    __slots__ = ("phrase", "masks", "is_negative")
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    IS_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    phrase: str
    masks: _containers.RepeatedCompositeFieldContainer[_common_pb2.Mask]
    is_negative: bool
    def __init__(self, phrase: _Optional[str] = ..., masks: _Optional[_Iterable[_Union[_common_pb2.Mask, _Mapping]]] = ..., is_negative: _Optional[bool] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("image", "pairs", "checks")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    pairs: _containers.RepeatedCompositeFieldContainer[PhraseMasks]
    checks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ..., pairs: _Optional[_Iterable[_Union[PhraseMasks, _Mapping]]] = ..., checks: _Optional[_Iterable[str]] = ...) -> None: ...

class PairVerdicts(_message.Message):
    __slots__ = ("phrase", "verdicts", "score")
    PHRASE_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    phrase: str
    verdicts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Verdict]
    score: float
    def __init__(self, phrase: _Optional[str] = ..., verdicts: _Optional[_Iterable[_Union[_common_pb2.Verdict, _Mapping]]] = ..., score: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("pairs", "score")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[PairVerdicts]
    score: float
    def __init__(self, pairs: _Optional[_Iterable[_Union[PairVerdicts, _Mapping]]] = ..., score: _Optional[float] = ...) -> None: ...
