"""The FAISS catalogue index: exactness, recall of the approximate kinds, persistence, mismatches, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightclip.config import IndexConfig, SplitConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.index import (
    CatalogueIndex,
    CatalogueIndexError,
    IndexMismatchError,
    Searcher,
    build_catalogue_index,
    build_faiss_index,
    recall_against,
    search_faiss,
)


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries.astype(np.float64) @ base.astype(np.float64).T
    return np.array([sorted(range(len(base)), key=lambda j: (-row[j], j))[:k] for row in sims])


def test_flat_search_is_exactly_brute_force():
    base, queries = _vectors(500, 24, 0), _vectors(30, 24, 1)
    index, info = build_faiss_index(base, IndexConfig(kind="flat"))
    assert info["count"] == 500 and index.ntotal == 500
    scores, rows = search_faiss(index, queries, 10)
    assert np.array_equal(rows, _brute_force(base, queries, 10))
    assert np.allclose(scores, np.sort(queries @ base.T, axis=1)[:, ::-1][:, :10], atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [IndexConfig(kind="ivf", ivf={"nprobe": 16}), IndexConfig(kind="hnsw", hnsw={"m": 16, "ef_search": 64})],
    ids=["ivf", "hnsw"],
)
def test_approximate_kinds_recall_against_flat(config: IndexConfig):
    base, queries = _vectors(3000, 16, 2), _vectors(100, 16, 3)
    exact, _ = build_faiss_index(base, IndexConfig(kind="flat"))
    _, reference = search_faiss(exact, queries, 10)
    index, info = build_faiss_index(base, config)
    _, rows = search_faiss(index, queries, 10)
    recall = recall_against(reference, rows, 10)
    assert recall >= 0.9, recall
    if config.kind == "ivf":
        assert info["nlist"] == 3000 // 39 and info["nprobe"] == 16


def test_ivf_with_more_lists_than_vectors_is_an_error():
    with pytest.raises(CatalogueIndexError, match="nlist = 100 lists for only 50 vectors"):
        build_faiss_index(_vectors(50, 8, 0), IndexConfig(kind="ivf", ivf={"nlist": 100}))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_and_reload_give_bit_identical_results(kind: str, tmp_path: Path):
    base, queries = _vectors(800, 16, 4), _vectors(20, 16, 5)
    index, info = build_faiss_index(base, IndexConfig(kind=kind, ivf={"nprobe": 4}, hnsw={"ef_search": 20}))
    meta = {"format": "lightclip-index/1", "kind": kind, "dim": 16, "count": 800,
            "params": {k: v for k, v in info.items() if k in ("nlist", "nprobe", "m", "ef_search")}}
    original = CatalogueIndex(index=index, ids=[f"i{r}" for r in range(800)], titles=[f"t{r}" for r in range(800)], meta=meta)
    before = search_faiss(original.index, queries, 10)
    original.save(tmp_path / "idx")
    loaded = CatalogueIndex.load(tmp_path / "idx")
    after = search_faiss(loaded.index, queries, 10)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert loaded.ids == original.ids and loaded.meta == original.meta
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "index.faiss").read_bytes() == (tmp_path / "idx" / "index.faiss").read_bytes()


# -- with a model and a catalogue --------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny catalogue, a tiny teacher, a second model of other width and a retrained one (same width)."""
    from lightclip.models.zoo import ModelSpec, arch_config, build_from_config, create_model, save_model

    root = tmp_path_factory.mktemp("index")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=2, n_items=48, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=8, test=8)).save(root / "split")
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", root / "models" / "teacher")
    retrained, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=1)
    save_model(retrained, "lc-test-tiny", root / "models" / "retrained")
    narrow = build_from_config({**arch_config("lc-test-tiny"), "embed_dim": 16})
    save_model(narrow, "lc-test-tiny", root / "models" / "narrow")
    index, metrics = build_catalogue_index(Catalogue.load(root / "split"), root / "models" / "teacher", IndexConfig(eval_queries=10), cache_dir=root / "cache")
    index.save(root / "index")
    return root


def test_catalogue_index_holds_every_item_and_its_model(workspace: Path):
    index = CatalogueIndex.load(workspace / "index")
    catalogue = Catalogue.load(workspace / "split")
    assert len(index) == 48 and index.dim == 32
    index.check_catalogue(catalogue.items["id"])
    assert index.meta["model"]["embed_dim"] == 32 and len(index.meta["model"]["weights_sha256"]) == 64
    assert set(index.attributes) == {"articleType", "baseColour"}
    index.check_model(workspace / "models" / "teacher")


def test_model_and_index_mismatches_are_errors(workspace: Path, tmp_path: Path):
    index = CatalogueIndex.load(workspace / "index")
    with pytest.raises(IndexMismatchError, match="embeds to 16 dims but the index holds 32-d"):
        index.check_model(workspace / "models" / "narrow")
    with pytest.raises(IndexMismatchError, match="stale index"):
        index.check_model(workspace / "models" / "retrained")
    with pytest.raises(IndexMismatchError, match="stale index"):
        Searcher(workspace / "index", workspace / "models" / "retrained")
    with pytest.raises(IndexMismatchError, match="does not match the catalogue"):
        index.check_catalogue(list(index.ids[:-1]) + ["s99999"])
    with pytest.raises(IndexMismatchError, match="16-d but the index holds 32-d"):
        index.search(np.ones((1, 16), dtype=np.float32))
    # ids that disagree with the FAISS rows
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("index.faiss", "index.json"):
        (broken / name).write_bytes((workspace / "index" / name).read_bytes())
    items = json.loads((workspace / "index" / "items.json").read_text())
    items["ids"] = items["ids"][:-1]
    (broken / "items.json").write_text(json.dumps(items))
    with pytest.raises(IndexMismatchError, match="47 item ids for 48 index rows"):
        CatalogueIndex.load(broken)
    items["ids"] = ["same"] * 48
    (broken / "items.json").write_text(json.dumps(items))
    with pytest.raises(IndexMismatchError, match="duplicate item id"):
        CatalogueIndex.load(broken)
    with pytest.raises(CatalogueIndexError, match="not a lightclip index"):
        CatalogueIndex.load(tmp_path / "nothing")


def test_search_by_text_and_image_and_long_queries(workspace: Path):
    searcher = Searcher(workspace / "index", workspace / "models" / "teacher")
    result = searcher.text("red floral midi dress", k=5)
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5] and not result.truncated
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    catalogue = Catalogue.load(workspace / "split")
    row = catalogue.items.iloc[5]
    by_image = searcher.image(catalogue.image_path(row["image"]), k=3)
    assert by_image.hits[0].id == row["id"] and by_image.hits[0].score == pytest.approx(1.0, abs=1e-5)
    # documented truncation: past the context (32 = 30 words + start/end) the words are ignored
    long = " ".join(["navy blue striped shirt"] * 8)
    first, second = searcher.text(long, k=5), searcher.text(long + " with a red floral print", k=5)
    assert first.truncated and first.tokens > first.context_length == 32
    assert [(h.id, h.score) for h in first.hits] == [(h.id, h.score) for h in second.hits]
    with pytest.raises(CatalogueIndexError, match="empty query"):
        searcher.text("   ")
    assert len(searcher.text("shirt", k=500).hits) == 48  # k is capped at the catalogue size


@pytest.fixture
def project(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_mlflow_uri: str, projects) -> Path:
    params = projects.repo_params()
    params["index"].update(eval_queries=10, threads=1)
    params["evaluate"]["num_threads"] = 1
    params["evaluate"]["models"] = {"teacher": "models/teacher"}
    root = projects.create(tmp_path / "proj", params)
    (root / "models").mkdir()
    (root / "models" / "teacher").symlink_to(workspace / "models" / "teacher")
    (root / "split").symlink_to(workspace / "split")
    return projects.enter(root, monkeypatch, mlflow_uri=shared_mlflow_uri)


def test_cli_index_evaluate_and_search(project: Path, workspace: Path, capsys: pytest.CaptureFixture[str]):
    from lightclip.cli import main

    assert main(["-q", "index", "--in", "split", "--out", "models/index", "--metrics", "metrics/index.json"]) == 0
    out = capsys.readouterr().out
    assert "flat index of 48 items x 32 dims" in out
    facts = json.loads((project / "metrics" / "index.json").read_text())
    assert facts["index/count"] == 48 and facts["index/recall@10_vs_flat"] == 1.0
    assert main(["-q", "evaluate", "--in", "split"]) == 0
    out = capsys.readouterr().out
    assert "teacher: mean recall" in out
    assert json.loads((project / "metrics" / "eval.json").read_text())["teacher"]["test/n_items"] == 8
    assert (project / "reports" / "eval" / "recall_at_k.png").is_file()

    assert main(["search", "red floral midi dress", "--k", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "flat index of 48 items" in lines[0] and lines[1].split() == ["rank", "score", "id", "title"] and len(lines) == 5
    assert main(["search", "red dress", "--k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 2 and {"id", "title", "score", "articleType"} <= set(hits[0])
    image = Catalogue.load(project / "split").image_path(Catalogue.load(project / "split").items["image"].iloc[0])
    assert main(["search", "--image", str(image), "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == Catalogue.load(project / "split").items["id"].iloc[0]
    assert main(["search", " ".join(["striped shirt"] * 20), "--k", "1"]) == 0
    assert "warning: the query is" in capsys.readouterr().err
    assert main(["search", "x", "--model", str(workspace / "models" / "retrained")]) == 1
    assert "stale index" in capsys.readouterr().err
    assert main(["search"]) == 1
    assert "give either a text query or --image" in capsys.readouterr().err
