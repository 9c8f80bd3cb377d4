"""Every model on every runtime: each evaluated on its own runtime, exported outside the model
directory, timed in one interleaved loop, and flagged when a runtime moves recall."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightclip import runtimes
from lightclip.config import EvaluateConfig
from lightclip.models.onnx_runtime import RUNTIME_DIR, has_onnx
from lightclip.models.zoo import ModelSpec, create_model, save_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtimes")
    dirs = {}
    for seed, name in enumerate(("teacher", "student")):
        model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=seed)
        save_model(model, "lc-test-tiny", root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture
def catalogue(tiny_catalogue):
    catalogue = tiny_catalogue(16)
    catalogue.items["split"] = "test"
    return catalogue


def compare(models, catalogue, tmp_path, runtime_names=("torch", "onnx"), **kwargs):
    config = EvaluateConfig(models={k: str(v) for k, v in models.items()}, batch_size=8)
    lines: list[str] = []
    report = runtimes.compare_runtimes(models, list(runtime_names), catalogue, config, cache_dir=tmp_path / "runtimes",
                                       image_cache_dir=tmp_path / "images", rounds=2, calls=4, log=lines.append, **kwargs)
    return report, lines


def test_each_model_on_each_runtime_has_its_own_recall_and_latency(models, catalogue, tmp_path):
    report, lines = compare(models, catalogue, tmp_path, runtimes.RUNTIMES)
    assert list(report) == ["teacher", "student"]
    for name in models:
        torch_row, onnx_row = report[name]["torch"], report[name]["onnx"]
        assert torch_row["batch1_ms"] > 0 and onnx_row["batch1_ms"] > 0
        assert torch_row["recall_change"] == 0 and abs(onnx_row["recall_change"]) <= runtimes.MAX_RECALL_CHANGE and onnx_row["recall_ok"]
        int8_row = report[name]["onnx-int8"]  # evaluated on its own graphs: a recall of its own, flagged or not by the same rule
        assert int8_row["batch1_ms"] > 0 and int8_row["recall_ok"] == (abs(int8_row["recall_change"]) <= runtimes.MAX_RECALL_CHANGE)
        assert not (models[name] / RUNTIME_DIR).exists()  # the model directory (a pipeline output) is never written
    assert not any("WARNING" in line and "on onnx " in line for line in lines)
    exports = sorted((tmp_path / "runtimes").iterdir())
    assert len(exports) == 2 and all(has_onnx(d) for d in exports)  # one export per weights, in the cache

    written = runtimes.write_plot_data(report, tmp_path / "plots" / "recall_vs_latency.csv")
    rows = list(csv.DictReader(written.open()))
    assert [(r["model"], r["runtime"]) for r in rows] == [(m, r) for m in ("teacher", "student") for r in ("torch", "onnx", "onnx-int8")]
    assert float(rows[1]["mean_recall"]) == pytest.approx(report["teacher"]["onnx"]["mean_recall"], abs=1e-3)
    figure = runtimes.write_figure(report, tmp_path / "figures" / "recall_vs_latency.png", "test")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_export_is_made_once_per_weights_and_redone_when_it_no_longer_matches(models, tmp_path):
    first = runtimes.runtime_dir(models["student"], "onnx", tmp_path)
    graph = first / RUNTIME_DIR / "text.onnx"
    stamp = graph.stat().st_mtime_ns
    assert runtimes.runtime_dir(models["student"], "onnx", tmp_path) == first and graph.stat().st_mtime_ns == stamp
    graph.write_bytes(graph.read_bytes() + b"\0")  # a changed graph: re-exported, never used
    again = runtimes.runtime_dir(models["student"], "onnx", tmp_path)
    assert again == first and graph.stat().st_mtime_ns != stamp and has_onnx(again)
    info_path = again / RUNTIME_DIR / "runtime.json"  # an export from before int8 graphs: redone for them
    info_path.write_text(json.dumps({k: v for k, v in json.loads(info_path.read_text()).items() if k != "int8"}))
    assert runtimes.runtime_dir(models["student"], "onnx-int8", tmp_path) == first and "int8" in json.loads(info_path.read_text())
    assert runtimes.runtime_dir(models["student"], "torch", tmp_path) == models["student"]
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        runtimes.runtime_dir(models["student"], "tensorrt", tmp_path)


def test_a_runtime_that_moves_recall_is_flagged(models, catalogue, tmp_path, monkeypatch):
    real = runtimes.evaluate_model

    def shifted(*args, runtime="torch", **kwargs):
        result = real(*args, runtime=runtime, **kwargs)
        if runtime == "onnx":
            result.metrics["test/mean_recall"] -= 2.0
        return result

    monkeypatch.setattr(runtimes, "evaluate_model", shifted)
    report, lines = compare({"student": models["student"]}, catalogue, tmp_path)
    row = report["student"]["onnx"]
    assert row["recall_change"] == pytest.approx(-2.0) and row["recall_ok"] is False
    assert any(line.startswith("  WARNING: student on onnx moves test mean recall by -2.00 points") for line in lines)
