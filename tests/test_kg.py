"""Concept mining and the is-a forest (FashionKLIP knowledge graph)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import networkx as nx
import pandas as pd
import pytest
from pydantic import ValidationError

from lightclip.config import KGConfig
from lightclip.kg import (
    KGError,
    ancestors,
    build_concept_graph,
    check_forest,
    extract_concepts,
    graph_stats,
    item_concepts,
    kg_quality,
    load_graph,
    match_article_type,
    mine_concepts,
    normalise_title,
    save_graph,
)

#: Hand-made catalogue: (title, articleType). Brands recur across product types; codes vary.
HAND_MADE: list[tuple[str, str]] = [
    ("Acme Men Navy Blue Check Shirt AC101", "Shirts"),
    ("Zeta Men Navy Blue Checked Shirts", "Shirts"),
    ("Orbit Men's Check Navy Blue Shirt OR-77", "Shirts"),
    ("Acme Men Check Shirt", "Shirts"),
    ("Zeta Men Red Check Shirt", "Shirts"),
    ("Orbit Men Striped White Shirt", "Shirts"),
    ("Acme Women Floral Midi Dress", "Dresses"),
    ("Zeta Women Floral Midi Dresses", "Dresses"),
    ("Orbit Women Floral Midi Dress 2014", "Dresses"),
    ("Acme Women Black Midi Dress", "Dresses"),
    ("Zeta Women Red Dress", "Dresses"),
    ("Acme Men Black Casual Shoes", "Casual Shoes"),
    ("Zeta Men Brown Casual Shoe", "Casual Shoes"),
    ("Orbit Unisex Black Casual Shoes", "Casual Shoes"),
    ("Acme Boys Printed T-Shirt", "Tshirts"),
    ("Zeta Girls Printed Tshirts", "Tshirts"),
    ("Orbit Kids Printed Tee", "Tshirts"),
    ("Acme Men Blue Flip-Flops", "Flip Flops"),
    ("Zeta Women Pink Flipflops", "Flip Flops"),
    ("Orbit Men Black Flip Flops", "Flip Flops"),
]


@pytest.fixture(scope="module")
def hand_items() -> pd.DataFrame:
    return pd.DataFrame(
        {"id": [str(i) for i in range(len(HAND_MADE))], "title": [t for t, _ in HAND_MADE], "articleType": [a for _, a in HAND_MADE]}
    )


@pytest.fixture(scope="module")
def hand_vocab(hand_items):
    return mine_concepts(hand_items["title"].tolist(), min_count=2)


@pytest.fixture(scope="module")
def hand_graph(hand_vocab):
    return build_concept_graph(hand_vocab)


# -- normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize("title", ["T-shirt", "Tshirt", "Tshirts", "T-Shirts", "tee", "Tees", "t shirt"])
def test_tshirt_variants_fold_to_one_head(title):
    assert normalise_title(title) == ["tshirt"]


@pytest.mark.parametrize(
    ("title", "expected"),
    [
        ("Shirts", ["shirt"]),
        ("Dresses", ["dress"]),
        ("Jeans", ["jeans"]),
        ("Shorts", ["shorts"]),
        ("Blue Short", ["blue", "shorts"]),
        ("Watches", ["watch"]),
        ("Scarves", ["scarf"]),
        ("Kurtis", ["kurti"]),
        ("Flip Flops", ["flip flop"]),
        ("Flip-Flops", ["flip flop"]),
        ("flipflops", ["flip flop"]),
        ("Checked Shirt", ["check", "shirt"]),
        ("Check Shirt", ["check", "shirt"]),
        ("Dotted Dress", ["polka dot", "dress"]),
        ("Polka Dot Dress", ["polka dot", "dress"]),
        ("Navy Blue Shirt", ["navy blue", "shirt"]),
        ("Off-White Top", ["off white", "top"]),
        ("Offwhite Top", ["off white", "top"]),
        ("Silver-Toned Watch", ["silver", "watch"]),
        ("Men's Slim Fit Shirt", ["men", "slim fit", "shirt"]),
        ("Casio Watch MTP-1234", ["casio", "watch", "mtp1234"]),
    ],
)
def test_normalise_title(title, expected):
    assert normalise_title(title) == expected


def test_normalise_non_string_is_empty():
    assert normalise_title(None) == []  # type: ignore[arg-type]


# -- brands, codes, gender -------------------------------------------------------------------


def test_brands_detected_and_never_concepts(hand_vocab):
    assert {"acme", "zeta", "orbit"} <= hand_vocab.brands
    words = {w for phrase in hand_vocab.concepts for w in phrase.split()}
    assert not words & {"acme", "zeta", "orbit"}


def test_codes_numbers_and_gender_words_are_not_concepts(hand_vocab):
    for phrase in hand_vocab.concepts:
        assert not any(ch.isdigit() for ch in phrase), phrase
        assert not set(phrase.split()) & {"men", "women", "boys", "girls", "unisex", "kids"}, phrase
    assert extract_concepts("Orbit Men's Check Navy Blue Shirt OR-77", hand_vocab)[0] == "navy blue check shirt"


def test_brand_that_looks_like_a_colour_is_stripped_only_as_prefix():
    titles = ["Red Tape Men Brown Casual Shoes", "Red Tape Men Black Belt", "Red Tape Brown Casual Shoes", "Zeta Men Red Belt", "Zeta Men Red Belt"]
    vocab = mine_concepts(titles, min_count=2)
    assert "red tape" in vocab.brands
    assert extract_concepts("Red Tape Brown Casual Shoes", vocab)[0] == "brown casual shoe"
    assert extract_concepts("Zeta Men Red Belt", vocab)[0] == "red belt"
    assert {p for p in vocab.concepts if "red" in p.split() or "tape" in p.split()} == {"red belt"}


# -- concepts and hierarchy -----------------------------------------------------------------


def test_word_order_variants_are_one_concept(hand_vocab):
    # "Check Navy Blue Shirt" and "Navy Blue Checked Shirts" are the same product concept.
    assert hand_vocab.concepts["navy blue check shirt"].count == 3


def test_extract_most_specific_first(hand_vocab):
    assert extract_concepts("Acme Men Navy Blue Check Shirt", hand_vocab) == ["navy blue check shirt", "check shirt", "navy blue shirt", "shirt"]


def test_hierarchy_chains(hand_graph):
    assert ancestors(hand_graph, "navy blue check shirt") == ["check shirt", "shirt"]
    assert ancestors(hand_graph, "floral midi dress") == ["midi dress", "dress"]
    assert ancestors(hand_graph, "black casual shoe") == ["casual shoe", "shoe"]
    assert ancestors(hand_graph, "printed tshirt") == ["tshirt"]
    levels = nx.get_node_attributes(hand_graph, "level")
    assert (levels["shirt"], levels["check shirt"], levels["navy blue check shirt"]) == (0, 1, 2)
    assert hand_graph.edges["check shirt", "shirt"]["relation"] == "is-a"


def test_forest_property(hand_graph):
    assert all(hand_graph.out_degree(n) <= 1 for n in hand_graph)
    assert nx.is_directed_acyclic_graph(hand_graph)
    roots = {n for n in hand_graph if hand_graph.out_degree(n) == 0}
    assert roots == {"shirt", "dress", "shoe", "tshirt", "flip flop"}
    for node, data in hand_graph.nodes(data=True):
        assert (data["level"] == 0) == (node in roots)
        assert node.endswith(data["head"]) and (node in roots) == (node == data["head"])
    check_forest(hand_graph)


def test_max_modifiers_bounds_depth(hand_items):
    vocab = mine_concepts(hand_items["title"].tolist(), min_count=2, max_modifiers=1)
    graph = build_concept_graph(vocab)
    assert "navy blue check shirt" not in graph
    assert max(nx.get_node_attributes(graph, "level").values()) == 1


def test_stats_and_quality_on_hand_made(hand_items, hand_vocab, hand_graph):
    links = item_concepts(hand_items, hand_vocab)
    stats = graph_stats(hand_graph, links, len(hand_items))
    assert stats["items_covered"] == len(hand_items) and stats["item_coverage"] == 1.0
    assert stats["concepts_per_level"][0] == 5 and stats["max_depth"] == 2
    quality = kg_quality(hand_items, hand_graph, links, min_type_items=3)
    assert quality["article_types_rooted"] == 1.0
    assert quality["items_descend_from_type"] == 1.0
    assert match_article_type("Casual Shoes", hand_graph) == ("casual shoe", "exact")
    assert match_article_type("Tshirts", hand_graph) == ("tshirt", "exact")
    assert match_article_type("Flip Flops", hand_graph) == ("flip flop", "exact")


# -- errors and config ----------------------------------------------------------------------


def test_title_without_concept(hand_vocab):
    assert extract_concepts("Acme Kidswear 2012", hand_vocab) == []
    with pytest.raises(KGError, match="no concept found in 2 title"):
        mine_concepts(["Acme Kidswear 2012", "Zeta 12345"])


def test_empty_catalogue_raises(hand_vocab):
    with pytest.raises(KGError, match="empty catalogue"):
        mine_concepts([])
    with pytest.raises(KGError, match="catalogue is empty"):
        item_concepts(pd.DataFrame({"id": [], "title": []}), hand_vocab)


def test_config_is_validated_and_frozen():
    with pytest.raises(ValidationError, match="min_count"):
        KGConfig(min_count=0)
    with pytest.raises(ValidationError, match="max_modifiers"):
        KGConfig(max_modifiers=-1)
    with pytest.raises(ValidationError, match="max_run"):
        KGConfig(max_modifiers=4, max_run=2)
    config = KGConfig()
    with pytest.raises(ValidationError):
        config.min_count = 5  # type: ignore[misc]
    with pytest.raises(KGError, match="either"):
        mine_concepts(["Acme Men Shirt"], min_count=1, config=config)


def test_save_load_round_trip(tmp_path: Path, hand_graph):
    path = save_graph(hand_graph, tmp_path / "kg" / "graph.json")
    loaded = load_graph(path)
    assert set(loaded.nodes) == set(hand_graph.nodes) and set(loaded.edges) == set(hand_graph.edges)
    assert loaded.nodes["navy blue check shirt"] == hand_graph.nodes["navy blue check shirt"]
    first = path.read_bytes()
    save_graph(loaded, path)
    assert path.read_bytes() == first


def test_load_graph_errors(tmp_path: Path):
    with pytest.raises(KGError, match="not found"):
        load_graph(tmp_path / "missing.json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"directed": True, "multigraph": False, "graph": {}, "nodes": [], "edges": []}))
    with pytest.raises(KGError, match="empty"):
        load_graph(empty)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(KGError, match="not a readable"):
        load_graph(broken)
    with pytest.raises(KGError, match="empty"):
        save_graph(nx.DiGraph(), tmp_path / "x.json")


# -- the real catalogue ---------------------------------------------------------------------


def _read_styles(path: Path) -> pd.DataFrame:
    """Kaggle styles.csv: the title is the last column and may hold unquoted commas."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        header = next(handle).rstrip("\r\n").split(",")
        for line in handle:
            fields = line.rstrip("\r\n").split(",")
            if len(fields) >= len(header):
                rows.append(fields[: len(header) - 1] + [",".join(fields[len(header) - 1 :]).strip()])
    return pd.DataFrame(rows, columns=header).rename(columns={"productDisplayName": "title"})


@pytest.mark.real_catalogue
def test_real_catalogue_quality(real_catalogue_dir: Path):
    items = _read_styles(real_catalogue_dir / "styles.csv")
    start = time.perf_counter()
    vocab = mine_concepts(items["title"].tolist())
    seconds = time.perf_counter() - start
    graph = build_concept_graph(vocab)
    check_forest(graph)
    links = item_concepts(items, vocab)
    stats = graph_stats(graph, links, len(items))
    quality = kg_quality(items, graph, links)
    assert seconds < 30
    assert stats["item_coverage"] >= 0.95
    assert quality["article_types_rooted"] >= 0.90, quality["unrooted_article_types"]
    assert quality["items_descend_from_type"] >= 0.90
