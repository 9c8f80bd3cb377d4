"""The Prefect flow ``retrain`` (pipelines/retrain.py) and its served deployment (pipelines/deploy.py).

- On a fake pipeline (one-line stages) under ``prefect_test_harness``: every task runs, a
  second run ends "up to date" without running a stage, a failing stage is retried the
  configured number of times and fails the flow before ``register``.
- On a real Prefect server started here on a free loopback port: ``deploy.py`` serves
  ``retrain/scheduled`` with the cron of params.yaml, scheduled runs are listed, and a manual run
  through the API completes. Everything started is stopped by process group.
- Marked slow: the real pipeline end to end on tiny params, with an override, MLflow runs
  (parent + nested stages), the registry version, then up to date, then an injected failure
  that leaves ``@staging`` as it was.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from lightclip import orchestration as orch
from lightclip.processes import stop_process_group
from lightclip.tracking import PARENT_RUN_ENV, default_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_flow_module():
    """pipelines/retrain.py as a module (pipelines/ is not a package)."""
    if "retrain" in sys.modules:
        return sys.modules["retrain"]
    spec = importlib.util.spec_from_file_location("retrain", REPO_ROOT / "pipelines" / "retrain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrain"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs log into each project's own MLflow store, with no parent run from outside."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)


@pytest.fixture(scope="session")
def fake_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch, fake_mlflow_store: str) -> str:
    """The fake pipelines share one MLflow store (creating a SQLite store costs seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fake_mlflow_store)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return fake_mlflow_store


def attempts(project: Path, stage: str) -> int:
    path = project / "attempts" / stage
    return len(path.read_text().splitlines()) if path.is_file() else 0


def prefect_client():
    from prefect import get_client

    return get_client(sync_client=True)


def task_runs(flow_run_id) -> dict[str, Any]:
    """The flow run's task runs by name (``prep``, ``train``, ...)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def report_artifact(flow_run_id) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with prefect_client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[orch.REPORT_ARTIFACT_KEY]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert len(found) == 1, f"expected one {orch.REPORT_ARTIFACT_KEY} artifact, got {len(found)}"
    return found[0].data


def mlflow_runs(uri: str, experiment: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


# -- the flow on a fake pipeline -----------------------------------------------------------------


#: A second pipeline in the repository that the flow does not run, as pipelines/ablation is: its
#: outputs never exist, so a `dvc exp save` of every pipeline would fail on them.
SWEEP_DVC_YAML = """\
stages:
  sweep:
    cmd: python -c "raise SystemExit('the flow must not run this')"
    outs: [models/sweep]
"""


def flow_logs(flow_run_id) -> str:
    """What the flow run logged to the API, one message a line."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_client() as client:
        return "\n".join(entry.message for entry in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))


def experiment_ref(project: Path, name: str) -> str:
    """The git ref of the DVC experiment ``name`` (refs/exps/<baseline>/<name>)."""
    refs = [r for r in subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=project, capture_output=True, text=True, check=True).stdout.split() if r.endswith("/" + name)]
    assert len(refs) == 1, f"experiment {name}: refs {refs}"
    return refs[0]


def test_flow_runs_every_stage_then_ends_up_to_date(prefect_harness, fake_env: str, fake_project: Path, projects):
    project = fake_project
    (project / "sweep").mkdir()
    (project / "sweep" / "dvc.yaml").write_text(SWEEP_DVC_YAML)
    projects.commit(project, "a sweep the flow does not run")
    retrain = load_flow_module().retrain

    state = retrain(project_dir=str(project), return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["status"] == "retrained"
    assert report["stages"] == ["prep", "train", "register"]
    assert report["stages_run"] == ["prep", "train@a", "train@b", "register"]
    flow_run_id = state.state_details.flow_run_id
    tasks = task_runs(flow_run_id)
    assert {"prep", "train", "register"} <= set(tasks) and all(tasks[n].state.is_completed() for n in ("prep", "train", "register"))

    # Prefect and MLflow point at each other; the run is a DVC experiment; the report has the version.
    runs = mlflow_runs(fake_env, "fake")
    parent = runs[runs["tags.prefect.flow_run_id"] == str(flow_run_id)]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    mlflow_id = parent.iloc[0]["run_id"]
    with prefect_client() as client:
        assert orch.mlflow_flow_run_tag(mlflow_id) in client.read_flow_run(flow_run_id).tags
    assert report["dvc_experiment"] and report["dvc_experiment"] in projects.run(orch.dvc_command("exp", "list", "--name-only"), project)
    logs = flow_logs(flow_run_id)
    assert "not saved as a DVC experiment" not in logs and "does not exist" not in logs, logs
    ref = experiment_ref(project, report["dvc_experiment"])  # the experiment holds the metrics it reports
    shown = subprocess.run(["git", "show", f"{ref}:metrics/register.json"], cwd=project, capture_output=True, check=True).stdout
    assert shown == (project / "metrics" / "register.json").read_bytes()
    assert not (project / "models" / "sweep").exists() and "sweep" not in report["stages"]
    markdown = report_artifact(flow_run_id)
    assert "# Retraining: retrained" in markdown and mlflow_id in markdown and "fake-student v1 (a)" in markdown

    started = time.monotonic()
    second = retrain(project_dir=str(project), return_state=True)
    assert second.is_completed() and second.name == "UpToDate", second
    assert "no stage ran" in second.message
    assert time.monotonic() - started < 30
    assert task_runs(second.state_details.flow_run_id).keys() == {"prepare", "check-changes"}
    assert attempts(project, "prep") == 1 and attempts(project, "register") == 1
    assert "# Retraining: up to date" in report_artifact(second.state_details.flow_run_id)


def test_a_failing_stage_is_retried_then_fails_the_flow_before_register(prefect_harness, fake_env: str, fake_project: Path, projects):
    project = fake_project
    retrain = load_flow_module().retrain
    projects.run(orch.dvc_command("repro"), project)  # a model is published (register ran once)
    published = (project / "metrics" / "register.json").read_bytes()

    (project / "FAIL_train-a").touch()
    state = retrain(project_dir=str(project), params_overrides={"split.seed": "1"}, return_state=True)
    assert state.is_failed()
    retries = yaml.safe_load((project / "params.yaml").read_text())["orchestration"]["retries"]
    assert retries == 2
    assert attempts(project, "train-a") == 1 + (1 + retries)  # the first, good run + the attempts of this one
    tasks = task_runs(state.state_details.flow_run_id)
    assert tasks["train"].run_count == 1 + retries and tasks["train"].state.is_failed()
    assert "register" not in tasks and attempts(project, "register") == 1
    assert (project / "metrics" / "register.json").read_bytes() == published  # @staging: untouched
    markdown = report_artifact(state.state_details.flow_run_id)
    assert "FAILED at stage `train`" in markdown and "@staging" in markdown
    runs = mlflow_runs(fake_env, "fake")
    parent = runs[runs["tags.prefect.flow_run_id"] == str(state.state_details.flow_run_id)]
    assert parent.iloc[0]["status"] == "FAILED"
    assert yaml.safe_load((project / "params.yaml").read_text())["split"]["seed"] == 1  # as `dvc exp run -S` leaves it


def test_a_bad_override_fails_before_any_stage(prefect_harness, fake_env: str, fake_project: Path):
    project = fake_project
    before = (project / "params.yaml").read_bytes()
    state = load_flow_module().retrain(project_dir=str(project), params_overrides={"split.nope": "1"}, return_state=True)
    assert state.is_failed() and "no such key" in state.message
    assert (project / "params.yaml").read_bytes() == before and attempts(project, "prep") == 0


# -- the served deployment on a real server ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log is not None and log.is_file() else ""
    pytest.fail(f"timed out waiting for {what} after {timeout} s\n{tail}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """``make prefect-server`` on a free loopback port with its home in a temp dir; stopped by PID.

    Started through the Makefile, as a user starts it, so that every test here checks the
    target too. No ``PREFECT_API_URL`` in its environment: the UI must learn its port from the
    Makefile alone.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = tmp_path_factory.mktemp("prefect-server")
    env = orch.stage_env({"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    command = ["make", "-s", "-C", str(REPO_ROOT), "prefect-server", f"PREFECT_PORT={port}", f"PREFECT_HOME={home / 'prefect'}", f"BIN={Path(sys.executable).parent}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: orch.server_is_up(url, timeout=1), 120, f"the Prefect server on port {port}", proc, log)
        yield url, {**env, "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": url}
    finally:
        stop_process_group(proc)


def test_the_ui_of_make_prefect_server_calls_the_api_on_its_own_port(prefect_server):
    """The UI reads its API URL from /ui-settings; Prefect's default there is port 4200."""
    url, _ = prefect_server
    port = urllib.parse.urlsplit(url).port
    assert port != 4200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
        settings = json.load(response)
    assert settings["api_url"] == url
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:  # the UI itself is served
        assert response.status == 200 and b"<html" in response.read().lower()


def test_served_deployment_has_the_cron_schedule_and_runs_on_demand(prefect_server, clean_env, fake_project: Path, tmp_path: Path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    project = fake_project
    cron = yaml.safe_load((project / "params.yaml").read_text())["orchestration"]["cron"]
    log = tmp_path / "deploy.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "pipelines" / "deploy.py"), "--project", str(project)],
            cwd=REPO_ROOT, env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), prefect_client() as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("retrain/scheduled")
                except ObjectNotFound:
                    return None

            found = wait_for(deployment, 90, "the deployment retrain/scheduled", serve, log)
            assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in found.schedules] == [(cron, "UTC", True)]
            assert found.parameters["project_dir"] == str(project)

            scheduled_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
            scheduled = wait_for(
                lambda: client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])), flow_run_filter=scheduled_filter),
                60, "a scheduled run", serve, log,
            )
            assert scheduled[0].expected_start_time > scheduled[0].created  # in the future, from the cron

            manual = run_deployment("retrain/scheduled", timeout=300, poll_interval=1)
            assert manual.state is not None and manual.state.is_completed(), f"{manual.state}\n{log.read_text()[-4000:]}"
            assert any(tag.startswith("mlflow-run:") for tag in client.read_flow_run(manual.id).tags)
        assert attempts(project, "register") == 1  # it ran in the served project, in the runner's process
    finally:
        stop_process_group(serve)


#: Prepended to the fake stage: ``prep`` records its pid and its parent's (``dvc repro``), then
#: blocks, so a flow run is in flight, inside a stage, when the signal comes.
BLOCKING_PREP = """\
import os, pathlib, sys, time
if sys.argv[1] == "prep":
    pathlib.Path("prep.pids").write_text(f"{os.getpid()} {os.getppid()}")
    time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, ended but not yet collected by its parent, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def session_processes(sid: int) -> list[str]:
    """The live processes of session ``sid``, as ``pid cmdline``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid and running(int(entry.name)):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name} {command}")
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_deploy_stops_on_sigint_and_sigterm_with_the_run_in_flight_and_leaves_nothing_running(prefect_server, clean_env, fake_project: Path, tmp_path: Path, signum: int):
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    project = fake_project
    stage = project / "stage.py"
    stage.write_text(BLOCKING_PREP + stage.read_text())
    name = f"stop-{signal.Signals(signum).name.lower()}"
    log = tmp_path / "deploy.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "pipelines" / "deploy.py"), "--project", str(project), "--name", name],
            cwd=REPO_ROOT, env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), prefect_client() as client:

            def deployment():
                try:
                    return client.read_deployment_by_name(f"retrain/{name}")
                except ObjectNotFound:
                    return None

            wait_for(deployment, 90, f"the deployment retrain/{name}", serve, log)
            flow_run = run_deployment(f"retrain/{name}", timeout=0)
            pids = wait_for(lambda: (project / "prep.pids").is_file() and (project / "prep.pids").read_text().split(), 120, "the prep stage to start", serve, log)
            stage_pid, dvc_pid = map(int, pids)
            assert running(stage_pid) and running(dvc_pid)

            started = time.monotonic()
            os.kill(serve.pid, signum)  # to deploy.py alone, as `kill` or a supervisor sends it
            try:
                returncode = serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"deploy.py still runs 60 s after {signal.Signals(signum).name}\n{log.read_text()[-4000:]}")
            elapsed = time.monotonic() - started
            assert returncode == 128 + signum, log.read_text()[-4000:]
            assert elapsed < 45, f"stopping took {elapsed:.0f} s"
            assert not running(stage_pid) and not running(dvc_pid), "the stage or its dvc repro outlived deploy.py"
            # helpers such as multiprocessing's resource tracker exit on their own once their
            # parent is gone: give them a bounded moment, then nothing may be left
            deadline = time.monotonic() + 10
            while session_processes(serve.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert session_processes(serve.pid) == []
            state = client.read_flow_run(flow_run.id).state
            assert state is not None and state.is_final() and not state.is_completed(), state
            assert client.read_deployment_by_name(f"retrain/{name}").paused  # the schedule stops with it
        assert f"stopped by {signal.Signals(signum).name}" in log.read_text()
    finally:
        stop_process_group(serve)


# -- the real pipeline end to end (tiny params) ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, projects) -> Path:
    """A copy of this project (pipeline, code, tiny params, synthetic data) committed in git and DVC."""
    root = tmp_path_factory.mktemp("tiny") / "proj"
    projects.create(root, projects.tiny_params(), real_pipeline=True, files={".gitignore": "mlflow/\n.cache/\n.prefect/\n"}, dvc=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(PARENT_RUN_ENV, raising=False)
        projects.track_synthetic_data(root)
    projects.commit(root, "tiny project")
    return root


@pytest.mark.slow
def test_real_pipeline_end_to_end_then_up_to_date_then_a_failure_leaves_staging(prefect_harness, clean_env, tiny_project: Path):
    from mlflow import MlflowClient

    root = tiny_project
    retrain = load_flow_module().retrain
    groups = orch.stage_groups(root)
    assert groups[-1].name == "register"

    # 1. Everything runs, with an override that must reach dvc.lock and the stage's MLflow params.
    state = retrain(project_dir=str(root), params_overrides={"pretrain.train.lr": "0.001"}, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert set(report["stages_run"]) == {t for g in groups for t in g.targets}
    tasks = task_runs(flow_run_id)
    assert all(tasks[g.name].state.is_completed() for g in groups)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["train"]["lr"] == 0.001

    runs = mlflow_runs(default_tracking_uri(root), "lightclip")
    parent = runs[runs["tags.prefect.flow_run_id"] == str(flow_run_id)].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert {g.name for g in groups} <= set(children["tags.lightclip.stage"])
    pretrain = children[children["tags.lightclip.stage"] == "pretrain"].iloc[0]
    assert float(pretrain["params.pretrain.train.lr"]) == 0.001
    assert set(children["tags.lightclip.dvc_exp_name"]) == {report["dvc_experiment"]}
    markdown = report_artifact(flow_run_id)
    assert parent["run_id"] in markdown and "## Metrics (metrics/eval.json)" in markdown

    client = MlflowClient(tracking_uri=default_tracking_uri(root))
    registered = json.loads((root / orch.REGISTER_METRICS_FILE).read_text())
    name = registered["model_name"]
    versions = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
    assert registered["students"] and {str(r["version"]) for r in registered["students"].values()} <= versions
    assert report["register"] == registered and "## Registration" in markdown
    # Make @staging point somewhere, so that "unchanged" below means something.
    client.set_registered_model_alias(name, "staging", max(versions, key=int))
    staging_before = str(client.get_model_version_by_alias(name, "staging").version)

    # 2. Nothing changed: up to date, no stage runs.
    lock_before = (root / "dvc.lock").read_bytes()
    again = retrain(project_dir=str(root), return_state=True)
    assert again.name == "UpToDate", again
    assert not {g.name for g in groups} & set(task_runs(again.state_details.flow_run_id))
    assert (root / "dvc.lock").read_bytes() == lock_before

    # 3. An injected failure (evaluate on a model directory that does not exist): retried, Failed,
    #    register never runs, @staging and metrics/register.json stay as they were.
    register_json = (root / orch.REGISTER_METRICS_FILE).read_bytes()
    models = yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["models"]
    teacher = next(iter(models))
    failed = retrain(project_dir=str(root), params_overrides={f"evaluate.models.{teacher}": "models/missing"}, return_state=True)
    assert failed.is_failed()
    tasks = task_runs(failed.state_details.flow_run_id)
    assert tasks["evaluate"].run_count == 1 + 1 and tasks["evaluate"].state.is_failed()  # orchestration.retries: 1
    assert "register" not in tasks
    assert (root / orch.REGISTER_METRICS_FILE).read_bytes() == register_json
    assert str(client.get_model_version_by_alias(name, "staging").version) == staging_before
    assert {str(v.version) for v in client.search_model_versions(f"name='{name}'")} == versions  # nothing registered
    assert "FAILED at stage `evaluate`" in report_artifact(failed.state_details.flow_run_id)
