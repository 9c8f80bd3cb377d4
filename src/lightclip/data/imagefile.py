"""Opening a user's image with a pixel limit checked before a single pixel is decoded.

A small file can hold a huge image (a 48 KB PNG of 20000 x 20000 pixels decodes to 1.2 GB of
RGB). PIL opens lazily: the header gives the size first, so every place lightclip decodes an
image it did not make (validation, the image cache, serving, search) opens it here and refuses
one larger than the limit with :class:`ImageTooLarge` ("image too large: W x H ..."), instead of
decoding it or ending in PIL's own ``DecompressionBombError`` traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from PIL import Image

from lightclip.config import MAX_IMAGE_PIXELS
from lightclip.errors import LightclipError

#: The params key that sets the limit (named in the error so the user knows what to change).
LIMIT_KEY = "validate.max_image_pixels"


class ImageTooLarge(LightclipError, ValueError):
    """An image whose width x height exceeds the pixel limit; the message gives both."""

    def __init__(self, width: int | None, height: int | None, limit: int, pixels: int | None = None) -> None:
        self.width, self.height, self.limit = width, height, limit
        self.pixels = width * height if width is not None and height is not None else pixels
        size = f"{width}x{height}" if width is not None else "size unknown"
        count = f" = {self.pixels:,} pixels" if self.pixels is not None else ""
        super().__init__(f"image too large: {size}{count} > limit {limit:,} pixels ({LIMIT_KEY})")


def _header_size(source: str | Path | IO[bytes]) -> tuple[int, int] | None:
    """Width and height from the file header, without PIL's decompression-bomb refusal.

    Used only once ``Image.open`` has refused the file, to name its size; the format plugins
    read headers only. None when no plugin recognises the file.
    """
    Image.init()
    handle = open(source, "rb") if isinstance(source, (str, Path)) else source
    try:
        handle.seek(0)
        prefix = handle.read(16)
        for fmt in Image.ID:
            factory, accept = Image.OPEN[fmt]
            verdict = accept(prefix) if accept is not None else True
            if not verdict or isinstance(verdict, str):
                continue
            handle.seek(0)
            try:
                width, height = factory(handle, "").size
            except Exception:  # not this format after all: try the next plugin
                continue
            return int(width), int(height)
        return None
    finally:
        if handle is not source:
            handle.close()


def check_pixels(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`ImageTooLarge` when ``width x height`` exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise ImageTooLarge(width, height, max_pixels)


@contextmanager
def open_image(source: str | Path | IO[bytes], max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open`` that refuses an image over ``max_pixels`` from its header alone.

    Raises :class:`ImageTooLarge`; any other failure is PIL's (``OSError`` for unreadable files).
    """
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as exc:  # over PIL's own limit, which is at least ours
        size = _header_size(source)
        if size is None:
            raise ImageTooLarge(None, None, max_pixels) from exc
        raise ImageTooLarge(*size, max_pixels) from None
    with image:
        check_pixels(*image.size, max_pixels)
        yield image
