"""Names and value formatting every part of validation shares."""

from __future__ import annotations

from typing import Any

import pandas as pd

ERROR = "error"
WARNING = "warning"
QUARANTINE_FILE = "quarantine.csv"
ATTRIBUTE_CHECK = "attribute_in_set:"  # + the column name
MAX_EXAMPLES = 10
ROW_COLUMN = "_row"

#: Columns :func:`inspect_images` adds, in order.
IMAGE_COLUMNS: tuple[str, ...] = (
    "image_exists", "image_too_large", "image_decodes", "image_width", "image_height", "image_min_side", "image_sha256",
)


def value_counts_text(counts: dict[str, int], limit: int = MAX_EXAMPLES) -> str:
    """``'Lime Green' x1, 'Teal Blue' x3`` (the most frequent first), ``...`` past ``limit`` values."""
    shown = [f"{value!r} x{count}" for value, count in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(shown) + (f", ... ({more} more value(s))" if more > 0 else "")


def plain_value(v: Any) -> Any:
    """``None`` for any null (None, NaN, NA: pandas 3 can hand back NaN in object columns)."""
    try:
        return None if v is None or pd.isna(v) else v
    except (TypeError, ValueError):  # array-likes
        return v
