"""Importer for the Kaggle "Fashion Product Images" layout: ``styles.csv`` + ``images/<id>.jpg``.

The real ``styles.csv`` is not valid CSV: a few product titles contain commas without quotes.
The title is the last column, so a row with too many fields is read as the first nine fields
plus the rest joined back with ``","``; such rows are counted in the report's notes.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pandas as pd

from lightclip.config import ATTRIBUTE_COLUMNS
from lightclip.data._images import NULL_MARKERS, NameAllocator, finish_import, format_ids, parse_year, staged_output
from lightclip.data.catalogue import Catalogue, CatalogueError, ImportReport, SkippedRow

STYLES_FILE = "styles.csv"
IMAGES_DIR = "images"
ID_COLUMN = "id"
TITLE_COLUMN = "productDisplayName"
#: The ``styles.csv`` header; the title must be last (that is what makes unquoted commas readable).
STYLES_HEADER: tuple[str, ...] = (ID_COLUMN,) + ATTRIBUTE_COLUMNS + (TITLE_COLUMN,)
#: Columns of the frame :func:`parse_styles_csv` returns.
PARSED_COLUMNS: tuple[str, ...] = ("line", "id", "title") + ATTRIBUTE_COLUMNS + ("unquoted_commas", "invalid_year")

__all__ = ["STYLES_HEADER", "parse_styles_csv", "import_kaggle", "styles_notes"]


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


def parse_styles_csv(path: Path) -> tuple[pd.DataFrame, list[SkippedRow]]:
    """Parse ``styles.csv`` into one row per usable product and the rows that are not usable.

    The frame has :data:`PARSED_COLUMNS`: ``line`` (1-based line in the file), ``id``, ``title``,
    the attributes (``NA``/empty -> null, ``year`` as nullable int), ``unquoted_commas`` (the
    title was rejoined from extra fields) and ``invalid_year`` (the raw year that was not an
    integer and became null, else None). Skipped: short rows (``bad_row``), empty ids
    (``bad_row``), empty titles (``empty_title``) and repeated ids (``duplicate_id``).
    """
    path = Path(path)
    name = path.name
    records: list[dict] = []
    skipped: list[SkippedRow] = []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader)
            except StopIteration:
                raise CatalogueError(f"{path}: empty file, expected the header {','.join(STYLES_HEADER)}") from None
            columns = _check_header(header, path)
            width = len(columns)
            last_line = reader.line_num
            for fields in reader:
                line, last_line = last_line + 1, reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # a blank line is not a record
                source = f"{name}:{line}"
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
    except UnicodeDecodeError as exc:
        raise CatalogueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise CatalogueError(f"{path}:{reader.line_num}: unreadable CSV: {exc}") from None
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # object columns holding None (as the Catalogue table does), not pandas' NaN-filled strings
    dtypes = {"line": "int64", "year": "Int32", "unquoted_commas": "bool"}
    frame = pd.DataFrame(
        {col: pd.Series([r[col] for r in records], dtype=dtypes.get(col, object)) for col in PARSED_COLUMNS}
    )
    return frame, skipped


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
    source_dir: Path, out_dir: Path, *, overwrite: bool = False, progress: bool = True
) -> tuple[Catalogue, ImportReport]:
    """Import a Kaggle-layout catalogue into ``out_dir`` (images copied as ``images/<id>.jpg``).

    Rows whose image is missing are skipped (``missing_image``) and listed in the report, which
    is also written to ``out_dir/import_report.json``.
    """
    source_dir = Path(source_dir)
    styles = source_dir / STYLES_FILE
    images_dir = source_dir / IMAGES_DIR
    if not styles.is_file():
        raise CatalogueError(f"{source_dir}: not a Kaggle fashion catalogue: no {STYLES_FILE}")
    if not images_dir.is_dir():
        raise CatalogueError(f"{source_dir}: not a Kaggle fashion catalogue: no {IMAGES_DIR}/ directory")
    frame, skipped = parse_styles_csv(styles)
    report = ImportReport(source=str(source_dir), rows_read=len(frame) + len(skipped), skipped=list(skipped))
    report.notes.extend(styles_notes(frame))
    # One directory listing instead of a stat per row; names never contain "/", so ids can't escape.
    with os.scandir(images_dir) as entries:
        available = {entry.name for entry in entries if entry.is_file()}

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
            target = names.allocate(row.id, ".jpg")
            jobs.append((images_dir / file_name, staging / IMAGES_DIR / target))
            record = {"id": row.id, "image": f"{IMAGES_DIR}/{target}", "title": row.title}
            record.update({col: getattr(row, col) for col in ATTRIBUTE_COLUMNS})
            record["year"] = None if pd.isna(record["year"]) else int(record["year"])
            records.append(record)
        catalogue = finish_import(staging, out_dir, records, jobs, report, desc=f"importing {source_dir.name}", progress=progress)
    return catalogue, report
