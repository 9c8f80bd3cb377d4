"""The shared training loop, on the image-text task with a tiny model and catalogue."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import lightclip.training as training
from lightclip.config import TrainConfig
from lightclip.models import ModelSpec, create_model, tokenizer
from lightclip.tasks import ImageTextTask, PairSet
from lightclip.training import TrainingDiverged, checkpoint_key, load_checkpoint, lr_factor, train, train_step

SPEC = ModelSpec(arch="lc-test-tiny")
FAST = dict(batch_size=8, lr=1e-3, weight_decay=0.0, warmup_steps=2, grad_clip_norm=0.0, early_stop_patience=0, num_threads=1, log_every_n_steps=1)


@pytest.fixture
def pairs(tiny_pairs):
    return tiny_pairs


def make_task(pairs, seed=0, **kwargs) -> ImageTextTask:
    model, _ = create_model(SPEC, seed=seed)
    return ImageTextTask(model, tokenizer(SPEC), pairs[0], pairs[1], **kwargs)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_loss_falls_and_checkpoints_are_written(pairs, tmp_path):
    logged: list[tuple[dict, int]] = []
    task = make_task(pairs)
    config = TrainConfig(epochs=10, **FAST)
    result = train(task, config, checkpoint_dir=tmp_path / "ck", log_metrics=lambda m, s: logged.append((m, s)), progress=False)
    assert result.steps == 40 and result.epochs_completed == 10 and not result.stopped_early
    steps = [(m, s) for m, s in logged if "train/loss" in m]
    assert len(steps) == 40 and [s for _, s in steps] == list(range(1, 41))
    assert {"train/loss", "train/clip", "train/lr", "train/pairs_per_s", "train/logit_scale"} <= set(steps[0][0])
    losses = [m["train/loss"] for m, _ in steps]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    epochs = [m for m, _ in logged if "val/mean_recall" in m]
    assert len(epochs) == 10 and {"val/i2t_R@1", "val/t2i_R@10", "epoch"} <= set(epochs[0])
    assert (tmp_path / "ck" / "last.pt").is_file() and (tmp_path / "ck" / "best.pt").is_file()
    last = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert last["step"] == 40 and last["epoch"] == 10 and len(last["history"]) == 10
    best = load_checkpoint(tmp_path / "ck" / "best.pt")
    assert best["epoch"] == result.best_epoch and best["best_metric"] == result.best_metric
    # the schedule: warm-up then cosine to min_lr_ratio
    assert lr_factor(0, 40, 2, 0.1) == pytest.approx(0.5) and lr_factor(2, 40, 2, 0.1) == pytest.approx(1.0)
    assert lr_factor(40, 40, 2, 0.1) == pytest.approx(0.1)


def test_resume_after_a_kill_is_exact(pairs, tmp_path, kill_at):
    config = TrainConfig(epochs=2, **FAST)
    full_task = make_task(pairs)
    full = train(full_task, config, checkpoint_dir=tmp_path / "full", progress=False)

    with pytest.raises(kill_at.Killed):
        train(kill_at(make_task(pairs), 1), config, checkpoint_dir=tmp_path / "part", progress=False)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 1
    resumed_task = make_task(pairs, seed=123)  # a different init: everything must come from the checkpoint
    resumed = train(resumed_task, config, checkpoint_dir=tmp_path / "part", resume=True, progress=False)

    assert resumed.steps == full.steps == 8
    assert resumed.history == full.history
    for (name, a), b in zip(full_task.model.state_dict().items(), resumed_task.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # resuming a finished run does nothing
    again = train(resumed_task, config, checkpoint_dir=tmp_path / "part", resume=True, progress=False)
    assert again.steps == 8 and again.epochs_completed == 2
    # a resume with a trajectory-changing config is refused
    with pytest.raises(ValueError, match="lr"):
        train(resumed_task, config.model_copy(update={"lr": 1.0}), checkpoint_dir=tmp_path / "part", resume=True, progress=False)


class NanAt:
    def __init__(self, task, step):
        self.task, self.step, self.calls = task, step, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, batch):
        out = self.task.loss(batch)
        self.calls += 1
        if self.calls > self.step:
            out["loss"] = out["loss"] * float("nan")
            out["clip"] = out["loss"].detach()
        return out


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(pairs, tmp_path):
    config = TrainConfig(epochs=3, **FAST)
    task = NanAt(make_task(pairs), step=6)
    with pytest.raises(TrainingDiverged) as err:
        train(task, config, checkpoint_dir=tmp_path / "ck", progress=False)
    message = str(err.value)
    assert "step 6" in message and "epoch 2" in message and "loss=nan" in message and "clip=nan" in message
    assert "logit_scale=" in message
    last = load_checkpoint(tmp_path / "ck" / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["task"]["model"].values())


class ScriptedEval:
    def __init__(self, task, recalls):
        self.task, self.recalls, self.epoch = task, list(recalls), 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self):
        value = self.recalls[self.epoch]
        self.epoch += 1
        return {"val/mean_recall": value}


def test_early_stopping_keeps_the_best_checkpoint(pairs, tmp_path):
    config = TrainConfig(**(FAST | {"epochs": 8, "early_stop_patience": 2}))
    task = ScriptedEval(make_task(pairs), [10.0, 30.0, 25.0, 29.0, 50.0, 60.0, 70.0, 80.0])
    result = train(task, config, checkpoint_dir=tmp_path / "ck", progress=False)
    assert result.stopped_early and result.epochs_completed == 4 and result.steps == 16
    assert result.best_epoch == 2 and result.best_metric == 30.0
    best = load_checkpoint(tmp_path / "ck" / "best.pt")
    assert best["epoch"] == 2 and best["step"] == 8
    before = _sha(tmp_path / "ck" / "last.pt")
    again = train(task, config, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert again.stopped_early and again.steps == 16 and _sha(tmp_path / "ck" / "last.pt") == before


def test_bf16_autocast_step_runs(pairs):
    task = make_task(pairs)
    config = TrainConfig(epochs=1, amp="bf16", **FAST)
    optimizer = training.make_optimizer(task.named_parameters(), config)
    batch = next(iter(task.train_batches(0, np.random.default_rng(0), 8)))
    terms = train_step(task, batch, optimizer, None, [p for _, p in task.named_parameters()], amp="bf16", grad_clip_norm=1.0)
    assert np.isfinite(terms["loss"])


def test_weight_decay_groups_follow_open_clip():
    model, _ = create_model(SPEC, seed=0)
    optimizer = training.make_optimizer(model.named_parameters(), TrainConfig())
    no_decay, decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "visual.conv1.weight" in decayed and "text_projection" in decayed
    assert not any(k in n for n in decayed for k in ("bias", "ln_", "logit_scale", "embedding"))


def test_train_config_forbids_unknown_keys():
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(epoch=3)
    with pytest.raises(ValueError):
        TrainConfig(amp="fp8")  # fp16 is a value (CUDA only: tests/test_devices.py)
    with pytest.raises(ValueError):
        TrainConfig(device="gpu")


def test_checkpoint_key_changes_with_trajectory_and_inputs():
    base = checkpoint_key({"lr": 0.1, "seed": 0}, "catalogue-a")
    assert base == checkpoint_key({"seed": 0, "lr": 0.1}, "catalogue-a")  # key order does not matter
    assert len(base) == 16
    assert base != checkpoint_key({"lr": 0.2, "seed": 0}, "catalogue-a")
    assert base != checkpoint_key({"lr": 0.1, "seed": 0}, "catalogue-b")
    assert base != checkpoint_key({"lr": 0.1, "seed": 0}, "catalogue-a", "kg-links")
