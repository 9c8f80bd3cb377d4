"""The ``distill`` stage: CocaCLIP/ConaCLIP distillation of the teacher into a small student.

The student (one of ``distill.students``: ``xt`` = ``lc-vit-xt`` and ``xxt`` = ``lc-vit-xxt`` by default) is
trained by the shared loop (:func:`lightclip.training.train`) on the training pairs with the
graph loss of :func:`lightclip.losses.distillation_losses` over the edges of
``distill.edges`` (the default supervises all four interaction types; the baseline without
distillation is ``[{edge: inter_ss, loss: infonce, weight: 1}]``, with the same budget).

The teacher is frozen. By default its embeddings come from the ``teacher_embed`` cache
(:mod:`lightclip.teacher_cache`), looked up by item index; with ``hflip`` a flipped image
uses the teacher's embedding of the flipped image (stored by ``teacher_embed.hflip``). With
``teacher_online: true`` the teacher runs on every batch, on the same augmented images as the
student (no cache needed; for augmentations the cache cannot hold).

When the student's embedding width differs from the teacher's, the teacher-student edges go
through learned linear projections (one per student modality, trained with the student, saved
beside it as ``projections.safetensors``; they are not part of the released retrieval model).
Validation selects the best epoch by the student's own val mean recall.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lightclip.config import DISTILL_PROJECTED_EDGES, DISTILL_TEACHER_EDGES, ConfigError, DistillConfig, EdgeLossConfig
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.imagecache import ImageCache, hflip as flip_images, normalise
from lightclip.losses import as_edge_losses, distillation_losses
from lightclip.models.zoo import encode_text, preprocess_config
from lightclip.training import ClipPretrainTask, PairSet

HISTORY_FILE = "train_history.json"
PROJECTIONS_FILE = "projections.safetensors"


def _concrete(edges: Sequence[EdgeLossConfig]) -> list[tuple[str, str]]:
    return [(edge, entry.loss) for entry in edges for edge in entry.edges]


def needs_teacher(edges: Sequence[EdgeLossConfig]) -> bool:
    return any(edge in DISTILL_TEACHER_EDGES for edge, _ in _concrete(edges))


def projected_modalities(edges: Sequence[EdgeLossConfig]) -> tuple[str, ...]:
    """The student modalities that the configured teacher-student edges compare with the teacher."""
    used = {"image" if edge.endswith("_image") else "text" for edge, _ in _concrete(edges) if edge in DISTILL_PROJECTED_EDGES}
    return tuple(m for m in ("image", "text") if m in used)


def check_widths(edges: Sequence[EdgeLossConfig], student_dim: int, teacher_dim: int, projection: bool) -> tuple[str, ...]:
    """The modalities that need a projection; a :class:`ConfigError` when one is needed but off."""
    modalities = projected_modalities(edges) if student_dim != teacher_dim else ()
    if modalities and not projection:
        edges_used = sorted({f"{e}/{loss}" for e, loss in _concrete(edges) if e in DISTILL_PROJECTED_EDGES})
        raise ConfigError(
            f"distill.projection: false, but the student's embeddings are {student_dim}-d and the teacher's {teacher_dim}-d, "
            f"and the teacher-student edges {', '.join(edges_used)} compare them directly; set distill.projection: true "
            "(learned linear projections) or pick a student with the teacher's embed_dim"
        )
    return modalities


def _embed_dim(model: nn.Module, tokens: torch.Tensor | None = None) -> int:
    dim = int(getattr(model, "lightclip_config", {}).get("embed_dim", 0) or 0)
    if dim:
        return dim
    assert tokens is not None
    with torch.no_grad():
        return int(encode_text(model, tokens[:1]).shape[-1])


@dataclass
class DistillBatch:
    indices: torch.Tensor  # B training-item indices
    images: torch.Tensor  # B x 3 x S x S, normalised for the student
    tokens: torch.Tensor  # B x L student tokens
    flipped: torch.Tensor  # B bool: the image was flipped
    teacher_images: torch.Tensor | None = None  # normalised for the online teacher

    def __len__(self) -> int:
        return int(self.indices.shape[0])


class DistillTask(ClipPretrainTask):
    """Student training under the ConaCLIP graph loss (the :class:`~lightclip.training.TrainingTask` protocol).

    ``teacher``: cached teacher embeddings of ``train`` (same ids, same order), or
    ``teacher_model`` (+ ``teacher_tokenizer``, and ``teacher_images`` when the teacher's image
    size differs from the student's) to run the frozen teacher online. Neither is needed when
    only ``inter_ss`` is supervised. Evaluation, the logit-scale clamp and :meth:`embed` are
    the student's, inherited from :class:`~lightclip.training.ClipPretrainTask`.
    """

    def __init__(
        self,
        student: nn.Module,
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        train: PairSet,
        val: PairSet | None,
        *,
        edges: Sequence[EdgeLossConfig | Mapping[str, Any]],
        teacher: Any | None = None,
        teacher_model: nn.Module | None = None,
        teacher_tokenizer: Callable[[Sequence[str]], torch.Tensor] | None = None,
        teacher_images: ImageCache | None = None,
        projection: bool = True,
        hflip: bool = True,
        seed: int = 0,
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__(student, tokenizer, train, val, hflip=hflip, eval_batch_size=eval_batch_size)
        self.edges = as_edge_losses(edges)
        self.teacher = None
        self.teacher_model = None
        self.teacher_images = None
        self._teacher_image: torch.Tensor | None = None
        self._teacher_image_hflip: torch.Tensor | None = None
        self._teacher_text: torch.Tensor | None = None
        teacher_dim = 0
        if needs_teacher(self.edges):
            if (teacher is None) == (teacher_model is None):
                raise ValueError("DistillTask: give exactly one of teacher (cached embeddings) or teacher_model (online)")
            if teacher is not None:
                teacher_dim = self._use_cache(teacher, train)
            else:
                assert teacher_model is not None
                teacher_dim = self._use_online(teacher_model, teacher_tokenizer, teacher_images, train)
        student_dim = _embed_dim(student, self.train_tokens)
        self.projections = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for modality in check_widths(self.edges, student_dim, teacher_dim, projection):
                self.projections[modality] = nn.Linear(student_dim, teacher_dim, bias=False)

    # -- the teacher ------------------------------------------------------------------------

    def _use_cache(self, teacher: Any, train: PairSet) -> int:
        if tuple(teacher.ids) != tuple(train.images.ids):
            raise ValueError(f"teacher embeddings of {len(teacher.ids)} items do not match the {len(train)} training pairs (ids or order differ)")
        if self.hflip and teacher.image_hflip is None:
            raise ConfigError(
                "distill.hflip: true, but the teacher embeddings hold no flipped-image embeddings; set teacher_embed.hflip: true "
                "and rerun teacher_embed, or set distill.hflip: false, or distill.teacher_online: true"
            )
        self.teacher = teacher
        self._teacher_image = torch.from_numpy(np.asarray(teacher.image, dtype=np.float32))
        self._teacher_text = torch.from_numpy(np.asarray(teacher.text, dtype=np.float32))
        if teacher.image_hflip is not None:
            self._teacher_image_hflip = torch.from_numpy(np.asarray(teacher.image_hflip, dtype=np.float32))
        return int(self._teacher_image.shape[1])

    def _use_online(self, model: nn.Module, tok: Callable[..., torch.Tensor] | None, images: ImageCache | None, train: PairSet) -> int:
        model.eval()
        model.requires_grad_(False)
        pre = preprocess_config(model)
        self.teacher_mean, self.teacher_std = pre["mean"], pre["std"]
        size = int(pre["size"])
        if images is None and size != train.images.image_size:
            raise ValueError(f"the teacher expects {size}px images, the training images are {train.images.image_size}px: pass teacher_images")
        if images is not None and (images.image_size != size or tuple(images.ids) != tuple(train.images.ids)):
            raise ValueError("teacher_images must hold the training items at the teacher's image size")
        self.teacher_model = model
        self.teacher_images = images
        tokens = tok(list(train.titles)) if tok is not None else self.train_tokens
        with torch.no_grad():  # titles are not augmented: the teacher's text embeddings once
            self._teacher_text = torch.cat([
                encode_text(model, tokens[start : start + self.eval_batch_size], normalize=True).float()
                for start in range(0, len(tokens), self.eval_batch_size)
            ])
        return int(self._teacher_text.shape[1])

    def teacher_embeddings(self, batch: DistillBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The frozen teacher's image and text embeddings of a batch (no gradient)."""
        if self._teacher_text is None:
            return None, None
        text = self._teacher_text[batch.indices]
        if self.teacher_model is not None:
            assert batch.teacher_images is not None
            with torch.no_grad():
                return self.teacher_model.encode_image(batch.teacher_images, normalize=True).float(), text
        assert self._teacher_image is not None
        image = self._teacher_image[batch.indices]
        if self._teacher_image_hflip is not None and bool(batch.flipped.any()):
            image = torch.where(batch.flipped[:, None], self._teacher_image_hflip[batch.indices], image)
        return image, text

    # -- protocol ---------------------------------------------------------------------------

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        yield from self.model.named_parameters()
        for name, param in self.projections.named_parameters():
            yield f"projections.{name}", param

    def train_batches(self, epoch: int, rng: np.random.Generator, batch_size: int) -> Iterator[DistillBatch]:
        for rows, flips in self.epoch_rows(rng, batch_size):
            flipped = torch.from_numpy(flips)
            raw = self.train_set.images.batch(rows)
            if self.hflip:
                raw = flip_images(raw, flipped)
            teacher_images = None
            if self.teacher_model is not None:
                if self.teacher_images is not None:
                    t_raw = self.teacher_images.batch(rows)
                    if self.hflip:
                        t_raw = flip_images(t_raw, flipped)
                else:
                    t_raw = raw.clone()
                teacher_images = normalise(t_raw, self.teacher_mean, self.teacher_std)
            yield DistillBatch(
                indices=torch.from_numpy(rows),
                images=normalise(raw, self.mean, self.std),
                tokens=self.train_tokens[rows],
                flipped=flipped,
                teacher_images=teacher_images,
            )

    def loss(self, batch: DistillBatch) -> dict[str, torch.Tensor]:  # type: ignore[override]
        model = self.model
        if not model.training:
            model.train()
        image_emb = model.encode_image(batch.images, normalize=True)
        text_emb = encode_text(model, batch.tokens, normalize=True)
        scale = model.logit_scale.exp()
        teacher_image, teacher_text = self.teacher_embeddings(batch)
        terms = distillation_losses(
            image_emb, text_emb, teacher_image, teacher_text, self.edges, scale,
            projections={k: v for k, v in self.projections.items()} or None,
        )
        out = {"loss": terms.pop("loss")}
        out.update({k: v.detach() for k, v in terms.items()})
        out["logit_scale"] = scale.detach()
        return out

    def on_epoch_end(self, epoch: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model.state_dict()}
        if len(self.projections):
            state["projections"] = self.projections.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if len(self.projections):
            self.projections.load_state_dict(state["projections"])


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def checkpoint_key(config: DistillConfig, catalogue: Catalogue, teacher_identity: str | None) -> str:
    """Identify a run by its config, catalogue and teacher: ``--resume`` only continues the same run."""
    digest = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(file_sha256(catalogue.table_path).encode())
    digest.update((teacher_identity or "no-teacher").encode())
    return digest.hexdigest()[:16]


def save_projections(projections: nn.ModuleDict, path: Path, *, teacher_dim: int) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()}
    path.write_bytes(save(state, metadata={"format": "lightclip-projections/1", "teacher_embed_dim": str(teacher_dim)}))


def run_distill(
    catalogue: Catalogue,
    teacher_dir: Path | None,
    teacher_cache_path: Path | None,
    config: DistillConfig,
    out_dir: Path,
    *,
    cache_dir: Path,
    checkpoint_root: Path,
    resume: bool = False,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil the teacher into the student; write the student (safetensors + config), its
    projections and history to ``out_dir`` (replaced atomically).

    ``teacher_cache_path``: the ``teacher_embed`` output (a directory with
    ``train.safetensors``, or that file); checked against the catalogue, and against
    ``teacher_dir``'s weights when given. ``teacher_dir``: the teacher model, needed for
    ``teacher_online: true``. Neither is needed when only ``inter_ss`` is supervised (the
    baseline). Returns the metrics of :func:`lightclip.pretrain.run_pretrain` (best val mean
    recall, ``test/*`` of the best checkpoint, steps, seconds, pairs/s, the student's
    ``params/*``) plus ``params/projections``. Checkpoints go to ``checkpoint_root/<key>``.
    """
    from pydantic import ValidationError

    from lightclip.imagecache import build_image_cache
    from lightclip.models.zoo import ModelError, ModelSpec, count_parameters, create_model, load_model, load_tokenizer, read_model_info, save_model, tokenizer
    from lightclip.teacher_cache import load_teacher_embeddings, teacher_weights_sha256
    from lightclip.training import BEST, load_task_checkpoint, train

    try:
        spec = ModelSpec(**config.student.model_dump())
    except ValidationError as exc:
        raise ModelError(f"distill.student: {exc.errors()[0]['msg']}") from None
    train_items = catalogue.split("train")
    if len(train_items) == 0:
        raise ValueError(f"{catalogue.table_path}: no items in split 'train'")

    teacher = teacher_model = teacher_tok = teacher_images = None
    teacher_identity: str | None = None
    teacher_dim = 0
    if config.needs_teacher:
        if config.teacher_online:
            if teacher_dir is None:
                raise ConfigError("distill.teacher_online: true needs the teacher model (--teacher)")
            teacher_identity = teacher_weights_sha256(teacher_dir)
            teacher_dim = int(read_model_info(teacher_dir)["embed_dim"])
        else:
            if teacher_cache_path is None:
                raise ConfigError("distill: the teacher edges need the teacher embeddings (teacher_embed output) or distill.teacher_online: true")
            teacher = load_teacher_embeddings(teacher_cache_path, catalogue, "train", teacher_dir=teacher_dir)
            teacher_identity = teacher.teacher_sha256
            teacher_dim = teacher.embed_dim
            if config.hflip and teacher.image_hflip is None:
                raise ConfigError(
                    "distill.hflip: true, but the teacher embeddings hold no flipped-image embeddings; set teacher_embed.hflip: true "
                    "and rerun teacher_embed, or set distill.hflip: false, or distill.teacher_online: true"
                )
        check_widths(config.edges, spec.embed_dim, teacher_dim, config.projection)  # before any image is decoded
        if config.teacher_online:
            assert teacher_dir is not None
            teacher_model = load_model(teacher_dir)
            teacher_tok = load_tokenizer(teacher_dir)
            teacher_size = int(preprocess_config(teacher_model)["size"])
            if teacher_size != spec.image_size:
                teacher_images = build_image_cache(catalogue, "train", teacher_size, cache_dir, progress=progress)

    model, _ = create_model(spec, seed=config.train.seed)
    tok = tokenizer(spec)
    train_pairs = PairSet.from_catalogue(catalogue, "train", spec.image_size, cache_dir, progress=progress)
    val_pairs = PairSet.from_catalogue(catalogue, "val", spec.image_size, cache_dir, progress=progress) if len(catalogue.split("val")) else None
    task = DistillTask(
        model,
        tok,
        train_pairs,
        val_pairs,
        edges=config.edges,
        teacher=teacher,
        teacher_model=teacher_model,
        teacher_tokenizer=teacher_tok,
        teacher_images=teacher_images,
        projection=config.projection,
        hflip=config.hflip,
        seed=config.train.seed,
    )
    checkpoint_dir = Path(checkpoint_root) / checkpoint_key(config, catalogue, teacher_identity)
    result = train(task, config.train, checkpoint_dir=checkpoint_dir, resume=resume, log_metrics=log_metrics, progress=progress)
    if (checkpoint_dir / BEST).is_file():
        load_task_checkpoint(task, checkpoint_dir / BEST)

    metrics: dict[str, Any] = result.summary()
    metrics.update({f"params/{k}": v for k, v in count_parameters(model).items()})
    metrics["params/projections"] = sum(p.numel() for p in task.projections.parameters())
    metrics.update(task.test_metrics(catalogue, tok, spec.image_size, cache_dir, progress=progress))

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = {
        "stage": "distill",
        "edges": [e.model_dump(mode="json") for e in config.edges],
        "teacher_sha256": teacher_identity,
        "teacher_online": config.teacher_online,
        "projection_modalities": list(task.projections.keys()),
    }
    save_model(model, spec, tmp, extra=extra)
    if len(task.projections):
        save_projections(task.projections, tmp / PROJECTIONS_FILE, teacher_dim=teacher_dim)
    (tmp / HISTORY_FILE).write_text(json.dumps(result.history, indent=1) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return metrics


def summarise(metrics: Mapping[str, Any]) -> str:
    """One line for the CLI (same shape as :func:`lightclip.pretrain.summarise`)."""
    from lightclip.pretrain import summarise as pretrain_summary

    return pretrain_summary(metrics)
