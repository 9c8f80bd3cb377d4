"""CocaCLIP/ConaCLIP: a small student trained under the knowledge-interaction-graph loss.

The student's batches, evaluation and logit-scale clamp are the image-text task's; this task
adds the frozen teacher and the graph loss of :func:`lightclip.losses.distillation_losses` over
the configured edges (:mod:`lightclip.edges`). The teacher's embeddings come from the
``teacher_embed`` cache, looked up by item index (a flipped image uses the teacher's embedding
of the flipped image), or, with a ``teacher_model``, from running the teacher on every batch on
the same augmented images. When the student's width differs from the teacher's, the
teacher-student edges go through learned linear projections trained with the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lightclip import distributed
from lightclip.config import ConfigError, EdgeLossConfig, concrete_edges
from lightclip.edges import PROJECTED_EDGES, needs_teacher, projected_modalities
from lightclip.evaluation import embed_texts
from lightclip.imagecache import ImageCache, hflip as flip_images, normalise
from lightclip.losses import distillation_losses
from lightclip.models.zoo import preprocess_config
from lightclip.tasks.image_text import ClipBatch, ImageTextTask, PairSet, Tokenizer
from lightclip.teacher_cache import TeacherEmbeddings


def check_widths(edges: Sequence[EdgeLossConfig], student_dim: int, teacher_dim: int, projection: bool) -> tuple[str, ...]:
    """The student modalities that need a projection; a :class:`ConfigError` when one is needed but off."""
    concrete = [edge for edge, _ in concrete_edges(list(edges))]
    modalities = projected_modalities(concrete) if student_dim != teacher_dim else ()
    if modalities and not projection:
        used = sorted({f"{e}/{entry.loss}" for e, entry in concrete_edges(list(edges)) if e in PROJECTED_EDGES})
        raise ConfigError(
            f"distill.projection: false, but the student's embeddings are {student_dim}-d and the teacher's {teacher_dim}-d, "
            f"and the teacher-student edges {', '.join(used)} compare them directly; set distill.projection: true "
            "(learned linear projections) or pick a student with the teacher's embed_dim"
        )
    return modalities


def hflip_cache_error() -> ConfigError:
    return ConfigError(
        "distill.hflip: true, but the teacher embeddings hold no flipped-image embeddings; set teacher_embed.hflip: true "
        "and rerun teacher_embed, or set distill.hflip: false, or distill.teacher_online: true"
    )


@dataclass
class DistillBatch(ClipBatch):
    flipped: torch.Tensor  # B bool: which images were flipped
    teacher_images: torch.Tensor | None = None  # normalised for the online teacher


class DistillTask(ImageTextTask):
    """Student training under the ConaCLIP graph loss (the :class:`~lightclip.training.TrainingTask` protocol).

    ``teacher``: cached teacher embeddings of ``train`` (same ids, same order), or
    ``teacher_model`` (+ ``teacher_tokenizer``, and ``teacher_images`` when the teacher's image
    size differs from the student's) to run the frozen teacher online. Neither is needed when
    only ``inter_ss`` is supervised. ``edges`` are validated config entries.
    """

    def __init__(
        self,
        student: nn.Module,
        tokenizer: Tokenizer,
        train: PairSet,
        val: PairSet | None,
        *,
        edges: Sequence[EdgeLossConfig],
        teacher: TeacherEmbeddings | None = None,
        teacher_model: nn.Module | None = None,
        teacher_tokenizer: Tokenizer | None = None,
        teacher_images: ImageCache | None = None,
        projection: bool = True,
        hflip: bool = True,
        seed: int = 0,
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__(student, tokenizer, train, val, hflip=hflip, eval_batch_size=eval_batch_size)
        self.edges = list(edges)
        self.teacher_model: nn.Module | None = None
        self.teacher_images: ImageCache | None = None
        self._teacher_image: torch.Tensor | None = None
        self._teacher_image_hflip: torch.Tensor | None = None
        self._teacher_text: torch.Tensor | None = None
        teacher_dim = 0
        if needs_teacher(edge for edge, _ in concrete_edges(self.edges)):
            if (teacher is None) == (teacher_model is None):
                raise ValueError("DistillTask: give exactly one of teacher (cached embeddings) or teacher_model (online)")
            if teacher is not None:
                teacher_dim = self._use_cache(teacher, train)
            else:
                assert teacher_model is not None
                teacher_dim = self._use_online(teacher_model, teacher_tokenizer, teacher_images, train)
        student_dim = self.embed_dim()
        self.projections = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for modality in check_widths(self.edges, student_dim, teacher_dim, projection):
                self.projections[modality] = nn.Linear(student_dim, teacher_dim, bias=False)

    # -- the teacher ------------------------------------------------------------------------

    def _use_cache(self, teacher: TeacherEmbeddings, train: PairSet) -> int:
        if tuple(teacher.ids) != tuple(train.images.ids):
            raise ValueError(f"teacher embeddings of {len(teacher.ids)} items do not match the {len(train)} training pairs (ids or order differ)")
        if self.hflip and teacher.image_hflip is None:
            raise hflip_cache_error()
        self._teacher_image = torch.from_numpy(np.asarray(teacher.image, dtype=np.float32))
        self._teacher_text = torch.from_numpy(np.asarray(teacher.text, dtype=np.float32))
        if teacher.image_hflip is not None:
            self._teacher_image_hflip = torch.from_numpy(np.asarray(teacher.image_hflip, dtype=np.float32))
        return int(self._teacher_image.shape[1])

    def _use_online(self, model: nn.Module, tok: Tokenizer | None, images: ImageCache | None, train: PairSet) -> int:
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
        # titles are not augmented: the teacher's text embeddings once
        self._teacher_text = embed_texts(model, tokens, self.eval_batch_size)
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

    def to(self, device: torch.device) -> "DistillTask":
        """The student, its projections, the teacher's embeddings and the online teacher on ``device``."""
        super().to(device)
        self.projections.to(device)
        for name in ("_teacher_image", "_teacher_image_hflip", "_teacher_text"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.teacher_model is not None:
            self.teacher_model.to(device)
        return self

    # -- the TrainingTask protocol ------------------------------------------------------------

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        yield from self.model.named_parameters()
        for name, param in self.projections.named_parameters():
            yield f"projections.{name}", param

    def train_batches(self, epoch: int, rng: np.random.Generator, batch_size: int) -> Iterator[DistillBatch]:
        world = distributed.world()
        for rows, flips in self.epoch_rows(rng, batch_size):
            rows, flips = distributed.shard(rows, world), distributed.shard(flips, world)
            flipped = torch.from_numpy(flips)
            raw = self.train_images(rows, flips)
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
        image_emb, text_emb, scale = self.encode(batch)  # of the global batch
        teacher_image, teacher_text = self.teacher_embeddings(batch)  # of this rank's slice: gathered
        world = distributed.world()
        teacher_image = None if teacher_image is None else distributed.gather_detached(teacher_image, world)
        teacher_text = None if teacher_text is None else distributed.gather_detached(teacher_text, world)
        terms = distillation_losses(
            image_emb, text_emb, teacher_image, teacher_text, self.edges, scale,
            projections={k: v for k, v in self.projections.items()} or None,
        )
        out = {"loss": terms.pop("loss")}
        out.update({k: v.detach() for k, v in terms.items()})
        out["logit_scale"] = scale.detach()
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if len(self.projections):
            state["projections"] = self.projections.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if len(self.projections):
            self.projections.load_state_dict(state["projections"])
