"""Tracking: runs land in the SQLite store, nest under the pipeline run, carry lineage tags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightclip.tracking import (
    data_version,
    default_tracking_uri,
    flatten,
    pipeline_run,
    project_root,
    stage_run,
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, projects) -> Path:
    """A tiny git project with params.yaml, dvc.yaml and a data.dvc, and its own SQLite store."""
    data_dvc = "outs:\n- md5: abc123.dir\n  path: data/raw\n"
    root = projects.create(tmp_path / "proj", "tracking:\n  experiment: test\n", files={"data.dvc": data_dvc}, git=True, commit="init")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-tiny")
    return projects.enter(root, monkeypatch)


def test_project_root_maps_dvc_temp_workspace_back(tmp_path: Path):
    repo = tmp_path / "repo"
    temp = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    temp.mkdir(parents=True)
    assert project_root(temp) == repo


def test_default_uri_is_absolute_sqlite(tmp_path: Path):
    uri = default_tracking_uri(tmp_path)
    assert uri.startswith("sqlite:////") and uri.endswith("/mlflow/mlflow.db")


def test_data_version_reads_data_dvc(project: Path, tmp_path: Path):
    assert data_version(project) == "abc123.dir"
    assert data_version(tmp_path) == "untracked"


def test_flatten_nested_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_stage_runs_nest_under_pipeline_and_carry_lineage(project: Path):
    import mlflow

    (project / "params.yaml").write_text("tracking:\n  experiment: test\n# dirty\n")
    with pipeline_run("repro", {"command": "dvc repro"}, project_dir=project, experiment="test") as parent:
        with stage_run("validate", {"validate": {"on_error": "fail"}}, project_dir=project, experiment="test") as child:
            child.log_metrics({"rows_in": 10, "flag": True, "test/i2t_R@1": 12.5})
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(project))
    run = client.get_run(child.run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id
    assert tags["lightclip.stage"] == "validate"
    assert len(tags["lightclip.git_commit"]) == 40
    assert tags["lightclip.git_dirty"] == "true"
    assert tags["lightclip.data_hash"] == "abc123.dir"
    assert tags["lightclip.dvc_exp_name"] == "exp-tiny"
    assert run.data.params["validate.on_error"] == "fail"
    assert run.data.metrics == {"rows_in": 10.0, "test/i2t_R_at_1": 12.5}
    assert (project / "mlflow" / "mlflow.db").is_file()
    experiment = client.get_experiment_by_name("test")
    assert experiment.artifact_location.endswith("/mlflow/artifacts")


def test_failed_stage_marks_run_failed(project: Path):
    import mlflow

    with pytest.raises(RuntimeError):
        with stage_run("split", {}, project_dir=project, experiment="test") as run:
            raise RuntimeError("boom")
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(project))
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_two_projects_in_one_process_log_into_their_own_stores(project: Path, tmp_path: Path, projects, monkeypatch: pytest.MonkeyPatch):
    """MLflow exports the URI it is pointed at; a second project's run must still go to its own store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    other = projects.create(tmp_path / "other", "tracking:\n  experiment: test\n")
    with stage_run("validate", {}, project_dir=project, experiment="test") as first:
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with stage_run("validate", {}, project_dir=other, experiment="test") as second:
        pass
    assert mlflow.MlflowClient(tracking_uri=default_tracking_uri(project)).get_run(first.run_id)
    assert mlflow.MlflowClient(tracking_uri=default_tracking_uri(other)).get_run(second.run_id)
    assert (other / "mlflow" / "mlflow.db").is_file()
    with pytest.raises(mlflow.exceptions.MlflowException):
        mlflow.MlflowClient(tracking_uri=default_tracking_uri(project)).get_run(second.run_id)
    # a URI the user set survives a run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(other))
    with stage_run("split", {}, project_dir=project, experiment="test") as third:
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == default_tracking_uri(other)
    assert mlflow.MlflowClient(tracking_uri=default_tracking_uri(other)).get_run(third.run_id)
