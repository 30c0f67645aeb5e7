from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeRequest(_message.Message):
    __slots__ = ("image", "known_labels", "max_positives", "max_negatives", "backend")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIVES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.ImageRef
    known_labels: _containers.RepeatedScalarFieldContainer[str]
    max_positives: int
    max_negatives: int
    backend: str
    def __init__(self, image: _Optional[_Union[_common_pb2.ImageRef, _Mapping]] = ..., known_labels: _Optional[_Iterable[str]] = ..., max_positives: _Optional[int] = ..., max_negatives: _Optional[int] = ..., backend: _Optional[str] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("phrases", "hard_negatives")
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    HARD_NEGATIVES_FIELD_NUMBER: _ClassVar[int]
    phrases: _containers.RepeatedCompositeFieldContainer[_common_pb2.NounPhrase]
    hard_negatives: _containers.RepeatedCompositeFieldContainer[_common_pb2.HardNegative]
    def __init__(self, phrases: _Optional[_Iterable[_Union[_common_pb2.NounPhrase, _Mapping]]] = ..., hard_negatives: _Optional[_Iterable[_Union[_common_pb2.HardNegative, _Mapping]]] = ...) -> None: ...
