"""The teacher-embedding cache: round trip, and every kind of stale file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightclip.config import SplitConfig, SynthConfig, TeacherEmbedConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.models.zoo import ModelSpec, create_model, encode_text, load_model, load_tokenizer, save_model
from lightclip.stage import StageContext
from lightclip.teacher_cache import StaleTeacherEmbeddings, TeacherEmbedInputs, TeacherEmbedOutputs, embed_with_teacher, load_teacher_embeddings, run_teacher_embed


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny split synthetic catalogue at 32 px (48 train / 8 val / 8 test) and two tiny teachers."""
    root = tmp_path_factory.mktemp("teacher_cache")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=5, n_items=64, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=8, test=8)).save(root / "split")
    for name, seed in (("teacher", 0), ("other_teacher", 1)):
        model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=seed)
        save_model(model, "lc-test-tiny", root / name)
    return root


@pytest.fixture(scope="module")
def cached(workspace: Path) -> Path:
    catalogue = Catalogue.load(workspace / "split")
    emb = embed_with_teacher(workspace / "teacher", catalogue, "train", workspace / "cache")
    return emb.save(workspace / "emb" / "train.safetensors")


def _variant(workspace: Path, tmp_path: Path, change) -> Catalogue:
    """A copy of the split catalogue with its items changed by ``change(items)``."""
    catalogue = Catalogue.load(workspace / "split")
    items = catalogue.items.copy()
    change(items)
    return catalogue.with_items(items).save(tmp_path / "variant")


def test_round_trip(workspace: Path, cached: Path):
    catalogue = Catalogue.load(workspace / "split")
    train = catalogue.split("train")
    emb = load_teacher_embeddings(workspace / "emb", catalogue, "train", teacher_dir=workspace / "teacher")
    assert emb.ids == tuple(train["id"]) and len(emb) == len(train) == 48
    assert emb.embed_dim == 32 and emb.image.dtype == emb.text.dtype == np.float32
    for array in (emb.image, emb.text, emb.image_hflip):
        assert array.shape == (48, 32)
        np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb.image, emb.image_hflip)  # flipped images embed differently
    assert emb.teacher_arch == "lc-test-tiny" and emb.image_size == 32 and emb.path == cached
    # the text rows are the teacher's embeddings of the titles, in catalogue order
    teacher, tok = load_model(workspace / "teacher"), load_tokenizer(workspace / "teacher")
    with torch.no_grad():
        expected = encode_text(teacher, tok([str(t) for t in train["title"][:4]]), normalize=True).numpy()
    np.testing.assert_allclose(emb.text[:4], expected, atol=1e-5)
    again = load_teacher_embeddings(cached, catalogue, "train")  # the file path itself, no teacher check
    np.testing.assert_array_equal(again.image, emb.image)


def test_stale_teacher_is_refused(workspace: Path, cached: Path):
    catalogue = Catalogue.load(workspace / "split")
    with pytest.raises(StaleTeacherEmbeddings, match=r"stale teacher embeddings: computed with teacher weights"):
        load_teacher_embeddings(cached, catalogue, "train", teacher_dir=workspace / "other_teacher")


def test_stale_catalogue_hash_is_refused(workspace: Path, cached: Path, tmp_path: Path):
    def retitle(items):
        items.loc[items.index[0], "title"] = "A Completely Different Title"

    with pytest.raises(StaleTeacherEmbeddings, match=r"stale.*catalogue table sha256"):
        load_teacher_embeddings(cached, _variant(workspace, tmp_path, retitle), "train")


def test_wrong_ids_and_wrong_count_are_refused(workspace: Path, cached: Path, tmp_path: Path):
    def swap(items):  # one train item and one val item trade places: same count, other ids
        train_row = items.index[items["split"] == "train"][0]
        val_row = items.index[items["split"] == "val"][0]
        items.loc[train_row, "split"], items.loc[val_row, "split"] = "val", "train"

    with pytest.raises(StaleTeacherEmbeddings, match=r"stale.*ids differ.*first at row"):
        load_teacher_embeddings(cached, _variant(workspace, tmp_path / "a", swap), "train")

    def drop(items):
        items.loc[items.index[items["split"] == "train"][0], "split"] = "test"

    with pytest.raises(StaleTeacherEmbeddings, match=r"stale.*48 items, but split 'train'.*has 47"):
        load_teacher_embeddings(cached, _variant(workspace, tmp_path / "b", drop), "train")
    catalogue = Catalogue.load(workspace / "split")
    with pytest.raises(StaleTeacherEmbeddings, match=r"of split 'train', not 'val'"):
        load_teacher_embeddings(cached, catalogue, "val")
    with pytest.raises(FileNotFoundError, match="teacher_embed"):
        load_teacher_embeddings(tmp_path / "nowhere", catalogue, "train")


def test_run_teacher_embed_writes_splits_and_teacher_metrics(workspace: Path, tmp_path: Path, saved_model_metrics):
    catalogue = Catalogue.load(workspace / "split")
    out = tmp_path / "teacher_emb"
    config = TeacherEmbedConfig(splits=["train", "test"], hflip=False, num_threads=1)
    outputs = TeacherEmbedOutputs(embeddings=out, metrics=tmp_path / "teacher_embed.json")
    metrics = run_teacher_embed(config, TeacherEmbedInputs(catalogue=workspace / "split", teacher=workspace / "teacher"), outputs, StageContext(project_dir=tmp_path, progress=False))
    assert json.loads(outputs.metrics.read_text()) == pytest.approx(metrics)
    assert sorted(p.name for p in out.iterdir()) == ["test.safetensors", "train.safetensors"]
    assert metrics["train_items"] == 48 and metrics["test_items"] == 8 and metrics["embed_dim"] == 32
    # the teacher's test metrics from the embeddings written are the trainers' metrics of the teacher
    test = saved_model_metrics(workspace / "teacher", catalogue, "test", workspace / "cache")
    assert test and {k: metrics[f"teacher/{k}"] for k in test} == pytest.approx(test, abs=1e-9)
    emb = load_teacher_embeddings(out, catalogue, "test", teacher_dir=workspace / "teacher")
    assert emb.image_hflip is None and len(emb) == 8
    assert not out.with_name(".teacher_emb.tmp").exists()
