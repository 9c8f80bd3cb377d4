"""The Markdown report each flow run ends with, and the MLflow tags that tie it to its flow run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lightclip.orchestration.common import EVAL_METRICS_FILE, REGISTER_METRICS_FILE
from lightclip.orchestration.inputs import flow_yaml
from lightclip.tracking import flatten


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def registrations(register: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model the ``register`` stage registered (teacher first), from its report.

    The report is ``lightclip.registry.run_register``'s: ``teacher`` and ``students`` (name ->
    registered model, version, gate verdict and reasons, whether it got ``@staging``).
    """
    rows = []
    teacher = register.get("teacher")
    if isinstance(teacher, dict):
        rows.append({"name": "teacher", **teacher})
    students = register.get("students")
    for name, entry in (students.items() if isinstance(students, dict) else []):
        if isinstance(entry, dict):
            rows.append({"name": name, **entry})
    return rows


@dataclass
class RetrainReport:
    """What one flow run did; rendered as the run's Markdown artifact and returned by the flow."""

    status: str  # "up to date" | "retrained" | "failed"
    message: str
    project: str
    stages: list[str] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    failed_stage: str | None = None
    changes: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    mlflow_run_id: str | None = None
    mlflow_experiment: str | None = None
    prefect_flow_run_id: str | None = None
    dvc_experiment: str | None = None
    workspace: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    register: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def model_version(self) -> str | None:
        """The student versions this run registered (``lightclip-student v4 (xt), v5 (xxt)``)."""
        students = [r for r in registrations(self.register or {}) if r.get("role") != "teacher" and r["name"] != "teacher" and "version" in r]
        if not students:
            return None
        name = (self.register or {}).get("model_name") or students[0].get("registered_model", "")
        return f"{name} " + ", ".join(f"v{r['version']} ({r['name']})" for r in students)

    @property
    def gate_verdict(self) -> str | None:
        """The promotion gate per student, with its reasons, and where ``@staging`` went."""
        parts = []
        for row in registrations(self.register or {}):
            if row.get("gate") is not None:
                reasons = row.get("reasons") or []
                parts.append(f"{row['name']}: {row['gate']}" + (f" ({'; '.join(map(str, reasons))})" if reasons else ""))
        if not parts:
            return None
        register = self.register or {}
        if "staging_after" in register:
            before, after = register.get("staging_before"), register.get("staging_after")
            parts.append(f"@staging: {'v' + str(before) if before else 'none'} -> {'v' + str(after) if after else 'none'}")
        return "; ".join(parts)

    def markdown(self) -> str:
        title = {"up to date": "up to date", "retrained": "retrained", "failed": f"FAILED at stage `{self.failed_stage}`" if self.failed_stage else "FAILED"}
        out = [f"# Retraining: {title.get(self.status, self.status)}", "", self.message.strip(), ""]
        rows: list[tuple[str, str]] = [("project", f"`{self.project}`")]
        if self.workspace:
            rows.append(("workspace", f"`{self.workspace}` (a git worktree of the project, removed after the run)"))
        if self.mlflow_run_id:
            rows.append(("MLflow parent run", f"`{self.mlflow_run_id}` (experiment `{self.mlflow_experiment}`)"))
        if self.model_version:
            rows.append(("model version", f"`{self.model_version}`"))
        if self.gate_verdict:
            rows.append(("promotion gate", self.gate_verdict))
        aliases = (self.register or {}).get("aliases")
        if isinstance(aliases, dict) and aliases:
            rows.append(("aliases", ", ".join(f"@{a} = v{v}" for a, v in sorted(aliases.items()))))
        if self.dvc_experiment:
            rows.append(("DVC experiment", f"`{self.dvc_experiment}` (`dvc exp show`)"))
        if self.data_hash:
            rows.append(("data (data.dvc md5)", f"`{self.data_hash}`"))
        if self.overrides:
            rows.append(("params overrides", ", ".join(f"`{k}={flow_yaml(v)}`" for k, v in self.overrides.items())))
        if self.stages:
            ran = set(self.stages_run)
            rows.append(("stages", ", ".join(f"**{s}**" if s in ran else s for s in self.stages) + " (bold: ran)"))
        out += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
        if self.changes and self.status != "up to date":
            out += ["## What changed", "", "```", self.changes, "```", ""]
        if self.metrics:
            models = list(self.metrics)
            names: list[str] = []
            for values in self.metrics.values():
                names += [n for n in values if n not in names]
            out += [f"## Metrics ({EVAL_METRICS_FILE})", "", "| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
            for name in names:
                cells = [self.metrics[m].get(name) for m in models]
                out.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.4g}" for c in cells) + " |")
            out.append("")
        rows_registered = registrations(self.register or {})
        if rows_registered:
            out += [f"## Registration ({REGISTER_METRICS_FILE})", "", "| model | registered | gate | reasons | @staging |", "|---|---|---|---|---|"]
            for row in rows_registered:
                reasons = "; ".join(map(str, row.get("reasons") or [])).replace("|", "/")
                staged = "yes" if row.get("staged") else ""
                out.append(f"| {row['name']} | `{row.get('registered_model', '?')}` v{row.get('version', '?')} | {row.get('gate', '')} | {reasons} | {staged} |")
            out.append("")
        elif self.register:
            out += [f"## Registration ({REGISTER_METRICS_FILE})", "", "| key | value |", "|---|---|"]
            out += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in flatten(self.register).items()]
            out.append("")
        return "\n".join(out)


def report_metrics(project: Path) -> dict[str, dict[str, float]]:
    """Retrieval metrics per model from ``metrics/eval.json``, timings left out."""
    data = read_json(Path(project) / EVAL_METRICS_FILE)
    if not isinstance(data, dict):
        return {}
    metrics: dict[str, dict[str, float]] = {}
    for model, values in data.items():
        if isinstance(values, dict):
            numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("timing/")}
            if numbers:
                metrics[model] = numbers
    return metrics


def read_register(project: Path) -> dict[str, Any] | None:
    """What the ``register`` stage wrote (version, gate verdict and reasons, aliases), if it ran."""
    data = read_json(Path(project) / REGISTER_METRICS_FILE)
    return data if isinstance(data, dict) else None
