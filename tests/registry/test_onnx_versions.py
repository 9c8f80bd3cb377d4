"""Versions that carry their ONNX export (``register.runtime: onnx``): the artifact ships the
graphs beside the weights, the gate's latency is timed on ONNX Runtime, the pyfunc runs them;
an export that is not the weights' is refused, never used."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from lightclip.io import read_json
from lightclip.models.onnx_runtime import RUNTIME_DIR, RUNTIME_FILE, RuntimeMismatchError, read_runtime_info
from lightclip.registry import packaging
from lightclip.registry.gate import TAG_RUNTIME
from lightclip.serving import ONNX_RUNTIME_FILE, Embedder, ServingError

from .conftest import STUDENT, TEACHER, Project, enter, new_project

MODELS = ["teacher", "a"]


def _download(source: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(source, tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))


@pytest.fixture(scope="module")
def onnx_project(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The teacher and student ``a`` registered once with ``register.runtime: onnx`` (``a`` gets @staging)."""
    project = new_project(tmp_path_factory.mktemp("onnx") / "proj", assets)
    with pytest.MonkeyPatch.context() as monkeypatch:
        enter(project, monkeypatch)
        project.write_params(MODELS, runtime="onnx")
        project.write_eval(MODELS)
        project.run_stage()
    return project


@pytest.fixture
def onnx_staged(onnx_project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    return enter(onnx_project, monkeypatch)


def test_a_new_version_ships_its_export_and_is_gated_on_onnx_runtime(onnx_staged: Project):
    report = read_json(onnx_staged.report_path)
    assert report["students"]["a"]["staged"] and report["students"]["a"]["gate"] == "pass"
    registry = onnx_staged.registry()
    for name, ref in ((STUDENT, "@staging"), (TEACHER, "1")):
        version = registry.version(name, ref)
        assert version.tags[TAG_RUNTIME] == "onnx"
        local = _download(version.source)
        model = local / "artifacts" / "model"
        shipped = sorted(p.name for p in (model / "onnx").iterdir())
        assert {"image.onnx", "text.onnx", "runtime.json"} <= set(shipped)
        info = read_runtime_info(model)
        assert info["weights_sha256"] == version.tags["lightclip.weights_sha256"]
        assert sorted(info["files"]) == [n for n in shipped if n != "runtime.json"]  # external data included
        requirements = (local / "requirements.txt").read_text().split()
        assert [r.split("==")[0] for r in requirements] == [*packaging.PIP_PACKAGES, *packaging.ONNX_PACKAGES]
        assert all("==" in r for r in requirements)
        assert "on ONNX Runtime (batch 1" in version.description and "run it on ONNX Runtime" in version.description
    latency = registry.version(STUDENT, "@staging").tags["lightclip.gate.staging.latency"]
    assert latency.startswith("pass: encode p50") and "ONNX Runtime, thread-cpu min-round p50" in latency


def test_the_pyfunc_of_such_a_version_runs_onnx_runtime_with_the_weights_vectors(onnx_staged: Project, assets: Path,
                                                                                 mixed_request: pd.DataFrame):
    model = mlflow.pyfunc.load_model(f"models:/{STUDENT}@staging")
    assert model.unwrap_python_model().embedder.runtime == "onnx"
    vectors = model.predict(mixed_request)
    expected = Embedder(assets / "models" / "students" / "a", runtime="torch").embed_frame(mixed_request)
    assert vectors.shape == expected.shape and vectors.dtype == np.float32
    assert float((vectors * expected).sum(axis=1).min()) >= 0.999


def test_an_export_that_is_not_the_weights_is_refused_never_used(onnx_staged: Project, assets: Path, tmp_path: Path):
    source = _download(onnx_staged.registry().version(STUDENT, "@staging").source) / "artifacts" / "model"
    assert Embedder(source).runtime == "onnx" and Embedder(source, runtime="torch").runtime == "torch"
    changed = shutil.copytree(source, tmp_path / "changed")
    (changed / "onnx" / "text.onnx").write_bytes((changed / "onnx" / "text.onnx").read_bytes() + b"\0")
    with pytest.raises(RuntimeMismatchError, match=r"text\.onnx: sha256 .* the file changed after export"):
        Embedder(changed)
    external = sorted((source / "onnx").glob("*.onnx.data"))  # the exporter keeps the graphs' weights beside them
    assert [p.name for p in external] == ["image.onnx.data", "text.onnx.data"]
    for data in external:  # checked like the graphs
        tampered = shutil.copytree(source, tmp_path / f"tampered-{data.name}")
        (tampered / "onnx" / data.name).write_bytes(data.read_bytes()[::-1])
        with pytest.raises(RuntimeMismatchError, match=rf"{data.name}: sha256 .* the file changed after export"):
            Embedder(tampered)
    extra = shutil.copytree(source, tmp_path / "extra")
    (extra / "onnx" / "stray.onnx.data").write_bytes(b"\0")
    with pytest.raises(RuntimeMismatchError, match=r"holds files it does not record \(stray\.onnx\.data\)"):
        Embedder(extra)
    other = shutil.copytree(source, tmp_path / "other")  # student b's weights under a's export
    for name in ("model.safetensors", "model.json"):
        shutil.copy(assets / "models" / "students" / "b" / name, other / name)
    with pytest.raises(RuntimeMismatchError, match="the graphs belong to other weights"):
        Embedder(other)
    assert Embedder(other, runtime="torch").runtime == "torch"  # the weights alone still serve, on PyTorch
    bare = assets / "models" / "students" / "b"
    assert ONNX_RUNTIME_FILE == Path(RUNTIME_DIR) / RUNTIME_FILE  # what serving looks for is what export writes
    assert Embedder(bare).runtime == "torch"
    with pytest.raises(ServingError, match=r"runtime onnx was asked for but the model carries no ONNX export \(onnx/runtime.json missing\)"):
        Embedder(bare, runtime="onnx")
    with pytest.raises(ServingError, match=r"runtime onnx-int8 was asked for but the model carries no ONNX export"):
        Embedder(bare, runtime="onnx-int8")
    with pytest.raises(ServingError, match="unknown runtime 'tensorrt'"):
        Embedder(bare, runtime="tensorrt")


def test_a_version_registered_again_keeps_the_runtime_its_artifact_carries(onnx_staged: Project):
    first = onnx_staged.registry().version(STUDENT, "@staging")
    onnx_staged.write_params(MODELS, runtime="torch")
    report = onnx_staged.run_stage()
    assert report["students"]["a"]["reused"] and report["students"]["a"]["version"] == str(first.version)
    again = onnx_staged.registry().version(STUDENT, str(first.version))
    assert again.tags[TAG_RUNTIME] == "onnx"  # timed again on what it ships, not on register.runtime
