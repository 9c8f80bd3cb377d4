"""Both directions from one matrix product equal one product per direction (placeholder until measured)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightclip.evaluation import Positives, evaluate_retrieval, retrieval_ranks
from lightclip.evaluation.one_matmul import _equal_rows, ranks_both_ways


def _folding_case(seed: int, noise: float = 0.7):
    """Unit vectors with exact duplicates on both sides (texts repeated within and across tiles),
    several positives per query, and integer-valued pairs that tie exactly. ``noise``: how far a
    text is from an image (small: a strong model, most ranks near the top)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((60, 6)).astype(np.float32)
    images[[7, 41]] = images[3]
    text_image = rng.integers(0, 60, 90)
    text_image[:60] = np.arange(60)  # every image has a caption
    texts = images[text_image] + noise * rng.standard_normal((90, 6)).astype(np.float32)
    texts[[1, 2, 50, 89]] = texts[0]  # one vector for four texts, in different tiles
    texts[60:66] = np.round(texts[60:66])  # small integers: exact ties with other small-integer rows
    images[50:56] = np.round(images[50:56])
    positives = Positives.from_pairs(60, 90, np.concatenate([text_image, rng.integers(0, 60, 25)]), np.concatenate([np.arange(90), rng.integers(0, 90, 25)]))
    norm = torch.nn.functional.normalize
    return norm(torch.from_numpy(images), dim=-1), norm(torch.from_numpy(texts), dim=-1), positives


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk", [1, 7, 256])
@pytest.mark.parametrize("noise", [0.05, 0.7, 5.0])  # text ranks read from the top-k candidates, or counted on whole rows
@pytest.mark.parametrize("threaded", [False, True])  # tiles in this thread, or spread over torch's threads
def test_one_matmul_equals_one_per_direction(seed: int, chunk: int, noise: float, threaded: bool, monkeypatch):
    import lightclip.evaluation.one_matmul

    monkeypatch.setattr(lightclip.evaluation.one_matmul, "_THREADED_SIMILARITIES", 0 if threaded else 10**12)
    images, texts, positives = _folding_case(seed, noise)
    both = ranks_both_ways(images, texts, positives, chunk=chunk, topk=5)
    assert both is not None  # no fallback on ordinary embeddings
    i2t, t2i, top = both
    ref_i2t, _ = retrieval_ranks(images, texts, *positives.csr("i2t"), chunk=chunk)
    ref_t2i, ref_top = retrieval_ranks(texts, images, *positives.csr("t2i"), chunk=chunk, topk=5)
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i) and torch.equal(top, ref_top)
    # and against Python sorting of float64 similarities (the duplicates tie exactly either way)
    sims = images.double() @ texts.double().T
    for i in range(60):
        order = sorted(range(90), key=lambda j: (-float(sims[i, j]), j))
        keys = set(positives.image_texts[positives.image_ptr[i] : positives.image_ptr[i + 1]].tolist())
        assert int(i2t[i]) == next(pos for pos, j in enumerate(order) if j in keys)


def test_one_matmul_falls_back_when_it_cannot_prove_its_bounds(monkeypatch):
    images, texts, positives = _folding_case(0)
    # mass ties between distinct texts (one sign pattern each, the same similarity to every
    # image): the bands would hold the whole matrix
    signs = np.array([[1.0] + [1.0 if (j >> b) & 1 else -1.0 for b in range(7)] for j in range(90)], dtype=np.float32)
    tied_texts = torch.nn.functional.normalize(torch.from_numpy(signs), dim=-1)
    same_images = torch.zeros((60, 8))
    same_images[:, 0] = 1.0
    assert ranks_both_ways(same_images, tied_texts, positives) is None
    # a matmul less precise than float32 (e.g. a reduced-precision mode) breaks the error bound
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out=None: real_mm(a, b, out=out).add_(1e-3))
    assert ranks_both_ways(images, texts, positives) is None
    monkeypatch.undo()
    # evaluate_retrieval answers either way (one matmul per direction)
    ranks, _ = retrieval_ranks(same_images, tied_texts, *positives.csr("i2t"))
    m = evaluate_retrieval(same_images, tied_texts, positives)["metrics"]
    assert m["i2t_mean_rank"] == pytest.approx(float(ranks.double().mean()) + 1)
    # every text ties: image i's rank is the lowest index among its positive texts
    assert ranks.tolist() == [int(positives.image_texts[positives.image_ptr[i]]) for i in range(60)]


def test_equal_rows_groups_exact_duplicates_only():

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((500, 7)).astype(np.float32)  # 28 bytes a row: not whole words
    rows[[40, 41, 499]] = rows[3]
    rows[60] = rows[3]
    rows[60, 6] = np.nextafter(rows[3, 6], np.float32(np.inf))  # one ulp away: not a duplicate
    groups = _equal_rows(rows)
    assert groups[3] == groups[40] == groups[41] == groups[499] != groups[60]
    assert len(set(groups.tolist())) == 497
    assert groups[0] == 0 and groups[1] == 1  # first-seen order
