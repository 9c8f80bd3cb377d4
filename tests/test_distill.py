"""The distill stage: the task through the shared loop (resume included), run_distill, the baseline, errors."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from lightclip.config import BASELINE_EDGES, ConfigError, DistillConfig, DistillJob, EdgeLossConfig, ModelConfig, SplitConfig, SynthConfig, TrainConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.distill import PROJECTIONS_FILE, DistillInputs, DistillOutputs, run_distill
from lightclip.stage import StageContext
from lightclip.tasks import DistillTask, PairSet
from lightclip.models.pooled_text import PooledTextCLIP
from lightclip.models.zoo import ModelSpec, arch_config, build_from_config, create_model, load_model, read_model_info, save_model, tokenizer
from lightclip.teacher_cache import StaleTeacherEmbeddings, embed_with_teacher, load_teacher_embeddings
from lightclip.training import load_checkpoint, train

SPEC = ModelSpec(arch="lc-test-tiny")
FAST = dict(batch_size=16, lr=1e-3, weight_decay=0.0, warmup_steps=1, grad_clip_norm=0.0, early_stop_patience=0, num_threads=1, log_every_n_steps=1)
FULL_GRAPH = DistillConfig().edges


def tiny_job(**updates) -> DistillJob:
    """The pipeline's distillation job for a tiny student, with ``updates`` (epochs, edges, ...)."""
    epochs = updates.pop("epochs", 1)
    job = DistillConfig(students={"tiny": ModelConfig(arch="lc-test-tiny")}, train=TrainConfig(epochs=epochs, **FAST)).job("tiny")
    return job.model_copy(update=updates)


def distill(job: DistillJob, workspace: Path, teacher: str | None, embeddings: Path | str | None, out: Path, **context) -> dict:
    """run_distill on the workspace's split with the student at ``out`` and metrics at ``out.json``."""
    inputs = DistillInputs(
        catalogue=workspace / "split",
        teacher=workspace / teacher if teacher else None,
        teacher_embeddings=(workspace / embeddings if isinstance(embeddings, str) else embeddings),
    )
    outputs = DistillOutputs(model=out, metrics=out.with_suffix(".json"))
    return run_distill(job, inputs, outputs, StageContext(project_dir=out.parent, progress=False, **context))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny split synthetic catalogue at 32 px (48 train / 8 val / 8 test), two tiny teachers
    (32-d like the student, and 48-d) and their cached train embeddings (with flipped images)."""
    root = tmp_path_factory.mktemp("distill")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=7, n_items=64, image_size=32), progress=False)
    catalogue = assign_splits(raw, SplitConfig(seed=0, val=8, test=8)).save(root / "split")
    model, _ = create_model(SPEC, seed=0)
    save_model(model, SPEC, root / "teacher")
    wide_config = deepcopy(arch_config("lc-test-tiny"))
    wide_config["embed_dim"] = 48
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        save_model(build_from_config(wide_config), "lc-test-tiny", root / "wide_teacher")
    for name in ("teacher", "wide_teacher"):
        embed_with_teacher(root / name, catalogue, "train", root / "cache").save(root / f"{name}_emb" / "train.safetensors")
    return root


def _pairs(workspace: Path):
    catalogue = Catalogue.load(workspace / "split")
    return (PairSet.from_catalogue(catalogue, "train", 32, workspace / "cache", progress=False),
            PairSet.from_catalogue(catalogue, "val", 32, workspace / "cache", progress=False))


def _task(workspace: Path, seed: int = 0, **kwargs) -> DistillTask:
    catalogue = Catalogue.load(workspace / "split")
    train_set, val_set = _pairs(workspace)
    student, _ = create_model(SPEC, seed=seed)
    kwargs.setdefault("teacher", load_teacher_embeddings(workspace / "teacher_emb", catalogue, "train", teacher_dir=workspace / "teacher"))
    kwargs.setdefault("edges", FULL_GRAPH)
    return DistillTask(student, tokenizer(SPEC), train_set, val_set, seed=seed, **kwargs)


def test_task_trains_two_epochs_and_resumes_exactly(workspace: Path, tmp_path: Path, kill_at):
    config = TrainConfig(epochs=2, **FAST)
    logged: list[tuple[dict, int]] = []
    full_task = _task(workspace)
    full = train(full_task, config, checkpoint_dir=tmp_path / "full", log_metrics=lambda m, s: logged.append((m, s)), progress=False)
    assert full.steps == 6 and full.epochs_completed == 2
    names = {k for m, _ in logged for k in m}
    expected = {"train/loss", "train/logit_scale", "train/inter_ss/infonce", "train/intra_ts_image/infonce", "train/intra_ts_text/fd",
                "train/inter_ts_text/infonce", "train/intra_ss_image/sd", "train/intra_ss_text/sd", "val/mean_recall"}
    assert expected <= names
    assert all(np.isfinite(v) for m, _ in logged for v in m.values())

    with pytest.raises(kill_at.Killed):
        train(kill_at(_task(workspace), 1), config, checkpoint_dir=tmp_path / "part", progress=False)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    resumed_task = _task(workspace, seed=123)  # other init: everything must come from the checkpoint
    resumed = train(resumed_task, config, checkpoint_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == full.steps and resumed.history == full.history
    for (name, a), b in zip(full_task.model.state_dict().items(), resumed_task.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_online_teacher_matches_the_cache_and_gets_no_gradient(workspace: Path):
    teacher = load_model(workspace / "teacher")
    online = _task(workspace, teacher=None, teacher_model=teacher)
    cached = _task(workspace)
    batch_online = next(online.train_batches(0, np.random.default_rng(0), 16))
    batch_cached = next(cached.train_batches(0, np.random.default_rng(0), 16))
    assert bool(batch_online.flipped.any()) and not bool(batch_online.flipped.all())
    for a, b in zip(online.teacher_embeddings(batch_online), cached.teacher_embeddings(batch_cached)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # flipped rows use the flipped-image embeddings
    out = online.loss(batch_online)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in online.model.parameters())
    assert not any("teacher" in name for name, _ in online.named_parameters())


def test_run_distill_with_the_teacher_online(workspace: Path, tmp_path: Path, saved_model_metrics):
    catalogue = Catalogue.load(workspace / "split")
    metrics = distill(tiny_job(teacher_online=True), workspace, "teacher", None, tmp_path / "student")
    assert metrics["steps"] == 3
    test = saved_model_metrics(tmp_path / "student", catalogue, "test", workspace / "cache")
    assert test and {k: metrics[k] for k in test} == pytest.approx(test)  # the saved student is the one scored
    assert read_model_info(tmp_path / "student")["extra"]["teacher_online"] is True


def test_run_distill_writes_the_student_and_metrics(workspace: Path, tmp_path: Path, saved_model_metrics):
    logged: list[tuple[dict, int]] = []
    catalogue = Catalogue.load(workspace / "split")
    metrics = distill(tiny_job(epochs=2), workspace, "teacher", "teacher_emb", tmp_path / "student", log_metrics=lambda m, s: logged.append((m, s)))
    assert metrics["steps"] == 6 and metrics["epochs_completed"] == 2
    assert json.loads((tmp_path / "student.json").read_text()) == pytest.approx(metrics)  # the stage writes its metrics
    for key in ("test/mean_recall", "test/i2t_R@1", "test/t2i_R@10", "val/best_mean_recall", "train_seconds", "train_pairs_per_s", "params/total", "params/non_embedding"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["params/projections"] == 0  # equal widths: no projection
    test = saved_model_metrics(tmp_path / "student", catalogue, "test", workspace / "cache")
    assert test and {k: metrics[k] for k in test} == pytest.approx(test)  # the saved student is the one scored
    assert not (tmp_path / "student" / PROJECTIONS_FILE).exists()
    info = read_model_info(tmp_path / "student")
    assert info["extra"]["stage"] == "distill" and len(info["extra"]["edges"]) == len(FULL_GRAPH)
    assert len(json.loads((tmp_path / "student" / "train_history.json").read_text())) == 2
    assert "train/intra_ts_image/fd" in {k for m, _ in logged for k in m}


def test_a_student_with_the_pooled_text_tower_distils_like_any_other(workspace: Path, tmp_path: Path, saved_model_metrics):
    catalogue = Catalogue.load(workspace / "split")
    job = tiny_job(epochs=2).model_copy(update={"student": ModelConfig(arch="lc-test-tiny-pooled")})
    metrics = distill(job, workspace, "teacher", "teacher_emb", tmp_path / "student")
    assert metrics["steps"] == 6 and np.isfinite(metrics["test/mean_recall"])
    assert isinstance(load_model(tmp_path / "student"), PooledTextCLIP)
    test = saved_model_metrics(tmp_path / "student", catalogue, "test", workspace / "cache")
    assert test and {k: metrics[k] for k in test} == pytest.approx(test)  # the saved student is the one scored


def test_wide_teacher_needs_projections(workspace: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"distill.projection: false.*32-d.*48-d"):
        distill(tiny_job(projection=False), workspace, None, "wide_teacher_emb", tmp_path / "s")
    assert not (tmp_path / "s").exists()
    metrics = distill(tiny_job(), workspace, "wide_teacher", "wide_teacher_emb", tmp_path / "s")
    assert metrics["params/projections"] == 2 * 32 * 48
    from safetensors.torch import load_file

    projections = load_file(str(tmp_path / "s" / PROJECTIONS_FILE))
    assert {k: tuple(v.shape) for k, v in projections.items()} == {"image.weight": (48, 32), "text.weight": (48, 32)}
    # relation-only edges need no projection even with different widths
    relations = tiny_job(projection=False, edges=[EdgeLossConfig(edge="inter_ss", loss="infonce"), EdgeLossConfig(edge="intra_ss", loss="fd")])
    assert distill(relations, workspace, None, "wide_teacher_emb", tmp_path / "r")["params/projections"] == 0


def test_baseline_runs_without_a_teacher(workspace: Path, tmp_path: Path, saved_model_metrics):
    baseline = tiny_job(epochs=2, edges=[EdgeLossConfig(edge=edge, loss=loss) for edge, loss in BASELINE_EDGES])
    assert baseline.needs_teacher is False
    logged: list[tuple[dict, int]] = []
    catalogue = Catalogue.load(workspace / "split")
    metrics = distill(baseline, workspace, None, None, tmp_path / "baseline", log_metrics=lambda m, s: logged.append((m, s)))
    assert metrics["steps"] == 6
    terms = {k for m, _ in logged for k in m if k.startswith("train/") and "/" in k[6:]}
    assert terms == {"train/inter_ss/infonce"}
    test = saved_model_metrics(tmp_path / "baseline", catalogue, "test", workspace / "cache")
    assert test and {k: metrics[k] for k in test} == pytest.approx(test)  # the saved student is the one scored


def test_missing_or_stale_teacher_inputs_are_clear_errors(workspace: Path, tmp_path: Path):
    catalogue = Catalogue.load(workspace / "split")
    with pytest.raises(ConfigError, match="teacher embeddings"):
        distill(tiny_job(), workspace, "teacher", None, tmp_path / "s")
    with pytest.raises(ConfigError, match="teacher_online: true needs the teacher"):
        distill(tiny_job(teacher_online=True), workspace, None, None, tmp_path / "s")
    with pytest.raises(StaleTeacherEmbeddings, match="stale"):  # the cache of another teacher
        distill(tiny_job(), workspace, "teacher", "wide_teacher_emb", tmp_path / "s")
    no_flips = tmp_path / "noflip" / "train.safetensors"
    embed_with_teacher(workspace / "teacher", catalogue, "train", workspace / "cache", hflip=False).save(no_flips)
    with pytest.raises(ConfigError, match="teacher_embed.hflip"):
        distill(tiny_job(), workspace, None, no_flips, tmp_path / "s")
    assert not (tmp_path / "s").exists()
