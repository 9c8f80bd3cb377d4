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
import pandas as pd
import torch
from torch import nn

from lightclip import distributed
from lightclip.config import BatchGroupsConfig, TrainImagesConfig
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.evaluation import embed_pairs, retrieval_metrics, title_groups
from lightclip.imagecache import ImageCache, build_image_cache, hflip, normalise, resize_mode_of
from lightclip.losses import clip_loss
from lightclip.models.zoo import encode_text, logit_scale_max, preprocess_config
from lightclip.trainstream import ShardTrainStream, StreamBatch

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


@dataclass(frozen=True)
class PairSet:
    """Image-title pairs of one split: decoded images and their titles, in the same order."""

    images: ImageCache | ShardTrainStream  # a stream: the train split read from shards (train.images)
    titles: tuple[str, ...]
    groups: np.ndarray | None = None  # evaluation positives; default: identical titles
    #: Training batches of look-alikes (``train.batch_groups``): each pair's kind (an integer code
    #: of the grouping column's value) and how many pairs of one kind run together in a batch.
    batch_kinds: np.ndarray | None = None
    batch_run: int = 8

    def __post_init__(self) -> None:
        if len(self.titles) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.titles)} titles")
        if self.batch_kinds is not None and len(self.batch_kinds) != len(self.titles):
            raise ValueError(f"{len(self.batch_kinds)} batch kinds but {len(self.titles)} pairs")
        if self.groups is None:
            object.__setattr__(self, "groups", title_groups(self.titles))

    def __len__(self) -> int:
        return len(self.titles)

    @classmethod
    def from_catalogue(
        cls, catalogue: Catalogue, split: str, image_size: int, cache_dir: Path | str, *, progress: bool = True, resize_mode: str = "crop",
        images: TrainImagesConfig | None = None, batch_groups: BatchGroupsConfig | None = None,
    ) -> "PairSet":
        """The split's pairs; ``images`` (the trainers' ``train.images``) may stream them from shards
        instead of the cache; ``batch_groups`` (``train.batch_groups``) batches look-alikes together."""
        items = catalogue.split(split)
        if images is not None and images.source == "webdataset":
            assert images.shards is not None  # the config's validator
            stream = ShardTrainStream([str(i) for i in items["id"]], images.shards, image_size, resize_mode=resize_mode,
                                      shuffle_buffer=images.shuffle_buffer, num_workers=images.decode_threads)
            return cls(images=stream, titles=tuple(str(t) for t in items["title"]))
        cache = build_image_cache(catalogue, split, image_size, cache_dir, progress=progress, resize_mode=resize_mode)
        kinds, run = None, BatchGroupsConfig().run
        if batch_groups is not None and batch_groups.column is not None:
            kinds, run = batch_kinds(catalogue, items, batch_groups.column), batch_groups.run
        return cls(images=cache, titles=tuple(str(t) for t in items["title"]), batch_kinds=kinds, batch_run=run)


def batch_kinds(catalogue: Catalogue, items: pd.DataFrame, column: str) -> np.ndarray:
    """Integer codes of ``items[column]`` (an empty value is a kind of its own, never a dropped pair)."""
    if column not in items.columns:
        raise CatalogueError(
            f"{catalogue.table_path}: train.batch_groups.column {column!r} is not a column of the catalogue "
            f"(its columns: {', '.join(map(str, items.columns))})"
        )
    values = items[column].astype("string").fillna("")
    return pd.factorize(values, sort=True)[0].astype(np.int64)


def grouped_order(kinds: np.ndarray, run: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the rows made of runs of up to ``run`` rows of one kind, the runs in random order.

    Cut into batches, it gives each batch several small clusters of look-alikes: every pair's
    in-batch negatives then include others of its own kind (hard negatives), and every row still
    comes once per epoch. Within a kind the rows are shuffled, so the runs differ every epoch.
    """
    shuffled = rng.permutation(len(kinds))
    by_kind = shuffled[np.argsort(kinds[shuffled], kind="stable")]
    starts = np.flatnonzero(np.r_[True, kinds[by_kind][1:] != kinds[by_kind][:-1]])
    runs: list[np.ndarray] = []
    for start, stop in zip(starts, np.r_[starts[1:], len(by_kind)]):
        runs.extend(by_kind[i : min(i + run, stop)] for i in range(start, stop, run))
    if not runs:
        return by_kind
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))])


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
        self._streamed: StreamBatch | None = None  # this rank's images of the current streamed batch
        self._batch_size: int | None = None  # the global batch a streamed training runs with (for run_metrics)
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
        if isinstance(self.train_set.images, ShardTrainStream):
            self._batch_size = batch_size
            return self.train_set.images.steps_per_epoch(batch_size)
        return max(1, len(self.train_set) // batch_size)

    def epoch_rows(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, flip flags) of each batch of an epoch: a pure function of ``rng`` (exact resume)."""
        if isinstance(self.train_set.images, ShardTrainStream):
            yield from self._streamed_rows(self.train_set.images, rng, batch_size)
            return
        n = len(self.train_set)
        kinds = self.train_set.batch_kinds
        order = rng.permutation(n) if kinds is None else grouped_order(kinds, self.train_set.batch_run, rng)
        flips = rng.random(n) < 0.5 if self.hflip else np.zeros(n, dtype=bool)
        size = min(batch_size, n)
        for b in range(self.batches_per_epoch(batch_size)):
            rows = order[b * size : (b + 1) * size]
            yield rows, flips[rows]

    def _streamed_rows(self, stream: ShardTrainStream, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The global batch's (rows, flips) gathered from the ranks' streamed shares, in rank order
        (so :func:`~lightclip.distributed.shard` gives each rank its own share back); this rank's
        images wait in ``_streamed`` for :meth:`train_images`."""
        world = distributed.world()
        try:
            for batch in stream.epoch(rng, batch_size, hflip=self.hflip):
                self._streamed = batch
                rows = distributed.gather_detached(torch.from_numpy(batch.rows), world).numpy()
                flips = distributed.gather_detached(torch.from_numpy(batch.flips.astype(np.uint8)), world).numpy().astype(bool)
                yield rows, flips
        finally:
            self._streamed = None

    def train_images(self, rows: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        """The batch's images, flipped where drawn (uint8, not yet normalised)."""
        streamed = self._streamed
        if streamed is not None and np.array_equal(rows, streamed.rows):
            images = streamed.images
        else:
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

    def run_metrics(self) -> dict[str, float]:
        """What a streamed epoch passed over: items of the split left out per epoch, samples of other splits."""
        stream = self.train_set.images
        if not isinstance(stream, ShardTrainStream) or self._batch_size is None:
            return {}
        return {"train/stream_items_left_out_per_epoch": stream.left_out(self._batch_size), "train/stream_other_items": stream.index.other_items}

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
