"""A split's images as a stream of uint8 batches: memory bounded by one batch, at any catalogue size.

The image cache (:mod:`lightclip.imagecache`) decodes a whole split into one ``N x 3 x S x S``
array before anything is embedded; at a million items that is a file as large as the
catalogue's pixels, and every page of it a process reads stays in its resident memory. The
stages that only *read each image once in order* (``teacher_embed``, ``evaluate``, ``index``)
do not need it: they take a :class:`ImageStream`, which decodes one batch at a time, with the
same decoder (:func:`~lightclip.imagecache.decode_image`) and so the same uint8 pixels.

Two sources, chosen by a stage's ``images`` knob (:class:`lightclip.config.ImageSourceConfig`):

* :class:`FileImageStream` (``source: stream``): the catalogue's own image files, in split
  order. Batches are cut at multiples of ``batch_size`` as :func:`~lightclip.evaluation.embed_images`
  cuts them, so embeddings are bit-identical to the cached path.
* :class:`ShardImageStream` (``source: webdataset``): WebDataset tar shards (``lightclip data
  export-webdataset``) read member by member (``tarfile`` stream mode, one sample's bytes at a
  time). Samples come in shard order and carry their split row (found by id); samples of other
  splits are counted and passed over, and an item of the split that no shard holds, or one that
  two hold, is an error at the end of the pass, never a smaller result.

Both split their work across ``torch.distributed`` ranks when a process group is initialised
(or ``rank``/``world`` are given): rank ``r`` takes units ``r, r + world, ...`` (batches of the
file source, shards of the WebDataset source), so together the ranks cover every item once.
:func:`embed_image_stream` embeds a stream and, across ranks, gathers the rows in split order.

The ``webdataset`` package is not a dependency: the reader here is ``tarfile`` over the
shards our own deterministic export writes (any WebDataset shard with ``<key>.json`` ids reads).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from lightclip.config import ImageSourceConfig
from lightclip.data.catalogue import Catalogue, CatalogueError
from lightclip.data.webdataset import IMAGE_MEMBER_EXTENSIONS, expand_shards
from lightclip.devices import model_device, to_device
from lightclip.errors import LightclipError
from lightclip.imagecache import ImageCache, build_image_cache, check_resize_mode, decode_image, normalise
from lightclip.io import default_threads
from lightclip.models.zoo import preprocess_config


class ImageStreamError(LightclipError, ValueError):
    """Shards that do not hold the split's items exactly once, or an unreadable shard."""


@dataclass(frozen=True)
class ImageBatch:
    """Decoded images and the split rows they are (``images[i]`` is row ``rows[i]``)."""

    rows: np.ndarray  # int64, B
    images: torch.Tensor  # uint8, B x 3 x S x S


def current_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ImageStreamError(f"rank {rank} of world size {world}: need 0 <= rank < world")


class ImageStream:
    """What the streaming sources share: the split's size and ids, the image size, this rank's part."""

    ids: tuple[str, ...]
    image_size: int
    resize_mode: str
    num_workers: int
    rank: int
    world: int

    def _set_decoding(self, image_size: int, resize_mode: str, num_workers: int | None, rank: int | None, world: int | None) -> None:
        """How images are fitted and decoded, and which rank of how many this stream reads for
        (default: the initialised process group's, else the one process)."""
        check_resize_mode(resize_mode)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.num_workers = max(1, num_workers or default_threads())
        default_rank, default_world = current_rank_world()
        self.rank, self.world = (default_rank if rank is None else rank), (default_world if world is None else world)
        _check_rank(self.rank, self.world)

    def __len__(self) -> int:
        """Items of the whole split (all ranks together)."""
        return len(self.ids)

    def batches(self, batch_size: int) -> Iterator[ImageBatch]:
        """This rank's images, ``batch_size`` at a time (the last batch may be smaller)."""
        raise NotImplementedError


class FileImageStream(ImageStream):
    """The catalogue's image files of one split, decoded batch by batch in split order.

    ``num_workers`` decoding threads work on one batch at a time; nothing is decoded ahead of
    the batch being handed out. Rank ``r`` of ``world`` takes batches ``r::world``.
    """

    def __init__(self, ids: Sequence[str], paths: Sequence[Path], image_size: int, *, resize_mode: str = "crop",
                 num_workers: int | None = None, rank: int | None = None, world: int | None = None) -> None:
        if len(ids) != len(paths):
            raise ImageStreamError(f"{len(ids)} ids but {len(paths)} image paths")
        self._set_decoding(image_size, resize_mode, num_workers, rank, world)
        self.ids = tuple(str(i) for i in ids)
        self.paths = [Path(p) for p in paths]

    @classmethod
    def from_catalogue(cls, catalogue: Catalogue, split: str | None, image_size: int, **kwargs: object) -> "FileImageStream":
        """The images of ``split`` (``None`` = every item) in catalogue order."""
        items = catalogue.items if split is None else catalogue.split(split)
        if len(items) == 0:
            raise CatalogueError(f"{catalogue.root}: split {split!r} has no items")
        return cls([str(i) for i in items["id"]], [catalogue.image_path(p) for p in items["image"]], image_size, **kwargs)  # type: ignore[arg-type]

    def batches(self, batch_size: int) -> Iterator[ImageBatch]:
        if batch_size < 1:
            raise ImageStreamError(f"batch_size must be at least 1, got {batch_size}")
        starts = range(self.rank * batch_size, len(self.ids), batch_size * self.world)
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            for start in starts:
                stop = min(start + batch_size, len(self.ids))
                arrays = list(pool.map(self._decode, self.paths[start:stop]))
                yield ImageBatch(rows=np.arange(start, stop, dtype=np.int64), images=torch.from_numpy(np.stack(arrays)))

    def _decode(self, path: Path) -> np.ndarray:
        return decode_image(path, self.image_size, resize_mode=self.resize_mode)


@dataclass
class ShardPass:
    """What one pass over the shards met besides the split's items (for the stage's metrics)."""

    other_items: int = 0  # samples of other splits (or not in this catalogue), passed over
    samples: int = 0  # samples of the split decoded


class ShardImageStream(ImageStream):
    """The images of one split read from WebDataset tar shards, one sample's bytes at a time.

    ``ids`` are the split's items in split order; a sample's id is its ``.json`` ``id`` (else its
    key, as :func:`lightclip.data.webdataset.import_webdataset` reads it). Rank ``r`` of
    ``world`` reads shards ``r::world``; when ``world`` is 1 the pass checks that every id was
    found exactly once (across ranks, :func:`embed_image_stream` checks the gathered rows).
    """

    def __init__(self, ids: Sequence[str], shards: Sequence[Path] | str, image_size: int, *, resize_mode: str = "crop",
                 num_workers: int | None = None, rank: int | None = None, world: int | None = None) -> None:
        self._set_decoding(image_size, resize_mode, num_workers, rank, world)
        self.ids = tuple(str(i) for i in ids)
        self.row_of: Mapping[str, int] = {item_id: row for row, item_id in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise ImageStreamError("the split's ids are not unique")
        self.shards = expand_shards(shards) if isinstance(shards, str) else [Path(s) for s in shards]
        if not self.shards:
            raise ImageStreamError("no shards given")
        self.last_pass = ShardPass()

    def my_shards(self) -> list[Path]:
        """This rank's shards: ``r::world``."""
        return self.shards[self.rank :: self.world]

    def samples(self) -> Iterator[tuple[int, bytes, str]]:
        """``(split row, image bytes, where)`` of this rank's samples of the split, in shard order."""
        self.last_pass = ShardPass()
        for shard in self.my_shards():
            try:
                with tarfile.open(shard, "r|*") as tar:  # stream mode: members in order, nothing kept
                    key, members = None, {}
                    for member in tar:
                        if not member.isfile():
                            continue
                        name = member.name.rpartition("/")[2]
                        stem, _, ext = name.partition(".")
                        if key is not None and stem != key:
                            yield from self._sample(shard, key, members)
                            members = {}
                        key = stem
                        handle = tar.extractfile(member)
                        members[ext.lower()] = handle.read() if handle is not None else b""
                    if key is not None:
                        yield from self._sample(shard, key, members)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise ImageStreamError(f"{shard}: not a readable tar shard: {exc}") from None

    def _sample(self, shard: Path, key: str, members: dict[str, bytes]) -> Iterator[tuple[int, bytes, str]]:
        where = f"{shard.name}:{key}"
        item_id = key
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ImageStreamError(f"{where}.json is not valid JSON: {exc}") from None
            if isinstance(meta, dict) and meta.get("id") is not None:
                item_id = str(meta["id"])
        row = self.row_of.get(item_id)
        if row is None:
            self.last_pass.other_items += 1
            return
        image = next((members[e] for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
        if image is None:
            raise ImageStreamError(f"{where}: item {item_id} has no jpg/jpeg/png/webp member")
        self.last_pass.samples += 1
        yield row, image, where

    def batches(self, batch_size: int) -> Iterator[ImageBatch]:
        if batch_size < 1:
            raise ImageStreamError(f"batch_size must be at least 1, got {batch_size}")
        seen = np.zeros(len(self.ids), dtype=np.int32) if self.world == 1 else None
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
            pending: list[tuple[int, bytes, str]] = []
            for sample in self.samples():
                pending.append(sample)
                if len(pending) == batch_size:
                    yield self._decode_batch(pool, pending, seen)
                    pending = []
            if pending:
                yield self._decode_batch(pool, pending, seen)
        if seen is not None:
            check_coverage(self.ids, seen, what=f"{len(self.shards)} shard(s)")

    def _decode_batch(self, pool: ThreadPoolExecutor, samples: list[tuple[int, bytes, str]], seen: np.ndarray | None) -> ImageBatch:
        rows = np.array([row for row, _, _ in samples], dtype=np.int64)
        if seen is not None:
            np.add.at(seen, rows, 1)
        arrays = list(pool.map(lambda s: self._decode(s[1], s[2]), samples))
        return ImageBatch(rows=rows, images=torch.from_numpy(np.stack(arrays)))

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        return decode_image(io.BytesIO(data), self.image_size, resize_mode=self.resize_mode)


def check_coverage(ids: Sequence[str], counts: np.ndarray, *, what: str) -> None:
    """Every row seen exactly once, else an error naming the first missing and repeated ids."""
    missing, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    problems = []
    if missing.size:
        problems.append(f"{missing.size} item(s) of the split are in none of them (first: {', '.join(ids[i] for i in missing[:5])})")
    if repeated.size:
        problems.append(f"{repeated.size} item(s) are in several samples (first: {', '.join(ids[i] for i in repeated[:5])})")
    if problems:
        raise ImageStreamError(f"{what}: " + "; ".join(problems) + "; export the split catalogue again: lightclip data export-webdataset")


def open_image_source(
    config: ImageSourceConfig,
    catalogue: Catalogue,
    split: str | None,
    image_size: int,
    cache_dir: Path | str,
    *,
    resize_mode: str = "crop",
    progress: bool = False,
) -> ImageCache | ImageStream:
    """The images of ``split`` as ``config.source`` says: the memory-mapped cache, or a stream."""
    if config.source == "cache":
        return build_image_cache(catalogue, split, image_size, cache_dir, progress=progress, resize_mode=resize_mode)
    if config.source == "stream":
        return FileImageStream.from_catalogue(catalogue, split, image_size, resize_mode=resize_mode, num_workers=config.decode_threads)
    if config.shards is None:
        raise ImageStreamError("images.source is webdataset but images.shards is null: name the shards (e.g. data/shards/shard-*.tar)")
    items = catalogue.items if split is None else catalogue.split(split)
    if len(items) == 0:
        raise CatalogueError(f"{catalogue.root}: split {split!r} has no items")
    return ShardImageStream([str(i) for i in items["id"]], config.shards, image_size, resize_mode=resize_mode, num_workers=config.decode_threads)


@dataclass(frozen=True)
class StreamEmbeddings:
    """What one pass over a stream gives, every array in split order (row ``i`` = item ``ids[i]``)."""

    image: torch.Tensor  # N x D float32, L2-normalised
    image_hflip: torch.Tensor | None = None  # the flipped images, when asked for
    content_groups: np.ndarray | None = None  # int64 N: rows with byte-identical decoded images share a value


def embed_image_stream(
    model: torch.nn.Module, stream: ImageStream, batch_size: int = 256, *, hflip: bool = False, content_groups: bool = False
) -> StreamEmbeddings:
    """Normalised float32 embeddings of a stream's images, from one decode of each image: also of
    the flipped images (``hflip``) and the groups of identical images (``content_groups``, for
    the ``image`` positives rule of ``evaluate``; a 16-byte hash per image is kept, no pixels).

    The same per-batch steps as :func:`lightclip.evaluation.embed_images` (normalise, encode,
    L2-normalise). Across ranks each embeds its part and the rows are gathered on every rank.
    """
    pre = preprocess_config(model)
    if int(pre["size"]) != stream.image_size:
        raise ImageStreamError(f"the stream decodes {stream.image_size}px images but the model expects {pre['size']}px")
    device = model_device(model)
    rows: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {"image": [], "image_hflip": [], "digest": []}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in stream.batches(batch_size):
                rows.append(batch.rows)
                images = to_device(batch.images, device)
                parts["image"].append(model.encode_image(normalise(images, pre["mean"], pre["std"]), normalize=True).float().cpu().numpy())
                if hflip:
                    flipped = to_device(batch.images, device).flip(-1)
                    parts["image_hflip"].append(model.encode_image(normalise(flipped, pre["mean"], pre["std"]), normalize=True).float().cpu().numpy())
                if content_groups:
                    parts["digest"].append(np.array([list(hashlib.blake2b(a.tobytes(), digest_size=16).digest()) for a in batch.images.numpy()],
                                                    dtype=np.uint8).reshape(-1, 16))
    finally:
        model.train(was_training)
    order = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    local = {name: np.concatenate(arrays) for name, arrays in parts.items() if arrays}
    if stream.world > 1:
        order, local = _gather_rows(order, local, stream)
    elif len(order) != len(stream):
        raise ImageStreamError(f"the stream gave {len(order)} images for a split of {len(stream)} items")
    placed = {name: _place(order, array, len(stream)) for name, array in local.items()}
    groups = None
    if content_groups:
        digests = placed.get("digest", np.zeros((0, 16), dtype=np.uint8))
        groups = pd.factorize(pd.Series([d.tobytes() for d in digests], dtype=object))[0].astype(np.int64)
    empty = torch.zeros((0, 0))
    return StreamEmbeddings(
        image=torch.from_numpy(placed["image"]) if "image" in placed else empty,
        image_hflip=(torch.from_numpy(placed["image_hflip"]) if "image_hflip" in placed else empty) if hflip else None,
        content_groups=groups,
    )


def _place(order: np.ndarray, part: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``part`` put in split order (``order[i]`` is the split row of ``part[i]``)."""
    out = np.empty((n, *part.shape[1:]), dtype=part.dtype)
    out[order] = part
    return out


def _gather_rows(order: np.ndarray, parts: dict[str, np.ndarray], stream: ImageStream) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every rank's rows and arrays on every rank; the rows must cover the split once."""
    gathered: list[object] = [None] * stream.world
    dist.all_gather_object(gathered, (order, parts))
    pieces = [g for g in gathered if len(g[0])]  # type: ignore[index]
    all_order = np.concatenate([g[0] for g in pieces]) if pieces else np.zeros(0, dtype=np.int64)  # type: ignore[index]
    counts = np.bincount(all_order, minlength=len(stream)) if all_order.size else np.zeros(len(stream), dtype=np.int64)
    check_coverage(stream.ids, counts, what=f"the {stream.world} ranks' images")
    names = pieces[0][1].keys() if pieces else ()  # type: ignore[index]
    return all_order, {name: np.concatenate([g[1][name] for g in pieces]) for name in names}  # type: ignore[index]
