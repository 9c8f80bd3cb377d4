"""``lightclip evaluate --catalogue DIR``: a whole catalogue (a new batch, a holdout) with the stage's metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lightclip.cli import main
from lightclip.config import EvaluateConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.geometry import MODEL_KEY as GEOMETRY_KEY
from lightclip.data.geometry import aspect_summary
from lightclip.data.synth import generate_catalogue
from lightclip.evaluation import EvaluateInputs, EvaluateOutputs, EvaluationError, read_ranks, run_evaluate, sample_catalogue
from lightclip.models.zoo import ModelSpec, create_model, save_model
from lightclip.stage import StageContext


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """An imported, unsplit catalogue of 40 items, the same items all marked test, and a tiny model."""
    root = tmp_path_factory.mktemp("evaluate_catalogue")
    batch = generate_catalogue(root / "batch", SynthConfig(seed=2, n_items=40, image_size=32), progress=False)
    items = batch.items.copy()
    items["split"] = None  # as imported: no split at all
    batch.with_items(items).save()
    items["split"] = "test"
    Catalogue(root=batch.root, items=items).save(root / "as_test")
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", root / "models" / "teacher")
    return root


@pytest.fixture
def project(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_mlflow_uri: str, projects) -> Path:
    params = projects.repo_params()
    params["evaluate"].update(num_threads=1, models={"teacher": "models/teacher"})
    root = projects.create(tmp_path / "proj", params)
    (root / "models").mkdir()
    (root / "models" / "teacher").symlink_to(workspace / "models" / "teacher")
    (root / "batch").symlink_to(workspace / "batch")
    return projects.enter(root, monkeypatch, mlflow_uri=shared_mlflow_uri)


def _scores(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


def test_the_whole_catalogue_scores_as_its_every_item_in_a_test_split(workspace: Path, tmp_path: Path):
    config = EvaluateConfig(models={"teacher": str(workspace / "models" / "teacher")}, num_threads=1)
    context = StageContext(project_dir=tmp_path, progress=False)

    def outputs(name: str) -> EvaluateOutputs:
        return EvaluateOutputs(metrics=tmp_path / name / "m.json", plots=tmp_path / name / "plots", figures=None, ranks=tmp_path / name / "r.json")

    whole = run_evaluate(config, EvaluateInputs(catalogue=workspace / "batch", whole=True), outputs("whole"), context)
    split = run_evaluate(config, EvaluateInputs(catalogue=workspace / "as_test"), outputs("split"), context)
    assert whole["teacher/catalogue/n_items"] == 40
    assert _scores(whole, "teacher/catalogue/") == _scores(split, "teacher/test/")  # the same metrics, named after the scope
    ranks = read_ranks(tmp_path / "whole" / "r.json")
    assert ranks["split"] == "catalogue" and len(ranks["models"]["teacher"]["i2t"]) == 40
    assert ranks["models"] == read_ranks(tmp_path / "split" / "r.json")["models"]
    with pytest.raises(EvaluationError, match="split 'test' has no items"):  # without --catalogue, the unsplit batch has no test split
        run_evaluate(config, EvaluateInputs(catalogue=workspace / "batch"), outputs("none"), context)


def test_a_sample_is_seeded_and_keeps_catalogue_order(workspace: Path):
    batch = Catalogue.load(workspace / "batch")
    a, again, other = (sample_catalogue(batch, 12, seed) for seed in (3, 3, 4))
    ids = batch.items["id"].tolist()
    assert a.items["id"].tolist() == again.items["id"].tolist() != other.items["id"].tolist()
    positions = [ids.index(i) for i in a.items["id"]]
    assert len(positions) == 12 and positions == sorted(positions)
    assert sample_catalogue(batch, 400, 0) is batch  # a sample larger than the catalogue is all of it
    with pytest.raises(EvaluationError, match="--sample must be at least 1"):
        sample_catalogue(batch, 0, 0)


def test_cli_evaluates_a_whole_catalogue_and_prints_the_gallery_size(project: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["-q", "evaluate", "--catalogue", "batch"]) == 0
    out = capsys.readouterr().out
    assert "whole catalogue batch: gallery of 40 items\n" in out and "teacher: mean recall" in out and "40 items, embed" in out
    folder = project / "reports" / "eval_catalogue" / "batch"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["teacher"]["catalogue/n_items"] == 40 and "catalogue/t2i_P@10_articleType" in metrics["teacher"]
    assert (folder / "ranks.json").is_file() and (folder / "plots" / "recall_at_k" / "teacher.csv").is_file()
    assert (folder / "figures" / "recall_at_k.png").is_file()
    assert not (project / "metrics" / "eval.json").exists()  # the evaluate stage's own outputs are left alone

    assert main(["-q", "evaluate", "--catalogue", "batch", "--sample", "16", "--seed", "5", "--metrics", "s.json", "--ranks", "r.json"]) == 0
    out = capsys.readouterr().out
    assert "whole catalogue batch: gallery of 16 items (a sample, seed 5)" in out
    expected = sample_catalogue(Catalogue.load(project / "batch"), 16, 5).items["id"].tolist()
    assert len(read_ranks(project / "r.json")["models"]["teacher"]["t2i"]) == len(expected) == 16
    assert json.loads((project / "s.json").read_text())["teacher"]["catalogue/n_items"] == 16

    assert main(["-q", "evaluate", "--sample", "16"]) == 1
    assert "--sample needs --catalogue DIR" in capsys.readouterr().err


def test_a_catalogue_shaped_unlike_the_training_one_warns_once_and_counts(workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    portraits = aspect_summary([(60, 80)] * 30)  # trained on 3:4 portraits; the batch is 32 x 32 squares
    save_model(model, "lc-test-tiny", tmp_path / "portrait_model", extra={GEOMETRY_KEY: portraits})
    config = EvaluateConfig(models={"portrait": str(tmp_path / "portrait_model"), "plain": str(workspace / "models" / "teacher")}, num_threads=1)
    outputs = EvaluateOutputs(metrics=tmp_path / "m.json", plots=tmp_path / "plots", figures=None)
    with caplog.at_level(logging.WARNING, logger="lightclip"):
        metrics = run_evaluate(config, EvaluateInputs(catalogue=workspace / "batch", whole=True), outputs, StageContext(project_dir=tmp_path, progress=False))
    warnings = [r.getMessage() for r in caplog.records if "image geometry differs" in r.getMessage()]
    assert warnings == [
        "portrait: image geometry differs from the model's training catalogue (100% of images in other shape buckets): "
        "trained on portrait 3:4 (0.70-0.90) 100%; this catalogue square (0.90-1.11) 100%"
    ]
    assert metrics["portrait/catalogue/geometry_shift"] == 1.0
    assert "plain/catalogue/geometry_shift" not in metrics  # a model saved without its training geometry: nothing to compare
