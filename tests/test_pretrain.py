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
import yaml

from lightclip.config import KGConfig, ModelConfig, PretrainConfig, SplitConfig, SynthConfig, TrainConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.kg import KGError
from lightclip.kg.build import build_knowledge_graph
from lightclip.models.zoo import ModelError, load_model
from lightclip.pretrain import run_pretrain

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        train=TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, num_threads=1, log_every_n_steps=2),
        concept_weight=concept_weight,
    )


@pytest.mark.parametrize("concept_weight", [0.0, 0.5])
def test_pretrain_writes_teacher_and_metrics(workspace: Path, tmp_path: Path, concept_weight: float):
    logged: list[tuple[dict, int]] = []
    metrics = run_pretrain(
        Catalogue.load(workspace / "split"),
        workspace / "kg",
        tiny_config(concept_weight),
        KGConfig(),
        tmp_path / "teacher",
        cache_dir=workspace / "cache",
        checkpoint_root=tmp_path / "ckpt",
        log_metrics=lambda values, step: logged.append((values, step)),
        progress=False,
    )
    assert metrics["steps"] == 2 * (64 // 16)
    assert 0 <= metrics["test/mean_recall"] <= 100 and "test/i2t_R@1" in metrics
    assert load_model(tmp_path / "teacher") is not None
    train_terms = {k for values, _ in logged for k in values}
    assert "train/loss" in train_terms and "val/mean_recall" in train_terms
    if concept_weight > 0:
        assert "train/concept" in train_terms and metrics["prototype_refreshes"] == 2
        prototypes = json.loads((tmp_path / "teacher" / "prototypes.json").read_text())
        assert prototypes and all(len(v) >= 1 for v in prototypes.values())
    else:
        assert "train/concept" not in train_terms
        assert not (tmp_path / "teacher" / "prototypes.json").exists()


def test_bad_inputs_are_clear_errors(workspace: Path, tmp_path: Path):
    catalogue = Catalogue.load(workspace / "split")
    kwargs = dict(cache_dir=workspace / "cache", checkpoint_root=tmp_path / "ckpt", progress=False)
    with pytest.raises(KGError, match="concept graph not found"):
        run_pretrain(catalogue, tmp_path / "no-kg", tiny_config(0.5), KGConfig(), tmp_path / "t", **kwargs)
    stale = tmp_path / "stale-kg"
    stale.mkdir()
    for name in ("graph.json", "prototypes.json"):
        (stale / name).write_text((workspace / "kg" / name).read_text())
    links = json.loads((workspace / "kg" / "item_concepts.json").read_text())
    (stale / "item_concepts.json").write_text(json.dumps(dict(list(links.items())[:10])))
    with pytest.raises(KGError, match="does not match the catalogue"):
        run_pretrain(catalogue, stale, tiny_config(0.5), KGConfig(), tmp_path / "t", **kwargs)
    bad_arch = tiny_config(0.0).model_copy(update={"model": ModelConfig(arch="lc-no-such-model")})
    with pytest.raises(ModelError, match="lc-no-such-model"):
        run_pretrain(catalogue, None, bad_arch, KGConfig(), tmp_path / "t", **kwargs)
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_kill_mid_run_then_resume_ends_with_same_steps(workspace: Path, tmp_path: Path):
    """A real SIGKILL of the CLI during training; --resume finishes with the planned step count."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["pretrain"] = {
        "model": {"arch": "lc-test-tiny"},
        "train": {"epochs": 6, "batch_size": 16, "lr": 1e-3, "num_threads": 1, "log_every_n_steps": 1},
        "concept_weight": 0.5,
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params))
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


def test_ensemble_teacher_trains_members_and_reuses_member_zero(workspace: Path, tmp_path: Path):
    """ensemble_members=2: two seeds trained, the ensemble saved and scored as one model;
    member 0 is the single-model run with the same params (its checkpoint is reused)."""
    catalogue = Catalogue.load(workspace / "split")
    common = dict(cache_dir=workspace / "cache", checkpoint_root=tmp_path / "ckpt", progress=False)
    single = run_pretrain(catalogue, workspace / "kg", tiny_config(0.5), KGConfig(), tmp_path / "single", **common)
    logged: list[dict] = []
    config = tiny_config(0.5).model_copy(update={"ensemble_members": 2})
    metrics = run_pretrain(
        catalogue, workspace / "kg", config, KGConfig(), tmp_path / "teacher",
        resume=True, log_metrics=lambda values, step: logged.append(values), **common,
    )
    assert metrics["ensemble_members"] == 2
    assert metrics["member0/test/mean_recall"] == pytest.approx(single["test/mean_recall"])
    assert metrics["steps"] == 2 * single["steps"]
    assert {k.split("/")[0] for values in logged for k in values} == {"member1"}  # member 0 resumed complete
    info = json.loads((tmp_path / "teacher" / "model.json").read_text())
    assert info["arch"] == "ensemble(lc-test-tiny x2)"
    assert info["embed_dim"] == 2 * json.loads((tmp_path / "single" / "model.json").read_text())["embed_dim"]
    teacher = load_model(tmp_path / "teacher")
    assert metrics["params/total"] == 2 * single["params/total"]
    assert 0.0 <= metrics["test/mean_recall"] <= 100.0
    assert type(teacher).__name__ == "EnsembleCLIP"
