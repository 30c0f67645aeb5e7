"""One input image, as every service and the orchestrator take it: encoded bytes given inline or
an object key in the store, and the file name it came from (provenance, and how errors name it)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidInput
from services.common.pb import common_pb2


@dataclass(frozen=True)
class ImageSource:
    """One input image: encoded bytes given inline, or an object key in the store (exactly one).

    filename is provenance only; it also names the image in error messages.
    """

    data: bytes | None = None
    key: str | None = None
    filename: str = ""

    def __post_init__(self) -> None:
        if (self.data is None) == (self.key is None):
            raise InvalidInput("an image needs exactly one of inline bytes or an object key")

    @classmethod
    def of(cls, value: "ImageSource | bytes | str") -> "ImageSource":
        """Bytes are an encoded image, a str is an object key."""
        if isinstance(value, ImageSource):
            return value
        if isinstance(value, (bytes, bytearray, memoryview)):
            return cls(data=bytes(value))
        if isinstance(value, str):
            return cls(key=value)
        raise InvalidInput(f"an image is encoded bytes or an object key (str), got {type(value).__name__}")

    @classmethod
    def from_proto(cls, ref: common_pb2.ImageRef, index: int = 0) -> "ImageSource":
        which = ref.WhichOneof("source")
        if which == "data":  # an explicitly empty payload is kept, so decoding can name it
            return cls(data=ref.data, filename=ref.filename)
        if which == "key":
            return cls(key=ref.key, filename=ref.filename)
        raise InvalidInput(f"image {index} has neither data nor key")

    def to_proto(self) -> common_pb2.ImageRef:
        if self.data is not None:
            return common_pb2.ImageRef(data=self.data, filename=self.filename)
        return common_pb2.ImageRef(key=self.key, filename=self.filename)

    def describe(self, index: int) -> str:
        """How error messages name this image: its index plus its filename (what the user knows it
        by), else its key."""
        detail = self.filename or (f"key {self.key!r}" if self.key is not None else "inline bytes")
        return f"image {index} ({detail})"


def image_of(request) -> ImageSource:
    """The image of a pipeline ``StepRequest``: inputs ``image_key`` and, optionally, ``source``."""
    # The item's source (its file name) names the image in errors, not the content-hash key.
    source = request.inputs.get("source")
    return ImageSource(key=request.need("image_key"), filename=source if isinstance(source, str) else "")
