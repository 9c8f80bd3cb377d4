"""Image geometry: the aspect-ratio distribution of a catalogue, and when two of them differ.

Product photos are usually 3:4 portraits; some exports are stretched to squares; others are
60x80. A model sees every image through its resize mode (``crop | pad | squash``, see
:func:`lightclip.imagecache.fit_image`), so a catalogue whose shapes differ from the training
catalogue's is seen differently: that is worth one warning line, never an error.

Shapes are bucketed by ``width / height`` (:data:`BUCKETS`); sizes come from the file headers
(:func:`header_sizes`) or from a decode that happens anyway (validation), never from a second
decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from lightclip.data.catalogue import Catalogue

#: (name, lowest width/height ratio) from the tallest bucket up; a ratio belongs to the last bucket whose bound it reaches.
BUCKETS: tuple[tuple[str, float], ...] = (
    ("tall (< 0.70)", 0.0),
    ("portrait 3:4 (0.70-0.90)", 0.70),
    ("square (0.90-1.11)", 0.90),
    ("landscape 4:3 (1.11-1.43)", 1.11),
    ("wide (>= 1.43)", 1.43),
)

#: Two catalogues differ clearly when this share of images would move between buckets
#: (the total variation distance of their bucket shares).
DIFFERENT_SHARE = 0.25


def bucket(width: int, height: int) -> str:
    """The :data:`BUCKETS` name of one image's shape."""
    ratio = width / height
    name = BUCKETS[0][0]
    for candidate, lowest in BUCKETS:
        if ratio >= lowest:
            name = candidate
    return name


def aspect_summary(sizes: Iterable[tuple[int, int] | None]) -> dict[str, Any]:
    """``{"images", "unknown", "buckets": {name: count}, "shares": {name: fraction}, "most_common_size"}``.

    ``None`` sizes (unreadable images) are counted as ``unknown``, not bucketed.
    """
    counts = {name: 0 for name, _ in BUCKETS}
    sizes_seen: dict[str, int] = {}
    unknown = 0
    for size in sizes:
        if size is None or not size[0] or not size[1]:
            unknown += 1
            continue
        width, height = int(size[0]), int(size[1])
        counts[bucket(width, height)] += 1
        key = f"{width}x{height}"
        sizes_seen[key] = sizes_seen.get(key, 0) + 1
    known = sum(counts.values())
    shares = {name: round(count / known, 4) if known else 0.0 for name, count in counts.items()}
    common = max(sizes_seen.items(), key=lambda kv: (kv[1], kv[0]))[0] if sizes_seen else None
    return {"images": known, "unknown": unknown, "buckets": counts, "shares": shares, "most_common_size": common}


def header_sizes(paths: Sequence[Path | str]) -> list[tuple[int, int] | None]:
    """Each image's ``(width, height)`` from its header (nothing is decoded); ``None`` when unreadable."""
    sizes: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            with Image.open(path) as image:  # lazy: reads the header only
                sizes.append((int(image.width), int(image.height)))
        except (OSError, ValueError, Image.DecompressionBombError):
            sizes.append(None)
    return sizes


def describe(summary: Mapping[str, Any]) -> str:
    """``portrait 3:4 (0.70-0.90) 92%, square (0.90-1.11) 8%`` (the buckets in use, largest first)."""
    shares = [(name, share) for name, share in summary.get("shares", {}).items() if share > 0]
    shares.sort(key=lambda kv: -kv[1])
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares) or "no readable images"


def difference(reference: Mapping[str, Any], other: Mapping[str, Any]) -> float:
    """The share of images that would have to change bucket to turn one distribution into the other."""
    a, b = reference.get("shares", {}), other.get("shares", {})
    return 0.5 * sum(abs(float(a.get(name, 0.0)) - float(b.get(name, 0.0))) for name, _ in BUCKETS)


def mismatch(reference: Mapping[str, Any] | None, other: Mapping[str, Any], *, threshold: float = DIFFERENT_SHARE) -> str | None:
    """A one-line warning when ``other`` differs clearly from ``reference`` (the model's training
    geometry); ``None`` when they agree or the model recorded none."""
    if not reference or not reference.get("images") or not other.get("images"):
        return None
    distance = difference(reference, other)
    if distance < threshold:
        return None
    return (
        f"image geometry differs from the model's training catalogue ({100 * distance:.0f}% of images in other shape buckets): "
        f"trained on {describe(reference)}; this catalogue {describe(other)}"
    )


#: Where :func:`catalogue_geometry`'s summary lives in a trained model's ``model.json`` (under ``extra``).
MODEL_KEY = "train_geometry"


def items_geometry(catalogue: Catalogue, items: Any) -> dict[str, Any]:
    """The aspect-ratio summary of ``items``' images (rows of ``catalogue``), from their headers."""
    return aspect_summary(header_sizes([catalogue.image_path(p) for p in items["image"]]))


def catalogue_geometry(catalogue: Catalogue, split: str | None = None) -> dict[str, Any]:
    """The aspect-ratio summary of one split's images (``None``: every item), from their headers."""
    return items_geometry(catalogue, catalogue.items if split is None else catalogue.split(split))


def model_geometry(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The training catalogue's summary a ``model.json`` records; ``None`` for models saved without one."""
    value = (info.get("extra") or {}).get(MODEL_KEY)
    return value if isinstance(value, dict) else None


def compare(reference: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> tuple[float, str | None] | None:
    """``(shift, warning or None)`` of a catalogue's ``summary`` against ``reference`` (a model's
    training geometry: :func:`model_geometry`); ``None`` when there is no reference. ``shift`` is
    :func:`difference`; the warning is :func:`mismatch`'s line."""
    if reference is None:
        return None
    return round(difference(reference, summary), 4), mismatch(reference, summary)


def check_items(reference: Mapping[str, Any] | None, catalogue: Catalogue, items: Any) -> tuple[float, str | None] | None:
    """:func:`compare` for ``items`` of ``catalogue`` (their headers are read only when there is a reference)."""
    return None if reference is None else compare(reference, items_geometry(catalogue, items))
