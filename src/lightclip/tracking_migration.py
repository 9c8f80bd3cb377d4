"""Move a tracking store (the project's SQLite ``mlflow/mlflow.db`` and its artifacts) to another
one, usually the team's MLflow server: ``lightclip tracking migrate --to URI``.

Why not ``mlflow-export-import`` (1.2.0, installed): it predates MLflow 3. It registers a version
only from a source path that contains the run id and exists on the local disk, so it cannot
import a version whose source is an MLflow 3 logged model (``models:/m-...``: every version the
register stage makes) into a server with proxied artifacts, and it copies no aliases
(``@staging``, ``@production``), which are what the registry and serving run on. MLflow itself
has no store-to-store copy. So this module replays the store through MLflow's public client API,
as export-import does, for what lightclip writes: experiments, runs (params, tags, every metric
point with its step and timestamp, artifacts, status, start and end times, parent runs), logged
models with their artifacts, registered models with their versions (same numbers: a deleted
version's number is kept by a placeholder that is deleted at once), tags, cards and aliases.

Ids of runs and logged models are new on the target; each copy carries the id it came from
(``lightclip.migrated_from``), tags whose value is a source run id are rewritten to the new id,
and a second migration skips what is already there, so an interrupted one is simply re-run.
:func:`migrate` returns what it copied and :func:`verify` compares both stores object by object.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import mlflow

from mlflow.artifacts import download_artifacts
from mlflow.entities import Metric, Param, ViewType
from mlflow.entities.logged_model_status import LoggedModelStatus
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service import utils as tracking_utils

from lightclip.errors import LightclipError
from lightclip.tracking import TAG_PREFIX

#: On every copied run, logged model and model version: the id (or name/version) it came from.
TAG_MIGRATED_FROM = f"{TAG_PREFIX}migrated_from"
PARENT_TAG = "mlflow.parentRunId"
#: MLflow's limits per log_batch request.
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100
PAGE = 1000


class MigrationError(LightclipError, RuntimeError):
    """A migration that cannot start or whose copy differs from its source; says what and where."""


@dataclass
class MigrationReport:
    """What one migration copied (and skipped, already there), and the id maps it used."""

    source: str
    target: str
    experiments: int = 0
    runs: int = 0
    runs_skipped: int = 0
    metric_points: int = 0
    artifacts: int = 0
    logged_models: int = 0
    model_versions: int = 0
    versions_skipped: int = 0
    aliases: int = 0
    run_ids: dict[str, str] = field(default_factory=dict)
    model_ids: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.source} -> {self.target}: {self.experiments} experiment(s), {self.runs} run(s) copied "
                f"({self.runs_skipped} already there), {self.metric_points} metric point(s), {self.artifacts} artifact file(s), "
                f"{self.logged_models} logged model(s), {self.model_versions} model version(s) ({self.versions_skipped} already there), "
                f"{self.aliases} alias(es)")


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, run_view_type=ViewType.ALL, max_results=PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _count_files(directory: Path) -> int:
    return sum(1 for path in directory.rglob("*") if path.is_file())


def logged_model_of(version: Any) -> str | None:
    """The id of the MLflow 3 logged model a version was made from: its ``model_id``, else read
    from its ``models:/m-...`` source (the SQLite store does not return ``model_id``)."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    source = str(version.source or "")
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def _map_value(value: str, ids: dict[str, str]) -> str:
    return ids.get(value, value)


class _Migration:
    def __init__(self, source: MlflowClient, target: MlflowClient, report: MigrationReport, log: Callable[[str], None]) -> None:
        self.source, self.target, self.report, self.log = source, target, report, log

    # -- experiments and runs --------------------------------------------------------------------

    def experiment(self, experiment: Any) -> str:
        existing = self.target.get_experiment_by_name(experiment.name)
        if existing is not None:
            return existing.experiment_id
        tags = {k: v for k, v in experiment.tags.items() if not k.startswith("mlflow.")}
        return self.target.create_experiment(experiment.name, tags=tags or None)

    def runs(self, source_experiment: str, target_experiment: str) -> None:
        done = {r.data.tags[TAG_MIGRATED_FROM]: r.info.run_id
                for r in _all_runs(self.target, target_experiment, f"tags.`{TAG_MIGRATED_FROM}` != ''")}
        self.report.run_ids.update(done)
        pending = []
        for run in _all_runs(self.source, source_experiment):
            if run.info.run_id in done:
                self.report.runs_skipped += 1
            else:
                pending.append(run)
        # parents before children: a child's parent tag must name the parent's new id
        pending.sort(key=lambda r: (PARENT_TAG in r.data.tags, r.info.start_time or 0))
        for run in pending:
            self.run(run, target_experiment)

    def run(self, run: Any, target_experiment: str) -> None:
        info, data = run.info, run.data
        tags = {k: _map_value(v, self.report.run_ids) for k, v in data.tags.items()}
        tags[TAG_MIGRATED_FROM] = info.run_id
        created = self.target.create_run(target_experiment, start_time=info.start_time, tags=tags, run_name=info.run_name)
        new_id = created.info.run_id
        self.report.run_ids[info.run_id] = new_id
        points = [Metric(m.key, m.value, m.timestamp, m.step) for key in data.metrics for m in self.source.get_metric_history(info.run_id, key)]
        for chunk in _chunks(points, BATCH_METRICS):
            self.target.log_batch(new_id, metrics=chunk)
        for chunk in _chunks([Param(k, v) for k, v in data.params.items()], BATCH_PARAMS):
            self.target.log_batch(new_id, params=chunk)
        self.report.metric_points += len(points)
        with tempfile.TemporaryDirectory(prefix="lightclip-migrate-") as scratch:
            if self.source.list_artifacts(info.run_id):
                local = Path(self.source.download_artifacts(info.run_id, "", scratch))
                self.target.log_artifacts(new_id, str(local))
                self.report.artifacts += _count_files(local)
        if info.status != "RUNNING":  # a copy starts RUNNING; ending it with no end time would stamp it now
            self.target.set_terminated(new_id, status=info.status, end_time=info.end_time)
        if info.lifecycle_stage == "deleted":
            self.target.delete_run(new_id)
        self.report.runs += 1
        self.log(f"  run {info.run_id} ({info.run_name}, {info.status}) -> {new_id}")

    # -- logged models (MLflow 3) ------------------------------------------------------------------

    def logged_models(self, source_experiment: str, target_experiment: str) -> None:
        done = {m.tags[TAG_MIGRATED_FROM]: m.model_id
                for m in self._all_models(self.target, target_experiment) if TAG_MIGRATED_FROM in m.tags}
        self.report.model_ids.update(done)
        for model in self._all_models(self.source, source_experiment):
            if model.model_id in done:
                continue
            tags = {k: _map_value(v, self.report.run_ids) for k, v in model.tags.items()}
            tags[TAG_MIGRATED_FROM] = model.model_id
            source_run = self.report.run_ids.get(model.source_run_id) if model.source_run_id else None
            created = self.target.create_logged_model(target_experiment, name=model.name, source_run_id=source_run, tags=tags,
                                                      params=model.params or None, model_type=model.model_type)
            with tempfile.TemporaryDirectory(prefix="lightclip-migrate-") as scratch:
                local = Path(self._download(model.artifact_location, scratch))
                self.target.log_model_artifacts(created.model_id, str(local))
                self.report.artifacts += _count_files(local)
            if model.status in (LoggedModelStatus.READY, LoggedModelStatus.FAILED):  # a PENDING one stays pending
                self.target.finalize_logged_model(created.model_id, model.status)
            self.report.model_ids[model.model_id] = created.model_id
            self.report.logged_models += 1

    @staticmethod
    def _all_models(client: MlflowClient, experiment_id: str) -> list:
        models, token = [], None
        while True:
            page = client.search_logged_models([experiment_id], max_results=100, page_token=token)
            models.extend(page)
            token = page.token
            if not token:
                return models

    def _download(self, artifact_uri: str, scratch: str) -> str:
        return download_artifacts(artifact_uri=artifact_uri, dst_path=scratch, tracking_uri=self.report.source)

    # -- the registry --------------------------------------------------------------------------------

    def registered_models(self) -> None:
        for model in self.source.search_registered_models(max_results=PAGE):
            name = model.name
            try:
                self.target.get_registered_model(name)
            except Exception:  # noqa: BLE001 -- not there yet (RESOURCE_DOES_NOT_EXIST)
                self.target.create_registered_model(name, tags=dict(model.tags) or None, description=model.description)
            existing = {int(v.version): v for v in self.target.search_model_versions(f"name = '{name}'", max_results=PAGE)}
            versions = sorted(self.source.search_model_versions(f"name = '{name}'", max_results=PAGE), key=lambda v: int(v.version))
            previous = max(existing, default=0)
            for version in versions:
                self.version(name, version, existing, previous)
                previous = int(version.version)
            for alias, number in (model.aliases or {}).items():
                self.target.set_registered_model_alias(name, alias, str(number))
                self.report.aliases += 1

    def version(self, name: str, version: Any, existing: dict[int, Any], previous: int) -> None:
        """Copy one version under its own number; ``previous`` is the number the target holds last."""
        number = int(version.version)
        marker = f"{name}/{number}"
        if number in existing:
            if existing[number].tags.get(TAG_MIGRATED_FROM) != marker:
                raise MigrationError(f"registered model {name!r} v{number} already exists on {self.report.target} and was not "
                                     "migrated from this version: refusing to mix two registries (migrate into an empty one)")
            self.report.versions_skipped += 1
            return
        tags = {k: _map_value(v, self.report.run_ids) for k, v in version.tags.items()}
        tags[TAG_MIGRATED_FROM] = marker
        source_model = logged_model_of(version)
        model_id = self.report.model_ids.get(source_model or "")
        if source_model and not model_id:
            raise MigrationError(f"registered model {name!r} v{number}: its logged model {source_model} was not found in any "
                                 f"experiment of {self.report.source}")
        source = f"models:/{model_id}" if model_id else version.source
        if not model_id and version.run_id and version.source.startswith(f"runs:/{version.run_id}"):
            source = version.source.replace(version.run_id, self.report.run_ids.get(version.run_id, version.run_id), 1)
        run_id = self.report.run_ids.get(version.run_id or "")
        for _ in range(previous + 1, number):  # a deleted source version: its number stays used on the target too
            # (a placeholder with this version's own source, since a server accepts only sources it can resolve)
            gap = self.target.create_model_version(name, source=source, run_id=run_id, tags={TAG_MIGRATED_FROM: "placeholder"},
                                                   model_id=model_id or None)
            self.target.delete_model_version(name, gap.version)
        created = self.target.create_model_version(name, source=source, run_id=run_id, tags=tags, description=version.description,
                                                   model_id=model_id or None)
        if int(created.version) != number:
            raise MigrationError(f"registered model {name!r}: source v{number} became v{created.version} on {self.report.target} "
                                 "(the target held versions this migration did not make)")
        self.report.model_versions += 1


@contextmanager
def _registry_resolves_in(target_uri: str) -> Iterator[None]:
    """MLflow's SQL registry store, used directly (a database URI, not a server), looks up a
    ``models:/m-...`` source through the process's global tracking URI: point it at the target
    while versions are created, then restore the URI and ``MLFLOW_TRACKING_URI`` as they were."""
    if target_uri.startswith(("http:", "https:")):
        yield
        return
    previous, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(target_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def migrate(source_uri: str, target_uri: str, *, log: Callable[[str], None] = lambda _: None) -> MigrationReport:
    """Copy every experiment, run, logged model and registered model of ``source_uri`` into ``target_uri``.

    Resumable: what a previous migration copied (tagged ``lightclip.migrated_from``) is skipped.
    """
    if source_uri.rstrip("/") == target_uri.rstrip("/"):
        raise MigrationError(f"source and target are the same store: {source_uri}")
    source, target = MlflowClient(tracking_uri=source_uri), MlflowClient(tracking_uri=target_uri)
    report = MigrationReport(source=source_uri, target=target_uri)
    job = _Migration(source, target, report, log)
    for experiment in source.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=PAGE):
        target_id = job.experiment(experiment)
        log(f"experiment {experiment.name!r}: {experiment.experiment_id} -> {target_id}")
        job.runs(experiment.experiment_id, target_id)
        job.logged_models(experiment.experiment_id, target_id)
        report.experiments += 1
    with _registry_resolves_in(target_uri):
        job.registered_models()
    return report


def verify(source_uri: str, target_uri: str, report: MigrationReport) -> list[str]:
    """What differs between the source and its copy (empty when everything arrived): runs with their
    status, params, tags, metric histories and artifact listings; versions with tags, card and
    source model; aliases."""
    source, target = MlflowClient(tracking_uri=source_uri), MlflowClient(tracking_uri=target_uri)
    problems: list[str] = []
    for old_id, new_id in report.run_ids.items():
        old, new = source.get_run(old_id), target.get_run(new_id)
        if (old.info.status, old.info.start_time, old.info.end_time, old.info.run_name) != (
                new.info.status, new.info.start_time, new.info.end_time, new.info.run_name):
            problems.append(f"run {old_id} -> {new_id}: status/times/name differ")
        if old.data.params != new.data.params:
            problems.append(f"run {old_id} -> {new_id}: params differ")
        expected_tags = {k: _map_value(v, report.run_ids) for k, v in old.data.tags.items()}
        if {k: v for k, v in new.data.tags.items() if k != TAG_MIGRATED_FROM} != expected_tags:
            problems.append(f"run {old_id} -> {new_id}: tags differ")
        for key in old.data.metrics:
            history = lambda client, run: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run, key))  # noqa: E731
            if history(source, old_id) != history(target, new_id):
                problems.append(f"run {old_id} -> {new_id}: metric {key!r} history differs")
        if _listing(source, old_id) != _listing(target, new_id):
            problems.append(f"run {old_id} -> {new_id}: artifacts differ")
    for model in source.search_registered_models(max_results=PAGE):
        copied = target.get_registered_model(model.name)
        if _aliases(copied) != _aliases(model):  # a SQLite store answers version numbers as ints, a server as strings
            problems.append(f"registered model {model.name!r}: aliases {copied.aliases} != {model.aliases}")
        for version in source.search_model_versions(f"name = '{model.name}'", max_results=PAGE):
            new = target.get_model_version(model.name, version.version)
            expected = {k: _map_value(v, report.run_ids) for k, v in version.tags.items()}
            if {k: v for k, v in new.tags.items() if k != TAG_MIGRATED_FROM} != expected or new.description != version.description:
                problems.append(f"{model.name} v{version.version}: tags or card differ")
            source_model = logged_model_of(version)
            if source_model and new.source != f"models:/{report.model_ids.get(source_model)}":
                problems.append(f"{model.name} v{version.version}: its source is not the copy of logged model {source_model}")
    return problems


def _aliases(model: Any) -> dict[str, str]:
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def _listing(client: MlflowClient, run_id: str, path: str | None = None) -> list[tuple[str, int | None]]:
    """Every artifact file of a run with its size (recursively)."""
    found = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found.extend(_listing(client, run_id, item.path))
        else:
            found.append((item.path, item.file_size))
    return sorted(found)
