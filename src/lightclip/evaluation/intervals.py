"""How sure a test set is of a mean recall: per-item scores and a paired bootstrap interval.

A test set of a few hundred items measures mean recall with an error of a point or more, which is
the size of the margins a promotion gate decides on. Two models evaluated on the same items share
much of that error (the hard items are hard for both), so the ratio of their mean recalls is
resampled over the items with both models at once (a paired bootstrap), not model by model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lightclip.evaluation.errors import EvaluationError


def item_recall_scores(i2t_ranks: Sequence[int] | np.ndarray, t2i_ranks: Sequence[int] | np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Each item's part of mean recall: the mean over both directions and ``ks`` of 100 x [rank < k].

    Item ``i`` is image query ``i`` and text query ``i`` (one image and one title per item, as the
    evaluate stage has them); ranks are 0-based. The mean of the scores is ``mean_recall``.
    """
    i2t = np.asarray(i2t_ranks, dtype=np.int64)
    t2i = np.asarray(t2i_ranks, dtype=np.int64)
    if i2t.ndim != 1 or i2t.shape != t2i.shape:
        raise EvaluationError(f"per-item scores need one image and one text query per item: {i2t.shape} vs {t2i.shape} ranks")
    if not ks:
        raise EvaluationError("per-item scores need at least one k")
    hits = [(ranks < int(k)) for ranks in (i2t, t2i) for k in ks]
    return 100.0 * np.mean(hits, axis=0)


@dataclass(frozen=True)
class RatioInterval:
    """``ratio`` = mean(numerator) / mean(denominator), and its percentile bootstrap interval."""

    ratio: float
    low: float
    high: float
    level: float
    resamples: int
    items: int

    def describe(self) -> str:
        return f"{self.level:.0%} interval {self.low:.1%}-{self.high:.1%}, paired bootstrap over {self.items} test items, {self.resamples} resamples"


def paired_ratio_interval(
    numerator: np.ndarray, denominator: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> RatioInterval:
    """The ratio of two models' mean per-item scores over the same items, with a bootstrap interval.

    Each resample draws the items with replacement once and scores both models on that draw;
    the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the ratios.
    Deterministic for a given ``seed``.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise EvaluationError(f"a paired interval needs two equal, non-empty score vectors: {a.shape} vs {b.shape}")
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"interval level must be in (0, 1), got {level}")
    if b.mean() <= 0.0:
        raise EvaluationError("the reference model's mean recall is 0: no ratio to it")
    rng = np.random.default_rng(seed)
    n = a.size
    sums_a = np.empty(resamples)
    sums_b = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory: 256 x n indices at a time
        draw = rng.integers(0, n, size=(min(256, resamples - start), n))
        sums_a[start:start + len(draw)] = a[draw].sum(axis=1)
        sums_b[start:start + len(draw)] = b[draw].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(sums_b > 0, sums_a / np.where(sums_b > 0, sums_b, 1.0), np.inf)
    low, high = np.quantile(ratios, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return RatioInterval(ratio=float(a.mean() / b.mean()), low=float(low), high=float(high), level=level, resamples=resamples, items=n)
