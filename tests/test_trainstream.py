"""Training from WebDataset shards: the shuffle-buffer rule, every item once per epoch (minus the
reported remainder), determinism per (seed, epoch), the memory bound, rank sharding, and a tiny
pretrain that trains and resumes from shards exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from lightclip.config import EdgeLossConfig, KGConfig, ModelConfig, PretrainConfig, SplitConfig, SynthConfig, TrainConfig, TrainImagesConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.data.webdataset import export_webdataset
from lightclip.distributed import free_port
from lightclip.imagecache import build_image_cache
from lightclip.imagestream import ImageStreamError
from lightclip.kg.build import build_knowledge_graph
from lightclip.models import ModelSpec, create_model, tokenizer
from lightclip.models.zoo import load_model
from lightclip.pretrain import PretrainInputs, PretrainOutputs, run_pretrain
from lightclip.stage import StageContext
from lightclip.tasks import DistillTask, ImageTextTask, PairSet
from lightclip.training import checkpoint_key, train
from lightclip.trainstream import ShardTrainStream, TrainStreamError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32  # lc-test-tiny's input
SPEC = ModelSpec(arch="lc-test-tiny")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A split synthetic catalogue (48 train / 8 val / 8 test) and its WebDataset export in shards of 10:
    7 shards, each with a different number of training items (the other splits are passed over)."""
    root = tmp_path_factory.mktemp("trainstream")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=3, n_items=64, image_size=SIZE), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=8, test=8)).save(root / "split")
    export_webdataset(Catalogue.load(root / "split"), root / "shards", shard_size=10)
    build_knowledge_graph(Catalogue.load(root / "split"), KGConfig(min_count=2), root / "kg", stats_path=root / "kg.json", figure_path=root / "kg.png", progress=False)
    return root


def shard_spec(workspace: Path) -> str:
    return str(workspace / "shards" / "shard-*.tar")


def train_ids(workspace: Path) -> list[str]:
    return [str(i) for i in Catalogue.load(workspace / "split").split("train")["id"]]


def open_stream(workspace: Path, buffer: int = 8, **kwargs) -> ShardTrainStream:
    return ShardTrainStream(train_ids(workspace), shard_spec(workspace), SIZE, shuffle_buffer=buffer, num_workers=1, **kwargs)


def epoch_batches(stream: ShardTrainStream, seed: int, epoch: int, batch_size: int):
    return list(stream.epoch(np.random.default_rng([seed, epoch]), batch_size))


def read_order(stream: ShardTrainStream, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The rows in the order this rank reads them: its shards in the epoch's drawn order, members in order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(stream.shards))
    return np.concatenate([stream.index.rows[i] for i in order if i % world == rank])


def test_index_finds_every_training_item_once(workspace: Path):
    stream = open_stream(workspace)
    assert len(stream.shards) == 7 and stream.index.other_items == 16
    rows = np.concatenate(stream.index.rows)
    assert sorted(rows.tolist()) == list(range(48))
    assert len({len(r) for r in stream.index.rows}) > 1  # uneven shards


def test_an_epoch_is_a_buffered_shuffle_of_the_whole_split(workspace: Path):
    stream = open_stream(workspace, buffer=8)
    batches = epoch_batches(stream, seed=0, epoch=0, batch_size=8)
    assert stream.steps_per_epoch(8) == 6 and stream.left_out(8) == 0 and len(batches) == 6
    emitted = np.concatenate([b.rows for b in batches])
    assert sorted(emitted.tolist()) == list(range(48))  # every item once
    read = read_order(stream, 0, 0)
    assert not np.array_equal(emitted, read)  # shuffled...
    read_position = {row: i for i, row in enumerate(read.tolist())}
    assert all(p > read_position[row] - 8 for p, row in enumerate(emitted.tolist()))  # ...but never ahead of the buffer
    assert stream.max_held <= 8 + 8  # buffer + one batch, never the split
    # a buffer of 1 is no shuffle: the shards' members in the epoch's shard order
    sequential = open_stream(workspace, buffer=1)
    assert np.array_equal(np.concatenate([b.rows for b in epoch_batches(sequential, 0, 0, 8)]), read)
    assert sequential.max_held <= 1 + 8


def test_batches_carry_the_cache_pixels_and_are_deterministic_per_seed_and_epoch(workspace: Path, tmp_path: Path):
    stream = open_stream(workspace, buffer=16)
    first, again = epoch_batches(stream, 0, 1, 16), epoch_batches(stream, 0, 1, 16)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.flips, b.flips) and torch.equal(a.images, b.images)
    other_epoch = np.concatenate([b.rows for b in epoch_batches(stream, 0, 2, 16)])
    other_seed = np.concatenate([b.rows for b in epoch_batches(stream, 1, 1, 16)])
    rows = np.concatenate([b.rows for b in first])
    assert not np.array_equal(rows, other_epoch) and not np.array_equal(rows, other_seed)
    flips = np.concatenate([b.flips for b in first])
    assert 0 < flips.sum() < len(flips)
    cache = build_image_cache(Catalogue.load(workspace / "split"), "train", SIZE, tmp_path / "cache", progress=False)
    for batch in first:
        assert torch.equal(batch.images, cache.batch(batch.rows))  # unflipped uint8, same decoder


def test_ranks_read_disjoint_shards_and_take_equal_steps(workspace: Path):
    world, batch_size = 3, 6
    streams = [open_stream(workspace, buffer=4, rank=r, world=world) for r in range(world)]
    steps = streams[0].steps_per_epoch(batch_size)
    items = [s.rank_items(r, world) for r, s in enumerate(streams)]
    assert steps == min(items) // 2 and len(set(items)) > 1  # the fewest items decide: no rank waits on another
    rows, shards = [], []
    for rank, stream in enumerate(streams):
        batches = epoch_batches(stream, 0, 0, batch_size)
        assert len(batches) == steps and all(len(b) == batch_size // world for b in batches)
        rows.append(np.concatenate([b.rows for b in batches]))
        shards.append(set(stream._reader.shards))
        assert set(np.concatenate([b.rows for b in batches]).tolist()) <= set(read_order(stream, 0, 0, rank, world).tolist())
    assert set().union(*shards) == set(streams[0].shards) and sum(len(s) for s in shards) == 7  # each shard on one rank
    every = np.concatenate(rows)
    assert len(set(every.tolist())) == len(every) == steps * batch_size
    assert streams[0].left_out(batch_size) == 48 - steps * batch_size > 0  # counted, not silent


def test_bad_streams_are_clear_errors(workspace: Path):
    with pytest.raises(ValidationError, match="shards is null"):
        TrainImagesConfig(source="webdataset")
    with pytest.raises(TrainStreamError, match="does not split over 3 ranks"):
        open_stream(workspace, rank=0, world=3).steps_per_epoch(8)
    with pytest.raises(TrainStreamError, match="fewer than its share of one batch"):
        open_stream(workspace).steps_per_epoch(64)
    with pytest.raises(TrainStreamError, match="no random access"):
        open_stream(workspace).batch(np.arange(2))
    with pytest.raises(ImageStreamError, match="in none of them"):
        ShardTrainStream([*train_ids(workspace), "not-exported"], shard_spec(workspace), SIZE)
    (workspace / "broken.tar").write_bytes(b"not a tar")
    with pytest.raises(TrainStreamError, match="broken.tar: not a readable tar shard"):
        ShardTrainStream(train_ids(workspace), [workspace / "broken.tar"], SIZE)


def streamed_task(workspace: Path, seed: int = 0) -> ImageTextTask:
    catalogue = Catalogue.load(workspace / "split")
    images = TrainImagesConfig(source="webdataset", shards=shard_spec(workspace), shuffle_buffer=8, decode_threads=1)
    pairs = PairSet.from_catalogue(catalogue, "train", SIZE, workspace / "unused", progress=False, images=images)
    model, _ = create_model(SPEC, seed=seed)
    return ImageTextTask(model, tokenizer(SPEC), pairs, None)


def test_streamed_training_resumes_at_an_epoch_boundary_exactly(workspace: Path, tmp_path: Path, kill_at):
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-3, warmup_steps=0, grad_clip_norm=0.0, early_stop_patience=0, num_threads=1)
    full_task = streamed_task(workspace)
    full = train(full_task, config, checkpoint_dir=tmp_path / "full", progress=False)
    assert full.steps == 2 * 3 and full_task.run_metrics() == {"train/stream_items_left_out_per_epoch": 0, "train/stream_other_items": 16}
    with pytest.raises(kill_at.Killed):
        train(kill_at(streamed_task(workspace), 1), config, checkpoint_dir=tmp_path / "part", progress=False)
    resumed_task = streamed_task(workspace, seed=123)  # everything must come from the checkpoint
    resumed = train(resumed_task, config, checkpoint_dir=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == full.steps and resumed.history == full.history
    for (name, a), b in zip(full_task.model.state_dict().items(), resumed_task.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not (workspace / "unused").exists()  # the split was never decoded to disk


def test_pretrain_from_shards_trains_the_concept_teacher(workspace: Path, tmp_path: Path):
    images = TrainImagesConfig(source="webdataset", shards=shard_spec(workspace), shuffle_buffer=8, decode_threads=1)
    config = PretrainConfig(
        model=ModelConfig(arch="lc-test-tiny"),
        train=TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_steps=0, early_stop_patience=0, num_threads=1, images=images),
        concept_weight=0.5,
        ensemble_members=1,
    )
    outputs = PretrainOutputs(model=tmp_path / "teacher", metrics=tmp_path / "teacher.json")
    metrics = run_pretrain(config, PretrainInputs(catalogue=workspace / "split", kg=workspace / "kg"), outputs, StageContext(project_dir=tmp_path, progress=False))
    assert metrics["steps"] == 3 and metrics["train/stream_items_left_out_per_epoch"] == 0 and metrics["prototype_refreshes"] == 1
    trained = load_model(tmp_path / "teacher").state_dict()
    initial, _ = create_model(SPEC, seed=0)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(v, trained[k]) for k, v in initial.state_dict().items() if v.is_floating_point())


WORKER = Path(__file__).with_name("trainstream_worker.py")


def test_two_gloo_ranks_stream_their_own_shards_in_step(workspace: Path, tmp_path: Path):
    """torchrun, 2 ranks: each reads its shards only, both take the same steps, no item twice, the remainder reported."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", DO_NOT_TRACK="1", PYTHONPATH=str(WORKER.parent))
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1", str(WORKER), str(workspace), str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    metrics = json.loads((tmp_path / "out" / "model.json").read_text())
    stream = open_stream(workspace)
    steps = min(stream.rank_items(r, 2) for r in (0, 1)) // 6  # the rank with fewer items decides
    assert metrics["steps"] == 2 * steps and metrics["train/stream_items_left_out_per_epoch"] == 48 - 12 * steps
    for epoch in (0, 1):
        first, second = logs[0][epoch], logs[1][epoch]
        assert len(first["batches"]) == len(second["batches"]) == steps
        assert all(len(rows) == 6 for rows in first["batches"] + second["batches"])
        assert not set(first["shards"]) & set(second["shards"]) and len(first["shards"]) + len(second["shards"]) == 7
        rows = [r for log in (first, second) for batch in log["batches"] for r in batch]
        assert len(set(rows)) == len(rows) == 12 * steps


def test_a_student_distils_from_shards(workspace: Path, tmp_path: Path):
    """DistillTask reads the streamed batch's images through the same hook (its own CLIP loss here)."""
    task = streamed_task(workspace)
    student = DistillTask(create_model(SPEC, seed=1)[0], tokenizer(SPEC), task.train_set, None, edges=[EdgeLossConfig(edge="inter_ss", loss="infonce")])
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_steps=0, early_stop_patience=0, num_threads=1)
    assert train(student, config, checkpoint_dir=tmp_path / "ck", progress=False).steps == 3
    assert any(not torch.equal(v, student.model.state_dict()[k]) for k, v in before.items() if v.is_floating_point())


def test_the_default_source_keeps_checkpoint_keys(workspace: Path):
    """train.images at its default trains as before it existed: old checkpoints stay resumable; shards are another run."""
    trajectory = TrainConfig().model_dump(mode="json")
    before = {k: v for k, v in trajectory.items() if k != "images"}
    assert checkpoint_key(trajectory, "x") == checkpoint_key(before, "x")
    streamed = TrainConfig(images=TrainImagesConfig(source="webdataset", shards=shard_spec(workspace))).model_dump(mode="json")
    assert checkpoint_key(streamed, "x") != checkpoint_key(before, "x")
