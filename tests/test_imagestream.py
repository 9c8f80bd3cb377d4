"""Streamed images: the same pixels and embeddings as the image cache, one batch in memory, every item once across ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lightclip.imagestream as imagestream
from lightclip.config import EvaluateConfig, ImageSourceConfig, IndexConfig, SplitConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.data.webdataset import export_webdataset
from lightclip.evaluation.stage import evaluate_model
from lightclip.imagecache import build_image_cache
from lightclip.imagestream import FileImageStream, ImageStreamError, ShardImageStream, embed_image_stream, open_image_source
from lightclip.index import build_catalogue_index
from lightclip.models.zoo import ModelSpec, create_model, load_model, save_model
from lightclip.teacher_cache import embed_with_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32  # lc-test-tiny's input


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A split synthetic catalogue (48 train / 8 val / 8 test; two test items share one image file),
    its WebDataset export in shards of 10, and a tiny model."""
    root = tmp_path_factory.mktemp("imagestream")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=3, n_items=64, image_size=SIZE), progress=False)
    split = assign_splits(raw, SplitConfig(seed=0, val=8, test=8))
    items = split.items.copy()
    test_rows = np.flatnonzero((items["split"] == "test").to_numpy())
    items.loc[items.index[test_rows[1]], "image"] = items["image"].iloc[test_rows[0]]  # byte-identical images
    split.with_items(items).save(root / "split")
    export_webdataset(Catalogue.load(root / "split"), root / "shards", shard_size=10)
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", root / "model")
    return root


def shards(workspace: Path) -> str:
    return str(workspace / "shards" / "shard-*.tar")


def test_teacher_embed_stream_equals_cache_bit_for_bit(workspace: Path):
    catalogue = Catalogue.load(workspace / "split")
    cached = embed_with_teacher(workspace / "model", catalogue, "train", workspace / "cache", batch_size=16)
    streamed = embed_with_teacher(workspace / "model", catalogue, "train", workspace / "unused", batch_size=16, images=ImageSourceConfig(source="stream"))
    assert streamed.ids == cached.ids
    for name in ("image", "image_hflip", "text"):
        assert np.array_equal(getattr(streamed, name), getattr(cached, name)), name
    assert not (workspace / "unused").exists()  # nothing decoded to disk


def test_webdataset_stream_same_pixels_and_embeddings(workspace: Path):
    catalogue = Catalogue.load(workspace / "split")
    cache = build_image_cache(catalogue, "train", SIZE, workspace / "cache", progress=False)
    stream = open_image_source(ImageSourceConfig(source="webdataset", shards=shards(workspace)), catalogue, "train", SIZE, workspace / "cache")
    assert isinstance(stream, ShardImageStream) and len(stream) == 48
    seen = []
    for batch in stream.batches(16):
        assert np.array_equal(batch.images.numpy(), cache.images[batch.rows])  # the same decoder, the same pixels
        seen.extend(batch.rows.tolist())
    assert sorted(seen) == list(range(48)) and stream.last_pass.other_items == 16  # val + test samples passed over
    cached = embed_with_teacher(workspace / "model", catalogue, "train", workspace / "cache", batch_size=16)
    streamed = embed_with_teacher(workspace / "model", catalogue, "train", workspace / "cache", batch_size=16,
                                  images=ImageSourceConfig(source="webdataset", shards=shards(workspace)))
    np.testing.assert_allclose(streamed.image, cached.image, atol=1e-6)  # other batch companions, same rows
    np.testing.assert_allclose(streamed.image_hflip, cached.image_hflip, atol=1e-6)


def test_index_and_evaluate_stream_equal_cache(workspace: Path):
    catalogue = Catalogue.load(workspace / "split")
    config = IndexConfig(batch_size=16, eval_queries=0)
    by_cache, _ = build_catalogue_index(catalogue, workspace / "model", config, cache_dir=workspace / "cache")
    by_stream, _ = build_catalogue_index(catalogue, workspace / "model", config.model_copy(update={"images": ImageSourceConfig(source="stream")}),
                                         cache_dir=workspace / "cache")
    assert by_stream.ids == by_cache.ids
    assert np.array_equal(by_stream.index.reconstruct_n(0, 64), by_cache.index.reconstruct_n(0, 64))

    evaluation = EvaluateConfig(split="test", batch_size=4)
    cached = evaluate_model("m", workspace / "model", catalogue, evaluation, cache_dir=workspace / "cache")
    streamed = evaluate_model("m", workspace / "model", catalogue, evaluation.model_copy(update={"images": ImageSourceConfig(source="stream")}),
                              cache_dir=workspace / "cache")
    assert streamed.metrics == cached.metrics
    assert cached.metrics["test/positive_pairs"] > 8  # the shared image made a pair beyond each item's own: the groups were used


def test_stream_decodes_one_batch_at_a_time(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """The iterator holds one batch: after k batches exactly k x batch images were decoded, none ahead."""
    decoded: list[int] = []
    real = imagestream.decode_image
    monkeypatch.setattr(imagestream, "decode_image", lambda *a, **k: (decoded.append(1), real(*a, **k))[1])
    catalogue = Catalogue.load(workspace / "split")
    for stream in (FileImageStream.from_catalogue(catalogue, "train", SIZE, num_workers=2),
                   ShardImageStream([str(i) for i in catalogue.split("train")["id"]], shards(workspace), SIZE, num_workers=2)):
        decoded.clear()
        batches = stream.batches(5)
        for k in (1, 2, 3):
            batch = next(batches)
            assert len(batch.rows) == 5 and len(decoded) == 5 * k
        batches.close()


def test_ranks_cover_every_item_once(workspace: Path):
    catalogue = Catalogue.load(workspace / "split")
    ids = [str(i) for i in catalogue.items["id"]]
    for world in (2, 3):
        file_rows, shard_rows, shard_files = [], [], []
        for rank in range(world):
            files = FileImageStream.from_catalogue(catalogue, None, SIZE, rank=rank, world=world)
            file_rows += [r for b in files.batches(8) for r in b.rows.tolist()]
            part = ShardImageStream(ids, shards(workspace), SIZE, rank=rank, world=world)
            shard_files += part.my_shards()
            shard_rows += [r for b in part.batches(8) for r in b.rows.tolist()]
        assert sorted(file_rows) == sorted(shard_rows) == list(range(64))
        assert sorted(shard_files) == sorted(part.shards)  # shards r::world: each one read by one rank


def test_ranks_gather_to_the_single_process_embeddings(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """Each rank embeds batches r::world; the gathered rows are the one-process result, bit for bit."""
    catalogue = Catalogue.load(workspace / "split")
    model = load_model(workspace / "model")
    alone = embed_image_stream(model, FileImageStream.from_catalogue(catalogue, None, SIZE), 8, hflip=True)
    recorded: list[object] = []

    class Recorded(Exception):
        pass

    def record(out: list, obj: object) -> None:  # rank 0's part, kept for rank 1's gather
        recorded.append(obj)
        raise Recorded

    monkeypatch.setattr(imagestream.dist, "all_gather_object", record)
    with pytest.raises(Recorded):
        embed_image_stream(model, FileImageStream.from_catalogue(catalogue, None, SIZE, rank=0, world=2), 8, hflip=True)
    monkeypatch.setattr(imagestream.dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [recorded[0], obj]))
    gathered = embed_image_stream(model, FileImageStream.from_catalogue(catalogue, None, SIZE, rank=1, world=2), 8, hflip=True)
    assert torch.equal(gathered.image, alone.image) and torch.equal(gathered.image_hflip, alone.image_hflip)


def test_shards_missing_an_item_are_an_error(workspace: Path):
    catalogue = Catalogue.load(workspace / "split")
    ids = [str(i) for i in catalogue.items["id"]]
    stream = ShardImageStream(ids, sorted((workspace / "shards").glob("shard-*.tar"))[1:], SIZE)
    with pytest.raises(ImageStreamError, match=r"10 item\(s\) of the split are in none of them"):
        list(stream.batches(16))
    with pytest.raises(ImageStreamError, match="images.shards is null"):
        open_image_source(ImageSourceConfig(source="webdataset"), catalogue, "train", SIZE, workspace / "cache")
