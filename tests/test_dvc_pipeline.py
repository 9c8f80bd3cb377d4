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
from lightclip.tracking import default_tracking_uri

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def dvc_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, projects) -> Path:
    """A copy of this project (pipeline, code, the ablation) at test size, in git and DVC with a local remote."""
    params = projects.tiny_params()
    params["pretrain"]["ensemble_members"] = 2  # still an ensemble, one tiny member fewer than the default
    for variant in ("intra_ts_fd", "sd_ts"):  # the sweep follows params.yaml: two variants here
        del params["distill_ablation"]["variants"][variant]
    root = projects.create(
        tmp_path / "proj", params, real_pipeline=True, copy=("pipelines/ablation", "benchmarks/ablation_table.py"),
        dvc=True, dvc_remote=tmp_path / "remote",
    )
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return projects.enter(root, monkeypatch)


def test_repro_is_tracked_idempotent_and_clean(dvc_project: Path, projects):
    root = dvc_project
    student = next(iter(yaml.safe_load((root / "params.yaml").read_text())["distill"]["students"]))
    tracked = projects.track_synthetic_data(root)

    assert main(["-q", "pipeline", "--name", "test-repro"]) == 0
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    stages = {"validate", "split", "build_kg", "pretrain", "teacher_embed", f"distill@{student}", "evaluate", "index"}
    assert stages <= set(lock["stages"])
    assert (root / "data" / "split" / "catalogue.parquet").is_file()
    assert (root / "data" / "kg" / "graph.json").is_file()
    assert (root / "models" / "teacher" / "model.safetensors").is_file()
    assert yaml.safe_load((root / "models" / "teacher" / "model.json").read_text())["arch"] == "ensemble(lc-test-tiny x2)"
    assert (root / "models" / "students" / student / "model.safetensors").is_file()
    assert set(yaml.safe_load((root / "metrics" / "eval.json").read_text())) == {"teacher", student}
    # The first run ends as the product promises: the student registered, gated with the test
    # set's interval and at @staging, as `lightclip registry list` shows a user.
    report = yaml.safe_load((root / "metrics" / "register.json").read_text())
    gated = report["students"][student]
    assert gated["staged"] and report["staging_after"] == gated["version"] and gated["gate"] == "pass"
    assert gated["teacher_fraction_low"] <= gated["teacher_fraction"] <= gated["teacher_fraction_high"]
    listing = _run(["lightclip", "registry", "list"], root)
    staged_row = next(line for line in listing.splitlines() if "@staging" in line.split())
    assert staged_row.split()[0] == gated["version"] and f" {student} " in staged_row

    status = _run(["dvc", "status", "dvc.yaml"], root)
    assert "up to date" in status
    assert (root / "data.dvc").read_text() == tracked
    again = _run(["dvc", "repro"], root)
    assert "Running stage" not in again

    # Every stage depends on the package: bytecode leaves them up to date, a change to any
    # module (here the KG code, which pretrain calls) makes every one of them stale.
    bytecode = root / "src" / "lightclip" / "kg" / "__pycache__"
    bytecode.mkdir()
    (bytecode / "graph.cpython-311.pyc").write_bytes(b"bytecode")
    assert "up to date" in _run(["dvc", "status", "dvc.yaml"], root)
    module = root / "src" / "lightclip" / "kg" / "graph.py"
    source = module.read_text()
    module.write_text(source + "# an edit\n")
    assert set(yaml.safe_load(_run(["dvc", "status", "dvc.yaml", "--json"], root))) == set(lock["stages"])
    module.write_text(source)
    shutil.rmtree(bytecode)

    import mlflow

    mlflow.set_tracking_uri(default_tracking_uri(root))
    runs = mlflow.search_runs(experiment_names=["lightclip"])
    parent = runs[runs["tags.lightclip.stage"] == "pipeline"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert {s.split("@")[0] for s in stages} <= set(children["tags.lightclip.stage"])
    assert set(children["tags.lightclip.data_hash"]) == {yaml.safe_load(tracked)["outs"][0]["md5"]}

    # The distillation ablation: a DVC matrix over the edge-set variants of params.yaml (two of
    # the four here), one MLflow parent.
    assert main(["-q", "pipeline", "--name", "test-ablation", "pipelines/ablation/dvc.yaml"]) == 0
    table = yaml.safe_load((root / "metrics" / "ablation_distill_synthetic.json").read_text())
    assert [(row["student"], row["variant"]) for row in table["rows"]] == [(student, v) for v in ("no_distill", "full")]
    runs = mlflow.search_runs(experiment_names=["lightclip"])
    parent = runs[runs["tags.mlflow.runName"] == "test-ablation"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert set(children["tags.lightclip.variant"]) == {"no_distill", "full"}
    assert set(children["tags.lightclip.student"]) == {student}
    assert "Running stage" not in _run(["dvc", "repro", "pipelines/ablation/dvc.yaml"], root)

    # Two experiments compare with dvc metrics diff / dvc plots diff (metrics and plot data in git).
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "baseline"], root)
    _run(["dvc", "exp", "run", "dvc.yaml", "-S", "distill.train.lr=0.004", "-n", "lr4"], root)
    diff = _run(["dvc", "metrics", "diff", "HEAD", "--json"], root)
    changed = yaml.safe_load(diff)
    assert "metrics/eval.json" in changed and any(k.startswith(f"{student}.") for k in changed["metrics/eval.json"])
    assert not any(k.startswith("teacher.test/") for k in changed["metrics/eval.json"])  # the teacher did not change
    _run(["dvc", "plots", "diff", "HEAD", "-o", str(root / "plots_diff")], root)
    assert (root / "plots_diff" / "index.html").is_file()


def test_remote_roundtrip_and_regeneration_match_data_dvc(dvc_project: Path, projects):
    root = dvc_project
    projects.track_synthetic_data(root)
    _run(["dvc", "push", "-q", "data.dvc"], root)

    shutil.rmtree(root / "data" / "raw")
    _run(["dvc", "pull", "-q", "data.dvc"], root)
    assert "up to date" in _run(["dvc", "status", "data.dvc"], root)

    # No remote copy: regenerating from params gives the same bytes, so data.dvc stays unchanged.
    shutil.rmtree(root / "data" / "raw")
    assert main(["-q", "data", "synth", "--out", "data/raw"]) == 0
    assert "up to date" in _run(["dvc", "status", "data.dvc"], root)
