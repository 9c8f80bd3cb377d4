"""Retrieval evaluation (minimal for now: recall@k in both directions).

Semantics (as in ``open_clip_train``'s ``get_clip_metrics``, plus duplicate titles):

* ``i2t_R@k``: image -> text. For image ``i`` the texts are ranked by cosine similarity; it is a
  hit when a *positive* text is among the first ``k``. ``t2i_R@k`` is the same from the texts.
* By default item ``i``'s only positive is text ``i``. With ``image_to_text_positives`` (one
  group id per item), items with equal group ids are mutual positives: products with the
  identical title count as hits (see :func:`title_groups`).
* Ties are broken deterministically: at equal similarity the lower index ranks first.
* ``mean_recall`` is the mean of the six recalls. All values are percentages.

Similarities are computed in chunks of rows, so 10k x 10k needs only ``chunk x N`` floats.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch

KS: tuple[int, ...] = (1, 5, 10)
_WHITESPACE = re.compile(r"\s+")


def title_groups(titles: Sequence[Any]) -> np.ndarray:
    """A group id per title: equal after lower-casing and collapsing whitespace -> same id."""
    seen: dict[str, int] = {}
    groups = np.empty(len(titles), dtype=np.int64)
    for i, title in enumerate(titles):
        key = _WHITESPACE.sub(" ", str(title)).strip().lower() if title is not None else f"\0missing{i}"
        groups[i] = seen.setdefault(key, len(seen))
    return groups


def _ranks_of_best_positive(queries: torch.Tensor, keys: torch.Tensor, q_groups: torch.Tensor, k_groups: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each query, the 0-based rank of its best-ranked positive key (sim desc, index asc)."""
    n_keys = keys.shape[0]
    key_index = torch.arange(n_keys)
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ keys.T  # c x N
        positive = q_groups[start : start + chunk, None] == k_groups[None, :]
        best = torch.where(positive, sims, torch.full_like(sims, -torch.inf)).max(dim=1).values
        at_best = positive & (sims == best[:, None])
        first = at_best.to(torch.uint8).argmax(dim=1)  # lowest index among the best positives
        above = (sims > best[:, None]).sum(dim=1)
        tied_before = ((sims == best[:, None]) & (key_index[None, :] < first[:, None])).sum(dim=1)
        ranks[start : start + chunk] = above + tied_before
    return ranks


def retrieval_metrics(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    image_to_text_positives: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    ks: Sequence[int] = KS,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k (percent) image->text and text->image, and their mean.

    ``image_to_text_positives``: a group id per item (items with equal ids are mutual
    positives); ``None`` = item ``i``'s positive is text ``i`` only. Embeddings are
    L2-normalised here (cosine similarity).
    """
    images = torch.as_tensor(image_emb, dtype=torch.float32)
    texts = torch.as_tensor(text_emb, dtype=torch.float32)
    if images.ndim != 2 or texts.shape != images.shape:
        raise ValueError(f"expected two N x D embedding matrices of equal shape, got {tuple(images.shape)} and {tuple(texts.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("no items to evaluate")
    images = torch.nn.functional.normalize(images, dim=-1)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    if image_to_text_positives is None:
        groups = torch.arange(n)
    else:
        groups = torch.as_tensor(np.asarray(image_to_text_positives), dtype=torch.long)
        if groups.shape != (n,):
            raise ValueError(f"image_to_text_positives: expected {n} group ids, got shape {tuple(groups.shape)}")
    metrics: dict[str, float] = {}
    with torch.no_grad():
        for name, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
            ranks = _ranks_of_best_positive(queries, keys, groups, groups, chunk)
            for k in ks:
                metrics[f"{name}_R@{k}"] = float((ranks < k).to(torch.float64).mean().item() * 100.0)
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
    return metrics
