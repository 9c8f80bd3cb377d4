"""Importer for the Kaggle "Fashion Product Images" layout: ``styles.csv`` + ``images/<id>.jpg``.

The real ``styles.csv`` is not valid CSV: a few product titles contain commas without quotes.
The title is the last column, so a row with too many fields is read as the first nine fields
plus the rest joined back with ``","``; such rows are counted in the report's notes. Each
physical line is one record (a quoted field cannot span lines), so the report accounts for every
line: an item, a skipped row with its line number and reason, or a blank line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from lightclip.config import ATTRIBUTE_COLUMNS
from lightclip.data._images import (
    NULL_MARKERS,
    NameAllocator,
    finish_import,
    format_ids,
    outside_root,
    outside_root_note,
    parse_year,
    staged_output,
)
from lightclip.data._lines import LineError, read_lines, split_csv_line
from lightclip.data.catalogue import Catalogue, CatalogueError, ImportReport, SkippedRow

STYLES_FILE = "styles.csv"
IMAGES_DIR = "images"
ID_COLUMN = "id"
TITLE_COLUMN = "productDisplayName"
#: The ``styles.csv`` header; the title must be last (that is what makes unquoted commas readable).
STYLES_HEADER: tuple[str, ...] = (ID_COLUMN,) + ATTRIBUTE_COLUMNS + (TITLE_COLUMN,)
#: Columns of the frame :func:`parse_styles_csv` returns.
PARSED_COLUMNS: tuple[str, ...] = ("line", "id", "title") + ATTRIBUTE_COLUMNS + ("unquoted_commas", "invalid_year")

__all__ = ["STYLES_HEADER", "ParsedStyles", "parse_styles_csv", "import_kaggle", "styles_notes"]


def _check_header(header: list[str], path: Path) -> list[str]:
    names = [h.strip() for h in header]
    missing = [c for c in STYLES_HEADER if c not in names]
    unknown = [c for c in names if c not in STYLES_HEADER]
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if missing or unknown or duplicated:
        raise CatalogueError(
            f"{path}:1: unexpected header: missing {missing}, unknown {unknown}, duplicated {duplicated}; "
            f"expected the columns {list(STYLES_HEADER)}"
        )
    if names[-1] != TITLE_COLUMN:
        raise CatalogueError(f"{path}:1: '{TITLE_COLUMN}' must be the last column (titles may hold unquoted commas); got {names}")
    return names


class ParsedStyles(NamedTuple):
    """What :func:`parse_styles_csv` read: the usable rows, the skipped ones and the line counts."""

    frame: pd.DataFrame
    skipped: list[SkippedRow]
    lines_read: int  # physical lines after the header
    blank_lines: int


def parse_styles_csv(path: Path) -> ParsedStyles:
    """Parse ``styles.csv`` into one row per usable product and the rows that are not usable.

    One record per physical line: a quoted field cannot span lines, so a line whose quote is
    not closed is skipped (``bad_row``, naming the line and the field) and the lines after it
    are read as usual. The frame has :data:`PARSED_COLUMNS`: ``line`` (1-based line in the
    file), ``id``, ``title``, the attributes (``NA``/empty -> null, ``year`` as nullable int),
    ``unquoted_commas`` (the title was rejoined from extra fields) and ``invalid_year`` (the raw
    year that was not an integer and became null, else None). Skipped: unreadable and short
    lines and empty ids (``bad_row``), empty titles (``empty_title``) and repeated ids
    (``duplicate_id``). Every line after the header is a frame row, a skipped row or blank.
    """
    path = Path(path)
    name = path.name
    records: list[dict] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    lines_read = blank_lines = 0
    try:
        lines = read_lines(path)
        first = next(lines, None)
        if first is None:
            raise CatalogueError(f"{path}: empty file, expected the header {','.join(STYLES_HEADER)}")
        try:
            header = split_csv_line(first.text)
        except LineError as exc:
            raise CatalogueError(f"{path}:1: unreadable header: {exc}") from None
        columns = _check_header(header, path)
        width = len(columns)
        for entry in lines:
            line = entry.number
            lines_read += 1
            if entry.blank:
                blank_lines += 1  # a blank line is not a record
                continue
            source = f"{name}:{line}"
            try:
                fields = split_csv_line(entry.text)
            except LineError as exc:
                hint = entry.text.split(",", 1)[0].strip()
                row_id = hint if hint and '"' not in hint else None
                skipped.append(SkippedRow(source, row_id, f"bad_row: line {line}: {exc}"))
                continue
            row_id = fields[0].strip() or None
            if len(fields) < width:
                skipped.append(SkippedRow(source, row_id, f"bad_row: line {line} has {len(fields)} fields, expected {width}"))
                continue
            unquoted = len(fields) > width
            values = fields[: width - 1] + [",".join(fields[width - 1 :])]
            row = dict(zip(columns, values))
            row_id = row[ID_COLUMN].strip()
            if not row_id or row_id in NULL_MARKERS:
                skipped.append(SkippedRow(source, None, f"bad_row: line {line} has no id"))
                continue
            title = row[TITLE_COLUMN].strip()
            if not title:
                skipped.append(SkippedRow(source, row_id, f"empty_title: line {line} has an empty {TITLE_COLUMN}"))
                continue
            if row_id in seen:
                skipped.append(SkippedRow(source, row_id, f"duplicate_id: id {row_id} already on line {seen[row_id]}"))
                continue
            seen[row_id] = line
            record: dict = {"line": line, "id": row_id, "title": title}
            for col in ATTRIBUTE_COLUMNS:
                value = row[col].strip()
                record[col] = None if value in NULL_MARKERS else value
            year, invalid = parse_year(record["year"])
            record["invalid_year"] = record["year"] if invalid else None
            record["year"] = year
            record["unquoted_commas"] = unquoted
            records.append(record)
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # object columns holding None (as the Catalogue table does), not pandas' NaN-filled strings
    dtypes = {"line": "int64", "year": "Int32", "unquoted_commas": "bool"}
    frame = pd.DataFrame(
        {col: pd.Series([r[col] for r in records], dtype=dtypes.get(col, object)) for col in PARSED_COLUMNS}
    )
    return ParsedStyles(frame, skipped, lines_read, blank_lines)


def styles_notes(frame: pd.DataFrame) -> list[str]:
    """Report notes for what parsing repaired: rejoined titles, years that became null, nulls."""
    notes = []
    comma_ids = frame.loc[frame["unquoted_commas"], "id"].tolist()
    if comma_ids:
        notes.append(
            f"rows_with_unquoted_commas: {len(comma_ids)} (ids {format_ids(comma_ids)}): "
            f"titles read as the rest of the line, commas kept"
        )
    bad_years = frame[frame["invalid_year"].notna()]
    if len(bad_years):
        pairs = [f"{i}={y!r}" for i, y in zip(bad_years["id"], bad_years["invalid_year"])]
        notes.append(f"year_not_integer: {len(bad_years)} rows imported with year null ({format_ids(pairs)})")
    nulls = {col: int(frame[col].isna().sum()) for col in ATTRIBUTE_COLUMNS}
    nulls = {col: n for col, n in nulls.items() if n}
    if nulls:
        shown = ", ".join(f"{col}={n}" for col, n in nulls.items())
        notes.append(f"null_attributes: empty or NA values imported as null ({shown})")
    return notes


def import_kaggle(
    source_dir: Path, out_dir: Path, *, overwrite: bool = False, allow_outside_root: bool = False, progress: bool = True
) -> tuple[Catalogue, ImportReport]:
    """Import a Kaggle-layout catalogue into ``out_dir`` (images copied as ``images/<id>.jpg``).

    Rows whose image is missing are skipped (``missing_image``), and so are rows whose image
    resolves outside ``source_dir`` (``outside_root``: a symlink out, or an ``images/`` that is
    one) unless ``allow_outside_root``. Every skipped row is listed in the report, which is
    also written to ``out_dir/import_report.json``.
    """
    source_dir = Path(source_dir)
    styles = source_dir / STYLES_FILE
    images_dir = source_dir / IMAGES_DIR
    if not styles.is_file():
        raise CatalogueError(f"{source_dir}: not a Kaggle fashion catalogue: no {STYLES_FILE}")
    if not images_dir.is_dir():
        raise CatalogueError(f"{source_dir}: not a Kaggle fashion catalogue: no {IMAGES_DIR}/ directory")
    frame, skipped, lines_read, blank_lines = parse_styles_csv(styles)
    report = ImportReport(
        source=str(source_dir), rows_read=len(frame) + len(skipped), skipped=list(skipped), lines_read=lines_read, blank_lines=blank_lines
    )
    report.notes.extend(styles_notes(frame))
    # One directory listing instead of a stat per row; names never contain "/", so ids can't
    # escape: only a symlink (an entry, or images/ itself) can point outside the source.
    with os.scandir(images_dir) as entries:
        available = {entry.name: entry.is_symlink() for entry in entries if entry.is_file()}
    images_escape = outside_root(images_dir, source_dir) is not None
    outside = 0

    names = NameAllocator()
    with staged_output(out_dir, overwrite=overwrite, inputs=[source_dir]) as staging:
        (staging / IMAGES_DIR).mkdir()
        records, jobs = [], []
        for row in frame.itertuples(index=False):
            file_name = f"{row.id}.jpg"
            if file_name not in available:
                report.skipped.append(
                    SkippedRow(f"{STYLES_FILE}:{row.line}", row.id, f"missing_image: {IMAGES_DIR}/{file_name} not found")
                )
                continue
            if not allow_outside_root and (images_escape or available[file_name]):
                real = outside_root(images_dir / file_name, source_dir)
                if real is not None:
                    outside += 1
                    report.skipped.append(SkippedRow(
                        f"{STYLES_FILE}:{row.line}", row.id, f"outside_root: {IMAGES_DIR}/{file_name} is {real}, outside {source_dir}"
                    ))
                    continue
            target = names.allocate(row.id, ".jpg")
            jobs.append((images_dir / file_name, staging / IMAGES_DIR / target))
            record = {"id": row.id, "image": f"{IMAGES_DIR}/{target}", "title": row.title}
            record.update({col: getattr(row, col) for col in ATTRIBUTE_COLUMNS})
            record["year"] = None if pd.isna(record["year"]) else int(record["year"])
            records.append(record)
        if outside:
            report.notes.append(outside_root_note(outside, source_dir))
        catalogue = finish_import(staging, out_dir, records, jobs, report, desc=f"importing {source_dir.name}", progress=progress)
    return catalogue, report
