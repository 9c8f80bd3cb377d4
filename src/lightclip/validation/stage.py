"""The ``validate`` stage: the suite's verdict, the quarantine file, the Markdown report and the metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightclip.config import ValidateConfig
from lightclip.data.catalogue import CATALOGUE_FILE, Catalogue, CatalogueError, normalise_items, rebase_image_path
from lightclip.io import write_json
from lightclip.stage import StageContext
from lightclip.validation.common import ATTRIBUTE_CHECK, QUARANTINE_FILE, WARNING, value_counts_text
from lightclip.validation.results import ValidationFailed, ValidationResult
from lightclip.validation.suite import validate_catalogue

log = logging.getLogger(__name__)


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
            lines.append(f"| {_md(column)} | {sum(counts.values())} | {_md(value_counts_text(counts))} |")
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
                f"{c.column}: {value_counts_text(result.unseen_values.get(c.column, {}))}" for c in strict
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
