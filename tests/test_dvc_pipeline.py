"""The real DVC pipeline on a tiny copy of the project: repro, lock, cache, remote, idempotence."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightclip.cli import main
from lightclip.tracking import PARENT_RUN_ENV, default_tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def dvc_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["synth"].update(n_items=48, image_size=32)
    params["split"].update(val=8, test=8)
    params["build_kg"]["min_count"] = 2
    params["pretrain"]["model"]["arch"] = "lc-test-tiny"
    params["pretrain"]["train"].update(epochs=1, batch_size=8, num_threads=1)
    params["teacher_embed"]["num_threads"] = 1
    params["distill"]["student"]["arch"] = "lc-test-tiny"
    params["distill"]["train"].update(epochs=1, batch_size=8, num_threads=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO_ROOT / "src" / "lightclip", root / "src" / "lightclip", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.chdir(root)
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], root)
    return root


def test_repro_is_tracked_idempotent_and_clean(dvc_project: Path):
    root = dvc_project
    assert main(["-q", "data", "synth", "--out", "data/raw"]) == 0
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], root)
    tracked = (root / "data.dvc").read_text()

    assert main(["-q", "pipeline", "--name", "test-repro"]) == 0
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    stages = {"validate", "split", "build_kg", "pretrain", "teacher_embed", "distill"}
    assert stages <= set(lock["stages"])
    assert (root / "data" / "split" / "catalogue.parquet").is_file()
    assert (root / "data" / "kg" / "graph.json").is_file()
    assert (root / "models" / "teacher" / "model.safetensors").is_file()
    assert (root / "models" / "student" / "model.safetensors").is_file()

    status = _run(["dvc", "status"], root)
    assert "up to date" in status
    assert (root / "data.dvc").read_text() == tracked
    again = _run(["dvc", "repro"], root)
    assert "Running stage" not in again

    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri(root))
    runs = mlflow.search_runs(experiment_names=["lightclip"])
    parent = runs[runs["tags.lightclip.stage"] == "pipeline"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert stages <= set(children["tags.lightclip.stage"])
    assert set(children["tags.lightclip.data_hash"]) == {yaml.safe_load(tracked)["outs"][0]["md5"]}


def test_remote_roundtrip_and_regeneration_match_data_dvc(dvc_project: Path):
    root = dvc_project
    assert main(["-q", "data", "synth", "--out", "data/raw"]) == 0
    (root / "data.dvc").write_text("outs:\n- path: data/raw\n")
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], root)
    _run(["dvc", "push", "-q", "data.dvc"], root)

    shutil.rmtree(root / "data" / "raw")
    _run(["dvc", "pull", "-q", "data.dvc"], root)
    assert "up to date" in _run(["dvc", "status", "data.dvc"], root)

    # No remote copy: regenerating from params gives the same bytes, so data.dvc stays unchanged.
    shutil.rmtree(root / "data" / "raw")
    assert main(["-q", "data", "synth", "--out", "data/raw"]) == 0
    assert "up to date" in _run(["dvc", "status", "data.dvc"], root)
