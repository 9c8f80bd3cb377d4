"""Losses: CLIP equals open_clip's, FashionKLIP concept alignment behaves."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from lightclip.losses import clip_loss, combine_with_concept, concept_alignment_loss, get_logits


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_clip_loss_equals_open_clip():
    image, text = _unit(24, 16, seed=1), _unit(24, 16, seed=2)
    scale = torch.tensor(14.2857)
    torch.testing.assert_close(clip_loss(image, text, scale), open_clip.ClipLoss()(image, text, scale))
    image.requires_grad_(True)
    ours = torch.autograd.grad(clip_loss(image, text, scale), image)[0]
    theirs = torch.autograd.grad(open_clip.ClipLoss()(image, text, scale), image)[0]
    torch.testing.assert_close(ours, theirs)
    terms = clip_loss(image, text, scale, return_terms=True)
    assert set(terms) == {"contrastive_loss"}
    per_image, per_text = get_logits(image, text, scale)
    torch.testing.assert_close(per_image.T, per_text)


def _concept_case(aligned: bool, seed: int = 0):
    B, C, P, D = 12, 5, 4, 32
    texts = _unit(C, D, seed=seed)
    ids = torch.full((B, 3), -1, dtype=torch.long)
    ids[:, 0] = torch.arange(B) % C
    if aligned:
        noise = 0.1 * torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 1))
        images = F.normalize(texts[ids[:, 0]] + noise, dim=-1)
        protos = F.normalize(texts[:, None, :] + 0.1 * torch.randn(C, P, D, generator=torch.Generator().manual_seed(seed + 2)), dim=-1)
    else:
        images, protos = _unit(B, D, seed=seed + 3), _unit(C, P, D, seed=seed + 4)
    return images, texts, ids, protos


def test_concept_loss_lower_when_aligned():
    scale = torch.tensor(10.0)
    for seed in range(3):
        aligned = concept_alignment_loss(*_concept_case(True, seed)[:3], scale, prototype_emb=_concept_case(True, seed)[3], return_terms=True)
        images, texts, ids, protos = _concept_case(False, seed)
        random = concept_alignment_loss(images, texts, ids, scale, prototype_emb=protos, return_terms=True)
        for term in ("concept", "concept_prototype", "concept_image"):
            assert aligned[term] < random[term] - 0.5, (term, aligned, random)


def test_weight_zero_skips_the_computation():
    # inputs that would fail if touched: no concept texts, ids of the wrong shape
    out = concept_alignment_loss(torch.zeros(4, 8), None, torch.zeros(3), 1.0, prototype_weight=0.0, image_weight=0.0, return_terms=True)
    assert set(out) == {"concept", "concept_prototype", "concept_image"} and all(float(v) == 0.0 for v in out.values())
    assert float(concept_alignment_loss(torch.zeros(4, 8), None, torch.zeros(3), 1.0, prototype_weight=0, image_weight=0)) == 0.0
    with pytest.raises(ValueError, match="concept_text_emb is required"):
        concept_alignment_loss(torch.zeros(4, 8), None, torch.zeros(3), 1.0)
    clip = torch.tensor(2.0)
    assert combine_with_concept(clip, torch.tensor(float("nan")), weight=0.0) is clip


def test_padding_slots_are_ignored():
    images, texts, ids, protos = _concept_case(False)
    scale = torch.tensor(10.0)
    base = concept_alignment_loss(images, texts, ids, scale, prototype_emb=protos, return_terms=True)
    # extra concepts in the table that only padding would point to, and garbage prototypes
    # behind a False mask, change nothing
    texts_more = torch.cat([texts, _unit(3, texts.shape[1], seed=9)])
    protos_more = torch.cat([protos, _unit(3, protos.shape[1], protos.shape[2], seed=10)])
    padded = ids.clone()
    padded[:, 2] = -1
    same = concept_alignment_loss(images, texts_more[: texts.shape[0]], padded, scale, prototype_emb=protos_more[: texts.shape[0]], return_terms=True)
    for term in base:
        torch.testing.assert_close(base[term], same[term])
    # a slot with weight 0 counts as padding
    weighted = ids.clone()
    weighted[:, 1] = 3
    weights = torch.ones(ids.shape)
    weights[:, 1] = 0.0
    zeroed = concept_alignment_loss(images, texts, weighted, scale, prototype_emb=protos, slot_weights=weights, return_terms=True)
    for term in base:
        torch.testing.assert_close(base[term], zeroed[term])
    # masked-out prototypes never matter, whatever their values
    mask = torch.ones(protos.shape[:2], dtype=torch.bool)
    mask[:, -1] = False
    scrambled = protos.clone()
    scrambled[:, -1] = _unit(protos.shape[0], protos.shape[2], seed=11)
    a = concept_alignment_loss(images, texts, ids, scale, prototype_emb=protos, prototype_mask=mask, return_terms=True)
    b = concept_alignment_loss(images, texts, ids, scale, prototype_emb=scrambled, prototype_mask=mask, return_terms=True)
    torch.testing.assert_close(a["concept_prototype"], b["concept_prototype"])


def test_all_padding_gives_zero_with_a_graph():
    images = _unit(4, 8).requires_grad_(True)
    texts = _unit(2, 8, seed=1).requires_grad_(True)
    loss = concept_alignment_loss(images, texts, torch.full((4, 2), -1), 10.0)
    assert float(loss.detach()) == 0.0
    loss.backward()  # no error: connected to the inputs


def test_gradients_are_finite_and_prototypes_detached():
    images, texts, ids, protos = _concept_case(False)
    ids[:, 1] = (torch.arange(ids.shape[0]) + 1) % texts.shape[0]
    images.requires_grad_(True)
    texts.requires_grad_(True)
    protos.requires_grad_(True)
    mask = torch.rand(protos.shape[:2], generator=torch.Generator().manual_seed(0)) > 0.4
    loss = concept_alignment_loss(images, texts, ids, torch.tensor(10.0), prototype_emb=protos, prototype_mask=mask, top_k=2)
    loss.backward()
    assert torch.isfinite(images.grad).all() and torch.isfinite(texts.grad).all()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0
    assert protos.grad is None


def test_own_image_is_never_its_prototype():
    images, texts, ids, protos = _concept_case(True)
    B, P = images.shape[0], protos.shape[1]
    proto_items = torch.arange(texts.shape[0] * P).view(-1, P) + 100
    # make item 0 the first prototype of its concept, with its own embedding: a trivial match
    c0 = int(ids[0, 0])
    protos = protos.clone()
    protos[c0, 0] = images[0]
    proto_items[c0, 0] = 0
    with_self = concept_alignment_loss(images, texts, ids, 10.0, prototype_emb=protos, top_k=1, image_weight=0.0)
    without = concept_alignment_loss(
        images, texts, ids, 10.0, prototype_emb=protos, prototype_item_ids=proto_items, item_ids=torch.arange(B), top_k=1, image_weight=0.0
    )
    assert not torch.isclose(with_self, without)


def test_adaptive_weighting_matches_reference():
    clip, concept = torch.tensor(3.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    total = combine_with_concept(clip, concept, weight=0.2, adaptive=True)
    a = 0.2 * 3.0 / 1.5
    assert float(total.detach()) == pytest.approx((1 - a) * 3.0 + a * 1.5)
    total.backward()
    assert float(clip.grad) == pytest.approx(1 - a) and float(concept.grad) == pytest.approx(a)
