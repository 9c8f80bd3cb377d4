"""The Prefect flow ``retrain``: the DVC pipeline as Prefect tasks, with retries and a report.

One task per top-level stage of ``dvc.yaml`` (in dependency order, ``register`` last), each a
``dvc repro --single-item`` of that stage, so DVC keeps caching and lineage (``dvc.lock``) and
Prefect adds runs, schedules, retries and the UI. The logic lives in :mod:`lightclip.orchestration`;
this file only wires Prefect around it.

    python pipelines/retrain.py [--data DIR] [-S key=value ...] [--no-auto-promote] [--force] [--worktree]

uses the server of ``make prefect-server`` when it is up (or ``PREFECT_API_URL``), else a
temporary one whose runs are not kept. The deployment ``retrain/scheduled``: ``pipelines/deploy.py``
(served, in place); ``retrain/pool`` on a work pool, each run in its own git worktree:
``pipelines/deploy_pool.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:  # a runner imports this file by path
    sys.path.insert(0, str(REPO_ROOT / "src"))

from lightclip.env import configure_environment  # noqa: E402

configure_environment(REPO_ROOT)  # before Prefect reads its settings: telemetry off, PREFECT_HOME in the project

from prefect import flow, get_client, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import deployment as runtime_deployment  # noqa: E402
from prefect.runtime import flow_run as runtime_flow_run  # noqa: E402
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings  # noqa: E402
from prefect.states import Completed  # noqa: E402

from lightclip import orchestration as orch  # noqa: E402
from lightclip.config import load_params  # noqa: E402
from lightclip.tracking import pipeline_run  # noqa: E402


@task(name="prepare", task_run_name="prepare", cache_policy=NO_CACHE, persist_result=False)
def prepare(project: Path, data: str | None, overrides: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The catalogue to train on and the params overrides, applied before the change check."""
    logger = get_run_logger()
    data_hash = orch.prepare_data(project, data, env, logger.info)
    changes = orch.apply_params_overrides(project, overrides) if overrides else {}
    for key, (old, new) in changes.items():
        logger.info("params override %s: %r -> %r", key, old, new)
    return {"data_hash": data_hash, "changes": changes}


@task(name="check-changes", task_run_name="check-changes", cache_policy=NO_CACHE, persist_result=False)
def check_changes(project: Path, env: dict[str, str]) -> orch.PipelineStatus:
    """``dvc status``: did data, code or params change since each stage's last successful run?"""
    status = orch.pipeline_status(project, env)
    get_run_logger().info("%s", status.summary())
    return status


@task(name="stage", cache_policy=NO_CACHE, persist_result=False)
def run_stage(project: Path, group: orch.StageGroup, env: dict[str, str], force: bool = False) -> orch.StageOutcome:
    """One DVC stage (all of its foreach/matrix entries); retried as ``params.yaml`` says."""
    logger = get_run_logger()
    outcome = orch.run_stage_group(project, group, env=env, log=logger.info, force=force)
    logger.info("stage %s: ran %s, unchanged %s (%.1f s)", group.name, outcome.ran or "nothing", outcome.skipped or "nothing", outcome.seconds)
    return outcome


def _tag_flow_run(flow_run_id: str | None, tag: str) -> None:
    """Add ``tag`` to this flow run, so the Prefect UI points at the MLflow run."""
    if not flow_run_id:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id)
        client.update_flow_run(flow_run_id, tags=sorted({*(current.tags or []), tag}))


@flow(name="retrain", log_prints=True, persist_result=False)
def retrain(
    project_dir: str | None = None,
    data: str | None = None,
    params_overrides: dict[str, Any] | None = None,
    auto_promote: bool | None = None,
    force: bool = False,
    save_experiment: bool = True,
    workspace: str = "in-place",
    push: bool = False,
):
    """Retrain when data, code or params changed; else end "up to date" without running a stage.

    ``data``: a catalogue directory to train on (default: the tracked ``data/raw``).
    ``params_overrides``: ``{"pretrain.train.epochs": "30"}``, applied like ``dvc exp run -S``.
    ``auto_promote``: sets ``promote.auto`` (None: as in ``params.yaml``). ``force``: run every
    stage even when nothing changed. ``save_experiment``: record the run with ``dvc exp save``.
    ``workspace``: ``in-place`` runs in the project's working tree (one run at a time);
    ``worktree`` in a fresh git worktree of its ``HEAD``, removed after the run, so that runs on
    several workers at once never share files (results: the DVC experiment, the shared DVC
    cache, MLflow). ``push``: ``dvc push`` the outputs to the default DVC remote after the run.
    """
    logger = get_run_logger()
    origin = Path(project_dir).resolve() if project_dir else REPO_ROOT
    project = origin
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    report = orch.RetrainReport(status="failed", message="", project=str(origin), prefect_flow_run_id=flow_run_id)
    place: orch.Workspace | None = None
    try:
        attempt = runtime_flow_run.run_count or 1
        crash_retries = load_params(origin / orch.PARAMS_FILE).orchestration.crash_retries
        if not orch.crash_retry_budget_left(attempt, crash_retries):
            raise orch.OrchestrationError(f"attempt {attempt} of this flow run: it crashed {attempt - 1} times, and orchestration.crash_retries is {crash_retries}; not starting it again")
        if attempt > 1:
            logger.warning("attempt %d of this flow run (the earlier one crashed: its worker or machine was lost)", attempt)
        overrides = orch.normalise_overrides(params_overrides)
        if auto_promote is not None:
            overrides["promote.auto"] = auto_promote
        report.overrides = overrides
        env = orch.stage_env()
        if workspace == "worktree":
            place = orch.create_workspace(origin, flow_run_id or f"local-{os.getpid()}", env, logger.info)
            project, env = place.path, orch.workspace_env(place, env)
            report.workspace = str(place.path)
        elif workspace != "in-place":
            raise orch.OrchestrationError(f"workspace={workspace!r}: expected one of {orch.WORKSPACE_MODES}")
        groups = orch.stage_groups(project)
        report.stages = [g.name for g in groups]
        prepared = prepare(project, data, overrides, env)
        report.data_hash = prepared["data_hash"]
        status = check_changes(project, env)
        report.changes = status.summary()
        params = load_params(project / orch.PARAMS_FILE)
        if status.up_to_date and not force:
            report.status = "up to date"
            report.message = "Up to date: " + status.summary() + "; no stage ran."
            report.metrics, report.register = orch.report_metrics(project), orch.read_register(project)
            _publish(report)
            return Completed(name="UpToDate", message=report.message, data=report.to_dict())

        config = params.orchestration
        stage = run_stage.with_options(retries=config.retries, retry_delay_seconds=config.retry_delays())
        exp_name = orch.experiment_name(runtime_flow_run.name) if save_experiment and orch.git_has_commit(project) else None
        tags = orch.parent_run_tags(flow_run_id, runtime_flow_run.name, _ui_url(), runtime_deployment.name)
        if place is not None:
            tags.update({"lightclip.workspace": str(place.path), "lightclip.workspace_commit": place.commit, "prefect.flow_run_attempt": str(attempt)})
        run_params = {"flow": "retrain", "stages": ",".join(report.stages), "force": force, "data": data or "tracked", "overrides": overrides}
        # The parent run belongs to the project (its store, its artifact root), also when the stages run in a workspace.
        with pipeline_run(f"retrain-{runtime_flow_run.name or 'local'}", run_params, project_dir=origin, experiment=params.tracking.experiment, tags=tags, settings=params.tracking) as run:
            report.mlflow_run_id, report.mlflow_experiment = run.run_id, params.tracking.experiment
            _tag_flow_run(flow_run_id, orch.mlflow_flow_run_tag(run.run_id))
            logger.info("MLflow parent run %s (experiment %s)", run.run_id, params.tracking.experiment)
            stage_env = orch.stage_env({"LIGHTCLIP_PARENT_RUN_ID": run.run_id, **({"DVC_EXP_NAME": exp_name} if exp_name else {})})
            if place is not None:
                stage_env = orch.workspace_env(place, stage_env)
            for group in groups:
                try:
                    outcome = stage.with_options(name=f"stage-{group.name}", task_run_name=group.name)(project, group, stage_env, force)
                except orch.StageFailed as exc:
                    report.failed_stage = exc.group
                    raise
                report.stages_run += outcome.ran
            if exp_name:
                try:
                    orch.save_experiment(project, exp_name, stage_env)
                    report.dvc_experiment = exp_name
                    run.set_tags({"lightclip.dvc_exp_name": exp_name})
                except orch.OrchestrationError as exc:
                    logger.warning("the run is not saved as a DVC experiment: %s", exc)
            if push:
                orch.push_outputs(project, stage_env, logger.info)
        report.status = "retrained"
        report.message = f"Retrained: ran {len(report.stages_run)} stage(s) ({', '.join(report.stages_run) or 'none'})."
        report.metrics, report.register = orch.report_metrics(project), orch.read_register(project)
        _publish(report)
        return Completed(message=report.message, data=report.to_dict())
    except Exception as exc:
        report.status = "failed"
        report.message = f"Failed: {exc}"
        last = [s for s in report.stages if s in orch.LAST_STAGES]
        if report.failed_stage and last and report.failed_stage not in last:
            report.message += f"\n\nThe stages after {report.failed_stage!r} did not run, so {last[0]!r} did not: the registry and its aliases (@staging) are as they were."
        _publish(report)
        raise
    finally:
        if place is not None:
            try:
                orch.remove_workspace(origin, place.path)
            except OSError as exc:  # the run's outcome stands; the leftover is replaced by a retry of this run
                logger.warning("workspace %s was not removed: %s", place.path, exc)


def _ui_url() -> str | None:
    """The flow run's page in the Prefect UI (None on a temporary server)."""
    return runtime_flow_run.ui_url if PREFECT_UI_URL.value() else None


def _publish(report: orch.RetrainReport) -> None:
    create_markdown_artifact(markdown=report.markdown(), key=orch.REPORT_ARTIFACT_KEY, description=f"retrain: {report.status}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python pipelines/retrain.py``: one flow run, on the local server when it is up."""
    parser = argparse.ArgumentParser(description="Run the retraining flow once (Prefect flow `retrain`).")
    parser.add_argument("--project", help="the lightclip project (default: this repository)")
    parser.add_argument("--data", help="a catalogue directory to train on (default: the tracked data/raw)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="params override, as `dvc exp run -S` (repeatable)")
    promote = parser.add_mutually_exclusive_group()
    promote.add_argument("--auto-promote", dest="auto_promote", action="store_const", const=True, help="set promote.auto: true")
    promote.add_argument("--no-auto-promote", dest="auto_promote", action="store_const", const=False, help="set promote.auto: false")
    parser.add_argument("--force", action="store_true", help="run every stage even when nothing changed")
    parser.add_argument("--no-save-experiment", dest="save_experiment", action="store_false", help="do not `dvc exp save` the run")
    parser.add_argument("--worktree", dest="workspace", action="store_const", const="worktree", default="in-place", help="run in a fresh git worktree of the project's HEAD (removed after the run)")
    parser.add_argument("--push", action="store_true", help="`dvc push` the outputs to the default DVC remote after the run")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"-S expects KEY=VALUE, got {bad}")

    url = orch.resolve_api_url()
    print(f"Prefect API: {url}" if url else "Prefect API: none found (start `make prefect-server`); using a temporary server, this run will not be kept", flush=True)
    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        state = retrain(
            project_dir=args.project,
            data=args.data,
            params_overrides=dict(o.split("=", 1) for o in args.overrides) or None,
            auto_promote=args.auto_promote,
            force=args.force,
            save_experiment=args.save_experiment,
            workspace=args.workspace,
            push=args.push,
            return_state=True,
        )
    print(f"flow run ended {state.name}: {state.message or ''}".rstrip(), flush=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
