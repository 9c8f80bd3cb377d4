"""Importer for a generic manifest: a CSV file or JSON lines naming an image and a title per item.

Columns (keys): ``image`` (or ``image_path``/``filepath``/``path``), ``title`` (or
``caption``/``text``), optional ``id`` (default ``row<N>``, N the 1-based record number),
optional attribute columns and optional ``split``. An unknown column is an error rather than
data we would silently drop. Image paths are relative to ``image_root`` (default: the
manifest's directory); a path that leads outside it (absolute, ``..``, a symlink out) is
skipped as ``outside_root`` unless allowed; URLs are not fetched.

One record per physical line, in both formats: a quoted CSV field cannot span lines, so an
unclosed quote costs its own line (skipped as ``bad_row``, naming the line and the field) and
never the lines after it. The report accounts for every line: an item, a skipped row with its
line number and reason, or a blank line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from lightclip.config import ATTRIBUTE_COLUMNS
from lightclip.data._images import (
    IMAGE_EXTENSIONS,
    NameAllocator,
    finish_import,
    format_ids,
    image_extension,
    outside_root,
    outside_root_note,
    parse_year,
    staged_output,
)
from lightclip.data._lines import LineError, read_lines, split_csv_line
from lightclip.data.catalogue import SPLITS, Catalogue, CatalogueError, ImportReport, SkippedRow

IMAGES_DIR = "images"
#: Canonical field -> the names accepted for it, canonical name first.
ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "image": ("image", "image_path", "filepath", "path"),
    "title": ("title", "caption", "text"),
    **{col: (col,) for col in ATTRIBUTE_COLUMNS},
    "split": ("split",),
}
_CANONICAL: dict[str, str] = {alias: field for field, names in ALIASES.items() for alias in names}
ALLOWED_COLUMNS: tuple[str, ...] = tuple(_CANONICAL)
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".json")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

__all__ = ["ALIASES", "ALLOWED_COLUMNS", "import_manifest"]


class _BadRecord(Exception):
    """A record that is skipped as ``bad_row`` (the message is the detail)."""


def _canonical_keys(keys: list[str], where: str) -> dict[str, str]:
    """Map the given column names to canonical fields; unknown or doubled names are errors."""
    unknown = [k for k in keys if k not in _CANONICAL]
    if unknown:
        raise CatalogueError(f"{where}: unknown column(s) {unknown}; allowed: {list(ALLOWED_COLUMNS)}")
    mapping: dict[str, str] = {}
    for key in keys:
        field = _CANONICAL[key]
        if field in mapping.values():
            other = next(k for k, f in mapping.items() if f == field)
            raise CatalogueError(f"{where}: columns '{other}' and '{key}' both give the {field}; keep one")
        mapping[key] = field
    return mapping


#: What a reader yields per line after the header: a record, a _BadRecord, or None (blank line).
Entry = tuple[int, "dict[str, Any] | _BadRecord | None"]


def _read_csv(path: Path) -> Iterator[Entry]:
    """Yield ``(line, record)`` for each line after the header; unreadable rows are _BadRecords."""
    lines = read_lines(path)
    first = next(lines, None)
    if first is None:
        raise CatalogueError(f"{path}: empty file, expected a header row naming the columns")
    if first.blank:
        raise CatalogueError(f"{path}:1: blank line; expected a header row naming the columns")
    try:
        header = [h.strip() for h in split_csv_line(first.text)]
    except LineError as exc:
        raise CatalogueError(f"{path}:1: unreadable header: {exc}") from None
    mapping = _canonical_keys(header, f"{path}:1")
    for field in ("image", "title"):
        if field not in mapping.values():
            raise CatalogueError(f"{path}:1: no {field} column; name it one of {list(ALIASES[field])}")
    for entry in lines:
        line = entry.number
        if entry.blank:
            yield line, None
            continue
        try:
            fields = split_csv_line(entry.text)
        except LineError as exc:
            yield line, _BadRecord(f"line {line}: {exc}")
            continue
        if len(fields) != len(header):
            yield line, _BadRecord(f"line {line} has {len(fields)} fields, expected {len(header)}")
            continue
        yield line, {mapping[k]: v for k, v in zip(header, fields)}


def _read_jsonl(path: Path) -> Iterator[Entry]:
    """Yield ``(line, record)`` for each line; unparsable lines are _BadRecords."""
    for entry in read_lines(path):
        line, text = entry.number, entry.text
        if entry.blank:
            yield line, None
            continue
        if line == 1 and text.lstrip().startswith("["):
            raise CatalogueError(f"{path}:1: a JSON array; expected JSON lines (one object per line)")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line, _BadRecord(f"line {line}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            yield line, _BadRecord(f"line {line}: expected a JSON object, got {type(obj).__name__}")
            continue
        unknown = [k for k in obj if k not in _CANONICAL]
        if unknown:
            raise CatalogueError(f"{path}:{line}: unknown key(s) {unknown}; allowed: {list(ALLOWED_COLUMNS)}")
        record: dict[str, Any] = {}
        try:
            for key, value in obj.items():
                field = _CANONICAL[key]
                if field in record:
                    raise _BadRecord(f"line {line}: two keys give the {field}")
                if isinstance(value, bool) or (value is not None and not isinstance(value, (str, int, float))):
                    raise _BadRecord(f"line {line}: '{key}' must be a string or number, got {json.dumps(value)[:40]}")
                record[field] = value
        except _BadRecord as bad:
            yield line, bad
            continue
        yield line, record


def _text(value: Any) -> str | None:
    """A stripped string, or None for null/empty."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def import_manifest(
    manifest: Path,
    out_dir: Path,
    *,
    image_root: Path | None = None,
    overwrite: bool = False,
    allow_outside_root: bool = False,
    progress: bool = True,
) -> tuple[Catalogue, ImportReport]:
    """Import a CSV/JSONL manifest into ``out_dir``, copying its images into ``out_dir/images/``.

    Skipped (and listed in the report with their line): ``bad_row`` (unreadable record, e.g.
    an unclosed quote), ``empty_title``, ``missing_image``, ``remote_image`` (URLs are not
    fetched), ``outside_root`` (the image resolves outside ``image_root``; allowed with
    ``allow_outside_root``), ``unsupported_image`` (not jpg/png/webp), ``bad_split`` and
    ``duplicate_id``.
    """
    manifest = Path(manifest)
    suffix = manifest.suffix.lower()
    if suffix in CSV_SUFFIXES:
        reader = _read_csv
    elif suffix in JSONL_SUFFIXES:
        reader = _read_jsonl
    else:
        raise CatalogueError(f"{manifest}: unknown manifest format '{suffix}'; use {list(CSV_SUFFIXES + JSONL_SUFFIXES)}")
    if not manifest.is_file():
        raise CatalogueError(f"{manifest}: manifest not found")
    root = Path(image_root) if image_root is not None else manifest.parent
    if not root.is_dir():
        raise CatalogueError(f"{root}: image_root is not a directory")

    name = manifest.name
    report = ImportReport(source=str(manifest), lines_read=0)
    accepted: list[tuple[dict[str, Any], Path, str]] = []  # item, image file, canonical extension
    seen: dict[str, str] = {}
    bad_years: list[str] = []
    outside = 0
    n = 0  # records (non-blank lines) so far
    try:
        for line, record in reader(manifest):
            report.lines_read += 1
            if record is None:
                report.blank_lines += 1
                continue
            n += 1
            report.rows_read += 1
            source = f"{name}:{line}"
            if isinstance(record, _BadRecord):
                report.skipped.append(SkippedRow(source, None, f"bad_row: {record}"))
                continue
            item_id = _text(record.get("id")) or f"row{n}"
            title = _text(record.get("title"))
            image = _text(record.get("image"))
            split = _text(record.get("split"))
            skip = None
            if title is None:
                skip = "empty_title: no title/caption"
            elif image is None:
                skip = "missing_image: no image path"
            elif _URL.match(image):
                skip = f"remote_image: {image} (URLs are not downloaded; download the image and give its path)"
            elif split is not None and split not in SPLITS:
                skip = f"bad_split: {split!r} is not one of {list(SPLITS)}"
            elif item_id in seen:
                skip = f"duplicate_id: id {item_id} already at {seen[item_id]}"
            if skip is None:
                path = root / image
                ext = image_extension(path)
                real = None if allow_outside_root else outside_root(path, root)
                if real is not None:  # checked first: nothing outside the root is even looked at
                    outside += 1
                    skip = f"outside_root: {image} is {real}, outside the image root {root}"
                elif ext is None:
                    skip = f"unsupported_image: {image} (allowed extensions: {sorted(IMAGE_EXTENSIONS)})"
                elif not path.is_file():
                    skip = f"missing_image: {path} not found"
            if skip is not None:
                report.skipped.append(SkippedRow(source, item_id, skip))
                continue
            seen[item_id] = source
            item = {"id": item_id, "title": title, "split": split}
            for col in ATTRIBUTE_COLUMNS:
                item[col] = _text(record.get(col))
            year, invalid = parse_year(item["year"])
            if invalid:
                bad_years.append(f"{item_id}={item['year']!r}")
            item["year"] = year
            accepted.append((item, path, ext))
    except OSError as exc:
        raise CatalogueError(f"{manifest}: cannot read: {exc.strerror or exc}") from None
    if outside:
        report.notes.append(outside_root_note(outside, root))
    if bad_years:
        report.notes.append(f"year_not_integer: {len(bad_years)} rows imported with year null ({format_ids(bad_years)})")

    names = NameAllocator()
    with staged_output(out_dir, overwrite=overwrite, inputs=[manifest]) as staging:
        (staging / IMAGES_DIR).mkdir()
        records, jobs = [], []
        for item, path, ext in accepted:
            target = names.allocate(item["id"], ext)
            jobs.append((path, staging / IMAGES_DIR / target))
            records.append(item | {"image": f"{IMAGES_DIR}/{target}"})
        catalogue = finish_import(staging, out_dir, records, jobs, report, desc=f"importing {name}", progress=progress)
    return catalogue, report
