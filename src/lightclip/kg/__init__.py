"""FashionKLIP concept knowledge graph: concepts mined from titles, organised as an is-a forest.

``concepts`` turns titles into a :class:`ConceptVocabulary`; ``graph`` builds the forest,
links items to concepts, measures it against ``articleType`` and saves/loads it as JSON.
"""

from lightclip.kg.concepts import (
    Concept,
    ConceptVocabulary,
    KGError,
    extract_concepts,
    mine_concepts,
    normalise_title,
)
from lightclip.kg.graph import (
    ancestors,
    build_concept_graph,
    check_forest,
    graph_stats,
    item_concepts,
    kg_quality,
    load_graph,
    match_article_type,
    save_graph,
)

__all__ = [
    "Concept",
    "ConceptVocabulary",
    "KGError",
    "ancestors",
    "build_concept_graph",
    "check_forest",
    "extract_concepts",
    "graph_stats",
    "item_concepts",
    "kg_quality",
    "load_graph",
    "match_article_type",
    "mine_concepts",
    "normalise_title",
    "save_graph",
]
