"""Training images read from WebDataset shards as a stream: memory bounded by a shuffle buffer and one batch.

The trainers' default source is the image cache (:mod:`lightclip.imagecache`): the whole train
split decoded into one memory-mapped array, and every epoch a global permutation of it. At a
catalogue that does not fit, ``train.images.source: webdataset`` reads the split from the tar
shards of ``lightclip data export-webdataset`` instead (:class:`ShardTrainStream`):

* once, at start, an *index* of the shards: which split rows each holds, in member order (tar
  headers and the small ``.json`` members only; no image is read). It checks that every item of
  the split is in exactly one shard, and it gives the step count of an epoch before the epoch.
* each epoch, from the loop's generator of ``(seed, epoch)``: the shards' order is drawn, each
  shard is read member by member (``tarfile`` stream mode), and a shuffle buffer of
  ``shuffle_buffer`` encoded samples mixes them (WebDataset's rule: once the buffer is full, each
  new sample takes the place of a random one, which goes to the batch). Flips are drawn per item.
  Only the batch being handed out is decoded. An epoch is a pure function of the generator, so
  a run killed between epochs and resumed trains exactly as an uninterrupted one.
* across ranks (``torchrun``): rank ``r`` of ``world`` owns shards ``r::world`` and reads them in
  the epoch's order; ``batch_size`` stays the global batch, each rank yields ``batch_size / world``
  items per step, and every rank takes the same number of steps: the smallest any rank can fill.
  The items that leaves out of an epoch (with the remainder of the last partial batch) are
  counted (:meth:`ShardTrainStream.left_out`) and reported with the run's metrics.
"""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lightclip import distributed
from lightclip.data.webdataset import IMAGE_MEMBER_EXTENSIONS, expand_shards
from lightclip.errors import LightclipError
from lightclip.imagecache import check_resize_mode, decode_image
from lightclip.imagestream import ShardImageStream, check_coverage
from lightclip.io import default_threads


class TrainStreamError(LightclipError, ValueError):
    """Shards that cannot feed training (unreadable, uneven beyond a step, a batch that does not split)."""


@dataclass(frozen=True)
class ShardIndex:
    """The split rows each shard holds, in member order, and the samples of other splits passed over."""

    shards: tuple[Path, ...]
    rows: tuple[np.ndarray, ...]  # rows[i]: int64 split rows of shards[i]
    other_items: int


@dataclass(frozen=True)
class StreamBatch:
    """One rank's share of a training batch: split rows, their uint8 images and flip draws."""

    rows: np.ndarray  # int64, B
    images: torch.Tensor  # uint8, B x 3 x S x S (not yet flipped)
    flips: np.ndarray  # bool, B

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def index_shards(ids: Sequence[str], shards: Sequence[Path]) -> ShardIndex:
    """Which rows of the split (``ids``, in split order) each shard holds; every item exactly once.

    Reads tar headers and ``.json`` members only (random-access mode seeks over the images of an
    uncompressed tar). A sample's id is its ``.json`` ``id``, else its key, as everywhere else.
    """
    row_of = {item_id: row for row, item_id in enumerate(ids)}
    counts = np.zeros(len(ids), dtype=np.int64)
    per_shard: list[np.ndarray] = []
    other = 0
    for shard in shards:
        rows: list[int] = []
        try:
            with tarfile.open(shard, "r:*") as tar:
                key: str | None = None
                members: dict[str, tarfile.TarInfo] = {}
                samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
                for member in tar:
                    if not member.isfile():
                        continue
                    stem, _, ext = member.name.rpartition("/")[2].partition(".")
                    if key is not None and stem != key:
                        samples.append((key, members))
                        members = {}
                    key = stem
                    members[ext.lower()] = member
                if key is not None:
                    samples.append((key, members))
                for key, members in samples:
                    item_id = _sample_id(tar, shard, key, members)
                    row = row_of.get(item_id)
                    if row is None:
                        other += 1
                        continue
                    if not any(e in members for e in IMAGE_MEMBER_EXTENSIONS):
                        raise TrainStreamError(f"{shard.name}:{key}: item {item_id} has no jpg/jpeg/png/webp member")
                    rows.append(row)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise TrainStreamError(f"{shard}: not a readable tar shard: {exc}") from None
        array = np.asarray(rows, dtype=np.int64)
        np.add.at(counts, array, 1)
        per_shard.append(array)
    check_coverage(ids, counts, what=f"{len(shards)} training shard(s)")
    return ShardIndex(shards=tuple(shards), rows=tuple(per_shard), other_items=other)


def _sample_id(tar: tarfile.TarFile, shard: Path, key: str, members: dict[str, tarfile.TarInfo]) -> str:
    if "json" not in members:
        return key
    handle = tar.extractfile(members["json"])
    raw = handle.read() if handle is not None else b""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TrainStreamError(f"{shard.name}:{key}.json is not valid JSON: {exc}") from None
    return str(meta["id"]) if isinstance(meta, dict) and meta.get("id") is not None else key


class ShardTrainStream:
    """The train split's images from WebDataset shards, an epoch at a time (see the module docstring).

    Stands where a :class:`~lightclip.imagecache.ImageCache` stands in a
    :class:`~lightclip.tasks.PairSet` (``ids``, ``image_size``, ``resize_mode``, ``len``) but has
    no random access: :meth:`epoch` is the only way to its images. ``rank``/``world`` default to
    the process group's (:func:`lightclip.distributed.world`), read when an epoch starts.
    """

    def __init__(
        self,
        ids: Sequence[str],
        shards: Sequence[Path] | str,
        image_size: int,
        *,
        resize_mode: str = "crop",
        shuffle_buffer: int = 1000,
        num_workers: int | None = None,
        rank: int | None = None,
        world: int | None = None,
    ) -> None:
        check_resize_mode(resize_mode)
        if shuffle_buffer < 1:
            raise TrainStreamError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.ids = tuple(str(i) for i in ids)
        paths = expand_shards(shards) if isinstance(shards, str) else [Path(s) for s in shards]
        if not paths:
            raise TrainStreamError("no training shards given")
        self.index = index_shards(self.ids, paths)
        self.image_size = int(image_size)
        self.resize_mode = resize_mode
        self.shuffle_buffer = int(shuffle_buffer)
        self.num_workers = max(1, num_workers or default_threads())
        self._rank, self._world = rank, world
        self._reader = ShardImageStream(self.ids, paths, self.image_size, resize_mode=resize_mode, num_workers=1, rank=0, world=1)
        self.max_held = 0  # most samples held at once (buffer + the batch being filled), for the memory bound

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shards(self) -> tuple[Path, ...]:
        return self.index.shards

    def rank_world(self) -> tuple[int, int]:
        """This process's ``(rank, world size)``: as given, else the process group's."""
        current = distributed.world()
        rank = current.rank if self._rank is None else self._rank
        world = current.size if self._world is None else self._world
        if world < 1 or not 0 <= rank < world:
            raise TrainStreamError(f"rank {rank} of world size {world}: need 0 <= rank < world")
        return rank, world

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        """Not available: a streamed split is read in its epoch's order only."""
        raise TrainStreamError("train.images.source is webdataset: the training images have no random access (read them with epoch())")

    def rank_items(self, rank: int, world: int) -> int:
        """Items of the split in rank ``rank``'s shards (``rank::world``)."""
        return int(sum(len(rows) for rows in self.index.rows[rank::world]))

    def local_batch(self, batch_size: int, world: int) -> int:
        """Items one rank takes per step: the global ``batch_size`` over the ranks."""
        if batch_size < 1 or batch_size % world:
            raise TrainStreamError(f"train.batch_size {batch_size} does not split over {world} ranks: make it a multiple of the world size")
        return batch_size // world

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps every rank takes in an epoch: full local batches of the rank with the fewest items."""
        _, world = self.rank_world()
        local = self.local_batch(batch_size, world)
        if world > len(self.shards):
            raise TrainStreamError(f"{len(self.shards)} training shard(s) for {world} ranks: every rank needs one; export smaller shards")
        fewest = min(self.rank_items(r, world) for r in range(world))
        steps = fewest // local
        if steps < 1:
            raise TrainStreamError(
                f"a rank's shards hold {fewest} training item(s), fewer than its share of one batch ({local} of train.batch_size {batch_size}); "
                "lower train.batch_size or export smaller shards"
            )
        return steps

    def left_out(self, batch_size: int) -> int:
        """Items of the split no rank trains on in an epoch (uneven shards and the partial last batch)."""
        return len(self) - self.steps_per_epoch(batch_size) * batch_size

    def epoch(self, rng: np.random.Generator, batch_size: int, *, hflip: bool = True) -> Iterator[StreamBatch]:
        """This rank's batches of one epoch: a pure function of ``rng`` (the loop's ``(seed, epoch)`` generator).

        Every rank draws the same shard order and buffer seed from ``rng``; each then reads its own
        shards in that order and shuffles with a generator of its own (the seed and its rank).
        """
        rank, world = self.rank_world()
        local = self.local_batch(batch_size, world)
        steps = self.steps_per_epoch(batch_size)
        order = rng.permutation(len(self.shards))
        mixer = np.random.default_rng([int(rng.integers(2**63)), rank])
        self._reader.shards = [self.shards[i] for i in order if i % world == rank]
        buffer: list[tuple[int, bytes, str]] = []
        pending: list[tuple[int, bytes, str]] = []
        done = 0
        with ThreadPoolExecutor(max_workers=self.num_workers) as pool:

            def emit(sample: tuple[int, bytes, str]) -> StreamBatch | None:
                pending.append(sample)
                self.max_held = max(self.max_held, len(buffer) + len(pending))
                if len(pending) < local:
                    return None
                taken = list(pending)
                pending.clear()
                return self._decode(pool, taken, mixer, hflip)

            for sample in self._reader.samples():
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    self.max_held = max(self.max_held, len(buffer) + len(pending))
                    continue
                j = int(mixer.integers(len(buffer)))
                sample, buffer[j] = buffer[j], sample
                batch = emit(sample)
                if batch is not None:
                    yield batch
                    done += 1
                    if done == steps:
                        return
            while buffer:
                j = int(mixer.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                batch = emit(buffer.pop())
                if batch is not None:
                    yield batch
                    done += 1
                    if done == steps:
                        return
        if done < steps:
            raise TrainStreamError(f"rank {rank}'s shards gave {done} batch(es) of {local}, the index promised {steps}: did the shards change during training?")

    def _decode(self, pool: ThreadPoolExecutor, samples: list[tuple[int, bytes, str]], mixer: np.random.Generator, hflip: bool) -> StreamBatch:
        rows = np.array([row for row, _, _ in samples], dtype=np.int64)
        flips = mixer.random(len(samples)) < 0.5 if hflip else np.zeros(len(samples), dtype=bool)
        arrays = list(pool.map(lambda s: decode_image(io.BytesIO(s[1]), self.image_size, resize_mode=self.resize_mode), samples))
        return StreamBatch(rows=rows, images=torch.from_numpy(np.stack(arrays)), flips=flips)
