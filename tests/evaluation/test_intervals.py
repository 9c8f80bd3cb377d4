"""Per-item recall scores and the paired bootstrap interval of one model's mean recall over another's."""

from __future__ import annotations

import numpy as np
import pytest

from lightclip.evaluation import EvaluationError, Positives, evaluate_retrieval, item_recall_scores, paired_ratio_interval


def _noisy_pairs(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    images = rng.standard_normal((n, 16)).astype(np.float32)
    return images, images + noise * rng.standard_normal((n, 16)).astype(np.float32)


def test_item_scores_average_to_the_reported_mean_recall():
    rng = np.random.default_rng(0)
    images, texts = _noisy_pairs(rng, 120, 1.2)
    groups = np.arange(120)
    groups[10:14] = 10  # identical titles: several positives per query
    result = evaluate_retrieval(images, texts, Positives.from_groups(groups), ks=(1, 5, 10))
    scores = item_recall_scores(result["ranks"]["i2t"], result["ranks"]["t2i"], (1, 5, 10))
    assert scores.shape == (120,) and set(np.unique(np.round(scores * 6 / 100, 9))) <= set(range(7))  # sixths of 100
    assert scores.mean() == pytest.approx(result["metrics"]["mean_recall"], abs=1e-9)


def test_identical_models_have_a_zero_width_interval_and_a_clear_gap_excludes_one():
    rng = np.random.default_rng(1)
    teacher = 100.0 * rng.integers(0, 7, 400) / 6
    same = paired_ratio_interval(teacher, teacher, resamples=500)
    assert (same.ratio, same.low, same.high) == (1.0, 1.0, 1.0)
    worse = np.clip(teacher - 100.0 / 6 * (rng.random(400) < 0.5), 0, None)  # loses a hit on half of the items
    interval = paired_ratio_interval(worse, teacher, resamples=1000)
    assert interval.low <= interval.ratio <= interval.high < 1.0
    assert interval.ratio == pytest.approx(worse.mean() / teacher.mean())


def test_the_interval_is_deterministic_and_narrows_with_more_items():
    rng = np.random.default_rng(2)
    big_teacher = 100.0 * rng.integers(2, 7, 4000) / 6
    big_student = np.clip(big_teacher + 100.0 / 6 * rng.integers(-2, 2, 4000), 0, 100)
    small = paired_ratio_interval(big_student[:250], big_teacher[:250], seed=3)
    assert small == paired_ratio_interval(big_student[:250], big_teacher[:250], seed=3)
    large = paired_ratio_interval(big_student, big_teacher, seed=3)
    # the width shrinks like 1 / sqrt(items): 16x the items, about a quarter of the width
    assert 0.15 < (large.high - large.low) / (small.high - small.low) < 0.4
    assert "95% interval" in large.describe() and "over 4000 test items, 2000 resamples" in large.describe()


def test_pairing_makes_the_ratio_interval_narrower_than_independent_draws():
    """Two models that fail on the same hard items: resampling them together cancels that shared error."""
    rng = np.random.default_rng(4)
    difficulty = 100.0 * rng.integers(0, 7, 300) / 6
    student = np.clip(difficulty - 100.0 / 6 * (rng.random(300) < 0.2), 0, None)
    paired = paired_ratio_interval(student, difficulty, seed=0)
    draws = np.random.default_rng(0)
    independent = [student[draws.integers(0, 300, 300)].mean() / difficulty[draws.integers(0, 300, 300)].mean() for _ in range(2000)]
    low, high = np.quantile(independent, [0.025, 0.975])
    assert (paired.high - paired.low) < 0.5 * (high - low)


def test_bad_inputs_are_named():
    with pytest.raises(EvaluationError, match="one image and one text query per item"):
        item_recall_scores([0, 1, 2], [0, 1], (1, 5))
    with pytest.raises(EvaluationError, match="two equal, non-empty score vectors"):
        paired_ratio_interval(np.ones(3), np.ones(4))
    with pytest.raises(EvaluationError, match="mean recall is 0"):
        paired_ratio_interval(np.ones(3), np.zeros(3))
    with pytest.raises(EvaluationError, match="level must be in"):
        paired_ratio_interval(np.ones(3), np.ones(3), level=1.5)
