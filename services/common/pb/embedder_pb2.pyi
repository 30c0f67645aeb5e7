from services.common.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedRequest(_message.Message):
    __slots__ = ("images", "crop_n_layers", "crop_overlap_ratio")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CROP_N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CROP_OVERLAP_RATIO_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageRef]
    crop_n_layers: int
    crop_overlap_ratio: float
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.ImageRef, _Mapping]]] = ..., crop_n_layers: _Optional[int] = ..., crop_overlap_ratio: _Optional[float] = ...) -> None: ...

class EmbeddedImage(_message.Message):
    __slots__ = ("image_id", "embeddings")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingRef]
    def __init__(self, image_id: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[_common_pb2.EmbeddingRef, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[EmbeddedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[EmbeddedImage, _Mapping]]] = ...) -> None: ...
