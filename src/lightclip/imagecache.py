"""Decode every image once: a uint8 ``N x 3 x S x S`` array on disk, memory-mapped for training.

:func:`build_image_cache` decodes the images of one catalogue split (PIL, RGB, fitted to an
``S x S`` square by the model's resize mode, :func:`fit_image`: by default the shortest side
resized to ``S`` with bicubic filtering, then centre-cropped to a square; large JPEGs are
decoded at a reduced scale first, which is what makes this fast; an image over the pixel limit is
refused from its header, see :mod:`lightclip.data.imagefile`) and stores them as
``<split>-<S>px-<key>.npy`` with a ``.json`` sidecar (ids, key). The key hashes the ordered item
ids, each image's resolved path, size and mtime, the image size and the cache format version,
so any change to the catalogue or its images rebuilds the cache; an unchanged one is reused
without decoding anything (:attr:`ImageCache.reused`).

Training augments uint8 batches (random horizontal flip) and then normalises them with the
model's mean/std into float32 (:func:`normalise`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lightclip.config import MAX_IMAGE_PIXELS, RESIZE_MODES
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.data.imagefile import ImageTooLarge, open_image
from lightclip.errors import LightclipError
from lightclip.io import atomic_file, atomic_write_bytes, default_threads

CACHE_VERSION = 1

#: The padding colour of ``pad``: product photos are shot on white.
PAD_FILL = (255, 255, 255)


def resize_mode_of(preprocess: Mapping[str, Any]) -> str:
    """The lightclip mode (``crop | pad | squash``) of a model's preprocess config (open_clip's names)."""
    name = preprocess.get("resize_mode", "shortest")
    for mode, open_clip_name in RESIZE_MODES.items():
        if name in (mode, open_clip_name):
            return mode
    raise ImageCacheError(f"unknown resize_mode {name!r}; lightclip knows {sorted(RESIZE_MODES)} (open_clip: {sorted(RESIZE_MODES.values())})")


def check_resize_mode(resize_mode: str) -> None:
    """Refuse an unknown mode before any image is opened."""
    if resize_mode not in RESIZE_MODES:
        raise ImageCacheError(f"unknown resize mode {resize_mode!r}; allowed: {sorted(RESIZE_MODES)}")


def fit_image(img: Image.Image, image_size: int, resize_mode: str = "crop") -> Image.Image:
    """An RGB image fitted to ``S x S`` (bicubic): the one resize of training and inference.

    ``crop``: shortest side -> ``S``, centre crop (cuts the top and bottom of a portrait);
    ``pad``: longest side -> ``S``, centred on :data:`PAD_FILL` (keeps all of it, smaller);
    ``squash``: both sides -> ``S`` (keeps all of it, distorted).
    """
    check_resize_mode(resize_mode)
    w, h = img.size
    if resize_mode == "crop":
        scale = image_size / min(w, h)
        new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        return img.crop((left, top, left + image_size, top + image_size))
    if resize_mode == "squash":
        return img if (w, h) == (image_size, image_size) else img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    # pad
    scale = image_size / max(w, h)
    new_w, new_h = min(image_size, max(1, round(w * scale))), min(image_size, max(1, round(h * scale)))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (image_size, image_size), PAD_FILL)
    canvas.paste(img, ((image_size - new_w) // 2, (image_size - new_h) // 2))
    return canvas


class ImageCacheError(LightclipError, ValueError):
    """An image that cannot be decoded, or a cache file that does not match its sidecar."""


@dataclass(frozen=True)
class ImageCache:
    """Decoded images of one split, in catalogue order (``ids[i]`` is row ``i`` of ``images``)."""

    path: Path
    ids: tuple[str, ...]
    images: np.ndarray  # uint8 N x 3 x S x S, memory-mapped read-only
    image_size: int
    key: str
    reused: bool = False
    resize_mode: str = "crop"  # how the images were fitted to S x S (:func:`fit_image`)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """uint8 tensor ``B x 3 x S x S`` of the given rows (a copy, safe to modify)."""
        rows = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.images[rows]))

    @classmethod
    def from_array(cls, images: np.ndarray, ids: Sequence[str] | None = None, key: str = "in-memory") -> "ImageCache":
        """An in-memory cache (tests, benchmarks): ``images`` is uint8 ``N x 3 x S x S``."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ImageCacheError(f"expected uint8 N x 3 x S x S images, got {images.dtype} {images.shape}")
        ids = tuple(str(i) for i in (ids if ids is not None else range(len(images))))
        return cls(path=Path(key), ids=ids, images=images, image_size=int(images.shape[2]), key=key)


def decode_image(path: Path | IO[bytes], image_size: int, max_pixels: int = MAX_IMAGE_PIXELS, resize_mode: str = "crop") -> np.ndarray:
    """One image as uint8 ``3 x S x S``: RGB, fitted by ``resize_mode`` (:func:`fit_image`).

    An image over ``max_pixels`` is refused from its header, before anything is decoded.
    """
    check_resize_mode(resize_mode)
    try:
        with open_image(path, max_pixels) as img:
            img.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale >= S
            img = fit_image(img.convert("RGB"), image_size, resize_mode)
            array = np.asarray(img, dtype=np.uint8)
    except ImageTooLarge as exc:
        raise ImageCacheError(f"{path}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ImageCacheError(f"{path}: cannot decode image: {exc}") from exc
    return array.transpose(2, 0, 1)


def cache_key(ids: Sequence[str], paths: Sequence[Path], image_size: int, resize_mode: str = "crop") -> str:
    """Hash of the ordered ids, each image's path, size and mtime, the image size and resize mode
    (``crop`` hashes as before the mode existed: its caches stay valid)."""
    mode = "" if resize_mode == "crop" else f":{resize_mode}"
    digest = hashlib.sha256(f"lightclip-imagecache/{CACHE_VERSION}:{image_size}{mode}\n".encode())
    for item_id, path in zip(ids, paths):
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ImageCacheError(f"item {item_id}: image {path} not readable: {exc}") from exc
        digest.update(f"{item_id}\t{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _load(npy: Path, meta: Path, key: str, ids: tuple[str, ...], image_size: int) -> ImageCache | None:
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if info.get("key") != key or tuple(info.get("ids", ())) != ids or images.shape != (len(ids), 3, image_size, image_size):
        return None
    return ImageCache(path=npy, ids=ids, images=images, image_size=image_size, key=key, reused=True)


def build_image_cache(
    catalogue: Catalogue,
    split: str | None,
    image_size: int,
    cache_dir: Path | str,
    *,
    num_workers: int | None = None,
    progress: bool = True,
    resize_mode: str = "crop",
) -> ImageCache:
    """Decode the images of ``split`` (``None`` = every item) once; reuse the cache while unchanged.

    ``num_workers``: decoding threads; ``None`` = the CPUs this process may use (:func:`lightclip.io.default_threads`).
    ``resize_mode``: :func:`fit_image`'s (give the model's: :func:`resize_mode_of`).
    """
    check_resize_mode(resize_mode)
    items = catalogue.items if split is None else catalogue.split(split)
    if len(items) == 0:
        raise CatalogueError(f"{catalogue.root}: split {split!r} has no items")
    ids = tuple(str(i) for i in items["id"])
    paths = [catalogue.image_path(p) for p in items["image"]]
    key = cache_key(ids, paths, image_size, resize_mode)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{split or 'all'}-{image_size}px" + ("" if resize_mode == "crop" else f"-{resize_mode}")
    npy = cache_dir / f"{stem}-{key[:16]}.npy"
    meta = npy.with_suffix(".json")
    cached = _load(npy, meta, key, ids, image_size)
    if cached is not None:
        return replace(cached, resize_mode=resize_mode)

    with atomic_file(npy) as tmp, tqdm(total=len(ids), desc=f"decoding {stem} images", unit="img", disable=not progress) as bar:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ids), 3, image_size, image_size))
        with ThreadPoolExecutor(max_workers=max(1, num_workers or default_threads())) as pool:
            for i, array in enumerate(pool.map(lambda p: decode_image(p, image_size, resize_mode=resize_mode), paths, chunksize=1)):
                out[i] = array
                bar.update(1)
        out.flush()
        del out
    sidecar = {"key": key, "version": CACHE_VERSION, "image_size": image_size, "ids": list(ids)}
    atomic_write_bytes(meta, (json.dumps(sidecar) + "\n").encode("utf-8"))
    for stale in cache_dir.glob(f"{stem}-*.npy"):  # older versions of this split at this size
        if stale != npy:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    images = np.load(npy, mmap_mode="r")
    return ImageCache(path=npy, ids=ids, images=images, image_size=image_size, key=key, reused=False, resize_mode=resize_mode)


def hflip(batch: torch.Tensor, flip: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Flip (in place) the images of a ``B x C x H x W`` batch where ``flip`` (bool, B) is set."""
    flip = torch.as_tensor(flip, dtype=torch.bool)
    if bool(flip.any()):
        batch[flip] = batch[flip].flip(-1)
    return batch


def normalise(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``B x 3 x S x S`` -> float32 ``(x / 255 - mean) / std``."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return batch.to(torch.float32).mul_(scale).sub_(shift)
