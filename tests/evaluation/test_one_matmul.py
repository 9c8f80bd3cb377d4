"""Both directions from one matrix product equal one product per direction, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightclip.evaluation import Positives, evaluate_retrieval, ranks_per_direction
from lightclip.evaluation.one_matmul import ranks_both_ways


def _folding_case(seed: int, noise: float = 0.7, n_images: int = 60, n_texts: int = 90, dim: int = 6):
    """Unit vectors with exact duplicates on both sides (texts repeated within and across tiles),
    several positives per query, and integer-valued pairs that tie exactly. ``noise``: how far a
    text is from an image (small: a strong model, most ranks near the top)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    images[[7, 41]] = images[3]
    text_image = rng.integers(0, n_images, n_texts)
    text_image[:n_images] = np.arange(n_images)  # every image has a caption
    texts = images[text_image] + noise * rng.standard_normal((n_texts, dim)).astype(np.float32)
    texts[[1, 2, 50, n_texts - 1]] = texts[0]  # one vector for four texts, in different tiles
    texts[60:66] = np.round(texts[60:66])  # small integers: exact ties with other small-integer rows
    images[50:56] = np.round(images[50:56])
    extra = max(1, n_texts // 4)
    positives = Positives.from_pairs(
        n_images, n_texts, np.concatenate([text_image, rng.integers(0, n_images, extra)]), np.concatenate([np.arange(n_texts), rng.integers(0, n_texts, extra)])
    )
    norm = torch.nn.functional.normalize
    return norm(torch.from_numpy(images), dim=-1), norm(torch.from_numpy(texts), dim=-1), positives


def _assert_same(got, expected):
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert (got[2] is None and expected[2] is None) or torch.equal(got[2], expected[2])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 7, 256])
@pytest.mark.parametrize("noise", [0.05, 0.7, 5.0])  # text ranks read from the top-k candidates, or counted on whole rows
@pytest.mark.parametrize("topk", [0, 5])
def test_one_matmul_equals_one_per_direction(seed: int, chunk: int, noise: float, topk: int):
    images, texts, positives = _folding_case(seed, noise)
    both = ranks_both_ways(images, texts, positives, chunk=chunk, topk=topk)
    _assert_same(both, ranks_per_direction(images, texts, positives, chunk=chunk, topk=topk))
    # and against Python sorting of float64 similarities (the duplicates tie exactly either way)
    sims = images.double() @ texts.double().T
    for i in range(60):
        order = sorted(range(90), key=lambda j: (-float(sims[i, j]), j))
        keys = set(positives.image_texts[positives.image_ptr[i] : positives.image_ptr[i + 1]].tolist())
        assert int(both[0][i]) == next(pos for pos, j in enumerate(order) if j in keys)


def test_a_text_one_ulp_off_a_duplicate_keeps_its_own_similarity():
    # every product here is exact in float32 whatever the summation order, so the ranks are known
    half_up = float(np.nextafter(np.float32(0.5), np.float32(1)))
    images = torch.eye(3, 4)
    texts = torch.tensor([[0.5, 0.25, 0, 0], [half_up, 0.25, 0, 0], [0.5, 0.25, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    positives = Positives.from_pairs(3, 5, [0, 1, 2, 1, 2], [0, 3, 4, 1, 2])
    # image 0: text 1 (one ulp higher) comes first, its positive text 0 second, then its duplicate text 2
    # text 1: image 0 (0.5 + ulp) before its positive image 1; text 2: images 0 and 1 before image 2
    both = ranks_both_ways(images, texts, positives, topk=2)
    assert both[0].tolist() == [1, 0, 0] and both[1].tolist() == [0, 1, 2, 0, 0]
    assert both[2].tolist() == [[0, 1], [0, 1], [0, 1], [1, 0], [2, 0]]
    _assert_same(both, ranks_per_direction(images, texts, positives, topk=2))


@pytest.mark.parametrize("threads", [1, 2])
def test_one_matmul_over_worker_threads_equals_one_per_direction(threads: int):
    # over 4M similarities the tiles are spread over one worker per torch thread
    images, texts, positives = _folding_case(3, 0.7, n_images=2100, n_texts=2100, dim=16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        both = ranks_both_ways(images, texts, positives, topk=10)
    finally:
        torch.set_num_threads(before)
    _assert_same(both, ranks_per_direction(images, texts, positives, topk=10))


def test_mass_ties_give_the_same_ranks():
    images, texts, positives = _folding_case(0)
    # distinct texts with one sign pattern each, all at the same similarity to every image: the
    # error bands would hold the whole matrix
    signs = np.array([[1.0] + [1.0 if (j >> b) & 1 else -1.0 for b in range(7)] for j in range(90)], dtype=np.float32)
    tied_texts = torch.nn.functional.normalize(torch.from_numpy(signs), dim=-1)
    same_images = torch.zeros((60, 8))
    same_images[:, 0] = 1.0
    both = ranks_both_ways(same_images, tied_texts, positives, topk=3)
    _assert_same(both, ranks_per_direction(same_images, tied_texts, positives, topk=3))
    # every text ties: image i's rank is the lowest index among its positive texts
    assert both[0].tolist() == [int(positives.image_texts[positives.image_ptr[i]]) for i in range(60)]
    m = evaluate_retrieval(same_images, tied_texts, positives)["metrics"]
    assert m["i2t_mean_rank"] == pytest.approx(float(both[0].double().mean()) + 1)


def test_a_matmul_less_precise_than_float32_gives_the_same_ranks(monkeypatch):
    # a reduced-precision matmul mode (bf16 inside float32 products) breaks the float32 error
    # bound the image counts rely on; the result must not change
    images, texts, positives = _folding_case(1)
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out=None: real_mm(a, b, out=out).add_(1e-3))
    _assert_same(ranks_both_ways(images, texts, positives, topk=5), ranks_per_direction(images, texts, positives, topk=5))
