"""The ``validate`` stage: one Great Expectations suite over the catalogue and its images.

The catalogue table is extended with derived columns (normalised title, image facts from
:func:`inspect_images`, cross-split flags) and a single GX 1.x suite runs on that frame. Every
expectation carries a stable check name (``meta["check"]``) so results map back to checks,
and the ``COMPLETE`` result format with a ``_row`` index column gives the exact failing rows.

Checks (severity ``error`` unless noted):

=====================  ==========================================  ===========================
check                  GX expectation                              what it means
=====================  ==========================================  ===========================
id_not_null            expect_column_values_to_not_be_null         id is missing or blank
id_unique              expect_column_values_to_be_unique           id used by 2+ rows
title_not_empty        expect_column_values_to_not_be_null         title missing/blank
title_length           expect_column_value_lengths_to_be_between   stripped title too short/long
title_not_placeholder  expect_column_values_to_not_be_in_set       "N/A", "none", "tbd", ...
attribute_in_set:COL   expect_column_values_to_be_in_set           unseen value (non-null only): a WARNING
                                                                   unless validate.unseen_values says otherwise
year_in_range          expect_column_values_to_be_between          year outside the bounds
catalogue_not_empty    (none: checked before the suite runs)       the catalogue has no rows
image_exists           expect_column_values_to_be_in_set           image file missing
image_too_large        expect_column_values_to_be_in_set           width x height > max_image_pixels
image_decodes          expect_column_values_to_be_in_set           PIL cannot decode the file
image_min_size         expect_column_values_to_be_between          shorter side too small
image_duplicate        expect_column_values_to_be_unique           WARNING: same bytes, same split
split_value            expect_column_values_to_be_in_set           split not null/train/val/test
cross_split_id         expect_column_values_to_be_in_set           id in two different splits
cross_split_image      expect_column_values_to_be_in_set           same bytes in two splits
=====================  ==========================================  ===========================

Only the first failing image check fires for a row (a missing file is not also reported as
undecodable or too small; an undecodable one not as too small; a too large one is never
decoded: its size comes from the header), and an empty title is not also reported as too short
or a placeholder, so each row's reasons stay readable. An empty catalogue fails: there is
nothing to validate, and nothing downstream could use it; so does a quarantine that leaves no
clean row.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig
from tqdm.auto import tqdm

from lightclip.config import MAX_IMAGE_PIXELS, ValidateConfig
from lightclip.data.catalogue import CATALOGUE_FILE, SPLITS, Catalogue, CatalogueError, normalise_items, rebase_image_path
from lightclip.data.geometry import aspect_summary
from lightclip.data.imagefile import ImageTooLarge, open_image
from lightclip.data.split import normalise_title
from lightclip.errors import LightclipError
from lightclip.io import write_json
from lightclip.stage import StageContext

log = logging.getLogger(__name__)

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


def _value_counts(counts: dict[str, int], limit: int = MAX_EXAMPLES) -> str:
    """``'Lime Green' x1, 'Teal Blue' x3`` (the most frequent first), ``...`` past ``limit`` values."""
    shown = [f"{value!r} x{count}" for value, count in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(shown) + (f", ... ({more} more value(s))" if more > 0 else "")


def _value(v: Any) -> Any:
    """``None`` for any null (None, NaN, NA: pandas 3 can hand back NaN in object columns)."""
    try:
        return None if v is None or pd.isna(v) else v
    except (TypeError, ValueError):  # array-likes
        return v


# --------------------------------------------------------------------------------------------
# Image inspection
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check (one GX expectation)."""

    name: str
    expectation: str
    column: str
    severity: str
    success: bool
    unexpected_count: int
    example_ids: list[str]
    rows: list[int]  # positions in the catalogue's items
    error: str | None = None  # set when GX could not evaluate the expectation
    details: list[str] = field(default_factory=list)  # what is wrong, for the first rows (or the table)

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.name} ({self.expectation}): could not be evaluated: {self.error}"
        if not self.rows and self.details:  # a check on the whole table
            return f"{self.name}: " + "; ".join(self.details)
        text = f"{self.name} ({self.expectation}): {self.unexpected_count} row(s), e.g. ids {self.example_ids!r}"
        return text + (" (" + "; ".join(self.details) + ")" if self.details else "")


@dataclass
class ValidationResult:
    """Every check's outcome, and per row the error-level checks (``reasons``) it failed."""

    rows_in: int
    checks: list[CheckResult]
    reasons: list[list[str]]  # per row: failed error-level checks (these rows are quarantined)
    row_warnings: list[list[str]] = field(default_factory=list)  # per row: warning-level checks
    row_details: dict[int, dict[str, str]] = field(default_factory=dict)  # row -> check -> what is wrong
    unseen_values: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> value outside allowed_values -> rows
    geometry: dict[str, Any] = field(default_factory=dict)  # the images' aspect-ratio summary (lightclip.data.geometry)

    @property
    def warned_rows(self) -> list[int]:
        """Rows kept with at least one warning (and no error-level failure)."""
        return [i for i, (bad, warned) in enumerate(zip(self.reasons, self.row_warnings)) if warned and not bad]

    def rows_by_reason(self, rows: list[int]) -> dict[str, int]:
        """Per error-level check, how many of ``rows`` failed it (a row may count under several)."""
        counts: dict[str, int] = {}
        for r in rows:
            for name in self.reasons[r]:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def reason_text(self, row: int) -> str:
        """The row's failed checks for ``quarantine.csv``: ``check`` or ``check: detail``, ``;``-joined."""
        details = self.row_details.get(row, {})
        return ";".join(f"{name}: {details[name]}" if name in details else name for name in self.reasons[row])

    @property
    def failed(self) -> list[CheckResult]:
        """Failed error-level checks."""
        return [c for c in self.checks if not c.success and c.severity == ERROR]

    @property
    def warnings(self) -> list[CheckResult]:
        """Failed warning-level checks (reported, never quarantined)."""
        return [c for c in self.checks if not c.success and c.severity == WARNING]

    @property
    def success(self) -> bool:
        return not self.failed

    @property
    def bad_rows(self) -> list[int]:
        return [i for i, reasons in enumerate(self.reasons) if reasons]

    @property
    def clean_rows(self) -> list[int]:
        return [i for i, reasons in enumerate(self.reasons) if not reasons]

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    def message(self) -> str:
        failed = self.failed
        lines = [f"validation failed: {len(failed)} check(s)"]
        lines.extend(f"  {c.describe()}" for c in failed)
        return "\n".join(lines)


class ValidationFailed(LightclipError):
    """Error-level checks failed; the message names each one with its count and example ids."""

    def __init__(self, message: str, result: ValidationResult | None = None, summary: "ValidationSummary | None" = None):
        super().__init__(message)
        self.result = result
        self.summary = summary


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def build_frame(catalogue: Catalogue, config: ValidateConfig, images: pd.DataFrame) -> pd.DataFrame:
    """The frame the suite runs on: items + derived columns (see the module docstring)."""
    items = normalise_items(catalogue.items).reset_index(drop=True)
    n = len(items)
    frame = items.copy()
    frame.insert(0, ROW_COLUMN, range(n))

    def obj(values) -> pd.Series:
        return pd.Series(list(values), index=frame.index, dtype=object)

    ids = [_value(v) for v in items["id"]]
    frame["id"] = obj(None if v is None or not str(v).strip() else v for v in ids)
    frame["year"] = pd.to_numeric(items["year"]).astype("float64")  # NaN for null: GX skips it

    title_text = [None if _value(t) is None else (str(t).strip() or None) for t in items["title"]]
    title_norm = [normalise_title(t) for t in title_text]
    placeholders = {p for p in (normalise_title(p) for p in config.placeholder_titles) if p}
    frame["title_text"] = obj(title_text)
    frame["title_norm"] = obj(title_norm)
    # length is judged only for real titles: a placeholder or empty title has its own check
    frame["title_length_text"] = obj(None if norm in placeholders else text for text, norm in zip(title_text, title_norm))

    exists = images["image_exists"].astype(bool).tolist()
    decodes = images["image_decodes"].tolist()
    frame["image_exists"] = pd.Series(exists, index=frame.index, dtype=bool)
    frame["image_too_large"] = obj(t if e else None for e, t in zip(exists, images["image_too_large"].tolist()))
    frame["image_decodes"] = obj(d if e else None for e, d in zip(exists, decodes))
    min_side = [float(s) if (d is True and not pd.isna(s)) else float("nan") for d, s in zip(decodes, images["image_min_side"])]
    frame["image_min_side"] = pd.Series(min_side, index=frame.index, dtype="float64")
    frame["image_width"] = images["image_width"].astype("float64").to_numpy()
    frame["image_height"] = images["image_height"].astype("float64").to_numpy()
    hashes = [None if _value(h) is None else str(h) for h in images["image_sha256"]]
    frame["image_sha256"] = obj(hashes)
    splits = [_value(v) for v in items["split"]]
    # duplicates only count within one split value (no split counts as one value too)
    frame["image_split_key"] = obj(None if h is None else f"{s or ''}|{h}" for h, s in zip(hashes, splits))

    def cross_split(keys: list[Any]) -> list[bool]:
        seen: dict[Any, set[str]] = {}
        for key, split in zip(keys, splits):
            if key is not None and split is not None:
                seen.setdefault(key, set()).add(split)
        return [key is not None and split is not None and len(seen.get(key, ())) > 1 for key, split in zip(keys, splits)]

    frame["cross_split_id"] = pd.Series(cross_split(frame["id"].tolist()), index=frame.index, dtype=bool)
    frame["cross_split_image"] = pd.Series(cross_split(hashes), index=frame.index, dtype=bool)
    return frame


def _suite_spec(config: ValidateConfig) -> list[tuple[str, str, dict[str, Any], str]]:
    """(check name, GX expectation class, kwargs, severity) for every check, in report order."""
    placeholders = sorted({p for p in (normalise_title(p) for p in config.placeholder_titles) if p})
    spec: list[tuple[str, str, dict[str, Any], str]] = [
        ("id_not_null", "ExpectColumnValuesToNotBeNull", {"column": "id"}, ERROR),
        ("id_unique", "ExpectColumnValuesToBeUnique", {"column": "id"}, ERROR),
        ("title_not_empty", "ExpectColumnValuesToNotBeNull", {"column": "title_text"}, ERROR),
        (
            "title_length",
            "ExpectColumnValueLengthsToBeBetween",
            {"column": "title_length_text", "min_value": config.title_min_chars, "max_value": config.title_max_chars},
            ERROR,
        ),
    ]
    if placeholders:
        spec.append(("title_not_placeholder", "ExpectColumnValuesToNotBeInSet", {"column": "title_norm", "value_set": placeholders}, ERROR))
    for column, allowed in config.allowed_values.items():
        values: list[Any] = list(allowed)
        if column == "year":
            values = [float(v) for v in allowed if str(v).strip().lstrip("-").isdigit()]
        severity = WARNING if config.unseen_values == "warn" else ERROR  # a growing taxonomy: counted, kept
        spec.append((f"{ATTRIBUTE_CHECK}{column}", "ExpectColumnValuesToBeInSet", {"column": column, "value_set": values}, severity))
    spec += [
        ("year_in_range", "ExpectColumnValuesToBeBetween", {"column": "year", "min_value": config.year_min, "max_value": config.year_max}, ERROR),
        ("image_exists", "ExpectColumnValuesToBeInSet", {"column": "image_exists", "value_set": [True]}, ERROR),
        ("image_too_large", "ExpectColumnValuesToBeInSet", {"column": "image_too_large", "value_set": [False]}, ERROR),
        ("image_decodes", "ExpectColumnValuesToBeInSet", {"column": "image_decodes", "value_set": [True]}, ERROR),
        ("image_min_size", "ExpectColumnValuesToBeBetween", {"column": "image_min_side", "min_value": config.min_image_side}, ERROR),
        ("image_duplicate", "ExpectColumnValuesToBeUnique", {"column": "image_split_key"}, WARNING),
        ("split_value", "ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)}, ERROR),
        ("cross_split_id", "ExpectColumnValuesToBeInSet", {"column": "cross_split_id", "value_set": [False]}, ERROR),
        ("cross_split_image", "ExpectColumnValuesToBeInSet", {"column": "cross_split_image", "value_set": [False]}, ERROR),
    ]
    return spec


def _exception_message(result: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    info = getattr(result, "exception_info", None) or {}
    candidates = [info] + [v for v in info.values() if isinstance(v, dict)] if isinstance(info, dict) else []
    for entry in candidates:
        if entry.get("raised_exception"):
            message = str(entry.get("exception_message") or "unknown error").strip().splitlines()
            return message[-1] if message else "unknown error"
    return None


def _run_suite(frame: pd.DataFrame, spec: list[tuple[str, str, dict[str, Any], str]]) -> dict[str, Any]:
    """Run the suite on ``frame`` in an ephemeral GX context; results keyed by check name."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_definition = (
        context.data_sources.add_pandas(name="lightclip").add_dataframe_asset(name="catalogue").add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="lightclip_catalogue"))
    for name, cls_name, kwargs, severity in spec:
        expectation = getattr(gx.expectations, cls_name)(**kwargs)
        expectation.meta = {"check": name, "severity": severity}
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="lightclip_validate", data=batch_definition, suite=suite))
    outcome = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_COLUMN]},
    )
    return {r.expectation_config.meta["check"]: r for r in outcome.results}


def validate_catalogue(catalogue: Catalogue, config: ValidateConfig, *, progress: bool = True) -> ValidationResult:
    """Run the whole suite on ``catalogue`` (and its images); never raises for bad data."""
    images = inspect_images(catalogue, max_pixels=config.max_image_pixels, progress=progress)
    frame = build_frame(catalogue, config, images)
    n = len(frame)
    spec = _suite_spec(config)
    raw = _run_suite(frame, spec) if n else {}
    ids = frame["id"].tolist()
    reasons: list[list[str]] = [[] for _ in range(n)]
    row_warnings: list[list[str]] = [[] for _ in range(n)]
    checks: list[CheckResult] = []
    if n == 0:
        checks.append(CheckResult(
            "catalogue_not_empty", "expect_table_row_count_to_be_between", "*", ERROR, False, 0, [], [],
            details=[f"{catalogue.table_path} has no rows: nothing to validate (an import that skipped every row? see its import_report.json)"],
        ))
    row_details: dict[int, dict[str, str]] = {}
    unseen: dict[str, dict[str, int]] = {}
    for name, cls_name, kwargs, severity in spec:
        expectation_type = re.sub(r"(?<!^)(?=[A-Z])", "_", cls_name).lower()
        result = raw.get(name)
        if result is None:  # empty catalogue: nothing to check
            checks.append(CheckResult(name, expectation_type, kwargs["column"], severity, True, 0, [], []))
            continue
        expectation_type = result.expectation_config.type
        error = _exception_message(result)
        details = result.result or {}
        rows = sorted({int(entry[ROW_COLUMN]) for entry in details.get("unexpected_index_list") or [] if isinstance(entry, dict)})
        count = int(details.get("unexpected_count") or len(rows))
        examples = [str(ids[r]) if ids[r] is not None else f"<row {r}>" for r in rows[:MAX_EXAMPLES]]
        success = bool(result.success) and error is None
        details = []
        if name == "image_too_large":
            for r in rows:
                size = f"{int(frame.at[r, 'image_width'])}x{int(frame.at[r, 'image_height'])} > {config.max_image_pixels} pixels"
                row_details.setdefault(r, {})[name] = size
            details = [f"{ids[r]}: {row_details[r][name]}" for r in rows[:3]] + ["the limit is validate.max_image_pixels"] if rows else []
        elif name.startswith(ATTRIBUTE_CHECK) and rows:
            column = kwargs["column"]
            counts: dict[str, int] = {}
            for r in rows:
                value = str(frame.at[r, column])
                counts[value] = counts.get(value, 0) + 1
                row_details.setdefault(r, {})[name] = repr(value)
            unseen[column] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            details = [_value_counts(unseen[column])]
        elif name == "title_not_placeholder":
            for r in rows:
                row_details.setdefault(r, {})[name] = repr(frame.at[r, "title_text"])
        checks.append(CheckResult(name, expectation_type, kwargs["column"], severity, success, count, examples, rows, error, details))
        target = reasons if severity == ERROR else row_warnings
        for r in rows:
            target[r].append(name)
    # sizes from the decode above (or the header of a too large image): nothing is read twice
    sizes = [None if pd.isna(w) or pd.isna(h) else (int(w), int(h)) for w, h in zip(images["image_width"], images["image_height"])]
    return ValidationResult(rows_in=n, checks=checks, reasons=reasons, row_warnings=row_warnings, row_details=row_details,
                            unseen_values=unseen, geometry=aspect_summary(sizes))


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass
class ValidationSummary:
    """What the stage did: counts, failed checks and warnings, and the files it wrote."""

    mode: str
    passed: bool  # no error-level check failed
    rows_in: int
    rows_out: int  # rows in the written catalogue (0 when none was written)
    rows_quarantined: int  # rows written to quarantine.csv
    rows_bad: int  # rows failing at least one error-level check
    checks_failed: list[str]
    warnings: list[str]
    report_path: Path
    metrics_path: Path
    catalogue_dir: Path | None = None
    quarantine_path: Path | None = None
    result: ValidationResult | None = field(default=None, repr=False)
    rows_warned: int = 0  # rows written with at least one warning (an unseen value, a duplicate image)
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)  # check -> quarantined rows failing it

    @property
    def rows_ok(self) -> int:
        """Rows written without any warning."""
        return self.rows_out - self.rows_warned

    def metrics(self) -> dict[str, Any]:
        checks = self.result.checks if self.result else []
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_ok": self.rows_ok,
            "rows_warned": self.rows_warned,
            "rows_quarantined": self.rows_quarantined,
            "rows_bad": self.rows_bad,
            "checks_failed": len(self.checks_failed),
            "warnings": len(self.warnings),
            "unexpected": {c.name: c.unexpected_count for c in checks},
            "quarantined_by_reason": dict(self.quarantined_by_reason),
            "unseen_values": self.result.unseen_values if self.result else {},
            "geometry": self.result.geometry if self.result else {},
        }

    def counts_line(self) -> str:
        """One line: rows of each kind (ok, warned, quarantined by reason)."""
        text = f"{self.rows_in} rows in: {self.rows_ok} ok, {self.rows_warned} kept with warnings, {self.rows_quarantined} quarantined"
        if self.quarantined_by_reason:
            text += " (" + ", ".join(f"{name}: {count}" for name, count in self.quarantined_by_reason.items()) + ")"
        return text


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_report(summary: ValidationSummary) -> str:
    """The Markdown report: counts, one table row per check, the warnings."""
    result = summary.result
    status = "PASSED" if summary.passed else ("QUARANTINED" if summary.catalogue_dir is not None else "FAILED")
    lines = [
        "# Catalogue validation",
        "",
        f"- result: **{status}** (mode `{summary.mode}`)",
        f"- rows in: {summary.rows_in}",
        f"- rows out: {summary.rows_out} ({summary.rows_ok} ok, {summary.rows_warned} with warnings)",
        f"- rows quarantined: {summary.rows_quarantined}"
        + (" (" + ", ".join(f"{_md(k)}: {v}" for k, v in summary.quarantined_by_reason.items()) + ")" if summary.quarantined_by_reason else ""),
        f"- rows failing an error-level check: {summary.rows_bad}",
        f"- checks failed: {len(summary.checks_failed)}" + (f" ({', '.join(summary.checks_failed)})" if summary.checks_failed else ""),
        f"- warnings: {len(summary.warnings)}" + (f" ({', '.join(summary.warnings)})" if summary.warnings else ""),
        "",
        "## Checks",
        "",
        "| check | expectation | column | severity | status | unexpected | example ids |",
        "|---|---|---|---|---|---:|---|",
    ]
    for c in result.checks if result else []:
        state = "ok" if c.success else ("WARN" if c.severity == WARNING else "FAIL")
        examples = c.error or ", ".join(c.example_ids) or "; ".join(c.details)
        lines.append(f"| {_md(c.name)} | {c.expectation} | {_md(c.column)} | {c.severity} | {state} | {c.unexpected_count} | {_md(examples)} |")
    lines += ["", "## Attribute values outside validate.allowed_values", ""]
    unseen = result.unseen_values if result else {}
    if unseen:
        lines += ["| column | rows | values |", "|---|---:|---|"]
        for column, counts in unseen.items():
            lines.append(f"| {_md(column)} | {sum(counts.values())} | {_md(_value_counts(counts))} |")
        lines += ["", "Add the values to `validate.allowed_values` once they are part of the taxonomy."]
    else:
        lines.append("None.")
    geometry = result.geometry if result else {}
    lines += ["", "## Image geometry", ""]
    if geometry.get("images"):
        lines += ["| aspect ratio (width / height) | images | share |", "|---|---:|---:|"]
        for name, count in geometry["buckets"].items():
            lines.append(f"| {name} | {count} | {100 * geometry['shares'][name]:.1f}% |")
        lines += ["", f"Most common size: {geometry['most_common_size']}; without a readable size: {geometry['unknown']}."]
    else:
        lines.append("No readable image sizes.")
    lines += ["", "## Warnings", ""]
    warned = result.warnings if result else []
    if warned:
        for c in warned:
            lines.append(f"- {_md(c.describe())}")
        lines.append("")
        lines.append("Warnings are reported only: those rows are kept.")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _write_quarantine(catalogue: Catalogue, result: ValidationResult, rows: list[int], out_dir: Path) -> Path:
    items = normalise_items(catalogue.items).iloc[rows].reset_index(drop=True)
    if catalogue.root.resolve() != out_dir.resolve():
        items["image"] = [rebase_image_path(p, catalogue.root, out_dir) if isinstance(p, str) else None for p in items["image"]]
    items["reasons"] = [result.reason_text(r) for r in rows]
    path = out_dir / QUARANTINE_FILE
    items.to_csv(path, index=False, lineterminator="\n")
    return path


def _clear_stale_outputs(out_dir: Path, keep: set[str]) -> str | None:
    """Remove a stale catalogue from ``out_dir`` if the folder holds only our outputs.

    Returns a note when a catalogue had to be left in place.
    """
    table = out_dir / CATALOGUE_FILE
    if not table.exists():
        return None
    ours = [p for p in out_dir.iterdir() if p.name in (CATALOGUE_FILE, QUARANTINE_FILE) or _is_table_temp(p.name)]
    others = sorted(p.name for p in out_dir.iterdir() if p not in ours and p.name not in keep)
    if others:
        return f"a stale {table} was left in place because {out_dir} also holds other files ({others[:5]}): remove it by hand"
    for path in ours:
        path.unlink(missing_ok=True)
    return None


def _is_table_temp(name: str) -> bool:
    """A temporary file of an interrupted catalogue write (``catalogue.parquet.<pid>.tmp``)."""
    return name.startswith(CATALOGUE_FILE + ".") and name.endswith(".tmp")


@dataclass(frozen=True)
class ValidateInputs:
    catalogue: Path  # the raw catalogue (data/raw)


@dataclass(frozen=True)
class ValidateOutputs:
    catalogue: Path  # the clean catalogue (data/validated), with quarantine.csv beside it
    report: Path  # reports/validation.md
    metrics: Path  # metrics/validate.json

    @property
    def quarantine(self) -> Path:
        return self.catalogue / QUARANTINE_FILE


def run_validation(config: ValidateConfig, inputs: ValidateInputs, outputs: ValidateOutputs, context: StageContext) -> ValidationSummary:
    """The ``validate`` stage: validate the input catalogue and write the clean one.

    Always writes the report (Markdown) and the metrics (JSON). With ``on_error: fail`` any
    failed error-level check raises :class:`ValidationFailed` after the report is written, and
    the output folder is left without a catalogue. With ``on_error: quarantine`` the clean rows
    are written as the catalogue and the bad ones, with a ``reasons`` column, to
    ``quarantine.csv`` beside it (header only when there are none). Image paths are rebased so
    the written catalogue points at the original images. An empty input fails in either mode,
    and so does a quarantine of every row (``quarantine.csv`` is written, no catalogue) or of
    more than ``max_quarantine_fraction`` of them. Attribute values outside ``allowed_values``
    are warnings with ``unseen_values: warn`` (the rows are kept and counted per column), row
    errors with ``quarantine``, and fail the stage naming column and values with ``fail``.
    """
    in_dir, out_dir, report_path, metrics_path = Path(inputs.catalogue), Path(outputs.catalogue), Path(outputs.report), Path(outputs.metrics)
    progress = context.progress
    if in_dir.resolve() == out_dir.resolve():
        raise CatalogueError(f"{out_dir}: the validated catalogue must go to a different folder than its input")
    catalogue = Catalogue.load(in_dir)
    result = validate_catalogue(catalogue, config, progress=progress)
    mode = config.on_error
    bad = result.bad_rows
    unattributed = [c for c in result.failed if not c.rows]  # failed but no row to blame (GX error, empty table)
    # strict taxonomy: an unseen value is a decision about the taxonomy, not a row to drop
    strict = [c for c in result.failed if c.name.startswith(ATTRIBUTE_CHECK)] if config.unseen_values == "fail" else []
    clean = result.clean_rows
    too_many = mode == "quarantine" and result.rows_in > 0 and bool(clean) and len(bad) / result.rows_in > config.max_quarantine_fraction
    blocked = bool(unattributed or strict or too_many)
    write_catalogue = (result.success or (mode == "quarantine" and not blocked)) and bool(clean)
    # quarantine that would leave an empty catalogue: write the quarantine (the reasons), fail
    quarantine_only = mode == "quarantine" and not unattributed and not strict and not clean and bool(bad)
    summary = ValidationSummary(
        mode=mode,
        passed=result.success,
        rows_in=result.rows_in,
        rows_out=0,
        rows_quarantined=0,
        rows_bad=len(bad),
        checks_failed=[c.name for c in result.failed],
        warnings=[c.name for c in result.warnings],
        report_path=report_path,
        metrics_path=metrics_path,
        result=result,
    )
    note = None
    if write_catalogue:
        out_dir.mkdir(parents=True, exist_ok=True)
        Catalogue(root=catalogue.root, items=catalogue.items.iloc[clean].reset_index(drop=True)).save(out_dir)
        summary.quarantine_path = _write_quarantine(catalogue, result, bad, out_dir)
        summary.catalogue_dir = out_dir
        summary.rows_out, summary.rows_quarantined = len(clean), len(bad)
        summary.rows_warned = len(result.warned_rows)
        summary.quarantined_by_reason = result.rows_by_reason(bad)
    else:
        if out_dir.is_dir():
            keep = {p.name for p in (report_path, metrics_path) if p.parent.resolve() == out_dir.resolve()}
            note = _clear_stale_outputs(out_dir, keep)
        if quarantine_only:
            out_dir.mkdir(parents=True, exist_ok=True)
            summary.quarantine_path = _write_quarantine(catalogue, result, bad, out_dir)
            summary.rows_quarantined = len(bad)
            summary.quarantined_by_reason = result.rows_by_reason(bad)

    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(render_report(summary), encoding="utf-8")
    write_json(metrics_path, summary.metrics(), sort_keys=False)

    for c in result.warnings:
        log.warning("validation warning: %s", c.describe())
    if not write_catalogue:
        message = result.message()
        if strict:
            message += "\n  validate.unseen_values is fail: " + "; ".join(
                f"{c.column}: {_value_counts(result.unseen_values.get(c.column, {}))}" for c in strict
            ) + " (add them to validate.allowed_values, or set unseen_values: warn)"
        elif too_many:
            message += (
                f"\n  {len(bad)} of {result.rows_in} rows ({len(bad) / result.rows_in:.1%}) would be quarantined, more than "
                f"validate.max_quarantine_fraction {config.max_quarantine_fraction:g}: no catalogue written"
            )
        if quarantine_only:
            message += f"\n  every one of the {len(bad)} rows failed a check: no catalogue written; reasons in {summary.quarantine_path}"
        elif unattributed and mode == "quarantine" and result.rows_in:
            message += "\n  (quarantine impossible: these checks could not name their rows)"
        if note:
            message += f"\n  note: {note}"
        message += f"\n  report: {report_path}"
        raise ValidationFailed(message, result=result, summary=summary)
    if not result.success:
        # the catalogue was written: say "quarantined", not "failed", above the stage's own "passed" line
        details = result.message().split("\n", 1)[1]
        log.warning("quarantined %d row(s) to %s (%d check(s) failed):\n%s", len(bad), summary.quarantine_path, len(result.failed), details)
    return summary
