"""The evaluate stage on a tiny catalogue: its files, its numbers against the brute-force reference, its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightclip.config import EvaluateConfig, SplitConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.evaluation import EvaluateInputs, EvaluateOutputs, EvaluationError, item_recall_scores, read_ranks, run_evaluate, summarise
from lightclip.imagecache import build_image_cache, normalise
from lightclip.models.zoo import ModelSpec, create_model, encode_text, load_model, load_tokenizer, preprocess_config, save_model
from lightclip.stage import StageContext


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=1, n_items=48, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=8, test=16)).save(root / "split")
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", root / "models" / "teacher")
    return root


def _outputs(tmp_path: Path, figures: bool = True) -> EvaluateOutputs:
    return EvaluateOutputs(metrics=tmp_path / "eval.json", plots=tmp_path / "plots", figures=tmp_path / "fig" if figures else None,
                           ranks=tmp_path / "ranks.json")


def test_evaluate_stage_writes_metrics_plots_and_figures(workspace: Path, tmp_path: Path):
    config = EvaluateConfig(models={"teacher": "models/teacher", "twin": str(workspace / "models" / "teacher")})
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "stale.csv").write_text("left over\n")
    returned = run_evaluate(config, EvaluateInputs(catalogue=workspace / "split"), _outputs(tmp_path), StageContext(project_dir=workspace, progress=False))
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert set(metrics) == {"teacher", "twin"}
    m = metrics["teacher"]
    for key in ("test/i2t_R@1", "test/t2i_R@10", "test/mean_recall", "test/i2t_median_rank", "test/t2i_mean_rank",
                "test/t2i_P@10_articleType", "test/t2i_P@5_articleType_baseColour", "test/n_items", "timing/encode_ms_per_item"):
        assert key in m, key
    assert m["test/n_items"] == 16 and m["model_dir"] == "models/teacher"
    # same weights, same numbers (timings aside)
    assert {k: v for k, v in metrics["twin"].items() if not k.startswith("timing/") and k != "model_dir"} == {
        k: v for k, v in m.items() if not k.startswith("timing/") and k != "model_dir"
    }
    # the returned metrics are the file's, flattened per model
    assert returned == {f"{name}/{k}": v for name, values in metrics.items() for k, v in values.items() if k != "model_dir"}
    curve = (tmp_path / "plots" / "recall_at_k" / "teacher.csv").read_text().splitlines()
    assert curve[0] == "k,i2t_recall,t2i_recall" and len(curve) == 1 + len(config.curve_ks)
    assert [int(line.split(",")[0]) for line in curve[1:]] == config.curve_ks
    assert float(curve[1].split(",")[1]) == pytest.approx(m["test/i2t_R@1"], abs=1e-4)
    latency = (tmp_path / "plots" / "recall_vs_latency.csv").read_text().splitlines()
    assert latency[0] == "model,encode_ms_per_item,mean_recall,i2t_R@1,t2i_R@1" and [row.split(",")[0] for row in latency[1:]] == ["teacher", "twin"]
    assert not (tmp_path / "plots" / "stale.csv").exists()  # the directory is replaced whole
    pngs = sorted((tmp_path / "fig").iterdir())
    assert [p.name for p in pngs] == ["recall_at_k.png", "recall_vs_latency.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000 for p in pngs)
    timings = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("timing/")}
    assert timings["metric_seconds"] > 0 and timings["embed_seconds"] > 0
    assert timings["metric_share_of_embed"] == pytest.approx(timings["metric_seconds"] / timings["embed_seconds"])
    # each query's rank, per model: the per-item scores average to the reported mean recall
    ranks = read_ranks(tmp_path / "ranks.json")
    assert ranks["split"] == "test" and ranks["ks"] == config.ks and set(ranks["models"]) == {"teacher", "twin"}
    teacher_ranks = ranks["models"]["teacher"]
    assert len(teacher_ranks["i2t"]) == len(teacher_ranks["t2i"]) == 16
    assert item_recall_scores(teacher_ranks["i2t"], teacher_ranks["t2i"], config.ks).mean() == pytest.approx(m["test/mean_recall"], abs=1e-9)
    (tmp_path / "ranks.json").write_text('{"format": "something else"}')
    with pytest.raises(EvaluationError, match="ranks.json: not a ranks file of lightclip evaluate"):
        read_ranks(tmp_path / "ranks.json")
    lines = summarise(returned, "test", list(config.models)).splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"teacher: mean recall {m['test/mean_recall']:.2f}; i2t R@1/5/10 ")


def test_stage_numbers_equal_the_float64_brute_force_reference(workspace: Path, tmp_path: Path, brute_force_metrics):
    config = EvaluateConfig(models={"teacher": "models/teacher"}, ks=[1, 5, 10], curve_ks=[1, 5, 10])
    context = StageContext(project_dir=workspace, progress=False)
    run_evaluate(config, EvaluateInputs(catalogue=workspace / "split"), _outputs(tmp_path, figures=False), context)
    ours = {k.split("/", 1)[1]: v for k, v in json.loads((tmp_path / "eval.json").read_text())["teacher"].items() if k.startswith("test/")}

    # independently: the model's own encoders on the cached pixels, positives from a dense mask
    items = Catalogue.load(workspace / "split").split("test")
    model, tok = load_model(workspace / "models" / "teacher"), load_tokenizer(workspace / "models" / "teacher")
    pre = preprocess_config(model)
    cache = build_image_cache(Catalogue.load(workspace / "split"), "test", int(pre["size"]), context.image_cache_dir, progress=False)
    with torch.no_grad():
        images = model.encode_image(normalise(torch.from_numpy(np.array(cache.images)), pre["mean"], pre["std"])).numpy()
        texts = encode_text(model, tok([str(t) for t in items["title"]])).numpy()
    folded = [" ".join(str(t).lower().split()) for t in items["title"]]
    pixels = [cache.images[i].tobytes() for i in range(len(items))]
    n = len(items)
    mask = np.array([[i == j or folded[i] == folded[j] or pixels[i] == pixels[j] for j in range(n)] for i in range(n)])
    labels = {
        "articleType": list(items["articleType"]),
        "articleType_baseColour": list(zip(items["articleType"], items["baseColour"])),
    }
    ref, sims = brute_force_metrics(images, texts, mask, (1, 5, 10), labels=labels, precision_ks=(1, 5, 10))
    # no two similarities of a row within float32 rounding of each other, unless exactly equal
    for matrix in (sims, sims.T):
        for row in matrix:
            gaps = np.diff(np.unique(row))
            assert gaps.size == 0 or gaps.min() > 1e-5
    assert set(ref) <= set(ours)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert ours["positive_pairs"] == int(mask.sum())


def test_evaluate_bad_inputs_are_clear_errors(workspace: Path, tmp_path: Path):
    context = StageContext(project_dir=workspace, progress=False)
    outputs = EvaluateOutputs(metrics=tmp_path / "m.json", plots=tmp_path / "p")
    inputs = EvaluateInputs(catalogue=workspace / "split")
    with pytest.raises(EvaluationError, match="student: models/students/s1 does not exist"):
        run_evaluate(EvaluateConfig(models={"teacher": "models/teacher", "student": "models/students/s1"}), inputs, outputs, context)
    catalogue = Catalogue.load(workspace / "split")
    catalogue.with_items(catalogue.items.assign(split="train")).save(tmp_path / "no_test")
    with pytest.raises(EvaluationError, match="split 'test' has no items"):
        run_evaluate(EvaluateConfig(models={"teacher": "models/teacher"}), EvaluateInputs(catalogue=tmp_path / "no_test"), outputs, context)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p").exists()
