"""The one training loop of the project, shared by teacher pre-training and student distillation.

The loop is generic: a *task* supplies the parameters, the batches, the loss and the
validation metrics (:class:`TrainingTask`); :func:`train` does the rest: AdamW with open_clip's
weight-decay exclusions, a step-based cosine schedule with linear warm-up, gradient clipping,
seeding, a checkpoint per epoch (``last.pt``, written atomically; ``best.pt`` on a new best
``val/mean_recall``), exact resume after a kill, early stopping, a progress bar and metrics
through a callback (the loop never imports MLflow).

Exact resume: batches are a pure function of ``(seed, epoch)`` (:meth:`TrainingTask.train_batches`
gets a ``numpy`` generator seeded with both), checkpoints hold the task, optimizer, scheduler and
RNG states, so killing a run after epoch ``e`` and resuming gives the same step count and the
same weights as an uninterrupted run.

The tasks live in :mod:`lightclip.tasks`. :func:`fit` and :func:`save_trained` are what the
``pretrain`` and ``distill`` stages share around the loop: the checkpoint key of a run, training
with resume, loading the best checkpoint, the metrics every trainer reports, and the atomic save
of the trained model directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightclip import devices, distributed
from lightclip.config import BatchGroupsConfig, FinetuneConfig, TrainConfig, TrainImagesConfig
from lightclip.errors import LightclipError
from lightclip.io import atomic_file, staged_dir, torch_threads
from lightclip.models.zoo import count_parameters, save_model
from lightclip.stage import MetricsCallback, StageContext

CHECKPOINT_FORMAT = "lightclip-train-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
VAL_METRIC = "val/mean_recall"


# ----------------------------------------------------------------------------------------------
# Configuration, protocol, results
# ----------------------------------------------------------------------------------------------


#: Config fields that change the trajectory: a resume with different values is refused.
_TRAJECTORY_FIELDS = ("batch_size", "lr", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio", "grad_clip_norm", "seed", "amp")


@runtime_checkable
class TrainingTask(Protocol):
    """What :func:`train` needs from a task. Batches must support ``len()`` (= pairs)."""

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]: ...

    def batches_per_epoch(self, batch_size: int) -> int: ...

    def train_batches(self, epoch: int, rng: np.random.Generator, batch_size: int) -> Iterator[Any]: ...

    def loss(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def evaluate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class TrainingDiverged(LightclipError, RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the last good checkpoint is left untouched."""

    def __init__(self, step: int, epoch: int, terms: Mapping[str, float], what: str = "loss") -> None:
        self.step, self.epoch, self.terms = step, epoch, dict(terms)
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(
            f"training diverged at step {step} (epoch {epoch + 1}): non-finite {what}; loss terms: {shown}. "
            "The last good checkpoint was kept; lower the lr, raise warm-up or enable grad clipping"
        )


@dataclass
class TrainResult:
    steps: int
    epochs_completed: int
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    history: list[dict[str, float]]
    checkpoint_dir: Path
    seconds: float
    pairs_per_s: float

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / LAST

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / BEST

    def summary(self) -> dict[str, float | int]:
        """The run's numbers under the metric names every trainer reports (pretrain, distill)."""
        return {
            "steps": self.steps,
            "epochs_completed": self.epochs_completed,
            "best_epoch": self.best_epoch or 0,
            "stopped_early": int(self.stopped_early),
            "train_seconds": self.seconds,
            "train_pairs_per_s": self.pairs_per_s,
            "val/best_mean_recall": self.best_metric if self.best_metric is not None else float("nan"),
        }


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule, step
# ----------------------------------------------------------------------------------------------


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's exclusions (1-d, norms, biases, logit_scale) plus all embeddings."""
    return param.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale", "embedding", "norm"))


def make_optimizer(
    named_parameters: Iterable[tuple[str, nn.Parameter]], config: TrainConfig, lr_scales: Mapping[str, float] | None = None
) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients (frozen ones are left out).

    ``lr_scales``: parameter name -> multiplier of ``config.lr`` (a fine-tune's lower rates for
    pretrained layers, :mod:`lightclip.finetune`); one group per (weight decay, multiplier).
    ``None``: the two groups (no decay, decay) at ``config.lr``.
    """
    decay, no_decay = [], []
    scaled: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in named_parameters:
        if param.requires_grad:
            exempt = _no_weight_decay(name, param)
            if lr_scales is None:
                (no_decay if exempt else decay).append(param)
            else:
                scaled.setdefault((exempt, float(lr_scales.get(name, 1.0))), []).append(param)
    if lr_scales is None:
        groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": config.weight_decay}]
    else:
        groups = [{"params": params, "weight_decay": 0.0 if exempt else config.weight_decay, "lr": config.lr * scale}
                  for (exempt, scale), params in sorted(scaled.items(), key=lambda item: (not item[0][0], -item[0][1]))]
    # The fused CPU kernel: 4 ms instead of 72 ms per step for the 7.4M lc-vit-t on 2 threads
    # (the 6.3M-entry token embedding dominates); same update rule as the default. On CUDA the
    # fused kernel is one launch per step instead of one per tensor group.
    kinds = {p.device.type for g in groups for p in g["params"]}
    fused = len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.dtype in (torch.float32, torch.bfloat16) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, config.warmup_steps, config.min_lr_ratio)
    )


def train_step(
    task: TrainingTask,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    params: Sequence[nn.Parameter],
    *,
    grad_clip_norm: float = 0.0,
    amp: str = "none",
    step: int = 0,
    epoch: int = 0,
    loss_fn: Callable[[Any], dict[str, torch.Tensor]] | None = None,
    device: torch.device | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One optimisation step; returns the loss terms as floats. Raises :class:`TrainingDiverged`.

    ``loss_fn``: what computes the loss terms of ``batch`` (default ``task.loss``; under
    ``torchrun`` the task wrapped in ``DistributedDataParallel``, which averages the gradients).
    ``device``: where the task's model is (the batch is copied there; on CPU nothing moves).
    ``scaler``: fp16's loss scaler; a step whose scaled gradients overflow is skipped by it (and
    the scale lowered), which is how fp16 training works, not a divergence.
    """
    device = device or torch.device("cpu")
    batch = devices.to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with devices.autocast(amp, device):
        out = (loss_fn or task.loss)(batch)
    names = list(out)
    values = torch.stack([out[k].detach().float().reshape(()) for k in names]).tolist()
    terms = dict(zip(names, values))
    if not math.isfinite(terms["loss"]):
        raise TrainingDiverged(step, epoch, terms)
    if scaler is None:
        out["loss"].backward()
    else:
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
    if grad_clip_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip_norm))
        if not math.isfinite(norm) and scaler is None:
            raise TrainingDiverged(step, epoch, terms | {"grad_norm": norm}, what="gradient norm")
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    hook = getattr(task, "on_step_end", None)
    if hook is not None:
        hook()
    return terms


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _rng_state(device: torch.device | None = None) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":  # CPU checkpoints keep their exact old content
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file, then an atomic rename (a kill never leaves half a file).

    The same payload gives the same bytes in any process: torch's zip entries carry a fixed
    date, the pickle follows the dicts' insertion order and the archive's serialization id is
    derived from the content. What is not fixed is the archive's folder name, which ``torch.save``
    takes from a *path* (here the per-process temporary name), so it is handed an open file
    instead (the folder is then always ``archive``). Two runs of the same training still write
    different checkpoints: they record wall-clock ``train_seconds``. Checkpoints are resume state,
    not DVC outputs or released weights, so that is kept.
    """
    with atomic_file(path) as tmp, tmp.open("wb") as handle:
        torch.save(dict(payload), handle)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint written by :func:`train` (``weights_only=True``: tensors and plain data only)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a lightclip training checkpoint")
    return state


def load_task_checkpoint(task: TrainingTask, path: Path | str) -> dict[str, Any]:
    """Load a checkpoint's task state (e.g. ``best.pt`` after training); returns the checkpoint."""
    state = load_checkpoint(path)
    task.load_state_dict(state["task"])
    return state


def _check_resumable(saved: Mapping[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.model_dump(mode="json")
    changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in _TRAJECTORY_FIELDS if saved.get(k) != current[k]]
    if changed:
        raise ValueError(f"{path}: cannot resume, the config changed in ways that alter training ({'; '.join(changed)}); resume=False starts afresh")


def move_task(task: TrainingTask, device: torch.device) -> None:
    """Put the task's model and tensors on ``device`` (its ``to(device)``); on CPU nothing is touched.

    A task that holds tensors besides its model (memory bank, teacher embeddings, projections)
    must move them too, so only tasks with a ``to`` method can train off the CPU.
    """
    if device.type == "cpu":
        return
    move = getattr(task, "to", None)
    if move is None:
        raise LightclipError(f"{type(task).__name__} has no to(device): it can only train on the CPU (train.device: cpu)")
    move(device)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(
    task: TrainingTask,
    config: TrainConfig,
    *,
    checkpoint_dir: Path | str,
    resume: bool = False,
    log_metrics: MetricsCallback | None = None,
    progress: bool = True,
    lr_scales: Mapping[str, float] | None = None,
) -> TrainResult:
    """Train ``task``; see the module docstring. Returns a :class:`TrainResult`.

    ``lr_scales``: per-parameter multipliers of ``config.lr`` (:func:`make_optimizer`).

    Under ``torchrun`` (:mod:`lightclip.distributed`) every rank calls this with the same task
    and config: ``config.batch_size`` is the global batch, the task's gradients are averaged by
    ``DistributedDataParallel``, and only rank 0 writes checkpoints, shows progress and calls
    ``log_metrics``; it alone validates and its decisions (best epoch, early stop) are broadcast.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    world = distributed.world()
    main = world.is_main
    if not main:
        log_metrics, progress = None, False
    device = devices.training_device(config.device, config.amp)  # after world(): under torchrun each rank's own GPU
    scaler = devices.grad_scaler(config.amp, device)
    with torch_threads(distributed.threads_per_rank(config.num_threads, world)):
        move_task(task, device)
        named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        loss_fn = distributed.data_parallel(task, named, world) if world.distributed else None
        optimizer = make_optimizer(named, config, lr_scales)
        steps_per_epoch = task.batches_per_epoch(config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        scheduler = make_scheduler(optimizer, config, total_steps)

        step, start_epoch = 0, 0
        best_metric: float | None = None
        best_epoch: int | None = None
        bad_epochs = 0
        stopped_early = False
        history: list[dict[str, float]] = []
        state = load_checkpoint(last_path) if main and resume and last_path.is_file() else None
        state = distributed.broadcast_object(state, world)  # rank 0's disk decides, on every machine
        if state is not None:
            _check_resumable(state["config"], config, last_path)
            task.load_state_dict(state["task"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"], device)
            step, start_epoch = int(state["step"]), int(state["epoch"])
            best_metric, best_epoch = state["best_metric"], state["best_epoch"]
            bad_epochs, stopped_early = int(state["bad_epochs"]), bool(state["stopped_early"])
            history = list(state["history"])
            resumed_seconds, resumed_pairs = float(state.get("train_seconds", 0.0)), int(state.get("pairs_seen", 0))
        else:
            resumed_seconds, resumed_pairs = 0.0, 0
            for stale in (last_path, best_path) if main else ():
                stale.unlink(missing_ok=True)
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
            torch.manual_seed(config.seed)

        started = time.perf_counter()
        pairs_seen = 0
        bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True, desc="train")
        try:
            for epoch in range(start_epoch, config.epochs):
                if stopped_early:
                    break
                rng = np.random.default_rng([config.seed, epoch])
                window: dict[str, float] = {}
                window_steps, window_pairs, window_start = 0, 0, time.perf_counter()
                for batch in task.train_batches(epoch, rng, config.batch_size):
                    terms = train_step(
                        task, batch, optimizer, scheduler, params,
                        grad_clip_norm=config.grad_clip_norm, amp=config.amp, step=step, epoch=epoch, loss_fn=loss_fn,
                        device=device, scaler=scaler,
                    )
                    step += 1
                    n = len(batch) * world.size  # every rank's slice is the same size
                    pairs_seen += n
                    window_pairs += n
                    window_steps += 1
                    for k, v in terms.items():
                        window[k] = window.get(k, 0.0) + v
                    if window_steps >= config.log_every_n_steps:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        rate = window_pairs / elapsed
                        metrics = {f"train/{k}": v / window_steps for k, v in window.items()}
                        metrics["train/lr"] = float(optimizer.param_groups[0]["lr"])
                        metrics["train/pairs_per_s"] = rate
                        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", pairs_s=f"{rate:.0f}", refresh=False)
                        if log_metrics is not None:
                            log_metrics(metrics, step)
                        window, window_steps, window_pairs, window_start = {}, 0, 0, time.perf_counter()
                    bar.update(1)

                epoch_hook = getattr(task, "on_epoch_end", None)
                if epoch_hook is not None:
                    epoch_hook(epoch)
                with torch.no_grad():
                    val = {k: float(v) for k, v in task.evaluate().items()} if main else {}
                val = distributed.broadcast_object(val, world)
                metric = val.get(VAL_METRIC)
                improved = metric is not None and (best_metric is None or metric > best_metric)
                if improved:
                    best_metric, best_epoch, bad_epochs = metric, epoch + 1, 0
                elif metric is not None:
                    bad_epochs += 1
                if config.early_stop_patience and bad_epochs >= config.early_stop_patience:
                    stopped_early = True
                record = {"epoch": float(epoch + 1), "step": float(step), **val}
                history.append(record)
                payload = {
                    "format": CHECKPOINT_FORMAT,
                    "task": task.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(device),
                    "step": step,
                    "epoch": epoch + 1,
                    "best_metric": best_metric,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": stopped_early,
                    "history": history,
                    "config": config.model_dump(mode="json"),
                    # cumulative over resumes, so a resumed run reports the whole run's cost
                    "train_seconds": resumed_seconds + time.perf_counter() - started,
                    "pairs_seen": resumed_pairs + pairs_seen,
                }
                if scaler is not None:
                    payload["scaler"] = scaler.state_dict()
                if main:
                    save_checkpoint(last_path, payload)
                if main and (improved or (metric is None and epoch + 1 == config.epochs)):
                    with atomic_file(best_path) as tmp:
                        shutil.copyfile(last_path, tmp)
                if log_metrics is not None:
                    log_metrics({**val, "epoch": float(epoch + 1)}, step)
                shown = f"{metric:.2f}" if metric is not None else "n/a"
                bar.set_description(f"train (epoch {epoch + 1}/{config.epochs}, val mean recall {shown})", refresh=False)
        finally:
            bar.close()
        seconds = resumed_seconds + time.perf_counter() - started
        pairs_seen += resumed_pairs
        return TrainResult(
            steps=step,
            epochs_completed=len(history),
            best_metric=best_metric,
            best_epoch=best_epoch,
            stopped_early=stopped_early,
            history=history,
            checkpoint_dir=checkpoint_dir,
            seconds=seconds,
            pairs_per_s=pairs_seen / seconds if seconds > 0 and pairs_seen else 0.0,
        )


# ----------------------------------------------------------------------------------------------
# What the trainers share around the loop
# ----------------------------------------------------------------------------------------------


#: Knobs whose value here trains exactly as before they existed: left out of :func:`checkpoint_key`.
KEY_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "resize_mode": "crop", "finetune": FinetuneConfig().model_dump(mode="json"), "images": TrainImagesConfig().model_dump(mode="json"),
    "batch_groups": BatchGroupsConfig().model_dump(mode="json"),
}

#: Knobs that never change the trajectory at any value: left out of :func:`checkpoint_key`, so a run
#: killed on one process count resumes on another (the global batch is the same), and one killed
#: on a GPU resumes on the CPU (the same computation, up to float rounding).
KEY_NEUTRAL: frozenset[str] = frozenset({"nproc", "device"})


def _without_neutral_defaults(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: _without_neutral_defaults(v)
            for k, v in value.items()
            if k not in KEY_NEUTRAL and not (k in KEY_NEUTRAL_DEFAULTS and v == KEY_NEUTRAL_DEFAULTS[k])
        }
    if isinstance(value, list):
        return [_without_neutral_defaults(v) for v in value]
    return value


def checkpoint_key(trajectory: Mapping[str, Any], *identities: str) -> str:
    """Identify a run by what shapes its weights: ``resume`` only ever continues the same run.

    ``trajectory``: the config that changes training (JSON-able); ``identities``: hashes of the
    inputs (catalogue table, knowledge graph links, teacher weights...). A knob added later at
    the value that reproduces the old training (:data:`KEY_NEUTRAL_DEFAULTS`) is left out, so
    the checkpoints of runs from before it stay resumable.
    """
    digest = hashlib.sha256(json.dumps(_without_neutral_defaults(trajectory), sort_keys=True).encode())
    for identity in identities:
        digest.update(identity.encode())
    return digest.hexdigest()[:16]


def fit(
    task: TrainingTask,
    config: TrainConfig,
    *,
    stage: str,
    key: str,
    context: StageContext,
    log_metrics: MetricsCallback | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train ``task`` in ``<checkpoints>/<stage>/<key>`` and leave its best checkpoint loaded.

    Returns the :class:`TrainResult` and the metrics every trainer reports: the run's summary,
    the task's ``run_metrics()`` if it has one (taken before the best checkpoint is loaded) and
    the model's ``params/*`` counts (``task.model``). ``log_metrics`` defaults to the
    context's (a member of an ensemble passes a prefixed one). ``lr_scales``: see :func:`make_optimizer`.
    """
    checkpoint_dir = context.checkpoint_root(stage) / key
    result = train(
        task, config, checkpoint_dir=checkpoint_dir, resume=context.resume,
        log_metrics=log_metrics or context.log_metrics, progress=context.progress, lr_scales=lr_scales,
    )
    metrics: dict[str, Any] = result.summary()
    run_metrics = getattr(task, "run_metrics", None)  # of the whole run: read before the best checkpoint
    if run_metrics is not None:
        metrics.update(run_metrics())
    if result.best_checkpoint.is_file() and distributed.world().is_main:  # the other ranks write nothing after training
        load_task_checkpoint(task, result.best_checkpoint)
    metrics.update({f"params/{k}": v for k, v in count_parameters(task.model).items()})
    return result, metrics


def save_trained(out_dir: Path | str, model: nn.Module, arch: Any, *, extra: Mapping[str, Any], files: Mapping[str, bytes]) -> Path:
    """Save a trained model directory atomically: weights + config, plus ``files`` (name -> bytes)."""
    with staged_dir(out_dir) as tmp:
        save_model(model, arch, tmp, extra=dict(extra))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def history_json(history: Any) -> bytes:
    """A run's per-epoch history as saved beside the model."""
    return (json.dumps(history, indent=1) + "\n").encode("utf-8")
