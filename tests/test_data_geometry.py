"""Image geometry: aspect-ratio buckets from headers, and when a catalogue differs from the model's training catalogue."""

from __future__ import annotations

import logging

import pytest
from PIL import Image, ImageFile

from lightclip.config import IndexConfig
from lightclip.data.geometry import MODEL_KEY, BUCKETS, aspect_summary, bucket, catalogue_geometry, describe, difference, header_sizes, mismatch
from lightclip.index import build_catalogue_index
from lightclip.models.zoo import ModelSpec, create_model, save_model


@pytest.mark.parametrize("size,name", [((60, 80), "portrait 3:4 (0.70-0.90)"), ((224, 224), "square (0.90-1.11)"), ((80, 60), "landscape 4:3 (1.11-1.43)"),
                                       ((100, 300), "tall (< 0.70)"), ((1600, 900), "wide (>= 1.43)"), ((70, 100), "portrait 3:4 (0.70-0.90)")])
def test_buckets(size, name):
    assert bucket(*size) == name


def test_summary_counts_shares_and_unknown_sizes():
    summary = aspect_summary([(60, 80)] * 6 + [(224, 224)] * 2 + [None, (0, 10)])
    assert summary["images"] == 8 and summary["unknown"] == 2
    assert summary["buckets"]["portrait 3:4 (0.70-0.90)"] == 6 and summary["buckets"]["square (0.90-1.11)"] == 2
    assert list(summary["buckets"]) == [name for name, _ in BUCKETS]
    assert summary["shares"]["portrait 3:4 (0.70-0.90)"] == 0.75 and summary["most_common_size"] == "60x80"
    assert describe(summary) == "portrait 3:4 (0.70-0.90) 75%, square (0.90-1.11) 25%"


def test_a_clear_difference_warns_in_one_line_a_small_one_does_not():
    portraits = aspect_summary([(60, 80)] * 10)
    squares = aspect_summary([(224, 224)] * 10)
    mostly = aspect_summary([(60, 80)] * 8 + [(224, 224)] * 2)
    assert difference(portraits, squares) == 1.0 and difference(portraits, mostly) == pytest.approx(0.2)
    assert mismatch(portraits, mostly) is None and mismatch(None, squares) is None
    line = mismatch(portraits, squares)
    assert line is not None and "\n" not in line
    assert "100% of images in other shape buckets" in line and "trained on portrait 3:4 (0.70-0.90) 100%" in line
    assert line.endswith("this catalogue square (0.90-1.11) 100%")


def test_sizes_come_from_headers_without_decoding(tmp_path, monkeypatch):
    paths = []
    for i, size in enumerate([(60, 80), (300, 200)]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", size, (9, 9, 9)).save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    assert header_sizes([*paths, tmp_path / "bad.jpg", tmp_path / "missing.jpg"]) == [(60, 80), (300, 200), None, None]
    assert decoded == []


def test_a_catalogue_split_geometry(tiny_catalogue):
    cat = tiny_catalogue(4)  # 48 x 48 squares
    items = cat.items.copy()
    items["split"] = ["train", "train", "test", "test"]
    cat = cat.with_items(items)
    summary = catalogue_geometry(cat, "train")
    assert summary["images"] == 2 and summary["buckets"]["square (0.90-1.11)"] == 2 and summary["most_common_size"] == "48x48"


def test_the_index_warns_when_the_catalogue_is_shaped_unlike_the_training_one(tiny_catalogue, tmp_path, caplog):
    cat = tiny_catalogue(6)  # 48 x 48 squares
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", tmp_path / "portrait_model", extra={MODEL_KEY: aspect_summary([(60, 80)] * 20)})
    save_model(model, "lc-test-tiny", tmp_path / "square_model", extra={MODEL_KEY: aspect_summary([(224, 224)] * 20)})
    config = IndexConfig(split=None, eval_queries=0, threads=1)
    with caplog.at_level(logging.WARNING, logger="lightclip"):
        _, metrics = build_catalogue_index(cat, tmp_path / "portrait_model", config, cache_dir=tmp_path / "cache")
        _, same = build_catalogue_index(cat, tmp_path / "square_model", config, cache_dir=tmp_path / "cache")
    assert metrics["index/geometry_shift"] == 1.0 and same["index/geometry_shift"] == 0.0
    warned = [r.getMessage() for r in caplog.records if "image geometry differs" in r.getMessage()]
    assert len(warned) == 1 and "portrait_model" in warned[0] and "trained on portrait 3:4 (0.70-0.90) 100%" in warned[0]
