"""The visual side of the concept graph: a few prototype images per concept.

As in FashionKLIP, a concept's prototypes are the catalogue images most similar to the concept
(exact inner-product search with FAISS over L2-normalised vectors), re-ranked with maximal
marginal relevance (MMR) so the k prototypes are relevant *and* diverse rather than k near-copies.
The query is the current teacher's embedding of the prompt ``a photo of {concept}``; before a
teacher exists (training from scratch) it is the centroid of the images whose titles name the
concept, in a cheap pixel-descriptor space, and training refreshes the prototypes with the teacher.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import faiss
import numpy as np

from lightclip.kg.concepts import KGError


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def pixel_descriptors(images: np.ndarray, grid: int = 8) -> np.ndarray:
    """Cheap image vectors for bootstrapping prototypes: block-averaged RGB, centred, normalised.

    ``images`` is uint8 ``N x 3 x S x S`` (S divisible by ``grid``). Colour layout at 8x8 is
    enough to tell a red striped dress from a blue sneaker, which is all the first prototypes need.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images N x 3 x S x S, got shape {images.shape}")
    n, c, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"image size {h}x{w} is not divisible by the descriptor grid {grid}")
    blocks = images.reshape(n, c, grid, h // grid, grid, w // grid).astype(np.float32).mean(axis=(3, 5))
    flat = blocks.reshape(n, -1) / 255.0
    return l2_normalise(flat - flat.mean(axis=1, keepdims=True))


def mmr_select(query: np.ndarray, candidates: np.ndarray, k: int, mmr_lambda: float) -> list[int]:
    """Indices (into ``candidates``) of up to k items by maximal marginal relevance.

    score(c) = lambda * sim(query, c) - (1 - lambda) * max_{s in selected} sim(c, s); ties go to
    the lower index, so the choice is deterministic.
    """
    if len(candidates) == 0 or k <= 0:
        return []
    query = l2_normalise(query.reshape(1, -1))[0]
    candidates = l2_normalise(candidates)
    relevance = candidates @ query
    selected: list[int] = []
    redundancy = np.full(len(candidates), -np.inf, dtype=np.float32)
    available = np.ones(len(candidates), dtype=bool)
    for _ in range(min(k, len(candidates))):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = mmr_lambda * relevance - (1.0 - mmr_lambda) * penalty
        score = np.where(available, score, -np.inf)
        best = int(np.argmax(score))
        selected.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, candidates @ candidates[best])
    return selected


def select_prototypes(
    queries: np.ndarray,
    image_vectors: np.ndarray,
    *,
    k: int,
    mmr_lambda: float,
    pool_size: int,
    candidates: Sequence[np.ndarray | None] | None = None,
) -> list[list[int]]:
    """For each query (a concept), k prototype image indices: FAISS top-``pool_size``, then MMR.

    ``candidates[i]``, when given, restricts concept i to those image indices (the images whose
    titles name it); a concept whose pool comes back empty falls back to its candidates.
    """
    queries = l2_normalise(queries)
    image_vectors = l2_normalise(image_vectors)
    if image_vectors.shape[1] != queries.shape[1]:
        raise KGError(f"prototype search: query dim {queries.shape[1]} != image dim {image_vectors.shape[1]}")
    if len(image_vectors) == 0:
        raise KGError("prototype search: no images to choose prototypes from")
    index = faiss.IndexFlatIP(image_vectors.shape[1])
    index.add(image_vectors)
    pool = min(pool_size, len(image_vectors))
    result: list[list[int]] = []
    if candidates is None:
        _, found = index.search(queries, pool)
        for q, row in enumerate(found):
            row = row[row >= 0]
            picked = mmr_select(queries[q], image_vectors[row], k, mmr_lambda)
            result.append([int(row[i]) for i in picked])
        return result
    for q, allowed in enumerate(candidates):
        if allowed is None:
            _, found = index.search(queries[q : q + 1], pool)
            row = found[0][found[0] >= 0]
        else:
            allowed = np.asarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                result.append([])
                continue
            sims = image_vectors[allowed] @ queries[q]
            order = np.lexsort((allowed, -sims))[:pool]  # best first, ties by index
            row = allowed[order]
        picked = mmr_select(queries[q], image_vectors[row], k, mmr_lambda)
        result.append([int(row[i]) for i in picked])
    return result


def bootstrap_prototypes(
    concept_items: Mapping[str, Sequence[int]],
    descriptors: np.ndarray,
    *,
    k: int,
    mmr_lambda: float,
    pool_size: int,
) -> dict[str, list[int]]:
    """Prototypes before any teacher exists: query = centroid of the concept's own images."""
    concepts = sorted(concept_items)
    if not concepts:
        return {}
    queries = np.stack([descriptors[np.asarray(concept_items[c], dtype=np.int64)].mean(axis=0) for c in concepts])
    chosen = select_prototypes(queries, descriptors, k=k, mmr_lambda=mmr_lambda, pool_size=pool_size, candidates=[np.asarray(concept_items[c]) for c in concepts])
    return dict(zip(concepts, chosen))
