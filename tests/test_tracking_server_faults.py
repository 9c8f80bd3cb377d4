"""An MLflow tracking server on PostgreSQL killed (SIGKILL, its whole process group) in the middle
of a real stage process: ``lightclip pretrain`` on tiny params, and ``lightclip register``.

Killed for good, the stage fails within a bounded time with one line naming the tracking URI; the
run it could not end is closed as KILLED by the next stage start (checked through the restarted
server), and the registry holds no version without its tags: a re-run completes the registration,
reusing what was registered. Restarted within the retry window (``tracking.retries``: MLflow's
HTTP client waits 0, 2, 4, 8, 16 s between attempts, so 5 retries ride out about 30 s), the
stage carries on and succeeds, with every metric it logged during the outage.

The server is this module's own process (``mlflow server --workers 1``) on a throwaway PostgreSQL
cluster, so killing it touches nothing another test uses. Everything binds 127.0.0.1 on free ports
and is stopped by PID; the module skips when PostgreSQL's binaries are absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import pytest
import yaml

from lightclip.cli import main
from lightclip.config import SplitConfig, SynthConfig
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.models.zoo import ModelSpec, create_model, save_model
from lightclip.orchestration import stage_env
from lightclip.registry import ModelRegistry
from lightclip.registry.aliases import TAG_WEIGHTS, AliasState
from lightclip.tracking import TAG_CLOSED_STALE
from tracking_servers import PG_BIN, POSTGRES_AVAILABLE, MlflowServer, Postgres

STUDENT, TEACHER = "lightclip-student", "lightclip-teacher"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not POSTGRES_AVAILABLE, reason=f"PostgreSQL server binaries absent ({PG_BIN}; apt-get install postgresql)"),
]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    cluster = Postgres()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def server(postgres: Postgres, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    """A fresh MLflow server on its own database of the module's PostgreSQL (registries never mix)."""
    backend = postgres.create_database(f"mlflow_{request.node.name[5:40].lower()}")
    tracking = MlflowServer(backend, tmp_path / "artifacts", tmp_path / "mlflow-server.log")
    tracking.start()
    try:
        yield tracking
    finally:
        tracking.kill()


def quick_client(uri: str, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    """The test's own client: no retries, so polling a dead server returns at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return mlflow.MlflowClient(tracking_uri=uri)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the stage exited ({process.returncode}) before {what}: {process.communicate()[1][-3000:]}")
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 -- the server may not answer yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def write_params(root: Path, params: dict, *, experiment: str, retries: int) -> None:
    params["tracking"] = {"experiment": experiment, "timeout_seconds": 2, "retries": retries}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(root: Path, uri: str, *args: str) -> subprocess.Popen:
    """``lightclip -q ARGS`` in ``root`` as its own process, logging to ``uri``."""
    env = stage_env({"MLFLOW_TRACKING_URI": uri})
    env.pop("LIGHTCLIP_PARENT_RUN_ID", None)
    return subprocess.Popen([sys.executable, "-m", "lightclip.cli", "-q", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def runs(client: mlflow.MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


# -- pretrain --------------------------------------------------------------------------------------

EPOCHS = 25


@pytest.fixture(scope="module")
def pretrain_project(tmp_path_factory: pytest.TempPathFactory, projects) -> tuple[Path, dict]:
    """A tiny project whose catalogue, split and concept graph exist (made with the local SQLite
    store); its teacher trains for EPOCHS epochs, one metric line per step, so a kill lands mid-stage."""
    root = tmp_path_factory.mktemp("pretrain") / "proj"
    params = projects.tiny_params()
    params["pretrain"]["train"].update(epochs=EPOCHS, log_every_n_steps=1, early_stop_patience=EPOCHS)
    projects.create(root, params)
    with pytest.MonkeyPatch.context() as monkeypatch:
        projects.enter(root, monkeypatch)
        for command in (["data", "synth"], ["validate"], ["split"], ["build-kg"]):
            assert main(["-q", *command]) == 0, command
    return root, params


def start_pretrain(pretrain_project: tuple[Path, dict], uri: str, experiment: str, retries: int) -> subprocess.Popen:
    root, params = pretrain_project
    write_params(root, params, experiment=experiment, retries=retries)
    shutil.rmtree(root / "models", ignore_errors=True)
    (root / "metrics" / "pretrain.json").unlink(missing_ok=True)
    return run_stage(root, uri, "pretrain")


def training_run(client: mlflow.MlflowClient, experiment: str):
    """The pretrain run once it has logged a training step (so the stage is mid-training)."""
    found = [r for r in runs(client, experiment) if r.info.status == "RUNNING" and r.data.metrics]
    return found[0] if found else None


def test_pretrain_with_its_server_killed_for_good_fails_in_seconds_naming_the_uri(server: MlflowServer, pretrain_project, monkeypatch):
    experiment = "faults-pretrain-dead"
    client = quick_client(server.uri, monkeypatch)
    stage = start_pretrain(pretrain_project, server.uri, experiment, retries=1)
    try:
        wait_for(lambda: training_run(client, experiment) is not None, 120, "the pretrain run logged a step", stage)
        run_id = training_run(client, experiment).info.run_id
        server.kill()
        killed_at = time.monotonic()
        assert stage.poll() is None, "the stage ended before the kill: not mid-stage"
        _, err = stage.communicate(timeout=120)
    finally:
        if stage.poll() is None:
            stage.kill()
    elapsed = time.monotonic() - killed_at
    # Bound: a write waits out 2 attempts (retries 1; jitter <= 1 s); ending the run gives up after
    # timeout_seconds (2 s); a few writes at most. Generous for a loaded 2-core machine.
    assert stage.returncode == 1 and elapsed < 30, (stage.returncode, elapsed, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("lightclip pretrain: error: tracking store ") and server.uri in last and "Traceback" not in err, err
    assert f"run {run_id} could not be ended FAILED" in err and "the next stage start on this host closes it as KILLED" in err
    assert not (pretrain_project[0] / "models" / "teacher").exists(), "the stage finished although its tracking failed"

    server.start()  # same database, same port: the run is still RUNNING there
    assert client.get_run(run_id).info.status == "RUNNING"
    root = pretrain_project[0]
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert main(["-q", "data", "synth", "--out", str(root / "resynth")]) == 0  # any stage start sweeps
    closed = client.get_run(run_id)
    assert closed.info.status == "KILLED" and "no longer runs" in closed.data.tags[TAG_CLOSED_STALE]
    assert [r.info.run_id for r in runs(client, experiment) if r.info.status == "RUNNING"] == []


def test_pretrain_rides_out_a_server_restarted_within_the_retry_window(server: MlflowServer, pretrain_project, monkeypatch):
    experiment = "faults-pretrain-restart"
    client = quick_client(server.uri, monkeypatch)
    stage = start_pretrain(pretrain_project, server.uri, experiment, retries=5)  # attempts 0, 2, 4, 8, 16 s apart: ~30 s
    try:
        wait_for(lambda: training_run(client, experiment) is not None, 120, "the pretrain run logged a step", stage)
        run_id = training_run(client, experiment).info.run_id
        server.kill()
        assert stage.poll() is None, "the stage ended before the kill: not mid-stage"
        time.sleep(1.0)
        outage = 1.0 + server.start()
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, f"outage {outage:.1f} s: {err[-3000:]}"
    assert outage < 30, f"the restart took {outage:.1f} s, longer than the retry window: the test proves nothing"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    epochs = sorted(m.value for m in client.get_metric_history(run_id, "epoch"))
    assert epochs == [float(e) for e in range(1, EPOCHS + 1)], "a metric logged during the outage is missing"
    recorded = json.loads((pretrain_project[0] / "metrics" / "pretrain.json").read_text())
    assert recorded and all(k.replace("@", "_at_") in run.data.metrics for k, v in recorded.items() if isinstance(v, (int, float)))
    assert [r.info.run_id for r in runs(client, experiment) if r.info.status == "RUNNING"] == []


# -- register ----------------------------------------------------------------------------------------

#: Test mean recall per model: the student passes the gate against the teacher.
RECALLS = {"teacher": 60.0, "a": 58.0}


@pytest.fixture(scope="module")
def register_assets(tmp_path_factory: pytest.TempPathFactory, projects) -> Path:
    """A split tiny catalogue, a teacher and a student (random lc-test-tiny weights) and eval.json."""
    root = tmp_path_factory.mktemp("register-assets")
    raw = generate_catalogue(root / "data" / "raw", SynthConfig(seed=5, n_items=32, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=4, test=8)).save(root / "data" / "split")
    spec = ModelSpec(arch="lc-test-tiny")
    for seed, name in enumerate(["teacher", "students/a"]):
        model, _ = create_model(spec, seed=seed)
        save_model(model, spec, root / "models" / name, extra={"stage": "test", "seed": seed})
    payload = {}
    for name, recall in RECALLS.items():
        payload[name] = {"model_dir": "models/teacher" if name == "teacher" else f"models/students/{name}", "test/mean_recall": recall,
                         "test/i2t_R@1": recall / 2, "test/i2t_R@5": recall, "test/i2t_R@10": recall + 10,
                         "test/t2i_R@1": recall / 2, "test/t2i_R@5": recall, "test/t2i_R@10": recall + 10, "test/n_items": 8,
                         "timing/encode_ms_per_item": 0.5}
    (root / "metrics").mkdir()
    (root / "metrics" / "eval.json").write_text(json.dumps(payload))
    return root


def register_project(root: Path, assets: Path, projects, experiment: str, retries: int) -> Path:
    params = projects.repo_params()
    params["evaluate"]["models"] = {"teacher": "models/teacher", "a": "models/students/a"}
    params["register"].update(latency_runs=5, latency_warmup=1, latency_rounds=2)
    projects.create(root, params)
    write_params(root, params, experiment=experiment, retries=retries)
    for name in ("data", "models", "metrics"):
        shutil.copytree(assets / name, root / name)
    return root


def start_register(root: Path, uri: str) -> subprocess.Popen:
    return run_stage(root, uri, "register", "--in", "data/split", "--ranks", "metrics/absent.json")


def assert_nothing_half_registered(registry: ModelRegistry) -> None:
    """Every version carries its identity tags and its card; every alias holder carries its alias tags."""
    for name in (TEACHER, STUDENT):
        if not registry.exists(name):
            continue
        for version in registry.versions(name):
            assert version.tags.get(TAG_WEIGHTS) and version.description, f"{name} v{version.version} lacks its tags or card"
        for alias, holder in registry.aliases(name).items():
            state = AliasState.from_tags(alias, registry.version(name, holder).tags)
            assert state is not None and state.holds, f"{name}@{alias} -> v{holder} without its alias tags"


def kill_during_the_students_upload(server: MlflowServer, stage: subprocess.Popen) -> None:
    """Kill the server as soon as the second logged model's files appear in its artifact store (read
    on disk, not through the busy server): the teacher is registered, the student is being uploaded."""
    # polled every 10 ms: a logged model is about 10 files, uploaded in well under a second
    deadline = time.monotonic() + 180
    while len(list(server.artifacts.glob("*/models/m-*"))) < 2:
        assert stage.poll() is None, f"the stage exited ({stage.returncode}) before the student's upload began: {stage.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "not within 180 s: the student's upload began"
        time.sleep(0.01)
    server.kill()
    assert stage.poll() is None, "the stage ended before the kill: not mid-stage"


def test_register_with_its_server_killed_for_good_leaves_nothing_half_registered(server, register_assets, projects, tmp_path, monkeypatch):
    root = register_project(tmp_path / "proj", register_assets, projects, "faults-register-dead", retries=1)
    client = quick_client(server.uri, monkeypatch)
    stage = start_register(root, server.uri)
    try:
        kill_during_the_students_upload(server, stage)
        killed_at = time.monotonic()
        _, err = stage.communicate(timeout=120)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 1 and time.monotonic() - killed_at < 45, err
    assert err.strip().splitlines()[-1].startswith("lightclip register: error: tracking store ") and server.uri in err, err

    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.chdir(root)
    registry = ModelRegistry(root, server.uri)
    assert_nothing_half_registered(registry)
    assert [v.version for v in registry.versions(TEACHER)] == ["1"] and registry.versions(STUDENT) == [], "not cut mid-way"

    rerun = start_register(root, server.uri)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert_nothing_half_registered(registry)
    assert [v.version for v in registry.versions(TEACHER)] == ["1"], "the teacher was registered twice"
    students = registry.versions(STUDENT)
    assert len(students) == 1 and registry.aliases(STUDENT) == {"staging": students[0].version}
    statuses = sorted(r.info.status for r in runs(client, "faults-register-dead"))
    assert statuses == ["FINISHED", "KILLED"], statuses  # the killed stage's run, closed by the re-run


def test_register_rides_out_a_server_restarted_within_the_retry_window(server, register_assets, projects, tmp_path, monkeypatch):
    root = register_project(tmp_path / "proj", register_assets, projects, "faults-register-restart", retries=5)
    client = quick_client(server.uri, monkeypatch)
    stage = start_register(root, server.uri)
    try:
        kill_during_the_students_upload(server, stage)
        time.sleep(1.0)
        server.start()
        out, err = stage.communicate(timeout=300)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 0, err[-3000:]
    registry = ModelRegistry(root, server.uri)
    assert_nothing_half_registered(registry)
    assert len(registry.versions(TEACHER)) == 1 and len(registry.versions(STUDENT)) == 1
    assert registry.aliases(STUDENT) == {"staging": "1"}
    assert [r.info.status for r in runs(client, "faults-register-restart")] == ["FINISHED"]
