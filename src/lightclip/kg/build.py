"""The ``build_kg`` stage: mine the concept forest from the training titles, link every item to
its concepts, bootstrap each concept's prototype images, measure and draw the result.

Only training titles are mined (val/test titles are linked with the training vocabulary), so
the graph never leaks test text into training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import networkx as nx
import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from lightclip.config import KGConfig
from lightclip.data.catalogue import Catalogue
from lightclip.io import staged_dir, write_json
from lightclip.kg.concepts import KGError, mine_concepts
from lightclip.kg.graph import build_concept_graph, check_forest, graph_stats, item_concepts, kg_quality, save_graph
from lightclip.kg.prototypes import bootstrap_prototypes, pixel_descriptors
from lightclip.stage import StageContext

GRAPH_FILE = "graph.json"
ITEM_CONCEPTS_FILE = "item_concepts.json"
PROTOTYPES_FILE = "prototypes.json"
#: How the prototypes were chosen (``KGConfig.prototype_selection``): pre-training re-picks them the same way.
SELECTION_FILE = "prototype_selection.json"
DESCRIPTOR_SIZE = 16


def _load_small_images(catalogue: Catalogue, images: list[str], size: int, progress: bool) -> np.ndarray:
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, image in enumerate(tqdm(images, desc="prototype descriptors", unit="img", disable=not progress)):
        with Image.open(catalogue.image_path(image)) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    return out


def concept_members(ids: list[str], links: Mapping[str, list[str]]) -> dict[str, list[int]]:
    """Concept -> positions (in ``ids``) of the items whose titles name it."""
    members: dict[str, list[int]] = {}
    for position, item_id in enumerate(ids):
        for concept in links.get(item_id, []):
            members.setdefault(concept, []).append(position)
    return members


@dataclass(frozen=True)
class BuildKGInputs:
    catalogue: Path  # the split catalogue (data/split): concepts are mined from its training titles


@dataclass(frozen=True)
class BuildKGOutputs:
    kg: Path  # data/kg: graph, item concepts, prototypes and how they were chosen
    metrics: Path  # metrics/kg.json
    figure: Path  # reports/kg_sample.png


def run_build_kg(config: KGConfig, inputs: BuildKGInputs, outputs: BuildKGOutputs, context: StageContext) -> dict[str, Any]:
    """The ``build_kg`` stage (:func:`build_knowledge_graph` on the split catalogue); returns the stats."""
    return build_knowledge_graph(
        Catalogue.load(inputs.catalogue), config, outputs.kg, stats_path=outputs.metrics, figure_path=outputs.figure, progress=context.progress
    )


def build_knowledge_graph(
    catalogue: Catalogue,
    config: KGConfig,
    out_dir: Path,
    *,
    stats_path: Path,
    figure_path: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Write graph, item concepts and prototypes to ``out_dir``, stats (JSON) and a picture; return stats.

    Everything is written to a temp dir and moved into place at the end, so a failure never
    leaves a partial graph that a later stage could take for a valid one.
    """
    items = catalogue.items
    if len(items) == 0:
        raise KGError(f"{catalogue.table_path}: the catalogue is empty")
    train = catalogue.split("train")
    if len(train) == 0:
        raise KGError(f"{catalogue.table_path}: no items in split 'train' (run the split stage first)")
    try:
        vocab = mine_concepts(train["title"].tolist(), config=config)
    except KGError as exc:
        raise KGError(f"{catalogue.table_path} (split 'train'): {exc}") from None
    graph = build_concept_graph(vocab)
    check_forest(graph)
    links = item_concepts(items, vocab)

    train_ids = [str(i) for i in train["id"]]
    members = concept_members(train_ids, links)
    descriptors = pixel_descriptors(_load_small_images(catalogue, train["image"].tolist(), DESCRIPTOR_SIZE, progress), grid=8)
    chosen = bootstrap_prototypes(members, descriptors, k=config.prototypes_per_concept, mmr_lambda=config.mmr_lambda, pool_size=config.prototype_pool)
    prototypes = {concept: [train_ids[i] for i in picks] for concept, picks in chosen.items()}

    stats: dict[str, Any] = graph_stats(graph, links, len(items))
    stats["n_train_titles"] = len(train)
    stats["train_title_coverage"] = vocab.n_titles_with_concept / max(vocab.n_titles, 1)
    stats["n_brands_detected"] = len(vocab.brands)
    stats["concepts_with_prototypes"] = sum(1 for p in prototypes.values() if p)
    if items["articleType"].notna().any():
        quality = kg_quality(items, graph, links)
        stats["article_types_rooted"] = quality["article_types_rooted"]
        stats["items_descend_from_type"] = quality["items_descend_from_type"]

    with staged_dir(out_dir) as tmp:
        save_graph(graph, tmp / GRAPH_FILE)
        write_json(tmp / ITEM_CONCEPTS_FILE, links, indent=1)
        write_json(tmp / PROTOTYPES_FILE, prototypes, indent=1)
        write_json(tmp / SELECTION_FILE, config.prototype_selection(), indent=1)
    write_json(stats_path, stats, indent=1)
    Path(figure_path).parent.mkdir(parents=True, exist_ok=True)
    draw_graph_sample(graph, prototypes, catalogue, Path(figure_path))
    return stats


def _sample_chains(graph: nx.DiGraph, n_chains: int) -> list[list[str]]:
    """Root -> most frequent child -> its most frequent child, for the most frequent roots."""
    roots = sorted((n for n, level in graph.nodes(data="level") if level == 0), key=lambda n: (-graph.nodes[n]["count"], n))
    chains = []
    for root in roots[:n_chains]:
        chain = [root]
        while True:
            children = sorted(graph.predecessors(chain[-1]), key=lambda n: (-graph.nodes[n]["count"], n))
            if not children or len(chain) == 3:
                break
            chain.append(children[0])
        chains.append(chain)
    return chains


def draw_graph_sample(graph: nx.DiGraph, prototypes: Mapping[str, list[str]], catalogue: Catalogue, path: Path, n_chains: int = 5, thumbs: int = 3) -> Path:
    """A picture of a few is-a chains (general -> specific, left to right) with prototype thumbnails."""
    chains = _sample_chains(graph, n_chains)
    by_id = dict(zip(catalogue.items["id"].astype(str), catalogue.items["image"]))
    columns = 3
    fig = Figure(figsize=(columns * thumbs * 1.1, len(chains) * 1.5))  # no pyplot: no global backend or figure registry
    axes = fig.subplots(len(chains), columns * thumbs, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, chain in enumerate(chains):
        for col, concept in enumerate(chain):
            ids = prototypes.get(concept, [])[:thumbs]
            for t, item_id in enumerate(ids):
                with Image.open(catalogue.image_path(by_id[item_id])) as img:
                    axes[row][col * thumbs + t].imshow(img.convert("RGB"))
            arrow = "" if col == 0 else "is-a \u2190 "
            axes[row][col * thumbs].set_title(f"{arrow}{concept} (n={graph.nodes[concept]['count']})", fontsize=8, loc="left")
    fig.suptitle("Concept graph sample: product type \u2192 finer concepts, with prototype images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
