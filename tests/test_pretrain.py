"""The pretrain stage: teacher training with and without concepts, bad input, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightclip.config import KGConfig, ModelConfig, PretrainConfig, SplitConfig, SynthConfig, TrainConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.kg import KGError
from lightclip.kg.build import build_knowledge_graph
from lightclip.models.zoo import ModelError, load_model
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.stage import StageContext


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny split synthetic catalogue at 32 px and its knowledge graph."""
    root = tmp_path_factory.mktemp("pretrain")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=3, n_items=96, image_size=32), progress=False)
    split = assign_splits(raw, SplitConfig(seed=0, val=16, test=16)).save(root / "split")
    build_knowledge_graph(split, KGConfig(min_count=2), root / "kg", stats_path=root / "kg.json", figure_path=root / "kg.png", progress=False)
    return root


def tiny_config(concept_weight: float, epochs: int = 2) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(arch="lc-test-tiny"),
        train=TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, warmup_steps=0, grad_clip_norm=0.0, early_stop_patience=0, num_threads=1, log_every_n_steps=2),
        concept_weight=concept_weight,
        ensemble_members=1,
    )


def pretrain(config: PretrainConfig, catalogue: Path, kg: Path | None, out: Path, project: Path, **context) -> dict:
    """run_pretrain with its outputs at ``out`` (model) and ``out.json`` (metrics), caches under ``project``."""
    outputs = PretrainOutputs(model=out, metrics=out.with_suffix(".json"))
    return run_pretrain(config, PretrainInputs(catalogue=catalogue, kg=kg), outputs, StageContext(project_dir=project, progress=False, **context))


@pytest.mark.parametrize("concept_weight", [0.0, 0.5])
def test_pretrain_writes_teacher_and_metrics(workspace: Path, tmp_path: Path, concept_weight: float, saved_model_metrics):
    logged: list[tuple[dict, int]] = []
    catalogue = Catalogue.load(workspace / "split")
    metrics = pretrain(
        tiny_config(concept_weight), workspace / "split", workspace / "kg", tmp_path / "teacher", tmp_path,
        log_metrics=lambda values, step: logged.append((values, step)),
    )
    assert metrics["steps"] == 2 * (64 // 16)
    assert json.loads((tmp_path / "teacher.json").read_text()) == pytest.approx(metrics)  # the stage writes its metrics
    test = saved_model_metrics(tmp_path / "teacher", catalogue, "test", workspace / "cache")
    assert "test/i2t_R@1" in test and {k: metrics[k] for k in test} == pytest.approx(test)  # the saved teacher is the one scored
    train_terms = {k for values, _ in logged for k in values}
    assert "train/loss" in train_terms and "val/mean_recall" in train_terms
    if concept_weight > 0:
        assert "train/concept" in train_terms and metrics["prototype_refreshes"] == 2
        prototypes = json.loads((tmp_path / "teacher" / "prototypes.json").read_text())
        selection = json.loads((workspace / "kg" / "prototype_selection.json").read_text())
        assert prototypes and all(1 <= len(v) <= selection["prototypes_per_concept"] for v in prototypes.values())
    else:
        assert "train/concept" not in train_terms
        assert not (tmp_path / "teacher" / "prototypes.json").exists()


def test_bad_inputs_are_clear_errors(workspace: Path, tmp_path: Path):
    split = workspace / "split"
    with pytest.raises(KGError, match="concept graph not found"):
        pretrain(tiny_config(0.5), split, tmp_path / "no-kg", tmp_path / "t", tmp_path)
    with pytest.raises(KGError, match="needs the knowledge graph"):
        pretrain(tiny_config(0.5), split, None, tmp_path / "t", tmp_path)
    stale = tmp_path / "stale-kg"
    stale.mkdir()
    for name in ("graph.json", "prototypes.json", "prototype_selection.json"):
        (stale / name).write_text((workspace / "kg" / name).read_text())
    links = json.loads((workspace / "kg" / "item_concepts.json").read_text())
    (stale / "item_concepts.json").write_text(json.dumps(dict(list(links.items())[:10])))
    with pytest.raises(KGError, match="does not match the catalogue"):
        pretrain(tiny_config(0.5), split, stale, tmp_path / "t", tmp_path)
    (stale / "prototype_selection.json").unlink()
    (stale / "item_concepts.json").write_text((workspace / "kg" / "item_concepts.json").read_text())
    with pytest.raises(KGError, match="prototype_selection.json: missing"):
        pretrain(tiny_config(0.5), split, stale, tmp_path / "t", tmp_path)
    bad_arch = tiny_config(0.0).model_copy(update={"model": ModelConfig(arch="lc-no-such-model")})
    with pytest.raises(ModelError, match="lc-no-such-model"):
        pretrain(bad_arch, split, None, tmp_path / "t", tmp_path)
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_kill_mid_run_then_resume_ends_with_same_steps(workspace: Path, tmp_path: Path, projects):
    """A real SIGKILL of the CLI during training; --resume finishes with the planned step count."""
    params = projects.repo_params()
    params["pretrain"] = {
        "model": {"arch": "lc-test-tiny"},
        "train": {"epochs": 6, "batch_size": 16, "lr": 1e-3, "warmup_steps": 0, "grad_clip_norm": 0.0, "early_stop_patience": 0,
                  "num_threads": 1, "log_every_n_steps": 1},
        "concept_weight": 0.5,
        "ensemble_members": 1,
    }
    project = projects.create(tmp_path / "proj", params)
    cmd = [sys.executable, "-m", "lightclip.cli", "-q", "pretrain", "--in", str(workspace / "split"), "--kg", str(workspace / "kg"),
           "--out", "teacher", "--metrics", "m.json", "--resume"]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db")
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = project / ".cache" / "checkpoints" / "pretrain"
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("*/last.pt")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    time.sleep(0.3)  # now inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (project / "m.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((project / "m.json").read_text())["steps"] == 6 * (64 // 16)


def test_ensemble_teacher_trains_members_and_reuses_member_zero(workspace: Path, tmp_path: Path, saved_model_metrics):
    """ensemble_members=2: two seeds trained, the ensemble saved and scored as one model;
    member 0 is the single-model run with the same params (its checkpoint is reused)."""
    catalogue = Catalogue.load(workspace / "split")
    single = pretrain(tiny_config(0.5), workspace / "split", workspace / "kg", tmp_path / "single", tmp_path)
    logged: list[dict] = []
    config = tiny_config(0.5).model_copy(update={"ensemble_members": 2})
    metrics = pretrain(config, workspace / "split", workspace / "kg", tmp_path / "teacher", tmp_path,
                       resume=True, log_metrics=lambda values, step: logged.append(values))
    assert metrics["ensemble_members"] == 2
    assert metrics["member0/test/mean_recall"] == pytest.approx(single["test/mean_recall"])
    assert metrics["steps"] == 2 * single["steps"]
    assert {k.split("/")[0] for values in logged for k in values} == {"member1"}  # member 0 resumed complete
    info = json.loads((tmp_path / "teacher" / "model.json").read_text())
    assert info["arch"] == "ensemble(lc-test-tiny x2)"
    assert info["embed_dim"] == 2 * json.loads((tmp_path / "single" / "model.json").read_text())["embed_dim"]
    teacher = load_model(tmp_path / "teacher")
    assert metrics["params/total"] == 2 * single["params/total"]
    test = saved_model_metrics(tmp_path / "teacher", catalogue, "test", workspace / "cache")
    assert test and {k: metrics[k] for k in test} == pytest.approx(test)  # scored as one model, the one saved
    assert type(teacher).__name__ == "EnsembleCLIP"
