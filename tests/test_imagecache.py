"""Image cache: decoded once, reused while unchanged, rebuilt on change; augmentation and normalisation.

Also every decoder of a user's image (the cache, serving, search) against an image too large to decode.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lightclip.imagecache as imagecache
from conftest import make_image
from lightclip.cli import main
from lightclip.config import IndexConfig
from lightclip.data.catalogue import Catalogue
from lightclip.imagecache import ImageCache, ImageCacheError, build_image_cache, decode_image, hflip, normalise
from lightclip.index import CatalogueIndexError, Searcher, build_catalogue_index
from lightclip.models.zoo import ModelSpec, create_model, save_model
from lightclip.serving import Embedder, ServingError


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real 1-bit PNG of ``width x height`` black pixels: about 48 KB for 20000 x 20000.

    Written row by row through zlib, so the test never holds the 400-megapixel image itself.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def counted_decodes(monkeypatch):
    calls = {"n": 0}
    real = imagecache.decode_image

    def counting(path, size, **options):
        calls["n"] += 1
        return real(path, size, **options)

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


TOO_LARGE = "image too large: 20000x20000 = 400,000,000 pixels > limit 50,000,000 pixels (validate.max_image_pixels)"


def test_the_bomb_is_real():
    data = bomb_png()
    assert len(data) < 60_000
    with pytest.raises(Image.DecompressionBombError):  # what every decoder used to end in
        Image.open(io.BytesIO(data))


def test_the_cache_refuses_an_image_too_large_before_decoding_it(tiny_catalogue, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    with pytest.raises(ImageCacheError) as err:
        decode_image(bomb, 32)
    assert str(err.value) == f"{bomb}: {TOO_LARGE}"
    # under PIL's own limit but over ours: refused the same way, from the header
    with pytest.raises(ImageCacheError, match=r"image too large: 8000x7000 = 56,000,000 pixels > limit 50,000,000"):
        decode_image(io.BytesIO(bomb_png(8000, 7000)), 32)
    with pytest.raises(ImageCacheError, match=r"image too large: 48x48 = 2,304 pixels > limit 2,000 pixels"):
        decode_image(make_image(tmp_path / "small.png"), 32, max_pixels=2000)

    cat = tiny_catalogue(4)
    (cat.root / "images" / "2.png").write_bytes(bomb_png())
    with pytest.raises(ImageCacheError, match=r"images/2.png: image too large: 20000x20000"):
        build_image_cache(cat, None, 32, tmp_path / "cache", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing half-written


@pytest.fixture
def search_setup(tiny_catalogue, tmp_path):
    """A tiny model and a flat index of 4 items (the search and serving paths, for real)."""
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", tmp_path / "model")
    index, _ = build_catalogue_index(tiny_catalogue(4), tmp_path / "model", IndexConfig(eval_queries=0, threads=1), cache_dir=tmp_path / "cache")
    index.save(tmp_path / "index")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    return tmp_path


def test_serving_and_search_refuse_an_image_too_large(search_setup: Path, monkeypatch, capsys):
    root = search_setup
    bomb = root / "bomb.png"
    embedder = Embedder(root / "model")
    with pytest.raises(ServingError) as err:  # the pyfunc's predict calls embed_frame
        embedder.embed_frame({"text": ["red shirt", None], "image": [None, bomb.read_bytes()]})
    assert str(err.value) == f"row 1: column 'image': {TOO_LARGE}"

    with pytest.raises(CatalogueIndexError, match="bomb.png: image too large: 20000x20000"):
        Searcher(root / "index", root / "model").image(bomb)
    monkeypatch.chdir(root)
    assert main(["search", "--image", str(bomb), "--index", "index", "--model", "model"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"lightclip search: error: {bomb}: {TOO_LARGE}"  # one line, no traceback
