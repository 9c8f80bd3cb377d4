"""The Great Expectations suite: one frame of the catalogue and its images, the checks from the config, their results."""

from __future__ import annotations

import re
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from lightclip.config import ValidateConfig
from lightclip.data.catalogue import SPLITS, Catalogue, normalise_items
from lightclip.data.geometry import aspect_summary
from lightclip.data.split import normalise_title
from lightclip.validation.common import ATTRIBUTE_CHECK, ERROR, MAX_EXAMPLES, ROW_COLUMN, WARNING, plain_value, value_counts_text
from lightclip.validation.images import inspect_images
from lightclip.validation.results import CheckResult, ValidationResult


def build_frame(catalogue: Catalogue, config: ValidateConfig, images: pd.DataFrame) -> pd.DataFrame:
    """The frame the suite runs on: items + derived columns (see the module docstring)."""
    items = normalise_items(catalogue.items).reset_index(drop=True)
    n = len(items)
    frame = items.copy()
    frame.insert(0, ROW_COLUMN, range(n))

    def obj(values) -> pd.Series:
        return pd.Series(list(values), index=frame.index, dtype=object)

    ids = [plain_value(v) for v in items["id"]]
    frame["id"] = obj(None if v is None or not str(v).strip() else v for v in ids)
    frame["year"] = pd.to_numeric(items["year"]).astype("float64")  # NaN for null: GX skips it

    title_text = [None if plain_value(t) is None else (str(t).strip() or None) for t in items["title"]]
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
    hashes = [None if plain_value(h) is None else str(h) for h in images["image_sha256"]]
    frame["image_sha256"] = obj(hashes)
    splits = [plain_value(v) for v in items["split"]]
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
            details = [value_counts_text(unseen[column])]
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
