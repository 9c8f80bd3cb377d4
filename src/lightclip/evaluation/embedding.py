"""The one batched-embedding path: images and tokenised texts through a model, for any caller.

Every place that embeds many items (the evaluate stage, validation during training, the
teacher cache, the index, serving, the bench) goes through these functions, so all of them see
the same preprocessing and produce the same numbers:

* the model runs in eval mode under ``torch.no_grad()``; its train/eval mode is restored after;
* images are uint8 ``N x 3 x S x S`` (an :class:`~lightclip.imagecache.ImageCache`, a numpy
  array or a tensor), normalised with the model's mean/std batch by batch;
* texts are token ids (``N x context``), encoded with :func:`lightclip.models.zoo.encode_text`
  (trimmed to the batch's longest title);
* outputs are float32, L2-normalised (``encode_*(..., normalize=True).float()``), row ``i`` the
  embedding of item ``i``. Batches are cut at multiples of ``batch_size``: a given batch size
  always gives bit-identical embeddings;
* the model runs where it is: inputs go to its device (uint8 images pinned and copied without
  blocking, normalised there; :func:`lightclip.devices.to_device`), outputs come back to the
  CPU. On a CPU model nothing is copied, so CPU numbers are those of a CPU-only build.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from lightclip.devices import model_device, to_device
from lightclip.evaluation.errors import EvaluationError
from lightclip.imagecache import ImageCache, normalise
from lightclip.imagestream import ImageStream, embed_image_stream
from lightclip.models.zoo import encode_text, preprocess_config

#: uint8 images, ``N x 3 x S x S``.
ImageSource = ImageCache | np.ndarray | torch.Tensor


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block with ``model`` in eval mode and without gradients; its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _image_batch(images: ImageSource, start: int, stop: int) -> torch.Tensor:
    if isinstance(images, ImageCache):
        return images.batch(np.arange(start, stop))
    if isinstance(images, torch.Tensor):
        return images[start:stop].contiguous()
    return torch.from_numpy(np.ascontiguousarray(images[start:stop]))


def _image_size(images: ImageSource) -> int:
    if isinstance(images, ImageCache):
        return images.image_size
    if images.dtype not in (np.uint8, torch.uint8) or images.ndim != 4:  # normalise() works in place on float input
        raise EvaluationError(f"expected uint8 N x 3 x S x S images, got {images.dtype} of shape {tuple(images.shape)}")
    return int(images.shape[-1])


def embed_images(model: torch.nn.Module, images: ImageSource, batch_size: int = 256, *, hflip: bool = False) -> torch.Tensor:
    """Normalised float32 embeddings (``N x D``) of uint8 images at the model's input size.

    ``hflip``: embed the horizontally flipped images instead (flipped before normalising).
    An empty input gives a ``0 x 0`` tensor.
    """
    pre = preprocess_config(model)
    if int(pre["size"]) != _image_size(images):
        raise EvaluationError(f"images are {_image_size(images)}px but the model expects {pre['size']}px")
    out = []
    device = model_device(model)
    with inference(model):
        for start in range(0, len(images), batch_size):
            batch = to_device(_image_batch(images, start, min(start + batch_size, len(images))), device)
            if hflip:
                batch = batch.flip(-1)
            out.append(model.encode_image(normalise(batch, pre["mean"], pre["std"]), normalize=True).float())
    return torch.cat(out).cpu() if out else torch.zeros((0, 0))


def embed_texts(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised float32 embeddings (``N x D``) of tokenised texts; an empty input gives ``0 x 0``."""
    out = []
    device = model_device(model)
    with inference(model):
        for start in range(0, tokens.shape[0], batch_size):
            out.append(encode_text(model, to_device(tokens[start : start + batch_size], device), normalize=True).float())
    return torch.cat(out).cpu() if out else torch.zeros((0, 0))


def embed_pairs(model: torch.nn.Module, images: ImageSource, tokens: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, text)`` embeddings of paired items (row ``i`` of both is item ``i``)."""
    if len(images) != tokens.shape[0]:
        raise EvaluationError(f"{len(images)} images but {tokens.shape[0]} texts: pairs need one of each per item")
    return embed_images(model, images, batch_size), embed_texts(model, tokens, batch_size)


def tokenize_checked(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Tokenise ``texts``; return the tokens and a bool mask of the texts that were truncated.

    Truncation (documented, not an error): a text longer than the model's context keeps its
    first ``context_length - 2`` BPE tokens between start and end of text (open_clip's rule).
    A row is truncated when its tokens fill the context and the text encodes to more; a
    tokenizer without ``encode`` marks every full row as truncated (conservative).
    """
    tokens = tokenizer(list(texts))
    full = np.flatnonzero((tokens[:, -1] != 0).numpy())
    truncated = np.zeros(len(texts), dtype=bool)
    encode = getattr(tokenizer, "encode", None)
    for i in full:
        truncated[i] = True if encode is None else len(encode(texts[i])) + 2 > tokens.shape[1]
    return tokens, truncated


@dataclass
class Embeddings:
    """Normalised embeddings of one split with one model, and what embedding them cost."""

    images: torch.Tensor
    texts: torch.Tensor
    image_seconds: float
    text_seconds: float
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def embed_split(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], cache: ImageCache, titles: Sequence[str], batch_size: int = 256) -> Embeddings:
    """Embed a split's images and titles, timing each half (tokenisation counts as text time)."""
    t0 = time.perf_counter()
    images = embed_images(model, cache, batch_size)
    t1 = time.perf_counter()
    tokens, truncated = tokenize_checked(tokenizer, list(titles))
    texts = embed_texts(model, tokens, batch_size)
    t2 = time.perf_counter()
    return Embeddings(images=images, texts=texts, image_seconds=t1 - t0, text_seconds=t2 - t1, truncated=truncated)


def embed_split_stream(
    model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], stream: ImageStream, titles: Sequence[str], batch_size: int = 256,
    *, content_groups: bool = False,
) -> tuple[Embeddings, np.ndarray | None]:
    """:func:`embed_split` over a stream (memory bounded by a batch); also the groups of
    byte-identical images when ``content_groups`` (for the ``image`` positives rule)."""
    t0 = time.perf_counter()
    streamed = embed_image_stream(model, stream, batch_size, content_groups=content_groups)
    t1 = time.perf_counter()
    tokens, truncated = tokenize_checked(tokenizer, list(titles))
    texts = embed_texts(model, tokens, batch_size)
    t2 = time.perf_counter()
    return Embeddings(images=streamed.image, texts=texts, image_seconds=t1 - t0, text_seconds=t2 - t1, truncated=truncated), streamed.content_groups
