"""The image-text task: CLIP training of an open_clip model on a catalogue's image-title pairs.

It is what both papers share and the plain-CLIP baseline of the concept ablation: pairs of one
split (:class:`PairSet`), an epoch's batches as a pure function of the loop's generator (so a
resumed run sees the same batches), random horizontal flips, the symmetric InfoNCE loss, the
logit scale clamped after every step as open_clip does, and validation by retrieval recall.
:mod:`lightclip.tasks.fashionklip` and :mod:`lightclip.tasks.cocaclip` extend it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lightclip import distributed
from lightclip.data.catalogue import Catalogue
from lightclip.evaluation import embed_pairs, retrieval_metrics, title_groups
from lightclip.imagecache import ImageCache, build_image_cache, hflip, normalise, resize_mode_of
from lightclip.losses import clip_loss
from lightclip.models.zoo import encode_text, logit_scale_max, preprocess_config

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


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
    def from_catalogue(
        cls, catalogue: Catalogue, split: str, image_size: int, cache_dir: Path | str, *, progress: bool = True, resize_mode: str = "crop"
    ) -> "PairSet":
        cache = build_image_cache(catalogue, split, image_size, cache_dir, progress=progress, resize_mode=resize_mode)
        items = catalogue.split(split)
        return cls(images=cache, titles=tuple(str(t) for t in items["title"]))


@dataclass
class ClipBatch:
    indices: torch.Tensor  # B training-item indices
    images: torch.Tensor  # B x 3 x S x S float, normalised
    tokens: torch.Tensor  # B x L

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def split_metrics(
    model: nn.Module,
    tokenizer: Tokenizer,
    catalogue: Catalogue,
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
    pairs = PairSet.from_catalogue(catalogue, split, image_size, cache_dir, progress=progress, resize_mode=resize_mode_of(preprocess_config(model)))
    image_emb, text_emb = embed_pairs(model, pairs.images, tokenizer(list(pairs.titles)), batch_size)
    return {f"{split}/{k}": v for k, v in retrieval_metrics(image_emb, text_emb, pairs.groups).items()}


class ImageTextTask:
    """CLIP training on image-title pairs (:class:`lightclip.training.TrainingTask`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        train: PairSet,
        val: PairSet | None,
        *,
        hflip: bool = True,
        eval_batch_size: int = 512,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.train_set, self.val_set = train, val
        pre = preprocess_config(model)
        self.mean, self.std = pre["mean"], pre["std"]
        self.image_size = int(pre["size"])
        self.resize_mode = resize_mode_of(pre)
        for name, pairs in (("train", train), ("val", val)):
            if pairs is not None and pairs.images.image_size != self.image_size:
                raise ValueError(f"{name} images are {pairs.images.image_size}px but the model expects {self.image_size}px")
            if pairs is not None and pairs.images.resize_mode != self.resize_mode:
                raise ValueError(f"{name} images were fitted by {pairs.images.resize_mode!r} but the model's resize_mode is {self.resize_mode!r}")
        self.hflip = hflip
        self.eval_batch_size = eval_batch_size
        self.train_tokens = tokenizer(list(train.titles))
        self.val_tokens = tokenizer(list(val.titles)) if val is not None else None

    def embed_dim(self) -> int:
        """The model's embedding width (from its config, else by encoding one title)."""
        dim = int(getattr(self.model, "lightclip_config", {}).get("embed_dim", 0) or 0)
        if dim:
            return dim
        with torch.no_grad():
            return int(encode_text(self.model, self.train_tokens[:1]).shape[-1])

    def to(self, device: torch.device) -> "ImageTextTask":
        """Put the model on ``device`` (the training loop's ``train.device``; batches follow it there)."""
        self.model.to(device)
        return self

    # -- the TrainingTask protocol ------------------------------------------------------------

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

    def train_images(self, rows: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """The batch's images, flipped where drawn (uint8, not yet normalised)."""
        images = self.train_set.images.batch(rows)
        return hflip(images, flips) if self.hflip else images

    def train_batches(self, epoch: int, rng: np.random.Generator, batch_size: int) -> Iterator[ClipBatch]:
        world = distributed.world()
        for rows, flips in self.epoch_rows(rng, batch_size):
            yield self.clip_batch(distributed.shard(rows, world), distributed.shard(flips, world))

    def clip_batch(self, rows: np.ndarray, flips: np.ndarray) -> ClipBatch:
        """The batch of ``rows`` (this rank's slice of a global batch under ``torchrun``)."""
        return ClipBatch(
            indices=torch.from_numpy(rows),
            images=normalise(self.train_images(rows, flips), self.mean, self.std),
            tokens=self.train_tokens[rows],
        )

    def encode(self, batch: ClipBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image embeddings, text embeddings, logit scale)`` of the global batch, in train mode.

        Under ``torchrun`` each rank encodes its slice and the slices are gathered with gradients
        (:func:`lightclip.distributed.gather_pair`): the losses see the single-process batch.
        """
        if not self.model.training:
            self.model.train()
        image_emb = self.model.encode_image(batch.images, normalize=True)
        text_emb = encode_text(self.model, batch.tokens, normalize=True)
        image_emb, text_emb = distributed.gather_pair(image_emb, text_emb, distributed.world())
        return image_emb, text_emb, self.model.logit_scale.exp()

    def clip_terms(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CLIP loss (``loss``) and what the loop logs beside it."""
        clip = clip_loss(image_emb, text_emb, scale)
        return {"loss": clip, "clip": clip.detach(), "logit_scale": scale.detach()}

    def loss(self, batch: ClipBatch) -> dict[str, torch.Tensor]:
        return self.clip_terms(*self.encode(batch))

    def on_step_end(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, logit_scale_max())

    def evaluate(self) -> dict[str, float]:
        if self.val_set is None or self.val_tokens is None:
            return {}
        image_emb, text_emb = embed_pairs(self.model, self.val_set.images, self.val_tokens, self.eval_batch_size)
        metrics = retrieval_metrics(image_emb, text_emb, self.val_set.groups)
        return {f"val/{k}": v for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

    # -- after training -------------------------------------------------------------------------

    def test_metrics(self, catalogue: Catalogue, cache_dir: Path | str, *, progress: bool = True) -> dict[str, float]:
        """``test/*`` retrieval metrics of the current model on the catalogue's test split ({} if empty)."""
        return split_metrics(self.model, self.tokenizer, catalogue, "test", self.image_size, cache_dir, batch_size=self.eval_batch_size, progress=progress)
