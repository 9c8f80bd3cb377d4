"""The flow ``retrain`` deployed to a work pool (pipelines/deploy_pool.py) and run by two workers.

On the team services (the ``team_services`` fixture) when they can run, else (or with
``LIGHTCLIP_TEST_POOL=own``) on a Prefect server (SQLite) and two process workers (``--limit 1``)
started here on loopback ports and stopped by process group:

- two flow runs with different ``params_overrides`` submitted at once run on the two workers at
  the same time, each in its own git worktree (the project's working tree is never touched), each
  under its own MLflow parent run and saved as its own DVC experiment of the project;
- a worker killed (SIGKILL, with what it runs: a lost machine) in the middle of a flow run: the
  run is marked Crashed (no heartbeat) and its retry completes on the other worker.

The pipeline is the fake one of conftest.py (one-line stages); its ``prep`` stage waits while a
hold file exists, so that the tests decide when a run may go on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from lightclip import orchestration as orch
from lightclip.tracking import PARENT_RUN_ENV

pytestmark = pytest.mark.team

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "retrain/pool"
#: Seconds without a heartbeat (sent every 30 s) before a run counts as lost: the least that
#: stays clear of a late heartbeat on a busy machine.
HEARTBEAT_TIMEOUT_S = 50

#: Put in front of the fake stage script: ``prep`` records its pid and working directory in
#: MARKS, then waits while HOLD exists.
HOLDING_PREP = """\
import os, pathlib, sys, time
if sys.argv[1] == "prep":
    marks = pathlib.Path({marks!r})
    marks.mkdir(exist_ok=True)
    (marks / str(os.getpid())).write_text(os.getcwd())
    hold = pathlib.Path({hold!r})
    while hold.exists():
        time.sleep(0.2)
"""


# -- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, logs: list[Path] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs if log.is_file())
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def ancestors(pid: int) -> list[int]:
    chain, current = [], parent_of(pid)
    while current and current > 1 and current not in chain:
        chain.append(current)
        current = parent_of(current)
    return chain


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := parent_of(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_worker_and_its_runs(pid: int) -> list[int]:
    """SIGKILL a worker's process group and every process below it, as when its machine is lost.

    Prefect's process worker starts each flow run in a session of its own, so the worker's
    group alone would leave the flow run behind, running to its end.
    """
    doomed = [pid, *descendants(pid)]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for victim in doomed:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return doomed


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# -- the pool --------------------------------------------------------------------------------------


@dataclass
class Pool:
    """A Prefect server with a process pool and two workers, and the clients' environment."""

    name: str
    env: dict[str, str]  # PREFECT_API_URL, MLFLOW_TRACKING_URI, ...
    workers: dict[str, int]  # worker name -> pid
    restart: Callable[[str], None]
    logs: list[Path]

    @property
    def api_url(self) -> str:
        return self.env["PREFECT_API_URL"]

    def worker_of(self, pid: int) -> str:
        """The worker that runs process ``pid`` (a stage, several processes below the worker)."""
        by_pid = {p: n for n, p in self.workers.items()}
        return next((by_pid[a] for a in ancestors(pid) if a in by_pid), "none")


def start_own_pool(tmp: Path) -> tuple[Pool, list[subprocess.Popen]]:
    """``prefect server start`` (SQLite) and two ``prefect worker start --limit 1``, in a temp home."""
    port = free_port()
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = orch.stage_env({
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "MLFLOW_TRACKING_URI": mlflow_uri,
    })
    env.pop(PARENT_RUN_ENV, None)
    procs, logs = [], []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        log = tmp / f"{name}.log"
        logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(command, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)])
    import mlflow  # the store exists before two runs at once would both create it

    mlflow.MlflowClient(tracking_uri=mlflow_uri).search_experiments()
    wait_for(lambda: orch.server_is_up(env["PREFECT_API_URL"], timeout=1), 90, "the Prefect server", logs)
    pool = "lightclip-test"
    workers = {}
    for name in ("worker-1", "worker-2"):
        workers[name] = start(name, [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--limit", "1"]).pid
    return Pool(name=pool, env=env, workers=workers, restart=lambda name: None, logs=logs), procs


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """The team services' Prefect server, pool and workers when there, else our own.

    ``LIGHTCLIP_TEST_POOL=own`` starts our own even where the team services could run (a check of
    the pool deployment alone, in a fraction of their start-up time).
    """
    team = None
    if os.environ.get("LIGHTCLIP_TEST_POOL") != "own":
        try:
            team = request.getfixturevalue("team_services")
        except (pytest.FixtureLookupError, pytest.skip.Exception):
            team = None
    if team is not None:
        env = orch.stage_env(team.env())
        env.pop(PARENT_RUN_ENV, None)
        workers = {s.name: s.pid for s in team.status() if s.name.startswith("worker-")}
        yield Pool(name=env["LIGHTCLIP_PREFECT_POOL"], env=env, workers=workers, restart=team.start_service, logs=[])
        return
    own, procs = start_own_pool(tmp_path_factory.mktemp("pool"))
    try:
        yield own
    finally:
        for proc in reversed(procs):  # workers before the server
            stop_group(proc)


@pytest.fixture(scope="module")
def pool_project(pool: Pool, tmp_path_factory: pytest.TempPathFactory, projects) -> Path:
    """The fake pipeline with a holding ``prep``, deployed to the pool as ``retrain/pool``."""
    root = tmp_path_factory.mktemp("pool-project")
    project = projects.fake_pipeline(root / "fake")
    stage = project / "stage.py"
    stage.write_text(HOLDING_PREP.format(marks=str(root / "marks"), hold=str(root / "hold")) + stage.read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestration"].update(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, crash_retries=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    projects.commit(project, "a prep stage that waits while the hold file exists")

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}), get_client(sync_client=True) as client:
        wait_for(lambda: {w.name for w in client.read_workers_for_work_pool(pool.name) if w.status == "ONLINE"} >= set(pool.workers), 90, "two workers online", pool.logs)
    deployed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "pipelines" / "deploy_pool.py"), "--project", str(project), "--pool", pool.name],
        env=pool.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"deployed {DEPLOYMENT}" in deployed.stdout
    return project


# -- helpers ----------------------------------------------------------------------------------------


@dataclass
class Held:
    """The hold file and the marks of the holding ``prep``: pid -> working directory."""

    root: Path

    @property
    def hold(self) -> Path:
        return self.root / "hold"

    def marks(self) -> dict[int, str]:
        folder = self.root / "marks"
        return {int(p.name): p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}


def origin_state(project: Path) -> tuple[str, bytes, list[str]]:
    """What the runs must not touch: git's view of the working tree, params.yaml, the files there."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--", ".", ":!.dvc"], cwd=project, capture_output=True, text=True, check=True).stdout
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*") if ".git" not in p.parts and ".dvc" not in p.parts)
    return status, (project / "params.yaml").read_bytes(), files


def submit(pool: Pool, seed: int) -> Any:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}):
        return run_deployment(DEPLOYMENT, parameters={"params_overrides": {"split.seed": seed}}, timeout=0)


def wait_final(pool: Pool, flow_run_ids: list, timeout: float) -> list[Any]:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}), get_client(sync_client=True) as client:

        def runs():
            found = [client.read_flow_run(i) for i in flow_run_ids]
            return found if all(r.state and r.state.is_final() for r in found) else None

        return wait_for(runs, timeout, f"flow runs {flow_run_ids} to end", pool.logs)


def parent_runs(pool: Pool, flow_run_id) -> list[Any]:
    """The MLflow parent runs of a flow run (one per attempt), on the pool's tracking server.

    A client bound to that server, no global: ``mlflow.search_runs`` reads the process-wide
    tracking URI, which an earlier test of the session set with ``mlflow.set_tracking_uri``
    (test_retrain_flow.py: a SQLite store without experiment ``fake``), and MLflow's
    ``_use_tracking_uri`` writes the previous URI back into ``MLFLOW_TRACKING_URI`` of
    ``os.environ`` on exit (or deletes it), so that the next query went to the wrong store.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=pool.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("fake")
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'"))


def tracking_report(pool: Pool, flow_run_ids: list) -> str:
    """What the tracking server and Prefect hold for ``flow_run_ids``: the message of a failed check.

    Every experiment, every run of ``fake`` (deleted ones too) with its tags, and per flow run its
    state history, its ``mlflow-run:<id>`` tag and where that run is.
    """
    import mlflow
    from mlflow.entities import ViewType
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    uri = pool.env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    lines = [f"tracking server {uri} (this process: global tracking URI {mlflow.get_tracking_uri()}, "
             f"MLFLOW_TRACKING_URI={os.environ.get('MLFLOW_TRACKING_URI')})"]
    try:
        lines.append("experiments:")
        for experiment in client.search_experiments(view_type=ViewType.ALL):
            lines.append(f"  {experiment.experiment_id} {experiment.name!r} {experiment.lifecycle_stage} {experiment.artifact_location}")
        experiment = client.get_experiment_by_name("fake")
        if experiment is not None:
            lines.append(f"runs of experiment 'fake' ({experiment.experiment_id}), deleted ones too:")
            for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=1000):
                tags = {k: v for k, v in sorted(run.data.tags.items()) if k.startswith(("prefect.", "lightclip.", "mlflow.parentRunId", "mlflow.runName"))}
                lines.append(f"  {run.info.run_id} {run.info.status} {run.info.lifecycle_stage} {tags}")
        with temporary_settings(updates={PREFECT_API_URL: pool.api_url}), get_client(sync_client=True) as prefect:
            for flow_run_id in flow_run_ids:
                flow_run = prefect.read_flow_run(flow_run_id)
                history = [(s.timestamp.isoformat(timespec="seconds"), s.type.value, s.name) for s in prefect.read_flow_run_states(flow_run_id)]
                lines.append(f"flow run {flow_run.name} {flow_run_id}: run_count {flow_run.run_count}, tags {flow_run.tags}, states {history}")
                for tag in (t for t in flow_run.tags if t.startswith("mlflow-run:")):
                    run = client.get_run(tag.split(":", 1)[1])
                    lines.append(f"  {tag}: experiment {run.info.experiment_id}, {run.info.status}, tags {run.data.tags}")
    except Exception as exc:  # noqa: BLE001 -- the failure message says as much as it could learn
        lines.append(f"(report cut short: {type(exc).__name__}: {exc})")
    return "\n".join(lines)


def experiments(project: Path) -> dict[str, str]:
    """DVC experiment name -> its git ref, as the project sees them."""
    names = orch.run_checked(orch.dvc_command("exp", "list", "--name-only"), project, orch.stage_env()).split()
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project, capture_output=True, text=True, check=True).stdout.split()
    return {n: next(r for r in refs if r.endswith("/" + n)) for n in names}


# -- the tests ---------------------------------------------------------------------------------------


def test_two_runs_at_once_run_on_both_workers_in_their_own_worktrees(pool: Pool, pool_project: Path):
    project, held = pool_project, Held(pool_project.parent)
    before = origin_state(project)
    held.hold.touch()
    try:
        runs = {seed: submit(pool, seed) for seed in (1, 2)}
        marks = wait_for(lambda: len(held.marks()) >= 2 and held.marks(), 120, "both prep stages to run at once (one worker each)", pool.logs)
    finally:
        held.hold.unlink(missing_ok=True)
    # Both stages were alive at the same time, each under another worker, each in its own worktree.
    assert len(marks) == 2
    assert {pool.worker_of(pid) for pid in marks} == set(pool.workers), (marks, pool.workers)
    workspaces = [Path(cwd) for cwd in marks.values()]
    assert workspaces[0] != workspaces[1]
    assert all(w.parent == project / orch.WORKSPACES_DIR for w in workspaces), workspaces

    ended = wait_final(pool, [r.id for r in runs.values()], 180)
    assert all(r.state.is_completed() for r in ended), tracking_report(pool, [r.id for r in ended])
    first, second = ended
    assert first.start_time < second.end_time and second.start_time < first.end_time  # they overlapped
    assert not any(w.exists() for w in workspaces)  # removed after the run
    assert origin_state(project) == before  # the project's working tree: untouched

    exps = experiments(project)
    for seed, run in zip(runs, ended):
        parents = parent_runs(pool, run.id)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", (
            f"flow run {run.name} ({run.id}): parent runs {[(p.info.run_id, p.info.status) for p in parents]}, expected one FINISHED\n"
            + tracking_report(pool, [r.id for r in ended]))
        tags = parents[0].data.tags
        name = tags.get("lightclip.dvc_exp_name")
        assert name in exps and tags.get("lightclip.workspace") in {str(w) for w in workspaces}, (tags, exps, workspaces)
        params = subprocess.run(["git", "show", f"{exps[name]}:params.yaml"], cwd=project, capture_output=True, text=True, check=True).stdout
        assert yaml.safe_load(params)["split"]["seed"] == seed  # each experiment holds its own override
        lock = yaml.safe_load(subprocess.run(["git", "show", f"{exps[name]}:dvc.lock"], cwd=project, capture_output=True, text=True, check=True).stdout)
        assert lock["stages"]["prep"]["params"]["params.yaml"]["split.seed"] == seed
    assert len({parent_runs(pool, r.id)[0].info.run_id for r in ended}) == 2


def test_a_run_whose_worker_is_killed_is_marked_crashed_and_retried_on_the_other_worker(pool: Pool, pool_project: Path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project, held = pool_project, Held(pool_project.parent)
    before = origin_state(project)
    seen = set(held.marks())
    held.hold.touch()
    killed = None
    try:
        run = submit(pool, 3)
        first = wait_for(lambda: set(held.marks()) - seen, 120, "the prep stage of the run", pool.logs)
        (stage_pid,) = first
        killed = pool.worker_of(stage_pid)
        assert killed in pool.workers
        doomed = kill_worker_and_its_runs(pool.workers[killed])
        assert stage_pid in doomed
        seen |= first
        started = time.monotonic()
        # The retry runs on the worker that is left: its prep shows up while the hold file exists.
        again = wait_for(lambda: set(held.marks()) - seen, HEARTBEAT_TIMEOUT_S + 30 + 90, "the retry's prep stage", pool.logs)
        (retry_pid,) = again
        retried_on = pool.worker_of(retry_pid)
        detected_after = time.monotonic() - started
    finally:
        held.hold.unlink(missing_ok=True)
        if killed is not None:
            pool.restart(killed)  # the team services' worker comes back for the tests after this one
    assert retried_on not in (killed, "none"), (retried_on, killed)

    (ended,) = wait_final(pool, [run.id], 120)
    assert ended.state.is_completed(), ended.state
    assert ended.run_count == 2
    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}), get_client(sync_client=True) as client:
        history = [(s.type.value, s.name) for s in client.read_flow_run_states(run.id)]
    crashed_at = next(i for i, (kind, _) in enumerate(history) if kind == "CRASHED")
    assert ("SCHEDULED", "AwaitingRetry") in history[crashed_at:] and history[-1][0] == "COMPLETED", history
    assert detected_after < HEARTBEAT_TIMEOUT_S + 30 + 60

    parents = parent_runs(pool, run.id)  # the lost attempt's run is closed, none stays RUNNING
    assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"], tracking_report(pool, [run.id])
    assert origin_state(project) == before
    assert not any((project / orch.WORKSPACES_DIR).iterdir())
