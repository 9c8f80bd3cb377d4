"""Retrieval metrics against an independent brute-force reference and hand-made cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lightclip.evaluation import (
    EvaluationError,
    Positives,
    attribute_precision,
    evaluate_retrieval,
    recall_at_k,
    retrieval_metrics,
    title_groups,
)


def _assert_close(ours: dict, ref: dict):
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def _random_case(seed: int):
    """Images with 1-3 captions each, some captions shared by several images, exact duplicate vectors."""
    rng = np.random.default_rng(seed)
    n_images, dim = 40, 8
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    images[7] = images[3]  # exact ties between images
    images[21] = 2.0 * images[3]  # same direction, exact tie after normalisation
    images[30] = images[12]
    text_of_image = np.repeat(np.arange(n_images), rng.integers(1, 4, n_images))
    texts = images[text_of_image] + 0.9 * rng.standard_normal((text_of_image.size, dim)).astype(np.float32)
    texts[5] = texts[2]  # exact ties between texts
    texts[40] = texts[11]
    mask = np.zeros((n_images, texts.shape[0]), dtype=bool)
    mask[text_of_image, np.arange(texts.shape[0])] = True
    for _ in range(10):  # several images per caption
        mask[rng.integers(n_images), rng.integers(texts.shape[0])] = True
    return images, texts, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_metrics_match_brute_force_reference(seed: int, chunk: int, brute_force_metrics):
    images, texts, mask = _random_case(seed)
    labels_a = [None if i % 9 == 0 else f"type{i % 4}" for i in range(40)]
    ref, sims = brute_force_metrics(images, texts, mask, (1, 5, 10))
    # the only exact ties are the duplicated vectors; every other gap is far above float32 rounding
    for matrix in (sims, sims.T):
        for row in matrix:
            assert np.diff(np.unique(np.round(row, 12))).min() > 1e-6
    image_index, text_index = np.nonzero(mask)
    positives = Positives.from_pairs(images.shape[0], texts.shape[0], image_index, text_index)
    result = evaluate_retrieval(torch.from_numpy(images), torch.from_numpy(texts), positives, chunk=chunk)
    _assert_close(result["metrics"], ref)
    assert set(result["metrics"]) == set(ref)

    # attribute precision: one item per row (images and texts are the same items)
    items_img, items_txt = images, texts[:40]
    ref_p, _ = brute_force_metrics(items_img, items_txt, np.eye(40, dtype=bool), (1, 5, 10), labels={"articleType": labels_a}, precision_ks=(1, 3, 5))
    got = evaluate_retrieval(items_img, items_txt, Positives.identity(40), precision_ks=(1, 3, 5), attributes={"articleType": [labels_a]}, chunk=chunk)
    _assert_close(got["metrics"], ref_p)


def test_ties_at_the_topk_boundary_keep_lower_indices():
    # every image is identical: all similarities tie, the top k must be the k lowest indices
    images = np.ones((12, 4), dtype=np.float32)
    texts = np.ones((12, 4), dtype=np.float32)
    labels = ["a", "b"] * 6
    m = evaluate_retrieval(images, texts, attributes={"t": [labels]}, precision_ks=(1, 3))["metrics"]
    # top 3 of every query: items 0, 1, 2 -> labels a, b, a
    assert m["t2i_P@1_t"] == pytest.approx(50.0)  # item 0 (a) for every query
    assert m["t2i_P@3_t"] == pytest.approx(100 * (6 * (2 / 3) + 6 * (1 / 3)) / 12)
    # ranks: query i's only positive is item i, preceded by the i lower-index ties
    assert m["i2t_mean_rank"] == pytest.approx(np.mean(np.arange(1, 13)))
    assert m["i2t_R@1"] == pytest.approx(100 / 12)


def test_hand_made_case_with_several_captions_and_ties():
    # I0=(1,0), I1=(0,1), I2=(1,0) (a duplicate of I0); T0 captions I0, T1 and T2 caption I1, T3 captions I2.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    positives = Positives.from_text_image_index([0, 1, 1, 2], n_images=3)
    m = evaluate_retrieval(images, texts, positives)["metrics"]
    # i2t: I0 -> T0 first (rank 1); I1 -> T2 (1.0) first; I2 -> T0 (1.0) then T3 (0.8): rank 2
    assert m["i2t_R@1"] == pytest.approx(200 / 3) and m["i2t_R@5"] == 100.0
    assert m["i2t_median_rank"] == 1.0 and m["i2t_mean_rank"] == pytest.approx(4 / 3)
    # t2i: T0 ties I0/I2 (I0 first, its positive: rank 1); T3 ties I0/I2 at 0.8, I0 first -> I2 rank 2
    assert m["t2i_R@1"] == 75.0 and m["t2i_R@10"] == 100.0
    assert m["t2i_median_rank"] == 1.0 and m["t2i_mean_rank"] == 1.25
    assert m["mean_recall"] == pytest.approx((200 / 3 + 100 + 100 + 75 + 100 + 100) / 6)


def test_attribute_precision_hand_made():
    images = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    # t2i top 2: T0 -> [0, 1]; T1 -> [3, 2]; T2 -> [2, 1]; T3 -> [1, 2]
    types = ["A", "A", "B", None]
    colours = ["Red", "Blue", "Red", "Red"]
    m = evaluate_retrieval(
        images, texts, precision_ks=(1, 2), attributes={"articleType": [types], "articleType_baseColour": [types, colours]}
    )["metrics"]
    # item 3 has no articleType: not a query; as a result it is a miss
    assert m["t2i_P@1_articleType"] == pytest.approx(100 * 2 / 3)
    assert m["t2i_P@2_articleType"] == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert m["t2i_P@1_articleType_baseColour"] == pytest.approx(100 * 2 / 3)
    assert m["t2i_P@2_articleType_baseColour"] == pytest.approx(100 * (0.5 + 0 + 0.5) / 3)
    no_labels = evaluate_retrieval(images, texts, attributes={"articleType": [[None] * 4]})["metrics"]
    assert not any(k.startswith("t2i_P@") for k in no_labels)


def test_retrieval_metrics_keeps_its_api_and_matches_evaluate_retrieval():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    groups = title_groups([f"title {i % 50}" for i in range(64)])
    simple = retrieval_metrics(images, texts, groups)
    assert list(simple) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean_recall"]
    full = evaluate_retrieval(images, texts, Positives.from_groups(groups))["metrics"]
    assert all(simple[k] == full[k] for k in simple)


def test_bad_embeddings_are_clear_errors():
    with pytest.raises(EvaluationError, match="no items"):
        evaluate_retrieval(torch.zeros((0, 4)), torch.zeros((0, 4)))
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate_retrieval(torch.full((2, 2), float("nan")), torch.ones((2, 2)))
    with pytest.raises(EvaluationError, match="4-d but text embeddings 3-d"):
        evaluate_retrieval(torch.ones((2, 4)), torch.ones((2, 3)))
    with pytest.raises(EvaluationError, match="pass the positives"):
        evaluate_retrieval(torch.ones((2, 4)), torch.ones((3, 4)))


def test_recall_at_k_counts_ranks_below_k():
    assert recall_at_k(np.array([0, 0, 1, 4, 9]), (1, 2, 5, 10)) == {1: 40.0, 2: 60.0, 5: 80.0, 10: 100.0}


def test_attribute_precision_averages_over_labelled_queries_only():
    top = torch.tensor([[0, 1], [1, 0], [2, 0]])
    labels = np.array([0, 1, -1])  # query 2 has no label
    assert attribute_precision(top, labels, labels, (1, 2)) == {1: 100.0, 2: 50.0}
    assert attribute_precision(top, np.array([-1, -1, -1]), labels, (1,)) == {}


def test_attribute_labels_treat_blank_and_missing_alike():
    labels = ["Dress", None, float("nan"), "  ", "Shirt", "Dress", pd.NA]
    images = np.eye(7, dtype=np.float32)
    m = evaluate_retrieval(images, images, attributes={"articleType": [labels]}, precision_ks=(1, 2))["metrics"]
    # only the three labelled items count; each finds itself first (P@1 = 100), at P@2 the next
    # key by index: Dress(0) -> item 1 (missing, a miss), Shirt(4) -> 0 (Dress), Dress(5) -> 0 (Dress)
    assert m["t2i_P@1_articleType"] == pytest.approx(100.0)
    assert m["t2i_P@2_articleType"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)

