"""Retrieval metrics against an independent brute-force reference, a hand-made case, the evaluate stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lightclip.config import EvaluateConfig, SplitConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.evaluation import (
    EvaluationError,
    Positives,
    catalogue_positives,
    evaluate_retrieval,
    image_content_groups,
    ranks_both_ways,
    retrieval_metrics,
    retrieval_ranks,
    run_evaluate,
    title_groups,
    tokenize_checked,
)
from lightclip.imagecache import ImageCache

# -- an independent reference: float64, Python sorting, a dense positive mask ------------------


def _reference(image_emb: np.ndarray, text_emb: np.ndarray, mask: np.ndarray, ks, labels=None, precision_ks=()):
    """Rank = 1-based position of the first positive in the list sorted by (-cosine, index)."""
    img = image_emb.astype(np.float64)
    txt = text_emb.astype(np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sims = np.einsum("id,jd->ij", img, txt)
    out = {}
    for name, s, m in (("i2t", sims, mask), ("t2i", sims.T, mask.T)):
        ranks, tops = [], []
        for q in range(s.shape[0]):
            order = sorted(range(s.shape[1]), key=lambda j: (-s[q, j], j))
            ranks.append(next(pos for pos, j in enumerate(order) if m[q, j]) + 1)
            tops.append(order)
        ranks = np.array(ranks)
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * np.mean(ranks <= k)
        out[f"{name}_median_rank"] = float(np.median(ranks))
        out[f"{name}_mean_rank"] = float(np.mean(ranks))
        if name == "t2i" and labels:
            for attr, lab in labels.items():
                for k in precision_ks:
                    values = [np.mean([lab[j] == lab[q] for j in tops[q][:k]]) for q in range(len(lab)) if lab[q] is not None]
                    out[f"t2i_P@{k}_{attr}"] = 100.0 * np.mean(values)
    out["mean_recall"] = np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks])
    return out, sims


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
def test_metrics_match_brute_force_reference(seed: int, chunk: int):
    images, texts, mask = _random_case(seed)
    labels_a = [None if i % 9 == 0 else f"type{i % 4}" for i in range(40)]
    ref, sims = _reference(images, texts, mask, (1, 5, 10))
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
    ref_p, _ = _reference(items_img, items_txt, np.eye(40, dtype=bool), (1, 5, 10), labels={"articleType": labels_a}, precision_ks=(1, 3, 5))
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


def test_positives_constructors_and_errors():
    a = Positives.from_groups([0, 0, 1])
    assert a.pairs()[0].tolist() == [0, 0, 1, 1, 2] and a.pairs()[1].tolist() == [0, 1, 0, 1, 2]
    b = Positives.from_text_image_index([0, 0, 1, 2], n_images=3)
    assert b.csr("i2t")[1].tolist() == [0, 1, 2, 3]
    assert Positives.identity(3).union(Positives.from_groups([5, 5, 6])).image_texts.size == 5
    with pytest.raises(EvaluationError, match="without a positive"):
        Positives.from_pairs(3, 3, [0, 1], [0, 1])
    with pytest.raises(EvaluationError, match="no items"):
        evaluate_retrieval(torch.zeros((0, 4)), torch.zeros((0, 4)))
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate_retrieval(torch.full((2, 2), float("nan")), torch.ones((2, 2)))


def test_long_titles_are_truncated_visibly():
    from lightclip.models.zoo import tokenizer

    tok = tokenizer("lc-test-tiny")  # context 32: 30 BPE tokens between start and end
    exact = " ".join(["red"] * 30)
    long = " ".join(["red"] * 31)
    tokens, truncated = tokenize_checked(tok, ["blue shirt", exact, long])
    assert truncated.tolist() == [False, False, True]
    assert torch.equal(tokens[1], tokens[2])  # the tail past the context is dropped (open_clip's rule)


# -- the stage on a tiny catalogue -------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from lightclip.models.zoo import ModelSpec, create_model, save_model

    root = tmp_path_factory.mktemp("evaluate")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=1, n_items=48, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=8, test=16)).save(root / "split")
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    save_model(model, "lc-test-tiny", root / "models" / "teacher")
    return root


def test_evaluate_stage_writes_metrics_plots_and_figures(workspace: Path, tmp_path: Path):
    catalogue = Catalogue.load(workspace / "split")
    config = EvaluateConfig(models={"teacher": "models/teacher", "twin": str(workspace / "models" / "teacher")})
    results, figures = run_evaluate(
        catalogue, config, project_dir=workspace, cache_dir=workspace / "cache",
        metrics_path=tmp_path / "eval.json", plots_dir=tmp_path / "plots", figures_dir=tmp_path / "fig",
    )
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert set(metrics) == {"teacher", "twin"}
    m = metrics["teacher"]
    for key in ("test/i2t_R@1", "test/t2i_R@10", "test/mean_recall", "test/i2t_median_rank", "test/t2i_mean_rank",
                "test/t2i_P@10_articleType", "test/t2i_P@5_articleType_baseColour", "test/n_items", "timing/encode_ms_per_item"):
        assert key in m, key
    assert m["test/n_items"] == 16 and m["model_dir"] == "models/teacher"
    assert metrics["twin"]["test/mean_recall"] == m["test/mean_recall"]  # same weights, same numbers
    curve = (tmp_path / "plots" / "recall_at_k" / "teacher.csv").read_text().splitlines()
    assert curve[0] == "k,i2t_recall,t2i_recall" and len(curve) == 1 + len(config.curve_ks)
    assert (tmp_path / "plots" / "recall_vs_latency.csv").read_text().startswith("model,encode_ms_per_item,mean_recall")
    assert all(f.is_file() and f.stat().st_size > 1000 for f in figures)
    # the timings are recorded (their ratio on a 10k split is lightclip bench's check; on 16
    # items fixed costs of a few ms decide it either way)
    timings = results[0].timings
    assert timings["metric_seconds"] > 0 and timings["embed_seconds"] > 0
    assert timings["metric_share_of_embed"] == pytest.approx(timings["metric_seconds"] / timings["embed_seconds"])


def test_evaluate_bad_inputs_are_clear_errors(workspace: Path, tmp_path: Path):
    catalogue = Catalogue.load(workspace / "split")
    kwargs = dict(project_dir=workspace, cache_dir=workspace / "cache", metrics_path=tmp_path / "m.json", plots_dir=tmp_path / "p", figures_dir=None)
    with pytest.raises(EvaluationError, match="student: models/students/s1 does not exist"):
        run_evaluate(catalogue, EvaluateConfig(models={"teacher": "models/teacher", "student": "models/students/s1"}), **kwargs)
    no_test = catalogue.with_items(catalogue.items.assign(split="train"))
    with pytest.raises(EvaluationError, match="split 'test' has no items"):
        run_evaluate(no_test, EvaluateConfig(models={"teacher": "models/teacher"}), **kwargs)
    assert not (tmp_path / "m.json").exists()


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
        order = sorted(range(n_keys), key=lambda j: (-sims[q, j], j))
        assert int(ranks[q]) == order.index(int(positive[q]))
        assert top[q].tolist() == order[:3]


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


def test_attribute_labels_treat_blank_and_missing_alike():
    labels = ["Dress", None, float("nan"), "  ", "Shirt", "Dress", pd.NA]
    images = np.eye(7, dtype=np.float32)
    m = evaluate_retrieval(images, images, attributes={"articleType": [labels]}, precision_ks=(1, 2))["metrics"]
    # only the three labelled items count; each finds itself first (P@1 = 100), at P@2 the next
    # key by index: Dress(0) -> item 1 (missing, a miss), Shirt(4) -> 0 (Dress), Dress(5) -> 0 (Dress)
    assert m["t2i_P@1_articleType"] == pytest.approx(100.0)
    assert m["t2i_P@2_articleType"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)


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
        row = sims[q].tolist()
        assert top[q].tolist() == sorted(range(n_keys), key=lambda j: (-row[j], j))[:10]


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
    import lightclip.evaluation

    monkeypatch.setattr(lightclip.evaluation, "_THREADED_SIMILARITIES", 0 if threaded else 10**12)
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
    from lightclip.evaluation import _equal_rows

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((500, 7)).astype(np.float32)  # 28 bytes a row: not whole words
    rows[[40, 41, 499]] = rows[3]
    rows[60] = rows[3]
    rows[60, 6] = np.nextafter(rows[3, 6], np.float32(np.inf))  # one ulp away: not a duplicate
    groups = _equal_rows(rows)
    assert groups[3] == groups[40] == groups[41] == groups[499] != groups[60]
    assert len(set(groups.tolist())) == 497
    assert groups[0] == 0 and groups[1] == 1  # first-seen order
