"""The concept graph: an is-a forest over mined concepts, item links, stats and quality checks.

Edges go child -> parent (``relation="is-a"``). A concept's parent is its most specific proper
generalisation that is itself a concept (same head, a sub-sequence of its modifiers; ties go to
the one that keeps the modifiers nearest the head, see
:func:`lightclip.kg.concepts.generalisations`). Every concept therefore has at most one parent
and the roots are the bare heads (product types), which makes the graph a forest by
construction; :func:`check_forest` verifies it after loading.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping

import networkx as nx
import pandas as pd

from lightclip.io import write_json
from lightclip.kg.concepts import (
    ConceptVocabulary,
    KGError,
    canonical_modifiers,
    concept_phrase,
    extract_concepts,
    generalisations,
    normalise_title,
    is_word,
)

RELATION = "is-a"
GRAPH_FORMAT = "lightclip-concept-graph/1"


def build_concept_graph(vocab: ConceptVocabulary) -> nx.DiGraph:
    """Concepts as nodes (``level``, ``count``, ``head``, ``modifiers``); edges child -> parent."""
    if not vocab.concepts:
        raise KGError("cannot build a concept graph from an empty vocabulary (no concepts were mined)")
    graph = nx.DiGraph(name="fashionklip-concepts", min_count=vocab.config.min_count, max_modifiers=vocab.config.max_modifiers)
    for phrase, concept in sorted(vocab.concepts.items()):
        graph.add_node(phrase, head=concept.head, count=concept.count, modifiers=list(concept.modifiers), level=0)
    for phrase, concept in sorted(vocab.concepts.items()):
        if not concept.modifiers:
            continue
        for mods in generalisations(concept.modifiers, len(concept.modifiers) - 1):
            parent = concept_phrase(concept.head, mods)
            if parent in vocab.concepts:
                graph.add_edge(phrase, parent, relation=RELATION)
                break
    for node in graph.nodes:
        graph.nodes[node]["level"] = _depth(graph, node)
    return graph


def _depth(graph: nx.DiGraph, node: str) -> int:
    depth = 0
    while True:
        parents = list(graph.successors(node))
        if not parents:
            return depth
        node, depth = parents[0], depth + 1
        if depth > graph.number_of_nodes():
            raise KGError(f"concept graph has a cycle through {node!r}")


def check_forest(graph: nx.DiGraph) -> None:
    """Raise :class:`KGError` unless every node has <= 1 parent, there is no cycle and roots are heads."""
    many = [n for n in graph.nodes if graph.out_degree(n) > 1]
    if many:
        raise KGError(f"not a forest: {len(many)} concept(s) with several parents, e.g. {many[:3]}")
    if not nx.is_directed_acyclic_graph(graph):
        raise KGError("not a forest: the is-a relation has a cycle")
    bad_roots = [n for n in graph.nodes if graph.out_degree(n) == 0 and n != graph.nodes[n].get("head")]
    if bad_roots:
        raise KGError(f"roots must be product types (bare heads); these are not: {bad_roots[:3]}")


def ancestors(graph: nx.DiGraph, concept: str) -> list[str]:
    """The is-a chain above ``concept``, nearest first (ending at its product type)."""
    if concept not in graph:
        raise KGError(f"unknown concept {concept!r}")
    return _chain(graph, concept)[1:]


def _chain(graph: nx.DiGraph, concept: str) -> list[str]:
    chain = [concept]
    while True:
        parents = list(graph.successors(chain[-1]))
        if not parents:
            return chain
        chain.append(parents[0])


def item_concepts(items: pd.DataFrame, vocab: ConceptVocabulary) -> dict[str, list[str]]:
    """Item id -> the concepts its title contains, most specific first ([] when none)."""
    if len(items) == 0:
        raise KGError("cannot link items to concepts: the catalogue is empty (0 items)")
    missing = [c for c in ("id", "title") if c not in items.columns]
    if missing:
        raise KGError(f"items need columns 'id' and 'title'; missing {missing}")
    return {str(item_id): extract_concepts(title, vocab) for item_id, title in zip(items["id"], items["title"])}


def graph_stats(graph: nx.DiGraph, item_concepts: Mapping[str, list[str]], n_items: int) -> dict[str, Any]:
    """Size and shape of the forest and how many items it reaches (for logging as metrics)."""
    levels = Counter(int(level) for _, level in graph.nodes(data="level"))
    covered = sum(1 for concepts in item_concepts.values() if concepts)
    linked = [len(c) for c in item_concepts.values() if c]
    return {
        "n_concepts": graph.number_of_nodes(),
        "n_edges": graph.number_of_edges(),
        "n_roots": levels.get(0, 0),
        "concepts_per_level": {int(k): int(v) for k, v in sorted(levels.items())},
        "max_depth": max(levels) if levels else 0,
        "items_covered": covered,
        "item_coverage": covered / n_items if n_items else 0.0,
        "mean_concepts_per_covered_item": sum(linked) / len(linked) if linked else 0.0,
    }


# --------------------------------------------------------------------------------------------
# Quality against articleType (evaluation only; mining never reads it)
# --------------------------------------------------------------------------------------------


def match_article_type(name: str, graph: nx.DiGraph) -> tuple[str | None, str]:
    """The concept an ``articleType`` name denotes, and how it was matched.

    The name goes through the same normalisation as titles ("Tshirts" -> ``tshirt``, "Casual
    Shoes" -> ``casual shoe``, "Flip Flops" -> ``flip flop``, "Kurtis" -> ``kurti``). "X and Y"
    names are tried part by part ("Perfume and Body Mist" -> ``perfume``). A name that is not a
    concept itself is generalised exactly like a title, by dropping modifiers ("Accessory Gift
    Set" -> ``set``): method ``generalised``. No fallback looks at the items' own concepts:
    matching a type to the most common root of its items would make the rooted share true
    by construction, so a type whose name names no product type stays unmatched.
    """
    units = normalise_title(name)
    parts: list[list[str]] = [[]]
    for unit in units:
        if unit == "and":
            parts.append([])
        else:
            parts[-1].append(unit)
    roots = {n for n, d in graph.nodes(data=True) if d.get("level") == 0}
    best: tuple[str | None, str] = (None, "unmatched")
    for part in parts:
        words = [u for u in part if is_word(u)]
        head_at = next((i for i in range(len(words) - 1, -1, -1) if words[i] in roots), None)
        if head_at is None:
            continue
        head, mods = words[head_at], canonical_modifiers(words[:head_at])
        for i, sub in enumerate(generalisations(mods, len(mods))):
            phrase = concept_phrase(head, sub)
            if phrase in graph:
                method = "exact" if i == 0 and head_at == len(words) - 1 else "generalised"
                if method == "exact":
                    return phrase, method
                if best[0] is None:
                    best = (phrase, method)
                break
    return best


def kg_quality(items: pd.DataFrame, graph: nx.DiGraph, item_concepts: Mapping[str, list[str]], *, min_type_items: int = 20) -> dict[str, Any]:
    """How well the forest recovers the catalogue's ``articleType`` (ground truth).

    - ``article_types_rooted``: share of article types with >= ``min_type_items`` items whose
      name matches (:func:`match_article_type`) a concept at level <= 1.
    - ``items_descend_from_type``: share of items (with an article type) whose most specific
      title concept equals or descends from their type's concept. Items without a concept, or
      whose type matches no concept, count as misses.
    """
    for col in ("id", "articleType"):
        if col not in items.columns:
            raise KGError(f"kg_quality needs column {col!r} (ground truth); got {list(items.columns)}")
    labelled = items[items["articleType"].notna()]
    if len(labelled) == 0:
        raise KGError("kg_quality needs items with an articleType; there are none")
    sizes = Counter(labelled["articleType"])
    matches = {name: match_article_type(name, graph) for name in sizes}
    chains: dict[str, set[str]] = {}

    def lineage(concept: str) -> set[str]:
        if concept not in chains:
            chains[concept] = set(_chain(graph, concept)) if concept in graph else set()
        return chains[concept]

    hits: dict[str, int] = defaultdict(int)
    no_concept = 0
    for item_id, atype in zip(labelled["id"], labelled["articleType"]):
        concepts = item_concepts.get(str(item_id), [])
        if not concepts:
            no_concept += 1
            continue
        target = matches[atype][0]
        if target is not None and target in lineage(concepts[0]):
            hits[atype] += 1
    big = [name for name, n in sizes.items() if n >= min_type_items]
    per_type = {
        name: {
            "n_items": sizes[name],
            "concept": matches[name][0],
            "match": matches[name][1],
            "level": graph.nodes[matches[name][0]]["level"] if matches[name][0] else None,
            "descend_share": round(hits[name] / sizes[name], 4),
        }
        for name in sorted(sizes, key=lambda n: (-sizes[n], n))
    }
    rooted = [n for n in big if per_type[n]["concept"] is not None and per_type[n]["level"] <= 1]
    n_big_items = sum(sizes[n] for n in big)
    return {
        "article_types_rooted": len(rooted) / len(big) if big else 0.0,
        "items_descend_from_type": sum(hits.values()) / len(labelled),
        "items_descend_from_type_frequent": sum(hits[n] for n in big) / n_big_items if n_big_items else 0.0,
        "n_article_types": len(sizes),
        "n_frequent_article_types": len(big),
        "min_type_items": min_type_items,
        "n_items": len(labelled),
        "items_without_concept": no_concept,
        "unrooted_article_types": sorted(set(big) - set(rooted)),
        "per_type": per_type,
    }


# --------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------


def save_graph(graph: nx.DiGraph, path: Path | str) -> Path:
    """Write the graph as node-link JSON (sorted, so equal graphs give identical files)."""
    if graph.number_of_nodes() == 0:
        raise KGError(f"{path}: refusing to save an empty concept graph")
    data = nx.node_link_data(graph, edges="edges")
    data["nodes"] = sorted(data["nodes"], key=lambda n: n["id"])
    data["edges"] = sorted(data["edges"], key=lambda e: (e["source"], e["target"]))
    data["format"] = GRAPH_FORMAT
    return write_json(path, data, indent=1)


def load_graph(path: Path | str) -> nx.DiGraph:
    """Read a graph written by :func:`save_graph`; :class:`KGError` if missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise KGError(f"{path}: concept graph not found (build it first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KGError(f"{path}: not a readable concept graph JSON: {exc}") from None
    if not isinstance(data, dict) or "nodes" not in data or "edges" not in data:
        raise KGError(f"{path}: not a node-link concept graph (expected keys 'nodes' and 'edges')")
    if not data["nodes"]:
        raise KGError(f"{path}: the concept graph is empty (0 concepts)")
    data.pop("format", None)
    try:
        graph = nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    except (KeyError, TypeError, nx.NetworkXError) as exc:
        raise KGError(f"{path}: malformed node-link data: {exc}") from None
    check_forest(graph)
    return graph
