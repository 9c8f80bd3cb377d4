"""What validation finds: each check's result, the catalogue's verdict and the error of a failed run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightclip.errors import LightclipError
from lightclip.validation.common import ERROR, WARNING


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
