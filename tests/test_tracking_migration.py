"""``lightclip tracking migrate --to URI``: a project's SQLite store moved to an MLflow server on
PostgreSQL, everything checked on the server: experiments, nested runs with params, tags, metric
histories, artifacts and status, MLflow 3 logged models, a registered model's versions (with the
number of a deleted one kept), their tags and cards, and its aliases; the model loads from the
server by alias; a second migration copies nothing twice."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import boto3
import mlflow
import pandas as pd
import pytest

from lightclip.cli import main
from lightclip.tracking import default_artifact_location, default_tracking_uri
from lightclip.tracking_migration import TAG_MIGRATED_FROM, MigrationError, migrate, verify
from tracking_servers import PG_BIN, POSTGRES_AVAILABLE, MlflowServer, Postgres

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not POSTGRES_AVAILABLE, reason=f"PostgreSQL server binaries absent ({PG_BIN}; apt-get install postgresql)"),
]

MODEL = "lightclip-student"


class AddOne(mlflow.pyfunc.PythonModel):
    """A model small enough to log in milliseconds, whose answer proves it was loaded."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input + 1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    cluster = Postgres()
    cluster.start()
    tracking = MlflowServer(cluster.create_database("mlflow"), tmp_path / "server-artifacts", tmp_path / "server.log")
    try:
        tracking.start()
        yield tracking
    finally:
        tracking.kill()
        cluster.stop()


def make_store(root: Path, projects, monkeypatch: pytest.MonkeyPatch, *, experiment_name: str = "lightclip", model: str = MODEL) -> dict[str, str]:
    """A project's SQLite store as the pipeline leaves it: a parent run, a finished child with metric
    history, params, tags and artifacts that logged two models, a failed run, a registered model
    with v1, v2 (deleted) and v3, and @staging/@production. Returns the ids the test checks."""
    root = projects.enter(projects.create(root, f"tracking:\n  experiment: {experiment_name}\n"), monkeypatch)
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(root))
    mlflow.set_tracking_uri(default_tracking_uri(root))
    experiment = client.create_experiment(experiment_name, artifact_location=default_artifact_location(root))
    (root / "out" / "sub").mkdir(parents=True)
    (root / "out" / "report.json").write_text('{"ok": true}')
    (root / "out" / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    with mlflow.start_run(experiment_id=experiment, run_name="pipeline") as parent:
        with mlflow.start_run(experiment_id=experiment, run_name="pretrain", nested=True, tags={"lightclip.stage": "pretrain"}) as child:
            mlflow.log_params({"pretrain.lr": "0.0005", "pretrain.epochs": "3"})
            for step in range(3):
                mlflow.log_metric("train/loss", 1.0 / (step + 1), step=step)
            mlflow.log_metric("val/mean_recall", 42.5)
            mlflow.log_artifacts(str(root / "out"))
            first = mlflow.pyfunc.log_model(name="teacher", python_model=AddOne(), pip_requirements=["mlflow"])
            second = mlflow.pyfunc.log_model(name="student", python_model=AddOne(), pip_requirements=["mlflow"])
    with pytest.raises(ZeroDivisionError):
        with mlflow.start_run(experiment_id=experiment, run_name="failed"):
            1 / 0
    client.create_registered_model(model, tags={"team": "search"}, description="the student")
    for info, card in ((first, "card one"), (second, "card two"), (second, "card three")):
        client.create_model_version(model, source=info.model_uri, run_id=child.info.run_id, tags={"lightclip.run_id": child.info.run_id},
                                    description=card, model_id=info.model_id)
    client.delete_model_version(model, "2")
    client.set_registered_model_alias(model, "staging", "3")
    client.set_registered_model_alias(model, "production", "1")
    mlflow.set_tracking_uri(None)
    return {"root": str(root), "source": default_tracking_uri(root), "parent": parent.info.run_id, "child": child.info.run_id}


@pytest.fixture
def store(tmp_path: Path, projects, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return make_store(tmp_path / "proj", projects, monkeypatch)


def test_migrate_moves_the_sqlite_store_to_the_server_and_verifies_it(store, server: MlflowServer, tmp_path: Path, capsys):
    assert main(["tracking", "migrate", "--to", server.uri]) == 0
    out = capsys.readouterr().out
    assert "3 run(s) copied (0 already there)" in out and "2 logged model(s), 2 model version(s)" in out and "2 alias(es)" in out, out
    assert "verified: every copied run" in out

    target = mlflow.MlflowClient(tracking_uri=server.uri)
    experiment = target.get_experiment_by_name("lightclip")
    copied = {r.info.run_name: r for r in target.search_runs([experiment.experiment_id])}
    assert sorted(copied) == ["failed", "pipeline", "pretrain"]
    child, parent = copied["pretrain"], copied["pipeline"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.tags[TAG_MIGRATED_FROM] == store["child"]
    assert (child.info.status, copied["failed"].info.status) == ("FINISHED", "FAILED")
    assert [(m.step, m.value) for m in target.get_metric_history(child.info.run_id, "train/loss")] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert child.data.params == {"pretrain.lr": "0.0005", "pretrain.epochs": "3"}
    downloaded = Path(target.download_artifacts(child.info.run_id, "sub/weights.bin", str(tmp_path / "dl")))
    assert downloaded.read_bytes() == bytes(range(256)) * 40

    versions = {v.version: v for v in target.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == ["1", "3"], "the deleted v2 must not come back, and v3 must stay v3"
    assert versions["3"].description == "card three" and versions["3"].tags["lightclip.run_id"] == child.info.run_id
    assert target.get_registered_model(MODEL).aliases == {"staging": "3", "production": "1"}
    assert target.get_registered_model(MODEL).tags == {"team": "search"}
    mlflow.set_tracking_uri(server.uri)  # a fresh process would know only this URI
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@staging")
        assert model.predict(pd.DataFrame({"x": [1.0, 2.0]}))["x"].tolist() == [2.0, 3.0]
    finally:
        mlflow.set_tracking_uri(None)


def test_a_second_migration_copies_nothing_twice(store, server: MlflowServer):
    first = migrate(store["source"], server.uri)
    again = migrate(store["source"], server.uri)
    assert (again.runs, again.runs_skipped, again.model_versions, again.versions_skipped, again.logged_models) == (0, 3, 0, 2, 0)
    assert again.run_ids == first.run_ids and verify(store["source"], server.uri, again) == []
    target = mlflow.MlflowClient(tracking_uri=server.uri)
    assert len(target.search_runs([target.get_experiment_by_name("lightclip").experiment_id])) == 3


def test_migrate_refuses_a_missing_store_and_the_same_store(tmp_path: Path, projects, monkeypatch, capsys):
    projects.enter(projects.create(tmp_path / "empty", "tracking:\n  experiment: lightclip\n"), monkeypatch)
    assert main(["tracking", "migrate", "--to", "http://127.0.0.1:1"]) == 1
    assert "no such store" in capsys.readouterr().err
    with pytest.raises(MigrationError, match="same store"):
        migrate("sqlite:////x/mlflow.db", "sqlite:////x/mlflow.db")


@pytest.mark.team
def test_migrate_into_the_team_server_puts_the_artifacts_in_its_bucket(team_services, tmp_path: Path, projects, monkeypatch):
    """Into the team deployment (PostgreSQL + S3 behind the server), under names of its own: the
    session's server is shared with the other team tests. The bucket is read with boto3."""
    suffix = uuid.uuid4().hex[:8]
    model = f"migrated-student-{suffix}"
    source = make_store(tmp_path / "proj", projects, monkeypatch, experiment_name=f"migrated-{suffix}", model=model)
    env = team_services.env()
    report = migrate(source["source"], env["MLFLOW_TRACKING_URI"])
    assert verify(source["source"], env["MLFLOW_TRACKING_URI"], report) == []
    assert mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_registered_model(model).aliases == {"staging": "3", "production": "1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=env["LIGHTCLIP_S3_MLFLOW_BUCKET"])
    sizes = {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
    run_id = report.run_ids[source["child"]]
    assert any(key.endswith(f"{run_id}/artifacts/sub/weights.bin") and size == 256 * 40 for key, size in sizes.items()), sorted(sizes)[:20]
    copies = set(report.model_ids.values())
    assert all(any(f"/models/{m}/artifacts/MLmodel" in key for key in sizes) for m in copies), "a logged model's files are not in the bucket"
