"""The one catalogue model: a ``catalogue.parquet`` table beside the images it points to.

A catalogue is a directory. Its table has one row per product with ``id``, ``image`` (a POSIX
path relative to the catalogue directory; it may step out with ``..`` so derived catalogues
such as the validated or split one reuse the raw images instead of copying them), ``title``
(the caption), the optional attribute columns and ``split``. Titles and images are required,
attributes are not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lightclip.config import ATTRIBUTE_COLUMNS
from lightclip.errors import LightclipError
from lightclip.io import atomic_file, write_json

CATALOGUE_FILE = "catalogue.parquet"
SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "image", "title")
COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + ATTRIBUTE_COLUMNS + ("split",)

#: Arrow schema of the table; fixed so that equal catalogues give byte-identical files.
SCHEMA = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("image", pa.string()), pa.field("title", pa.string())]
    + [pa.field(col, pa.int32() if col == "year" else pa.string()) for col in ATTRIBUTE_COLUMNS]
    + [pa.field("split", pa.string())]
)


class CatalogueError(LightclipError, ValueError):
    """A catalogue that cannot be read or written; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SkippedRow:
    """One input record an importer could not turn into an item, and why."""

    source: str  # file (and row/line/key) it came from
    id: str | None
    reason: str


@dataclass
class ImportReport:
    """What an importer read, wrote and skipped; nothing is dropped without a line here.

    Every record read is written or skipped (``rows_read == items_written + len(skipped)``);
    for a line-based input every physical line after the header is a record or a blank line
    (``lines_read == rows_read + blank_lines``). :meth:`check_complete` holds an importer to it.
    """

    source: str
    rows_read: int = 0
    items_written: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lines_read: int | None = None  # physical lines after the header (line-based inputs only)
    blank_lines: int = 0  # of those, lines holding nothing (no record)

    def check_complete(self) -> None:
        """Raise :class:`CatalogueError` unless every record and every line is accounted for."""
        if self.items_written + len(self.skipped) != self.rows_read:
            raise CatalogueError(
                f"{self.source}: import lost records: read {self.rows_read}, wrote {self.items_written}, skipped {len(self.skipped)}"
            )
        if self.lines_read is not None and self.rows_read + self.blank_lines != self.lines_read:
            raise CatalogueError(
                f"{self.source}: import lost lines: {self.lines_read} lines after the header, "
                f"{self.rows_read} records and {self.blank_lines} blank lines"
            )

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.skipped:
            key = row.reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def summary(self) -> str:
        blank = f" ({self.blank_lines} blank line{'s' if self.blank_lines != 1 else ''} not counted)" if self.blank_lines else ""
        lines = [f"{self.source}: read {self.rows_read} rows, wrote {self.items_written} items, skipped {len(self.skipped)}{blank}"]
        for reason, count in sorted(self.skipped_by_reason().items()):
            ids = [r.source if r.id is None else f"{r.id} ({r.source})" for r in self.skipped if r.reason.split(":")[0] == reason]
            shown = ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
            lines.append(f"  skipped {count} x {reason}: {shown}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        """Write the report as JSON (every skipped row with its source, id and reason)."""
        write_json(path, asdict(self) | {"skipped_by_reason": self.skipped_by_reason()}, sort_keys=False)


def _is_null(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _empty_frame() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas()


def normalise_items(items: pd.DataFrame, source: str = "catalogue") -> pd.DataFrame:
    """Return ``items`` with exactly :data:`COLUMNS`, canonical dtypes and clean strings.

    Missing optional columns are added as nulls; unknown columns are an error (they would be
    dropped silently otherwise). Required columns must be present.
    """
    unknown = [c for c in items.columns if c not in COLUMNS]
    if unknown:
        raise CatalogueError(f"{source}: unknown column(s) {unknown}; allowed: {list(COLUMNS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in items.columns]
    if missing:
        raise CatalogueError(f"{source}: missing required column(s) {missing}")
    frame = items.copy()
    for col in COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[list(COLUMNS)].reset_index(drop=True)
    for col in COLUMNS:
        if col == "year":
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int32")
        else:
            # Built as an object Series: under pandas 3 ``.map`` on a str column would turn None into NaN.
            frame[col] = pd.Series([None if _is_null(v) else str(v) for v in frame[col]], index=frame.index, dtype=object)
    return frame


@dataclass(frozen=True)
class Catalogue:
    """A catalogue directory and its items table."""

    root: Path
    items: pd.DataFrame

    def __len__(self) -> int:
        return len(self.items)

    @property
    def table_path(self) -> Path:
        return self.root / CATALOGUE_FILE

    def image_path(self, image: str) -> Path:
        """Absolute path of an ``image`` value of this catalogue."""
        return (self.root / PurePosixPath(image)).resolve()

    def image_paths(self) -> list[Path]:
        return [self.image_path(p) for p in self.items["image"]]

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split (``train``/``val``/``test``)."""
        if name not in SPLITS:
            raise CatalogueError(f"unknown split {name!r}; allowed: {list(SPLITS)}")
        return self.items[self.items["split"] == name].reset_index(drop=True)

    @classmethod
    def load(cls, root: Path | str) -> "Catalogue":
        root = Path(root)
        path = root / CATALOGUE_FILE
        if not path.is_file():
            raise CatalogueError(f"{path}: no catalogue here (expected {CATALOGUE_FILE} in {root})")
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise CatalogueError(f"{path}: not a readable parquet file: {exc}") from None
        return cls(root=root, items=normalise_items(table.to_pandas(), source=str(path)))

    def save(self, root: Path | str | None = None) -> "Catalogue":
        """Write the table (deterministically) under ``root``; image paths are rebased if it moves."""
        target = Path(root) if root is not None else self.root
        target.mkdir(parents=True, exist_ok=True)
        items = normalise_items(self.items)
        if target.resolve() != self.root.resolve():
            items["image"] = [rebase_image_path(p, self.root, target) for p in items["image"]]
        write_table(items, target / CATALOGUE_FILE)
        return Catalogue(root=target, items=items)

    def with_items(self, items: pd.DataFrame) -> "Catalogue":
        return Catalogue(root=self.root, items=normalise_items(items))


def rebase_image_path(image: str, old_root: Path, new_root: Path) -> str:
    """Express ``image`` (relative to ``old_root``) relative to ``new_root``."""
    absolute = Path(os.path.normpath(Path(old_root).resolve() / PurePosixPath(image)))
    return PurePosixPath(Path(os.path.relpath(absolute, Path(new_root).resolve()))).as_posix()


def write_table(items: pd.DataFrame, path: Path) -> None:
    """Write items as parquet with a fixed schema and no volatile metadata (byte-reproducible)."""
    table = pa.Table.from_pandas(normalise_items(items), schema=SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata(None)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False, store_schema=False)


def new_catalogue(root: Path | str, records: Iterable[dict]) -> Catalogue:
    """Build and save a catalogue from item dicts (keys from :data:`COLUMNS`)."""
    records = list(records)
    frame = pd.DataFrame.from_records(records) if records else _empty_frame()
    catalogue = Catalogue(root=Path(root), items=normalise_items(frame, source=str(root)))
    return catalogue.save()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
