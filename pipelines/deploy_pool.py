"""Deploy the flow ``retrain`` to a Prefect work pool: ``retrain/pool``, on the cron of ``params.yaml``.

    make services-up                      # Prefect server, a process work pool and its workers
    python pipelines/deploy_pool.py [--pool NAME] [--project DIR] [--name pool] [--cron CRON] [--push]

``make serve`` (``pipelines/deploy.py``) serves ``retrain/scheduled`` from one process that also
runs its flow runs, one at a time, in the project's working tree. This script instead registers
the deployment with the server and exits: the workers of the pool pick its runs, several at once,
each in a process of its own and in a workspace of its own (flow parameter
``workspace="worktree"``: a fresh git worktree of the project's ``HEAD``), so that two runs never
share files. What they share is the tracking server, the DVC cache and remote, and the git
repository's experiment refs (``dvc exp show`` in the project lists every run).

The code comes from this repository through ``flow.from_source`` on a local directory (no image,
no git remote): a process worker on this machine runs ``pipelines/retrain.py`` from here.

A lost worker (killed, or its machine gone) takes its flow runs with it, and nothing would ever
end them: each flow run therefore sends a heartbeat every 30 s (the deployment's job variables),
and two automations, created next to the deployment, end such runs and run them again:

- no heartbeat for ``orchestration.heartbeat_timeout_seconds``: the run is marked Crashed;
- a Crashed run of this deployment is scheduled again (``AwaitingRetry``), so a live worker of
  the pool picks it up; the flow refuses attempts beyond ``1 + orchestration.crash_retries``.

The pool (``--pool``, else ``LIGHTCLIP_PREFECT_POOL``, else ``lightclip``) is created as a process
pool when it does not exist. Running the script again updates the deployment and automations.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Sequence
from uuid import UUID

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from lightclip.env import configure_environment  # noqa: E402

configure_environment(REPO_ROOT)

from prefect import Flow, get_client  # noqa: E402
from prefect.client.orchestration import SyncPrefectClient  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.client.schemas.objects import StateType  # noqa: E402
from prefect.events.actions import ChangeFlowRunState  # noqa: E402
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402
from prefect.schedules import Cron  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from lightclip import orchestration as orch  # noqa: E402
from lightclip.config import OrchestrationConfig, load_params  # noqa: E402

DEPLOYMENT_NAME = "pool"
DEFAULT_POOL = "lightclip"
FLOW_ENTRYPOINT = "pipelines/retrain.py:retrain"
#: The flow-run events that answer "is it still alive?": a heartbeat, or the run ended.
ALIVE_EVENTS = frozenset({"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Cancelling", "Crashed", "Paused", "Suspended"))})


class PoolError(orch.OrchestrationError):
    """The pool cannot take the deployment (e.g. it exists with another worker type)."""


@dataclass(frozen=True)
class PoolDeployment:
    """What :func:`deploy_to_pool` registered."""

    deployment_id: UUID
    name: str
    pool: str
    automation_ids: tuple[UUID, ...]


def default_pool() -> str:
    """``LIGHTCLIP_PREFECT_POOL`` (the team services' env file sets it), else ``lightclip``."""
    return os.environ.get("LIGHTCLIP_PREFECT_POOL") or DEFAULT_POOL


def ensure_process_pool(client: SyncPrefectClient, pool: str) -> None:
    """Create ``pool`` as a process pool unless it exists; refuse one of another type."""
    try:
        found = client.read_work_pool(pool)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process", description="lightclip: process workers that run the flow `retrain`"))
        return
    if found.type != "process":
        raise PoolError(f"work pool {pool!r} has type {found.type!r}; retrain/pool runs on a process pool (it runs the code of {REPO_ROOT})")


def automations(deployment_id: UUID, label: str, config: OrchestrationConfig) -> list[AutomationCore]:
    """The two automations that end and re-run the flow runs of a lost worker (see the module doc)."""
    deployment = {"prefect.resource.id": f"prefect.deployment.{deployment_id}", "prefect.resource.role": "deployment"}
    flow_runs = {"prefect.resource.id": "prefect.flow-run.*"}
    no_heartbeat = AutomationCore(
        name=f"{label}: crash runs without heartbeat",
        description=f"A running flow run of {label} that sent no heartbeat for {config.heartbeat_timeout_seconds:g} s lost its worker: mark it Crashed.",
        trigger=EventTrigger(
            match=flow_runs,
            match_related=deployment,
            after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect=set(ALIVE_EVENTS),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=config.heartbeat_timeout_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {config.heartbeat_timeout_seconds:g} s: the worker or its machine was lost")],
    )
    retry_crashed = AutomationCore(
        name=f"{label}: retry crashed runs",
        description=f"Schedule a Crashed flow run of {label} again so that a live worker picks it up; the flow stops after orchestration.crash_retries ({config.crash_retries}).",
        trigger=EventTrigger(match=flow_runs, match_related=deployment, expect={"prefect.flow-run.Crashed"}, for_each={"prefect.resource.id"}, posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", message="the run crashed (worker lost): scheduled again", force=True)],
    )
    return [no_heartbeat, retry_crashed]


def replace_automations(client: SyncPrefectClient, wanted: list[AutomationCore]) -> tuple[UUID, ...]:
    """Create ``wanted``, deleting the automations of the same names first (a re-deploy updates them)."""
    ids = []
    for automation in wanted:
        for old in client.read_automations_by_name(automation.name):
            client.delete_automation(old.id)
        ids.append(client.create_automation(automation))
    return tuple(ids)


def deploy_to_pool(project: Path, pool: str, *, name: str = DEPLOYMENT_NAME, cron: str | None = None, push: bool = False) -> PoolDeployment:
    """Register ``retrain/<name>`` on ``pool`` for ``project`` (cron and crash handling from its params.yaml).

    Needs ``PREFECT_API_URL`` (a real server: schedules and workers do not work on a temporary one).
    """
    project = Path(project).resolve()
    config = load_params(project / orch.PARAMS_FILE).orchestration
    with get_client(sync_client=True) as client:
        ensure_process_pool(client, pool)
    flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=FLOW_ENTRYPOINT)
    deployment_id = flow.deploy(
        name=name,
        work_pool_name=pool,
        build=False,
        push=False,
        schedules=[Cron(cron or config.cron, timezone=config.timezone)],
        parameters={"project_dir": str(project), "workspace": "worktree", "push": push},
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(orch.HEARTBEAT_SECONDS)}},
        description=f"Retrain {project} on the cron of params.yaml (orchestration.cron), each run in its own git worktree, on the workers of pool {pool!r}.",
        tags=["lightclip", "retrain"],
        print_next_steps=False,
    )
    with get_client(sync_client=True) as client:
        ids = replace_automations(client, automations(deployment_id, f"lightclip retrain/{name}", config))
    return PoolDeployment(deployment_id=deployment_id, name=f"retrain/{name}", pool=pool, automation_ids=ids)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Deploy the flow retrain to a Prefect work pool (cron from params.yaml); each run in its own git worktree.")
    parser.add_argument("--project", default=str(REPO_ROOT), help="the lightclip project the runs retrain (default: this repository)")
    parser.add_argument("--pool", default=default_pool(), help="the work pool (default: LIGHTCLIP_PREFECT_POOL, else lightclip); created as a process pool if absent")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default: {DEPLOYMENT_NAME})")
    parser.add_argument("--cron", help="override orchestration.cron of params.yaml")
    parser.add_argument("--push", action="store_true", help="each run pushes its outputs to the project's default DVC remote")
    args = parser.parse_args(argv)

    url = orch.resolve_api_url()
    if not url or not orch.server_is_up(url):
        print(f"no Prefect server at {url or orch.local_api_url()}: start one (`make services-up` or `make prefect-server`) or set PREFECT_API_URL", file=sys.stderr)
        return 2
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            done = deploy_to_pool(Path(args.project), args.pool, name=args.name, cron=args.cron, push=args.push)
    except orch.OrchestrationError as exc:
        print(f"deploy_pool: {exc}", file=sys.stderr)
        return 1
    print(f"deployed {done.name} (id {done.deployment_id}) to work pool {done.pool!r} for {Path(args.project).resolve()}; API {url}")
    print(f"start workers with `prefect worker start --pool {done.pool} --limit 1`; run it now with `prefect deployment run {done.name}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
