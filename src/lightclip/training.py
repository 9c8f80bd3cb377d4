"""The one training loop of the project (teacher pre-training now, student distillation later).

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

:class:`ClipPretrainTask` is the ready task for CLIP training on a catalogue, optionally with
FashionKLIP's concept-level alignment (:func:`lightclip.losses.concept_alignment_loss`).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from lightclip.config import ConceptLossConfig, TrainConfig
from lightclip.evaluation import retrieval_metrics, title_groups
from lightclip.imagecache import ImageCache, build_image_cache, hflip, normalise
from lightclip.losses import clip_loss, combine_with_concept, concept_alignment_loss
from lightclip.models.zoo import encode_text, logit_scale_max, preprocess_config

CHECKPOINT_FORMAT = "lightclip-train-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"
VAL_METRIC = "val/mean_recall"

MetricsCallback = Callable[[dict[str, float], int], None]


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


class TrainingDiverged(RuntimeError):
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


def make_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if _no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": config.weight_decay}]
    # The fused CPU kernel: 4 ms instead of 72 ms per step for the 7.4M lc-vit-t on 2 threads
    # (the 6.3M-entry token embedding dominates); same update rule as the default.
    fused = all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) for g in groups for p in g["params"])
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


def autocast_context(amp: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else nullcontext()


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
) -> dict[str, float]:
    """One optimisation step; returns the loss terms as floats. Raises :class:`TrainingDiverged`."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(amp):
        out = task.loss(batch)
    names = list(out)
    values = torch.stack([out[k].detach().float().reshape(()) for k in names]).tolist()
    terms = dict(zip(names, values))
    if not math.isfinite(terms["loss"]):
        raise TrainingDiverged(step, epoch, terms)
    out["loss"].backward()
    if grad_clip_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip_norm))
        if not math.isfinite(norm):
            raise TrainingDiverged(step, epoch, terms | {"grad_norm": norm}, what="gradient norm")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    hook = getattr(task, "on_step_end", None)
    if hook is not None:
        hook()
    return terms


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary file, then an atomic rename (a kill never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


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
) -> TrainResult:
    """Train ``task``; see the module docstring. Returns a :class:`TrainResult`."""
    from tqdm.auto import tqdm

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / LAST, checkpoint_dir / BEST
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
    try:
        named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = make_optimizer(named, config)
        steps_per_epoch = task.batches_per_epoch(config.batch_size)
        total_steps = steps_per_epoch * config.epochs
        scheduler = make_scheduler(optimizer, config, total_steps)

        step, start_epoch = 0, 0
        best_metric: float | None = None
        best_epoch: int | None = None
        bad_epochs = 0
        stopped_early = False
        history: list[dict[str, float]] = []
        state = load_checkpoint(last_path) if resume and last_path.is_file() else None
        if state is not None:
            _check_resumable(state["config"], config, last_path)
            task.load_state_dict(state["task"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            step, start_epoch = int(state["step"]), int(state["epoch"])
            best_metric, best_epoch = state["best_metric"], state["best_epoch"]
            bad_epochs, stopped_early = int(state["bad_epochs"]), bool(state["stopped_early"])
            history = list(state["history"])
            resumed_seconds, resumed_pairs = float(state.get("train_seconds", 0.0)), int(state.get("pairs_seen", 0))
        else:
            resumed_seconds, resumed_pairs = 0.0, 0
            for stale in (last_path, best_path):
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
                    terms = train_step(task, batch, optimizer, scheduler, params, grad_clip_norm=config.grad_clip_norm, amp=config.amp, step=step, epoch=epoch)
                    step += 1
                    n = len(batch)
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
                    val = {k: float(v) for k, v in task.evaluate().items()}
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
                    "rng": _rng_state(),
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
                save_checkpoint(last_path, payload)
                if improved or (metric is None and epoch + 1 == config.epochs):
                    tmp = best_path.with_name(best_path.name + ".tmp")
                    shutil.copyfile(last_path, tmp)
                    os.replace(tmp, best_path)
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
    finally:
        torch.set_num_threads(previous_threads)


# ----------------------------------------------------------------------------------------------
# CLIP pre-training on a catalogue (optionally with FashionKLIP concepts)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSet:
    """Image-title pairs of one split: decoded images and their titles, in the same order."""

    images: ImageCache
    titles: tuple[str, ...]
    groups: np.ndarray | None = None  # evaluation positives; default: identical titles

    def __post_init__(self) -> None:
        if len(self.titles) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.titles)} titles")
        if self.groups is None:
            object.__setattr__(self, "groups", title_groups(self.titles))

    def __len__(self) -> int:
        return len(self.titles)

    @classmethod
    def from_catalogue(cls, catalogue: Any, split: str, image_size: int, cache_dir: Path | str, *, progress: bool = True) -> "PairSet":
        cache = build_image_cache(catalogue, split, image_size, cache_dir, progress=progress)
        items = catalogue.split(split)
        return cls(images=cache, titles=tuple(str(t) for t in items["title"]))


@dataclass(frozen=True)
class ConceptInputs:
    """Concept links of the training items.

    ``concepts``: the concept table; ``item_concepts``: ``N x K`` ids into it per training item
    (-1 = padding, most specific first); ``slot_weights``: ``N x K``; ``prototypes``: ``C x P``
    training-item indices whose images are the concept's visual prototypes (-1 = padding).
    """

    concepts: tuple[str, ...]
    item_concepts: np.ndarray
    slot_weights: np.ndarray
    prototypes: np.ndarray

    @classmethod
    def build(
        cls,
        item_ids: Sequence[str],
        links: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
        *,
        max_slots: int = 5,
        prototypes_per_concept: int = 10,
        seed: int = 0,
        prototypes: Mapping[str, Sequence[str]] | None = None,
    ) -> "ConceptInputs":
        """From item -> concepts links (e.g. :func:`lightclip.kg.graph.item_concepts`).

        ``prototypes`` (concept -> item ids, best first, e.g. the knowledge graph's FAISS + MMR
        choice) fixes a concept's prototype images; ids that are not training items are
        skipped (prototype embeddings come from the training memory bank). Concepts without
        any are given a seeded sample of the training items linked to them.
        """
        lists = [list(links.get(str(i), ())) for i in item_ids] if isinstance(links, Mapping) else [list(x) for x in links]
        if len(lists) != len(item_ids):
            raise ValueError(f"{len(item_ids)} items but {len(lists)} concept lists")
        table = tuple(sorted({c for concepts in lists for c in concepts[:max_slots]}))
        index = {c: i for i, c in enumerate(table)}
        slots = np.full((len(lists), max_slots), -1, dtype=np.int64)
        members: list[list[int]] = [[] for _ in table]
        for row, concepts in enumerate(lists):
            for k, concept in enumerate(dict.fromkeys(concepts[:max_slots])):
                slots[row, k] = index[concept]
                members[index[concept]].append(row)
        row_of = {str(i): r for r, i in enumerate(item_ids)}
        chosen_rows = np.full((len(table), prototypes_per_concept), -1, dtype=np.int64)
        for c, rows in enumerate(members):
            given = [row_of[str(i)] for i in (prototypes or {}).get(table[c], ()) if str(i) in row_of]
            if given:
                chosen = list(dict.fromkeys(given))[:prototypes_per_concept]
            else:
                rng = np.random.default_rng([seed, c])  # per concept: independent of the others
                chosen = sorted(rng.choice(rows, size=min(len(rows), prototypes_per_concept), replace=False)) if rows else []
            chosen_rows[c, : len(chosen)] = chosen
        weights = (slots >= 0).astype(np.float32)
        return cls(concepts=table, item_concepts=slots, slot_weights=weights, prototypes=chosen_rows)


@dataclass
class ConceptBatch:
    tokens: torch.Tensor  # C_b x L prompt tokens of the batch concept table
    slot_ids: torch.Tensor  # B x K ids into the batch table, -1 = padding
    slot_weights: torch.Tensor  # B x K
    prototype_items: torch.Tensor  # C_b x P training-item indices, -1 = padding


@dataclass
class ClipBatch:
    indices: torch.Tensor  # B training-item indices
    images: torch.Tensor  # B x 3 x S x S float, normalised
    tokens: torch.Tensor  # B x L
    concepts: ConceptBatch | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])


class ClipPretrainTask:
    """CLIP training of an open_clip model on image-title pairs; concepts optional.

    With ``concept_weight == 0`` (or no ``concepts``) it is plain CLIP training and nothing of
    the concept machinery runs. Otherwise prototype embeddings come from a memory bank of the
    latest (detached) image embedding of every training item, updated by each step at no extra
    cost; prototypes not yet seen in this run are masked (so the prototype term starts during
    the first epoch). The bank is part of :meth:`state_dict`, which keeps resume exact.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        train: PairSet,
        val: PairSet | None,
        *,
        concepts: ConceptInputs | None = None,
        concept_weight: float = 0.0,
        concept_config: ConceptLossConfig = ConceptLossConfig(),
        prototype_mmr_lambda: float = 0.7,
        prototype_pool: int = 64,
        hflip: bool = True,
        eval_batch_size: int = 512,
    ) -> None:
        self.model = model
        self.train_set, self.val_set = train, val
        pre = preprocess_config(model)
        self.mean, self.std = pre["mean"], pre["std"]
        size = int(pre["size"])
        for name, pairs in (("train", train), ("val", val)):
            if pairs is not None and pairs.images.image_size != size:
                raise ValueError(f"{name} images are {pairs.images.image_size}px but the model expects {size}px")
        self.hflip = hflip
        self.eval_batch_size = eval_batch_size
        self.train_tokens = tokenizer(list(train.titles))
        self.val_tokens = tokenizer(list(val.titles)) if val is not None else None
        self.concept_weight = float(concept_weight)
        self.concept_config = concept_config
        self.prototype_mmr_lambda = prototype_mmr_lambda
        self.prototype_pool = prototype_pool
        self.prototype_refreshes = 0
        self.concepts = concepts if (concepts is not None and self.concept_weight > 0) else None
        self.bank: torch.Tensor | None = None
        self.bank_valid: torch.Tensor | None = None
        if self.concepts is not None:
            if self.concepts.item_concepts.shape[0] != len(train):
                raise ValueError(f"concept links for {self.concepts.item_concepts.shape[0]} items, but {len(train)} training pairs")
            prompts = [concept_config.prompt.format(c) for c in self.concepts.concepts]
            self.concept_tokens = tokenizer(prompts) if prompts else torch.zeros((0, self.train_tokens.shape[1]), dtype=torch.long)
            embed_dim = int(getattr(model, "lightclip_config", {}).get("embed_dim", 0)) or self._embed_dim()
            self.bank = torch.zeros((len(train), embed_dim), dtype=torch.float32)
            self.bank_valid = torch.zeros(len(train), dtype=torch.bool)

    def _embed_dim(self) -> int:
        with torch.no_grad():
            return int(encode_text(self.model, self.train_tokens[:1]).shape[-1])

    # -- protocol ---------------------------------------------------------------------------

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def batches_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train_set) // batch_size)

    def epoch_rows(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, flip flags) of each batch of an epoch: a pure function of ``rng`` (exact resume)."""
        n = len(self.train_set)
        order = rng.permutation(n)
        flips = rng.random(n) < 0.5 if self.hflip else np.zeros(n, dtype=bool)
        size = min(batch_size, n)
        for b in range(self.batches_per_epoch(batch_size)):
            rows = order[b * size : (b + 1) * size]
            yield rows, flips[rows]

    def test_metrics(self, catalogue: Any, tokenizer: Callable[[Sequence[str]], torch.Tensor], image_size: int, cache_dir: Path | str, *, progress: bool = True) -> dict[str, float]:
        """``test/*`` retrieval metrics of the current model on the catalogue's test split ({} if empty)."""
        return split_metrics(self.model, tokenizer, catalogue, "test", image_size, cache_dir, batch_size=self.eval_batch_size, progress=progress)

    def train_batches(self, epoch: int, rng: np.random.Generator, batch_size: int) -> Iterator[ClipBatch]:
        for rows, flips in self.epoch_rows(rng, batch_size):
            images = self.train_set.images.batch(rows)
            if self.hflip:
                images = hflip(images, flips)
            batch = ClipBatch(
                indices=torch.from_numpy(rows),
                images=normalise(images, self.mean, self.std),
                tokens=self.train_tokens[rows],
            )
            if self.concepts is not None:
                batch.concepts = self._concept_batch(rows)
            yield batch

    def _concept_batch(self, rows: np.ndarray) -> ConceptBatch:
        assert self.concepts is not None
        ids = self.concepts.item_concepts[rows]
        table, local = np.unique(ids, return_inverse=True)
        local = local.reshape(ids.shape)
        if table.size and table[0] == -1:  # padding sorts first
            table, local = table[1:], local - 1
        local[ids < 0] = -1
        return ConceptBatch(
            tokens=self.concept_tokens[torch.from_numpy(table)],
            slot_ids=torch.from_numpy(local),
            slot_weights=torch.from_numpy(self.concepts.slot_weights[rows]),
            prototype_items=torch.from_numpy(self.concepts.prototypes[table]),
        )

    def loss(self, batch: ClipBatch) -> dict[str, torch.Tensor]:
        model = self.model
        if not model.training:
            model.train()
        image_emb = model.encode_image(batch.images, normalize=True)
        text_emb = encode_text(model, batch.tokens, normalize=True)
        scale = model.logit_scale.exp()
        clip = clip_loss(image_emb, text_emb, scale)
        out = {"loss": clip, "clip": clip.detach(), "logit_scale": scale.detach()}
        if self.concepts is None or batch.concepts is None:
            return out
        cb = batch.concepts
        cfg = self.concept_config
        assert self.bank is not None and self.bank_valid is not None
        concept_emb = encode_text(model, cb.tokens, normalize=True) if cb.tokens.shape[0] else None
        if concept_emb is not None:
            items = cb.prototype_items.clamp_min(0)
            proto_emb = self.bank[items]  # C_b x P x D
            proto_mask = (cb.prototype_items >= 0) & self.bank_valid[items]
            terms = concept_alignment_loss(
                image_emb,
                concept_emb,
                cb.slot_ids,
                scale,
                prototype_emb=proto_emb,
                prototype_mask=proto_mask,
                prototype_item_ids=cb.prototype_items,
                item_ids=batch.indices,
                slot_weights=cb.slot_weights,
                top_k=cfg.top_k,
                prototype_weight=cfg.prototype_weight,
                image_weight=cfg.image_weight,
                return_terms=True,
            )
            out["loss"] = combine_with_concept(clip, terms["concept"], weight=self.concept_weight, adaptive=cfg.adaptive)
            out.update({k: v.detach() for k, v in terms.items()})
        with torch.no_grad():
            self.bank[batch.indices] = image_emb.detach().float()
            self.bank_valid[batch.indices] = True
        return out

    def on_epoch_end(self, epoch: int) -> None:
        every = self.concept_config.refresh_every_epochs
        if self.concepts is not None and every and (epoch + 1) % every == 0:
            self.refresh_prototypes()

    def refresh_prototypes(self) -> None:
        """Re-pick each concept's prototypes with the current model, as FashionKLIP does.

        Query: the model's embedding of the concept prompt; pool: the latest embeddings of the
        training images that name the concept (the memory bank); FAISS top-``prototype_pool``,
        then MMR for diversity. Images not embedded yet in this run are not eligible.
        """
        from lightclip.kg.prototypes import select_prototypes

        assert self.concepts is not None and self.bank is not None and self.bank_valid is not None
        valid = self.bank_valid.numpy()
        if not valid.any():
            return
        slots = self.concepts.item_concepts
        members: list[list[int]] = [[] for _ in self.concepts.concepts]
        for row, concept in zip(*np.nonzero(slots >= 0)):
            if valid[row]:
                members[slots[row, concept]].append(int(row))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                queries = torch.cat([
                    encode_text(self.model, self.concept_tokens[start : start + self.eval_batch_size], normalize=True).float()
                    for start in range(0, len(self.concept_tokens), self.eval_batch_size)
                ])
        finally:
            self.model.train(was_training)
        chosen = select_prototypes(
            queries.numpy(),
            self.bank.numpy(),
            k=self.concepts.prototypes.shape[1],
            mmr_lambda=self.prototype_mmr_lambda,
            pool_size=self.prototype_pool,
            candidates=[np.asarray(m, dtype=np.int64) for m in members],
        )
        for c, rows in enumerate(chosen):
            if rows:  # keep the old prototypes of a concept none of whose images was seen yet
                self.concepts.prototypes[c] = -1
                self.concepts.prototypes[c, : len(rows)] = rows
        self.prototype_refreshes += 1

    def prototype_ids(self, item_ids: Sequence[str]) -> dict[str, list[str]]:
        """Concept -> current prototype item ids (for saving beside the teacher)."""
        if self.concepts is None:
            return {}
        return {c: [str(item_ids[r]) for r in self.concepts.prototypes[i] if r >= 0] for i, c in enumerate(self.concepts.concepts)}

    def on_step_end(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, logit_scale_max())

    def embed(self, pairs: PairSet, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings of a pair set (eval mode, no grad)."""
        return embed_pair_set(self.model, pairs, tokens, batch_size=self.eval_batch_size)

    def evaluate(self) -> dict[str, float]:
        if self.val_set is None or self.val_tokens is None:
            return {}
        image_emb, text_emb = self.embed(self.val_set, self.val_tokens)
        metrics = retrieval_metrics(image_emb, text_emb, self.val_set.groups)
        return {f"val/{k}": v for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict()}
        if self.bank is not None and self.bank_valid is not None:
            state["bank"] = self.bank.clone()
            state["bank_valid"] = self.bank_valid.clone()
        if self.concepts is not None:
            state["prototypes"] = torch.from_numpy(self.concepts.prototypes.copy())
            state["prototype_refreshes"] = self.prototype_refreshes
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.bank is not None and "bank" in state:
            self.bank.copy_(state["bank"])
            self.bank_valid.copy_(state["bank_valid"])
        if self.concepts is not None and "prototypes" in state:
            self.concepts.prototypes[...] = state["prototypes"].numpy()
            self.prototype_refreshes = int(state.get("prototype_refreshes", 0))


def embed_pair_set(model: nn.Module, pairs: PairSet, tokens: torch.Tensor, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of a pair set with any model (eval mode, no grad)."""
    pre = preprocess_config(model)
    was_training = model.training
    model.eval()
    images, texts = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                rows = np.arange(start, min(start + batch_size, len(pairs)))
                batch = normalise(pairs.images.batch(rows), pre["mean"], pre["std"])
                images.append(model.encode_image(batch, normalize=True).float())
                texts.append(encode_text(model, tokens[rows], normalize=True).float())
    finally:
        model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def split_metrics(
    model: nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    catalogue: Any,
    split: str,
    image_size: int,
    cache_dir: Path | str,
    *,
    batch_size: int = 512,
    progress: bool = True,
) -> dict[str, float]:
    """``<split>/*`` retrieval metrics (R@1/5/10 both ways, mean) of any model; {} for an empty split.

    The numbers the trainers log for val, so teachers, ensembles and students compare directly.
    """
    if len(catalogue.split(split)) == 0:
        return {}
    pairs = PairSet.from_catalogue(catalogue, split, image_size, cache_dir, progress=progress)
    image_emb, text_emb = embed_pair_set(model, pairs, tokenizer(list(pairs.titles)), batch_size=batch_size)
    return {f"{split}/{k}": v for k, v in retrieval_metrics(image_emb, text_emb, pairs.groups).items()}
