"""Positives and ranks: the tie rule, top-k, who counts as whose positive."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightclip.data.split import normalise_title
from lightclip.evaluation import (
    EvaluationError,
    Positives,
    catalogue_positives,
    group_pairs,
    image_content_groups,
    retrieval_ranks,
    title_groups,
)
from lightclip.imagecache import ImageCache


def _stable_order(row: list[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


@pytest.mark.parametrize("n_keys", [1, 5, 8, 13, 17])
def test_ranks_and_topk_for_any_gallery_width(n_keys: int):
    # the comparison masks are padded to 8-byte words: counts must not depend on the width
    rng = np.random.default_rng(n_keys)
    queries = torch.from_numpy(rng.integers(-2, 3, (11, 3)).astype(np.float32))  # small integers: many exact ties
    keys = torch.from_numpy(rng.integers(-2, 3, (n_keys, 3)).astype(np.float32))
    positive = rng.integers(0, n_keys, 11)
    ranks, top = retrieval_ranks(queries, keys, np.arange(12), positive, chunk=4, topk=3)
    sims = (queries.double() @ keys.double().T).numpy()
    for q in range(11):
        order = _stable_order(sims[q].tolist())
        assert int(ranks[q]) == order.index(int(positive[q]))
        assert top[q].tolist() == order[:3]


@pytest.mark.parametrize("ties", [False, True])
def test_topk_over_block_candidates_equals_a_full_stable_sort(ties: bool):
    # wide enough rows for the block-maxima shortcut (and a ragged last block)
    rng = np.random.default_rng(3)
    n_keys = 1237
    if ties:  # small integers: exact ties everywhere, also at the k-th place
        queries = rng.integers(-1, 2, (16, 4)).astype(np.float32)
        keys = rng.integers(-1, 2, (n_keys, 4)).astype(np.float32)
    else:
        queries = rng.standard_normal((16, 8)).astype(np.float32)
        keys = rng.standard_normal((n_keys, 8)).astype(np.float32)
        keys[1200:] = keys[0]  # duplicates of key 0 in the ragged end
    _, top = retrieval_ranks(torch.from_numpy(queries), torch.from_numpy(keys), np.arange(17), np.zeros(16, dtype=np.int64), chunk=5, topk=10)
    sims = torch.from_numpy(queries) @ torch.from_numpy(keys).T  # the same float32 products
    for q in range(16):
        assert top[q].tolist() == _stable_order(sims[q].tolist())[:10]


def test_rank_is_the_best_of_several_positives_and_ties_go_to_the_lower_index():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    # query 0: order 1, 3 (tie at 1.0, lower index first), 2, 0; its positives 0 and 3 -> rank 1
    # query 1: order 0, 2, 1, 3; its only positive 3 -> rank 3
    ranks, top = retrieval_ranks(queries, keys, np.array([0, 2, 3]), np.array([0, 3, 3]), topk=2)
    assert ranks.tolist() == [1, 3]
    assert top.tolist() == [[1, 3], [0, 2]]


def test_positives_constructors_and_errors():
    a = Positives.from_groups([0, 0, 1])
    assert a.pairs()[0].tolist() == [0, 0, 1, 1, 2] and a.pairs()[1].tolist() == [0, 1, 0, 1, 2]
    b = Positives.from_text_image_index([0, 0, 1, 2], n_images=3)
    assert b.csr("i2t")[1].tolist() == [0, 1, 2, 3]
    assert b.csr("t2i")[1].tolist() == [0, 0, 1, 2]
    assert Positives.identity(3).union(Positives.from_groups([5, 5, 6])).image_texts.size == 5
    images, texts = group_pairs(np.array([4, 7, 4]), np.array([7, 4, 9, 4]))
    assert sorted(zip(images.tolist(), texts.tolist())) == [(0, 1), (0, 3), (1, 0), (2, 1), (2, 3)]
    with pytest.raises(EvaluationError, match="without a positive"):
        Positives.from_pairs(3, 3, [0, 1], [0, 1])
    with pytest.raises(EvaluationError, match="out of range"):
        Positives.from_pairs(2, 2, [0, 2], [0, 1])
    with pytest.raises(ValueError, match="unknown direction"):
        a.csr("x2y")


def test_title_groups_fold_case_and_whitespace_like_the_split():
    titles = ["Red  Dress", "red dress", " RED\tDRESS\n", "Red\u00a0Dress", "Blue Shirt", None, None, "", "   "]
    groups = title_groups(titles).tolist()
    assert groups[0] == groups[1] == groups[2] == groups[3] != groups[4]
    # a missing title is never anyone's duplicate; blank titles share one group
    assert len({groups[5], groups[6]} | set(groups[:5])) == 4
    assert groups[7] == groups[8]
    # the split's leakage groups use the same folding (blank and missing titles join no group there)
    assert len({normalise_title(t) for t in titles[:4]}) == 1
    assert normalise_title("   ") is None and normalise_title(None) is None and normalise_title(float("nan")) is None


def test_image_content_groups_are_exact_byte_equality():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 16, 16), dtype=np.uint8)
    images[9] = images[2]
    images[31] = images[2]
    images[40] = images[2]
    images[40, 2, 15, 15] ^= 1  # one byte off, outside the strided sample: not a duplicate
    groups = image_content_groups(ImageCache.from_array(images))
    assert groups[2] == groups[9] == groups[31]
    assert groups[40] != groups[2]
    assert len(set(groups.tolist())) == 48


def test_catalogue_positives_merge_own_title_and_image_rules():
    titles = ["Red Dress", "red  dress", "Blue Shirt", "Green Cap", "Black Belt"]
    images = np.zeros((5, 3, 4, 4), dtype=np.uint8)
    images[2] = 1
    images[3] = 1  # items 2 and 3 show byte-identical images
    images[4] = 2
    cache = ImageCache.from_array(images)
    # item 0 and 1 also share an image, so both rules pair them: the pair must appear once
    positives = catalogue_positives(titles, cache, ["title", "image"])
    pairs = set(zip(*(a.tolist() for a in positives.pairs())))
    assert pairs == {(i, i) for i in range(5)} | {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert positives.image_texts.size == 9
    assert set(zip(*(a.tolist() for a in catalogue_positives(titles, cache, []).pairs()))) == {(i, i) for i in range(5)}
    only_titles = catalogue_positives(titles, None, ["title"])
    assert only_titles.image_texts.size == 7
    with pytest.raises(EvaluationError, match="needs the decoded images"):
        catalogue_positives(titles, None, ["image"])
    with pytest.raises(EvaluationError, match="unknown positives rule 'colour'"):
        catalogue_positives(titles, cache, ["colour"])
