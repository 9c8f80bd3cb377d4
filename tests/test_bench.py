"""``lightclip bench`` at tiny sizes writes metrics/speed.json with every field (a smoke test, not a benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightclip.bench import clustered_vectors, model_ratios, p50_p95_ms

MODEL_FIELDS = (
    "params_total", "params_non_embedding", "file_mb", "peak_rss_mb", "image_ms_p50", "image_ms_p95", "text_ms_p50", "text_ms_p95",
    "image_ms_p50_one_thread", "text_ms_p50_one_thread",
    "image_per_s", "text_per_s", "index_build_s", "query_ms_p50", "query_ms_p95", "search_text_ms_p50", "search_text_ms_p95",
    "eval_overhead/embed_s", "eval_overhead/metrics_s", "eval_overhead/share", "eval_overhead/ok",
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_mlflow_uri: str, projects) -> Path:
    from lightclip.models.zoo import ModelSpec, arch_config, build_from_config, create_model, save_model

    root = tmp_path / "proj"
    (root / "models").mkdir(parents=True)
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", root / "models" / "teacher")
    small = build_from_config({**arch_config("lc-test-tiny"), "embed_dim": 16})
    save_model(small, "lc-test-tiny", root / "models" / "student")
    params = projects.repo_params()
    params["evaluate"]["models"] = {"teacher": "models/teacher", "student": "models/student"}
    params["evaluate"]["batch_size"] = 16
    params["bench"].update(
        warmup=1, runs=100, rounds=1, batch_size=8, throughput_batches=1, gallery_size=300, eval_rounds=2, index_sizes=[200, 400],
        index_queries=10, hnsw_max_build_seconds=1e-9, num_threads=1,
    )
    params["evaluate"]["num_threads"] = 1
    params["index"]["threads"] = 1
    projects.create(root, params)
    return projects.enter(root, monkeypatch, mlflow_uri=shared_mlflow_uri)


def test_bench_at_tiny_sizes_writes_speed_json_and_the_runtimes_plot(project: Path, tiny_catalogue, capsys: pytest.CaptureFixture[str]):
    from lightclip.bench import flat_metrics
    from lightclip.cli import main

    catalogue = tiny_catalogue(16, root=project / "data" / "split")  # the evaluated catalogue: each runtime's recall
    catalogue.items["split"] = "test"
    catalogue.save()
    assert main(["bench", "--out", "metrics/speed.json"]) == 0
    out = capsys.readouterr().out
    assert "of the embedding time" in out and "speed report: metrics/speed.json" in out
    assert "recall vs latency, every model and runtime: metrics/plots/bench/recall_vs_latency.csv" in out
    report = json.loads((project / "metrics" / "speed.json").read_text())
    assert {"cores", "torch_threads", "cpu"} <= set(report["machine"])
    assert set(report["models"]) == {"teacher", "student"}
    for name, values in report["models"].items():
        for field in MODEL_FIELDS:
            assert field in values, (name, field)
        assert values["image_ms_p95"] >= values["image_ms_p50"] > 0
        assert values["eval_overhead/gallery"] == 300 and values["eval_overhead/rounds"] == 2
    assert report["models"]["student"]["embed_dim"] == 16
    ratios = report["ratios"]["student"]
    assert {"image_latency_x", "text_latency_x", "image_latency_one_thread_x", "text_latency_one_thread_x", "params_x", "file_size_x", "peak_rss_x"} <= set(ratios)
    assert ratios["params_x"] > 1  # the 16-d student has fewer parameters
    rows = {(r["n"], r["kind"]): r for r in report["index_scaling"]}
    assert set(rows) == {(n, k) for n in (200, 400) for k in ("flat", "ivf", "hnsw")}
    assert rows[(200, "flat")]["recall@10_vs_flat"] == 1.0
    ivf = rows[(400, "ivf")]  # 400 vectors: 10 lists, all probed, so IVF searches exactly
    assert ivf["nlist"] == ivf["nprobe"] == 10 and ivf["recall@10_vs_flat"] == 1.0 and "query_ms_p95" in ivf
    assert "skipped" in rows[(400, "hnsw")] and "build_s" in rows[(200, "hnsw")]

    every = {"torch", "onnx", "onnx-int8"}
    assert {name: set(rows) for name, rows in report["runtimes"].items()} == {"teacher": every, "student": every}
    for rows in report["runtimes"].values():
        assert rows["onnx"]["recall_ok"] and rows["onnx"]["batch1_ms"] > 0 and rows["torch"]["recall_change"] == 0
    lines = (project / "metrics" / "plots" / "bench" / "recall_vs_latency.csv").read_text().splitlines()
    assert lines[0] == "model,runtime,label,batch1_ms,mean_recall" and len(lines) == 7
    assert (project / "reports" / "bench" / "recall_vs_latency.png").stat().st_size > 0
    assert "runtimes/student/onnx/mean_recall" in flat_metrics(report)
    assert not (project / "models" / "student" / "onnx").exists()  # exported in .cache/runtimes, not in the model directory
    if report["efficiency"]["peak"]["int8"].get("available"):  # the int8 graphs timed against the int8 peak
        assert report["efficiency"]["models"]["student"]["image_peak_ratio_int8"] > 0


def test_bench_without_the_evaluated_catalogue_says_so_and_skips_the_runtimes(project: Path, monkeypatch, capsys: pytest.CaptureFixture[str]):
    import lightclip.bench
    from lightclip.cli import main

    seen = {}

    def recorded(config, inputs, outputs, context):
        seen.update(catalogue=inputs.catalogue, runtimes=config.runtimes)
        return {"machine": {}, "models": {}, "ratios": {}, "index_scaling": [], "runtimes": {}}

    monkeypatch.setattr(lightclip.bench, "run_bench", recorded)
    assert main(["bench", "--in", "data/nowhere", "--out", "metrics/speed.json"]) == 0
    captured = capsys.readouterr()
    assert seen == {"catalogue": None, "runtimes": ["torch", "onnx", "onnx-int8"]}
    assert "no catalogue at data/nowhere: the runtimes' recall-vs-latency plot is skipped (give --in DIR)" in captured.err
    assert "recall vs latency" not in captured.out


def test_bench_helpers():
    x = clustered_vectors(50, 8, seed=0)
    assert x.shape == (50, 8) and x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.array_equal(x, clustered_vectors(50, 8, seed=0))
    assert p50_p95_ms([0.001] * 10) == pytest.approx((1.0, 1.0))
    ratios = model_ratios({"teacher": {"image_ms_p50": 4.0, "params_total": 100}, "s": {"image_ms_p50": 1.0, "params_total": 25}}, "teacher")
    assert ratios == {"s": {"image_latency_x": 4.0, "params_x": 4.0}}
    assert model_ratios({"s": {"image_ms_p50": 1.0}}, "teacher") == {}
