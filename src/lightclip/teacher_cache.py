"""The frozen teacher's embeddings of a catalogue split, computed once and checked on every use.

Distillation reads the teacher's image and text embeddings of each training pair by item
index instead of running the teacher at every step. :func:`embed_with_teacher` computes them
(eval mode, no gradient; images from the uint8 image cache at the teacher's own size and
normalisation, titles with the teacher's recorded tokenizer), L2-normalised, float32;
optionally also the embeddings of the horizontally flipped images, so that ``distill.hflip``
works from the cache.

File format (``<split>.safetensors``, no pickle): tensors ``image``, ``text`` and optionally
``image_hflip`` (``N x D`` float32); metadata ``format``, ``split``, ``ids`` (JSON list, in
catalogue order), ``count``, ``embed_dim``, ``catalogue_sha256`` (the catalogue parquet),
``teacher_sha256`` (the teacher's ``model.safetensors``), ``teacher_arch``, ``image_size``,
``teacher_logit_scale``.

:func:`load_teacher_embeddings` refuses a file that does not match its inputs (a *stale*
cache): a different number of items, different ids or order, another catalogue table, or (when
``teacher_dir`` is given) other teacher weights. The image files themselves are not hashed
(the catalogue table names them; regenerating the catalogue changes its hash).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lightclip.config import ImageSourceConfig, TeacherEmbedConfig
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.devices import resolve_device
from lightclip.errors import LightclipError
from lightclip.evaluation import embed_images, embed_texts, retrieval_metrics, title_groups
from lightclip.imagecache import ImageCache, resize_mode_of
from lightclip.imagestream import embed_image_stream, open_image_source
from lightclip.io import atomic_write_bytes, staged_dir, torch_threads, write_json
from lightclip.models.common import canonical_safetensors
from lightclip.models.zoo import WEIGHTS_FILE, ModelError, load_model, load_tokenizer, preprocess_config, read_model_info, weights_sha256
from lightclip.stage import StageContext

FORMAT = "lightclip-teacher-embeddings/1"
REFRESH_HINT = "recompute it: dvc repro teacher_embed (or lightclip teacher-embed)"


class StaleTeacherEmbeddings(LightclipError, ValueError):
    """A teacher-embedding file that does not belong to this catalogue split or teacher."""


@dataclass(frozen=True)
class TeacherEmbeddings:
    """The teacher's L2-normalised embeddings of one split, row ``i`` = item ``ids[i]``."""

    ids: tuple[str, ...]
    image: np.ndarray  # N x D float32
    text: np.ndarray  # N x D float32
    split: str
    catalogue_sha256: str
    teacher_sha256: str
    teacher_arch: str
    image_size: int
    teacher_logit_scale: float
    image_hflip: np.ndarray | None = None  # N x D float32: the flipped images
    path: Path | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("image", "text", "image_hflip"):
            array = getattr(self, name)
            if array is None:
                continue
            if array.ndim != 2 or array.shape[0] != n or array.shape[1] != self.image.shape[1]:
                raise ValueError(f"teacher embeddings: {name} has shape {array.shape}, expected ({n}, {self.image.shape[1]})")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def embed_dim(self) -> int:
        return int(self.image.shape[1])

    def save(self, path: Path | str) -> Path:
        """Write the safetensors file atomically (byte-stable: same embeddings, same bytes); returns its path."""
        tensors = {"image": torch.from_numpy(np.ascontiguousarray(self.image, dtype=np.float32)),
                   "text": torch.from_numpy(np.ascontiguousarray(self.text, dtype=np.float32))}
        if self.image_hflip is not None:
            tensors["image_hflip"] = torch.from_numpy(np.ascontiguousarray(self.image_hflip, dtype=np.float32))
        metadata = {
            "format": FORMAT,
            "split": self.split,
            "ids": json.dumps(list(self.ids)),
            "count": str(len(self.ids)),
            "embed_dim": str(self.embed_dim),
            "catalogue_sha256": self.catalogue_sha256,
            "teacher_sha256": self.teacher_sha256,
            "teacher_arch": self.teacher_arch,
            "image_size": str(self.image_size),
            "teacher_logit_scale": repr(float(self.teacher_logit_scale)),
        }
        return atomic_write_bytes(path, canonical_safetensors(tensors, metadata))


def teacher_weights_sha256(teacher_dir: Path | str) -> str:
    """sha256 of a saved teacher's ``model.safetensors``, verified against its ``model.json``."""
    path = Path(teacher_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelError(f"{teacher_dir}: no teacher weights ({WEIGHTS_FILE}); train it first: dvc repro pretrain")
    return weights_sha256(teacher_dir)


def embed_with_teacher(
    teacher_dir: Path | str,
    catalogue: Catalogue,
    split: str,
    cache_dir: Path | str,
    *,
    batch_size: int = 256,
    hflip: bool = True,
    progress: bool = False,
    device: str = "auto",
    images: ImageSourceConfig | None = None,
) -> TeacherEmbeddings:
    """The teacher's embeddings of ``split`` (images from the uint8 cache under ``cache_dir``).

    ``device``: the ``teacher_embed.device`` knob (:func:`lightclip.devices.resolve_device`).
    ``images``: the ``teacher_embed.images`` knob: the cache, or a stream that decodes each
    image once for both the plain and the flipped embedding (:mod:`lightclip.imagestream`).
    """
    teacher_dir = Path(teacher_dir)
    teacher_sha = teacher_weights_sha256(teacher_dir)
    info = read_model_info(teacher_dir)
    model = load_model(teacher_dir).to(resolve_device(device, field="teacher_embed.device"))
    model.requires_grad_(False)
    pre = preprocess_config(model)
    size = int(pre["size"])
    source = open_image_source(images or ImageSourceConfig(), catalogue, split, size, cache_dir, resize_mode=resize_mode_of(pre), progress=progress)
    if isinstance(source, ImageCache):
        image = embed_images(model, source, batch_size)
        image_hflip = embed_images(model, source, batch_size, hflip=True) if hflip else None
    else:
        streamed = embed_image_stream(model, source, batch_size, hflip=hflip)
        image, image_hflip = streamed.image, streamed.image_hflip
    tokens = load_tokenizer(teacher_dir)([str(t) for t in catalogue.split(split)["title"]])
    return TeacherEmbeddings(
        ids=source.ids,
        image=image.numpy(),
        text=embed_texts(model, tokens, batch_size).numpy(),
        image_hflip=image_hflip.numpy() if image_hflip is not None else None,
        split=split,
        catalogue_sha256=file_sha256(catalogue.table_path),
        teacher_sha256=teacher_sha,
        teacher_arch=str(info["arch"]),
        image_size=size,
        teacher_logit_scale=float(model.logit_scale.exp()),
    )


def embeddings_path(path: Path | str, split: str) -> Path:
    """A file path, or ``<dir>/<split>.safetensors`` for a ``teacher_embed`` output directory."""
    path = Path(path)
    return path / f"{split}.safetensors" if path.is_dir() or not path.suffix else path


def load_teacher_embeddings(path: Path | str, catalogue: Catalogue, split: str, teacher_dir: Path | str | None = None) -> TeacherEmbeddings:
    """Read a teacher-embedding file and check it against the catalogue split (and the teacher).

    Raises :class:`StaleTeacherEmbeddings` naming what differs (count, ids, catalogue hash,
    teacher hash, split), ``FileNotFoundError`` when there is no file.
    """
    path = embeddings_path(path, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher embeddings for split {split!r}; {REFRESH_HINT}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta: dict[str, Any] = dict(handle.metadata() or {})
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise StaleTeacherEmbeddings(f"{path}: not a readable teacher-embedding file ({exc}); {REFRESH_HINT}") from exc
    if meta.get("format") != FORMAT:
        raise StaleTeacherEmbeddings(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}; {REFRESH_HINT}")
    stale = f"{path}: stale teacher embeddings"
    if meta.get("split") != split:
        raise StaleTeacherEmbeddings(f"{stale}: they are of split {meta.get('split')!r}, not {split!r}; {REFRESH_HINT}")
    ids = tuple(json.loads(meta["ids"]))
    expected = tuple(str(i) for i in catalogue.split(split)["id"])
    if len(ids) != len(expected) or int(meta.get("count", -1)) != len(ids) or arrays["image"].shape[0] != len(ids):
        raise StaleTeacherEmbeddings(f"{stale}: {len(ids)} items, but split {split!r} of {catalogue.table_path} has {len(expected)}; {REFRESH_HINT}")
    if ids != expected:
        diff = [i for i, (a, b) in enumerate(zip(ids, expected)) if a != b]
        first = diff[0]
        raise StaleTeacherEmbeddings(
            f"{stale}: the item ids differ from split {split!r} of the catalogue at {len(diff)} position(s), first at row {first} "
            f"({ids[first]!r} vs {expected[first]!r}); {REFRESH_HINT}"
        )
    catalogue_sha = file_sha256(catalogue.table_path)
    if meta.get("catalogue_sha256") != catalogue_sha:
        raise StaleTeacherEmbeddings(
            f"{stale}: computed for catalogue table sha256 {str(meta.get('catalogue_sha256'))[:12]}..., "
            f"but {catalogue.table_path} is {catalogue_sha[:12]}...; {REFRESH_HINT}"
        )
    if teacher_dir is not None:
        teacher_sha = teacher_weights_sha256(teacher_dir)
        if meta.get("teacher_sha256") != teacher_sha:
            raise StaleTeacherEmbeddings(
                f"{stale}: computed with teacher weights sha256 {str(meta.get('teacher_sha256'))[:12]}..., "
                f"but {teacher_dir} holds {teacher_sha[:12]}...; {REFRESH_HINT}"
            )
    return TeacherEmbeddings(
        ids=ids,
        image=arrays["image"].astype(np.float32, copy=False),
        text=arrays["text"].astype(np.float32, copy=False),
        image_hflip=arrays["image_hflip"].astype(np.float32, copy=False) if "image_hflip" in arrays else None,
        split=split,
        catalogue_sha256=str(meta["catalogue_sha256"]),
        teacher_sha256=str(meta["teacher_sha256"]),
        teacher_arch=str(meta.get("teacher_arch", "")),
        image_size=int(meta.get("image_size", 0)),
        teacher_logit_scale=float(meta.get("teacher_logit_scale", "nan")),
        path=path,
    )


@dataclass(frozen=True)
class TeacherEmbedInputs:
    catalogue: Path  # the split catalogue (data/split)
    teacher: Path  # the teacher model dir (models/teacher)


@dataclass(frozen=True)
class TeacherEmbedOutputs:
    embeddings: Path  # data/teacher_emb: <split>.safetensors per configured split
    metrics: Path  # metrics/teacher_embed.json


def run_teacher_embed(config: TeacherEmbedConfig, inputs: TeacherEmbedInputs, outputs: TeacherEmbedOutputs, context: StageContext) -> dict[str, Any]:
    """The ``teacher_embed`` stage: ``<embeddings>/<split>.safetensors`` for each configured split.

    The directory is replaced atomically. Returns (and writes) the metrics: items per split, the
    embedding width, seconds, and (for a ``val``/``test`` split) the teacher's retrieval metrics
    from its cached embeddings, as ``teacher/<split>/<metric>``.
    """
    catalogue = Catalogue.load(inputs.catalogue)
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    with torch_threads(config.num_threads), staged_dir(outputs.embeddings) as tmp:
        for split in config.splits:
            if len(catalogue.split(split)) == 0:
                raise ValueError(f"{catalogue.table_path}: split {split!r} has no items (teacher_embed.splits)")
            emb = embed_with_teacher(inputs.teacher, catalogue, split, context.image_cache_dir, batch_size=config.batch_size, hflip=config.hflip, progress=context.progress,
                                     device=config.device, images=config.images)
            emb.save(tmp / f"{split}.safetensors")
            metrics[f"{split}_items"] = len(emb)
            metrics["embed_dim"] = emb.embed_dim
            if split != "train":
                titles = [str(t) for t in catalogue.split(split)["title"]]
                recall = retrieval_metrics(emb.image, emb.text, title_groups(titles))
                metrics.update({f"teacher/{split}/{k}": v for k, v in recall.items()})
    metrics["seconds"] = time.perf_counter() - started
    write_json(outputs.metrics, metrics)
    return metrics
