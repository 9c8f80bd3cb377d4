"""Image cache: decoded once, reused while unchanged, rebuilt on change; augmentation and normalisation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lightclip.imagecache as imagecache
from conftest import make_image
from lightclip.imagecache import ImageCache, build_image_cache, decode_image, hflip, normalise


@pytest.fixture
def counted_decodes(monkeypatch):
    calls = {"n": 0}
    real = imagecache.decode_image

    def counting(path, size):
        calls["n"] += 1
        return real(path, size)

    monkeypatch.setattr(imagecache, "decode_image", counting)
    return calls


def _with_splits(catalogue):
    items = catalogue.items.copy()
    items["split"] = ["val" if i % 4 == 0 else "train" for i in range(len(items))]
    return catalogue.with_items(items).save()


def test_built_once_then_reused(tiny_catalogue, tmp_path, counted_decodes):
    cat = _with_splits(tiny_catalogue(n=8))
    first = build_image_cache(cat, "train", 32, tmp_path / "cache", progress=False)
    assert counted_decodes["n"] == 6 and not first.reused
    assert first.images.shape == (6, 3, 32, 32) and first.images.dtype == np.uint8
    assert list(first.ids) == list(cat.split("train")["id"])
    again = build_image_cache(cat, "train", 32, tmp_path / "cache", progress=False)
    assert counted_decodes["n"] == 6 and again.reused
    assert isinstance(again.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(again.images))
    # another size is another cache
    build_image_cache(cat, "train", 16, tmp_path / "cache", progress=False)
    assert counted_decodes["n"] == 12


def test_rebuilt_when_an_image_or_the_items_change(tiny_catalogue, tmp_path, counted_decodes):
    cat = _with_splits(tiny_catalogue(n=8))
    first = build_image_cache(cat, "train", 32, tmp_path / "cache", progress=False)
    path = cat.image_path(cat.split("train")["image"][0])
    make_image(path, colour=(1, 2, 3), size=40)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    changed = build_image_cache(cat, "train", 32, tmp_path / "cache", progress=False)
    assert not changed.reused and changed.key != first.key and counted_decodes["n"] == 12
    assert not np.array_equal(np.asarray(changed.images[0]), np.asarray(first.images[0]))
    assert len(list((tmp_path / "cache").glob("train-32px-*.npy"))) == 1  # the stale one is gone
    items = cat.items[cat.items["id"] != cat.split("train")["id"][1]]
    fewer = build_image_cache(cat.with_items(items), "train", 32, tmp_path / "cache", progress=False)
    assert len(fewer) == 5 and not fewer.reused


def test_decode_resizes_shortest_side_and_centre_crops(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 15, 30))  # a red band on the far left is cropped away
    img.save(tmp_path / "wide.png")
    array = decode_image(tmp_path / "wide.png", 16)
    assert array.shape == (3, 16, 16) and array.dtype == np.uint8
    assert array[0].max() < 30 and array[2].min() > 200


def test_flip_and_normalise():
    batch = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).view(2, 3, 2, 2)
    flipped = hflip(batch.clone(), np.array([True, False]))
    assert torch.equal(flipped[0], batch[0].flip(-1)) and torch.equal(flipped[1], batch[1])
    out = normalise(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_in_memory_cache_checks_its_shape():
    cache = ImageCache.from_array(np.zeros((3, 3, 8, 8), dtype=np.uint8))
    assert len(cache) == 3 and cache.batch([2, 0]).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        ImageCache.from_array(np.zeros((3, 8, 8, 3), dtype=np.uint8))
