"""Retrieval metrics in both directions: recall@k, ranks, attribute precision (CLIP_benchmark-shaped).

Semantics (as in CLIP_benchmark's ``zeroshot_retrieval``, with our names):

* ``i2t_R@k`` (image -> text): for each image query, the texts are ranked by cosine
  similarity; the query is a hit at ``k`` when **any** of its positive texts is among the first
  ``k``. ``t2i_R@k`` (text -> image) is the same from the texts. Beware: CLIP_benchmark calls
  the text -> image number ``image_retrieval_recall@k``; here the prefix is always the query
  side first (``i2t``: image queries, ``t2i``: text queries).
* Positives are a many-to-many relation (:class:`Positives`): several titles per image and
  several images per title. ``retrieval_metrics(..., groups)`` keeps the simple form: items
  with equal group ids are mutual positives (identical titles, see :func:`title_groups`).
* The **rank** of a query is the 1-based position of its best-ranked positive.
  ``*_median_rank`` is the median over the queries (numpy's: the mean of the two middle
  values for an even count) and ``*_mean_rank`` the mean; lower is better.
* **Ties** are broken deterministically: keys are ordered by similarity, descending, and at
  exactly equal similarity by key index, ascending (the order of a stable sort). So a positive
  that ties with a negative of lower index ranks after it. Similarities are float32 dot
  products, and a query's best positive is read from the same similarities as the keys it is
  compared with, so a query is always compared with itself consistently.
* ``mean_recall`` is the mean of the six recalls (i2t and t2i R@1, R@5, R@10): the number the
  papers report (as ``rsum / 6``). All recalls and precisions are percentages.
* ``t2i_P@k_<attrs>`` (e-commerce relevance): for each text query, the fraction of the first
  ``k`` retrieved images whose product has the same value of every attribute in ``<attrs>``
  (``articleType``, or ``articleType`` and ``baseColour`` joined by ``_``) as the query's
  product, averaged over the queries whose product has those attributes. A retrieved product
  without the attribute counts as a miss. The top ``k`` follows the same tie rule.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lightclip.evaluation.errors import EvaluationError
from lightclip.evaluation.one_matmul import ranks_both_ways
from lightclip.evaluation.ranking import DIRECTIONS, Positives

KS: tuple[int, ...] = (1, 5, 10)


def recall_at_k(ranks: torch.Tensor | np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Percent of queries whose best positive has 0-based rank < k."""
    r = torch.as_tensor(ranks)
    return {int(k): float((r < k).to(torch.float64).mean().item() * 100.0) for k in ks}


def _as_matrix(emb: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(emb) if not isinstance(emb, torch.Tensor) else emb).detach().to("cpu", torch.float32)
    if t.ndim != 2:
        raise EvaluationError(f"{what}: expected an N x D matrix, got shape {tuple(t.shape)}")
    # a float64 sum of float32 values cannot overflow, so it is finite exactly when they all are
    # (one reduction instead of a bool matrix)
    if not bool(torch.isfinite(t.sum(dtype=torch.float64))):
        raise EvaluationError(f"{what}: contains NaN or inf")
    return t


def _label_codes(values: Sequence[Any]) -> np.ndarray:
    """Integer code per value (equal values, equal codes); missing (None/NaN/NA/blank) -> -1."""
    codes, uniques = pd.factorize(pd.Series(list(values), dtype=object), use_na_sentinel=True)
    codes = codes.astype(np.int64)
    blank = [i for i, v in enumerate(uniques) if _missing(v)]
    if blank:
        codes[np.isin(codes, blank)] = -1
    return codes


def _missing(value: Any) -> bool:
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        return True
    return type(value).__name__ == "NAType"  # pandas.NA


def _joint_codes(columns: Sequence[Sequence[Any]]) -> np.ndarray:
    """Codes of value tuples; missing when any value is missing."""
    joint = np.zeros(len(columns[0]) if columns else 0, dtype=np.int64)
    missing = np.zeros(joint.size, dtype=bool)
    for column in columns:  # mixed radix: distinct tuples, distinct numbers
        codes = _label_codes(column)
        missing |= codes < 0
        joint = joint * (int(codes.max(initial=0)) + 2) + codes + 1
        joint = _dense(joint)
    joint[missing] = -1
    return joint


def _dense(values: np.ndarray) -> np.ndarray:
    """Equal values, equal codes ``0..k-1`` (first-seen order): keeps mixed-radix codes small."""
    return pd.factorize(values)[0].astype(np.int64)


def attribute_precision(top: torch.Tensor, query_labels: np.ndarray, key_labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Mean over labelled queries of the percent of the first k retrieved keys with the query's label."""
    q = np.asarray(query_labels)
    valid = q >= 0
    if not valid.any():
        return {}
    retrieved = np.asarray(key_labels)[top.numpy()]  # Q x K
    same = retrieved == q[:, None]
    return {int(k): float(same[valid, :k].mean(axis=1).mean() * 100.0) for k in ks if k <= same.shape[1]}


def evaluate_retrieval(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    positives: Positives | None = None,
    *,
    ks: Sequence[int] = KS,
    precision_ks: Sequence[int] = KS,
    attributes: Mapping[str, Sequence[Sequence[Any]]] | None = None,
    curve_ks: Sequence[int] = (),
    chunk: int = 256,
) -> dict[str, Any]:
    """Every retrieval metric of one model on one split (see the module docstring).

    ``positives`` defaults to item ``i``'s image and text only. ``attributes`` maps a metric
    suffix (``"articleType"``, ``"articleType_baseColour"``) to one column of values per
    attribute, per item (images and texts are the same items then), e.g.
    ``{"articleType": [types]}``. Returns ``{"metrics": {...}, "recall_curve": {"i2t": {k: %},
    "t2i": {...}}, "ranks": {"i2t": array, "t2i": array}}`` (the ranks: each query's 0-based
    rank of its best positive); metric names: ``i2t_R@k``, ``t2i_R@k``, ``mean_recall``,
    ``{i2t,t2i}_{median,mean}_rank``, ``t2i_P@k_<suffix>``.
    """
    images = torch.nn.functional.normalize(_as_matrix(image_emb, "image embeddings"), dim=-1)
    texts = torch.nn.functional.normalize(_as_matrix(text_emb, "text embeddings"), dim=-1)
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise EvaluationError("no items to evaluate (empty image or text set)")
    if images.shape[1] != texts.shape[1]:
        raise EvaluationError(f"image embeddings are {images.shape[1]}-d but text embeddings {texts.shape[1]}-d")
    if positives is None:
        if images.shape[0] != texts.shape[0]:
            raise EvaluationError(f"{images.shape[0]} images but {texts.shape[0]} texts: pass the positives")
        positives = Positives.identity(images.shape[0])
    if (positives.n_images, positives.n_texts) != (images.shape[0], texts.shape[0]):
        raise EvaluationError(
            f"positives are over {positives.n_images} images x {positives.n_texts} texts, embeddings {images.shape[0]} x {texts.shape[0]}"
        )
    attribute_codes: dict[str, np.ndarray] = {}
    for name, columns in (attributes or {}).items():
        if images.shape[0] != texts.shape[0]:
            raise EvaluationError("attribute precision needs one image and one text per item")
        columns = [list(c) for c in columns]
        if any(len(c) != images.shape[0] for c in columns):
            raise EvaluationError(f"attribute {name!r}: expected {images.shape[0]} values per column")
        codes = _joint_codes(columns)
        if (codes >= 0).any():
            attribute_codes[name] = codes
    max_p = max(precision_ks) if (attribute_codes and precision_ks) else 0
    all_ks = sorted({int(k) for k in (*ks, *curve_ks)})

    metrics: dict[str, float] = {}
    curves: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        i2t_ranks, t2i_ranks, top = ranks_both_ways(images, texts, positives, chunk=chunk, topk=max_p)
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        recalls = recall_at_k(ranks, all_ks)
        for k in ks:
            metrics[f"{direction}_R@{k}"] = recalls[int(k)]
        curves[direction] = {k: recalls[k] for k in all_ks}
        one_based = ranks.numpy() + 1
        metrics[f"{direction}_median_rank"] = float(np.median(one_based))
        metrics[f"{direction}_mean_rank"] = float(one_based.mean())
    if top is not None:
        for name, codes in attribute_codes.items():
            for k, value in attribute_precision(top, codes, codes, precision_ks).items():
                metrics[f"t2i_P@{k}_{name}"] = value
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_R@{k}"] for d in DIRECTIONS for k in ks]))
    return {"metrics": metrics, "recall_curve": curves, "ranks": {"i2t": i2t_ranks.numpy(), "t2i": t2i_ranks.numpy()}}


def retrieval_metrics(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    image_to_text_positives: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    ks: Sequence[int] = KS,
    chunk: int = 256,
) -> dict[str, float]:
    """Recall@k (percent) image->text and text->image, and their mean (used during training).

    ``image_to_text_positives``: a group id per item (items with equal ids are mutual
    positives); ``None`` = item ``i``'s positive is text ``i`` only. Embeddings are
    L2-normalised here (cosine similarity). See :func:`evaluate_retrieval` for everything else.
    """
    images = _as_matrix(image_emb, "image embeddings")
    texts = _as_matrix(text_emb, "text embeddings")
    if texts.shape != images.shape:
        raise ValueError(f"expected two N x D embedding matrices of equal shape, got {tuple(images.shape)} and {tuple(texts.shape)}")
    n = images.shape[0]
    if n == 0:
        raise EvaluationError("no items to evaluate")
    if image_to_text_positives is None:
        positives = Positives.identity(n)
    else:
        groups = np.asarray(image_to_text_positives)
        if groups.shape != (n,):
            raise ValueError(f"image_to_text_positives: expected {n} group ids, got shape {tuple(groups.shape)}")
        positives = Positives.from_groups(groups)
    result = evaluate_retrieval(images, texts, positives, ks=ks, chunk=chunk)["metrics"]
    keys = [f"{d}_R@{k}" for d in DIRECTIONS for k in ks] + ["mean_recall"]
    return {k: result[k] for k in keys}

