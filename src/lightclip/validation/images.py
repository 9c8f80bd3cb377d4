"""Every image's readability, size and content hash, read before the suite runs."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from lightclip.config import MAX_IMAGE_PIXELS
from lightclip.data.catalogue import Catalogue
from lightclip.data.imagefile import ImageTooLarge, open_image
from lightclip.validation.common import IMAGE_COLUMNS


def _inspect_one(path: Path | None, max_pixels: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(IMAGE_COLUMNS)
    row["image_exists"] = False
    if path is None or not path.is_file():
        return row
    try:
        data = path.read_bytes()
    except OSError:
        return row
    row["image_exists"] = True
    row["image_sha256"] = hashlib.sha256(data).hexdigest()
    try:
        with open_image(io.BytesIO(data), max_pixels) as image:  # the size is checked before decoding
            image.load()  # decode every pixel: truncated or corrupt files fail here
            width, height = image.size
    except ImageTooLarge as exc:  # not decoded: image_decodes stays None
        row.update(image_too_large=True, image_width=exc.width, image_height=exc.height)
        return row
    except Exception:  # PIL raises many types (OSError, SyntaxError, ...)
        row.update(image_too_large=False, image_decodes=False)
        return row
    row.update(image_too_large=False, image_decodes=True, image_width=int(width), image_height=int(height), image_min_side=int(min(width, height)))
    return row


def inspect_images(catalogue: Catalogue, *, max_pixels: int = MAX_IMAGE_PIXELS, progress: bool = True) -> pd.DataFrame:
    """One row per item (same order): whether its image exists and decodes, its size and hash.

    Columns: ``image_exists`` (bool), ``image_too_large`` (bool, width x height over
    ``max_pixels`` read from the header; ``None`` when missing), ``image_decodes`` (bool;
    ``None`` when missing or too large), ``image_width``/``image_height`` (``None`` unless it
    decodes or is too large), ``image_min_side`` (``None`` unless it decodes) and
    ``image_sha256`` (hash of the file bytes; ``None`` when missing).
    """
    rows = []
    for image in tqdm(catalogue.items["image"], desc="inspect images", unit="img", disable=not progress, leave=False):
        path = None
        if isinstance(image, str) and image.strip():
            try:
                path = catalogue.image_path(image)
            except (OSError, ValueError):
                path = None
        rows.append(_inspect_one(path, max_pixels))
    index = pd.RangeIndex(len(rows))
    columns: dict[str, pd.Series] = {}
    for col in IMAGE_COLUMNS:
        values = [row[col] for row in rows]
        if col == "image_exists":
            columns[col] = pd.Series(values, index=index, dtype=bool)
        elif col in ("image_too_large", "image_decodes", "image_sha256"):  # object: keeps None (pandas 3 would make NaN)
            columns[col] = pd.Series(values, index=index, dtype=object)
        else:
            columns[col] = pd.Series(pd.array(values, dtype="Int64"), index=index)
    return pd.DataFrame(columns, index=index)
