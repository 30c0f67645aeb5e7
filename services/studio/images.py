"""The image as a browser should draw it: in the orientation the embedder saw (EXIF applied), in a
format every browser decodes. Masks and clicks are in those pixels."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidInput

BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                   "BMP": "image/bmp"}
ORIENTATION = 0x0112  # the EXIF tag


def browser_image(data: bytes) -> tuple[bytes, str]:
    """(bytes, content type): the stored bytes when a browser draws them as the engine decoded
    them, else a PNG with the EXIF orientation applied (TIFF, rotated JPEGs, ...)."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or ""
        rotated = img.getexif().get(ORIENTATION, 1) not in (0, 1)
        if fmt in BROWSER_FORMATS and not rotated:
            return data, BROWSER_FORMATS[fmt]
        out = io.BytesIO()
        ImageOps.exif_transpose(img).convert("RGB").save(out, format="PNG")
        return out.getvalue(), "image/png"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInput(f"the stored image cannot be shown: {exc}") from None
