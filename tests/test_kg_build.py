"""The build_kg stage and the prototype selection (FAISS + MMR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightclip.config import KGConfig, SplitConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.kg import KGError, load_graph
from lightclip.kg.build import ITEM_CONCEPTS_FILE, PROTOTYPES_FILE, build_knowledge_graph
from lightclip.kg.prototypes import mmr_select, pixel_descriptors, select_prototypes


def test_mmr_pure_relevance_is_top_k():
    query = np.array([1.0, 0.0])
    candidates = np.array([[0.9, 0.1], [0.1, 0.9], [1.0, 0.0], [0.7, 0.7]])
    assert mmr_select(query, candidates, 2, mmr_lambda=1.0) == [2, 0]


def test_mmr_trades_relevance_for_diversity():
    query = np.array([1.0, 0.2, 0.0])
    near_copy = np.array([1.0, 0.21, 0.0])
    candidates = np.stack([np.array([1.0, 0.2, 0.0]), near_copy, np.array([0.6, 0.0, 0.8])])
    assert mmr_select(query, candidates, 2, mmr_lambda=1.0) == [0, 1]
    assert mmr_select(query, candidates, 2, mmr_lambda=0.3) == [0, 2]


def test_select_prototypes_respects_candidates_and_k():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(50, 8)).astype(np.float32)
    queries = images[[3, 10]] + 0.01
    chosen = select_prototypes(queries, images, k=3, mmr_lambda=0.7, pool_size=20, candidates=[np.array([3, 4, 5, 6]), None])
    assert set(chosen[0]) <= {3, 4, 5, 6} and len(chosen[0]) == 3 and chosen[0][0] == 3
    assert len(chosen[1]) == 3 and chosen[1][0] == 10
    with pytest.raises(KGError, match="dim"):
        select_prototypes(queries[:, :4], images, k=2, mmr_lambda=0.5, pool_size=5)


def test_pixel_descriptors_separate_colours():
    red = np.zeros((1, 3, 16, 16), np.uint8)
    red[:, 0] = 200
    blue = np.zeros((1, 3, 16, 16), np.uint8)
    blue[:, 2] = 200
    d = pixel_descriptors(np.concatenate([red, red, blue]))
    assert d[0] @ d[1] > 0.99 and d[0] @ d[2] < 0.5


@pytest.fixture(scope="module")
def split_synth(tmp_path_factory) -> Catalogue:
    root = tmp_path_factory.mktemp("synth")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=1, n_items=160), progress=False)
    return assign_splits(raw, SplitConfig(seed=0, val=0.1, test=0.1)).save(root / "split")


def test_build_writes_graph_links_prototypes_and_stats(split_synth: Catalogue, tmp_path: Path):
    out = tmp_path / "kg"
    stats = build_knowledge_graph(split_synth, KGConfig(min_count=2), out, stats_path=tmp_path / "kg.json", figure_path=tmp_path / "kg.png", progress=False)
    graph = load_graph(out / "graph.json")
    assert stats["n_concepts"] == graph.number_of_nodes() > 20
    assert stats["article_types_rooted"] >= 0.9
    assert json.loads((tmp_path / "kg.json").read_text())["n_concepts"] == stats["n_concepts"]
    assert (tmp_path / "kg.png").stat().st_size > 10_000

    links = json.loads((out / ITEM_CONCEPTS_FILE).read_text())
    assert set(links) == set(split_synth.items["id"])
    prototypes = json.loads((out / PROTOTYPES_FILE).read_text())
    train_ids = set(split_synth.split("train")["id"])
    config = KGConfig(min_count=2)
    assert json.loads((out / "prototype_selection.json").read_text()) == config.prototype_selection()
    assert max(len(ids) for ids in prototypes.values()) == config.prototypes_per_concept
    for concept, ids in prototypes.items():
        assert 1 <= len(ids) <= config.prototypes_per_concept and len(set(ids)) == len(ids)
        assert set(ids) <= train_ids
        assert all(concept in links[i] for i in ids), concept  # prototypes show the concept


def test_build_refuses_catalogue_without_train_or_concepts(split_synth: Catalogue, tmp_path: Path):
    no_split = split_synth.with_items(split_synth.items.assign(split=None))
    with pytest.raises(KGError, match="no items in split 'train'"):
        build_knowledge_graph(no_split, KGConfig(), tmp_path / "kg", stats_path=tmp_path / "s.json", figure_path=tmp_path / "f.png")
    gibberish = split_synth.with_items(split_synth.items.assign(title=[f"zz{i} qq{i}" for i in range(len(split_synth))]))
    with pytest.raises(KGError, match=r"catalogue.parquet \(split 'train'\): no concept found in 128 title"):
        build_knowledge_graph(gibberish, KGConfig(), tmp_path / "kg", stats_path=tmp_path / "s.json", figure_path=tmp_path / "f.png")
    assert not (tmp_path / "kg").exists() and not (tmp_path / "s.json").exists()
