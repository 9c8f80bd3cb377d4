"""The one module that talks to MLflow.

Every stage run is an MLflow run in the pipeline's experiment, nested under the pipeline's parent
run when one is open (``LIGHTCLIP_PARENT_RUN_ID``, exported by :func:`pipeline_run` to the
processes it starts, e.g. ``dvc repro``), and tagged with its lineage: git commit and dirty flag,
the DVC hash of the tracked data, the stage name, ``DVC_EXP_NAME`` and its params.

The default store is the project's ``mlflow/mlflow.db`` (SQLite, as an absolute URI, so that
``dvc exp run --temp`` copies under ``.dvc/tmp/exps`` log into the same database) with artifacts
beside it; ``MLFLOW_TRACKING_URI`` overrides it (a shared server).
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping

import yaml

PARENT_RUN_ENV = "LIGHTCLIP_PARENT_RUN_ID"
TAG_PREFIX = "lightclip."
DATA_DVC_FILE = "data.dvc"


def project_root(start: Path | str | None = None) -> Path:
    """The project directory: the nearest parent holding ``params.yaml`` and ``dvc.yaml``.

    A DVC temporary experiment workspace (``<repo>/.dvc/tmp/exps/...``) maps back to the repo, so
    all experiments share one tracking store.
    """
    path = Path(start or Path.cwd()).resolve()
    parts = path.parts
    if ".dvc" in parts:
        index = parts.index(".dvc")
        if parts[index + 1 : index + 3] == ("tmp", "exps"):
            return Path(*parts[:index])
    for candidate in (path, *path.parents):
        if (candidate / "params.yaml").is_file() and (candidate / "dvc.yaml").is_file():
            return candidate
    return path


def default_tracking_uri(project_dir: Path) -> str:
    return f"sqlite:///{(Path(project_dir).resolve() / 'mlflow' / 'mlflow.db').as_posix()}"


def default_artifact_location(project_dir: Path) -> str:
    return (Path(project_dir).resolve() / "mlflow" / "artifacts").as_uri()


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: tracking URI, experiment name and the default artifact root."""

    uri: str
    experiment: str
    artifact_location: str | None

    @classmethod
    def for_project(cls, project_dir: Path, experiment: str) -> "TrackingTarget":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_dir)
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        return cls(uri=uri, experiment=experiment, artifact_location=default_artifact_location(project_dir) if local else None)


def _git(project_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(project_dir: Path) -> str:
    """The DVC hash of the tracked raw catalogue (``data.dvc``), or ``untracked``."""
    path = Path(project_dir) / DATA_DVC_FILE
    if not path.is_file():
        return "untracked"
    outs = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def lineage_tags(project_dir: Path, stage: str) -> dict[str, str]:
    """Tags that say which code, data and experiment produced a run."""
    commit = _git(project_dir, "rev-parse", "HEAD") or "unknown"
    status = _git(project_dir, "status", "--porcelain", "--untracked-files=no")
    tags = {
        f"{TAG_PREFIX}stage": stage,
        f"{TAG_PREFIX}git_commit": commit,
        f"{TAG_PREFIX}git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        f"{TAG_PREFIX}data_hash": data_version(project_dir),
        "mlflow.source.git.commit": commit,
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        tags[f"{TAG_PREFIX}dvc_exp_name"] = exp_name
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= 6000 else text[:5997] + "..."
    return flat


def mlflow_metric_name(name: str) -> str:
    """MLflow allows ``[A-Za-z0-9_-. :/]`` only: our ``test/i2t_R@1`` is logged as ``test/i2t_R_at_1``."""
    return name.replace("@", "_at_")


def _mlflow() -> ModuleType:
    """MLflow, imported on first use: it costs 1.1 s, and every CLI command (``--help`` too)
    imports this module for :func:`project_root`."""
    import mlflow

    return mlflow


def _activate(target: TrackingTarget) -> str:
    """Point MLflow at ``target`` and return the experiment id (created on first use)."""
    mlflow = _mlflow()
    mlflow.set_tracking_uri(target.uri)
    experiment = mlflow.get_experiment_by_name(target.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(target.experiment, artifact_location=target.artifact_location)
    except Exception:  # created concurrently by another stage process
        experiment = mlflow.get_experiment_by_name(target.experiment)
        if experiment is None:
            raise
        return experiment.experiment_id


class StageRun:
    """A thin handle on the active run, so stages never call ``mlflow.*`` themselves."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @property
    def run_id(self) -> str:
        return self._run.info.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric values; names are made MLflow-safe (``R@1`` -> ``R_at_1``), others skipped."""
        clean = {mlflow_metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            _mlflow().log_metrics(clean, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        _mlflow().log_params(flatten(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _mlflow().set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            _mlflow().log_artifacts(str(path), artifact_path=artifact_path)
        elif path.is_file():
            _mlflow().log_artifact(str(path), artifact_path=artifact_path)


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    project_dir: Path,
    experiment: str,
    run_name: str | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; nested under the pipeline run when one is open.

    The run ends FAILED when the stage raises, so a broken stage is visible as such in the UI.
    """
    target = TrackingTarget.for_project(project_dir, experiment)
    experiment_id = _activate(target)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = lineage_tags(project_dir, stage)
    with _mlflow().start_run(
        experiment_id=experiment_id,
        run_name=run_name or stage,
        parent_run_id=parent,
        nested=parent is not None,
        tags=tags,
    ) as run:
        handle = StageRun(run)
        handle.log_params(params)
        yield handle


@contextmanager
def pipeline_run(
    name: str,
    params: Mapping[str, Any],
    *,
    project_dir: Path,
    experiment: str,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open the parent run of a whole pipeline and export its id to child processes."""
    previous = os.environ.get(PARENT_RUN_ENV)
    with stage_run("pipeline", params, project_dir=project_dir, experiment=experiment, run_name=name) as run:
        if tags:
            run.set_tags(tags)
        os.environ[PARENT_RUN_ENV] = run.run_id
        try:
            yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
