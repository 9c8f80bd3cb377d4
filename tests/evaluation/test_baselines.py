"""Zero-shot baselines: a downloaded open_clip model evaluated beside saved models, from params
(``evaluate.baselines``) and from the command line (``--baseline NAME=ARCH@DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightclip.cli.common import CliError, _with
from lightclip.cli.stages import _baselines
from lightclip.config import EvaluateConfig, ModelConfig, SplitConfig, SynthConfig
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.evaluation import EvaluateInputs, EvaluateOutputs, EvaluationError, run_evaluate
from lightclip.models.zoo import OPEN_CLIP_CONFIG_FILE, ModelSpec, arch_config, create_model, load_model, read_model_info, save_model
from lightclip.stage import StageContext

MEAN, STD = [0.5, 0.5, 0.5], [0.3, 0.3, 0.3]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny split catalogue, a saved teacher and a download (open_clip layout) of other weights."""
    root = tmp_path_factory.mktemp("baselines")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=2, n_items=32, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=4, test=8)).save(root / "split")
    teacher, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(teacher, "lc-test-tiny", root / "models" / "teacher")
    pretrained, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=5)
    download = root / "downloads" / "tiny-clip"
    download.mkdir(parents=True)
    (download / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps({"model_cfg": arch_config("lc-test-tiny"), "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    torch.save(pretrained.state_dict(), download / "open_clip_pytorch_model.bin")
    return root


def test_a_download_is_a_baseline_row_beside_the_saved_models(workspace: Path, tmp_path: Path):
    config = EvaluateConfig(models={"teacher": "models/teacher"}, baselines={"zero_shot": ModelConfig(arch="lc-test-tiny", pretrained="downloads/tiny-clip")})
    context = StageContext(project_dir=workspace, progress=False)
    outputs = EvaluateOutputs(metrics=tmp_path / "eval.json", plots=tmp_path / "plots", ranks=tmp_path / "ranks.json")
    metrics = run_evaluate(config, EvaluateInputs(catalogue=workspace / "split"), outputs, context)
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert list(rows) == ["teacher", "zero_shot"]
    assert rows["zero_shot"]["model_dir"] == "lc-test-tiny@downloads/tiny-clip" and rows["zero_shot"]["test/n_items"] == 8
    assert {"teacher/test/mean_recall", "zero_shot/test/mean_recall"} <= set(metrics)
    assert set(json.loads((tmp_path / "ranks.json").read_text())["models"]) == {"teacher", "zero_shot"}

    (converted,) = (workspace / ".cache" / "baselines").iterdir()  # converted once, with the download's preprocessing
    info = read_model_info(converted)
    assert info["image"]["mean"] == MEAN and info["image"]["std"] == STD and info["extra"]["pretrained"].endswith("downloads/tiny-clip")
    reference, _ = create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(workspace / "downloads" / "tiny-clip")))
    assert torch.equal(load_model(converted).visual.conv1.weight, reference.visual.conv1.weight)
    stamp = converted.stat().st_mtime_ns
    run_evaluate(config, EvaluateInputs(catalogue=workspace / "split"), outputs, context)
    assert [p.stat().st_mtime_ns for p in (workspace / ".cache" / "baselines").iterdir()] == [stamp]  # reused, not converted again


def test_baseline_errors_name_the_entry(workspace: Path, tmp_path: Path):
    context = StageContext(project_dir=workspace, progress=False)
    outputs = EvaluateOutputs(metrics=tmp_path / "eval.json", plots=tmp_path / "plots")
    clash = EvaluateConfig(models={"teacher": "models/teacher"}, baselines={"teacher": ModelConfig(arch="lc-test-tiny")})
    with pytest.raises(EvaluationError, match=r"\['teacher'\] also name\(s\) in evaluate.models"):
        run_evaluate(clash, EvaluateInputs(catalogue=workspace / "split"), outputs, context)
    unknown = EvaluateConfig(models={"teacher": "models/teacher"}, baselines={"big": ModelConfig(arch="ViT-Z-99")})
    with pytest.raises(EvaluationError, match="evaluate.baselines.big: .*unknown architecture 'ViT-Z-99'"):
        run_evaluate(unknown, EvaluateInputs(catalogue=workspace / "split"), outputs, context)
    assert not (tmp_path / "eval.json").exists()


def test_cli_baseline_flag_becomes_evaluate_baselines():
    config = _with(EvaluateConfig(), baselines=_baselines(["clip=ViT-B-32@/data/clip-vit-b-32", "plain=RN50"]))
    assert config.baselines == {"clip": ModelConfig(arch="ViT-B-32", pretrained="/data/clip-vit-b-32"), "plain": ModelConfig(arch="RN50")}
    assert _baselines(None) is None and _with(EvaluateConfig(), baselines=None).baselines == {}
    with pytest.raises(CliError, match="expected NAME=ARCH"):
        _baselines(["no-arch"])


def test_a_download_replaced_in_place_is_converted_again_even_with_its_old_size_and_time(workspace: Path, tmp_path: Path):
    """The conversion cache is keyed by the weights' bytes, not by the files' size and mtime."""
    import os
    import shutil

    from lightclip.evaluation.baselines import baseline_dir

    download = shutil.copytree(workspace / "downloads" / "tiny-clip", tmp_path / "dl")
    config = ModelConfig(arch="lc-test-tiny", pretrained=str(download))
    first = baseline_dir("zs", config, tmp_path / "cache")
    assert baseline_dir("zs", config, tmp_path / "cache") == first  # unchanged: reused
    weights = download / "open_clip_pytorch_model.bin"
    stat = weights.stat()
    other, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=6)
    torch.save(other.state_dict(), weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    second = baseline_dir("zs", config, tmp_path / "cache")
    assert second != first and torch.equal(load_model(second).visual.conv1.weight, other.visual.conv1.weight)
