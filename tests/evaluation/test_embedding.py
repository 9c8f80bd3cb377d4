"""The shared embedding path: same numbers as the model's own encoders, eval mode, no grad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightclip.evaluation import EvaluationError, embed_images, embed_pairs, embed_split, embed_texts, tokenize_checked
from lightclip.imagecache import ImageCache, normalise
from lightclip.models.zoo import ModelSpec, create_model, encode_text, preprocess_config, tokenizer

TITLES = ["red shirt", "blue summer dress with a long title", "cap", "black leather belt", "green sneakers", "pink bag", "grey scarf"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def images(model) -> np.ndarray:
    size = int(preprocess_config(model)["size"])
    return np.random.default_rng(0).integers(0, 256, (7, 3, size, size), dtype=np.uint8)


def _by_hand(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> torch.Tensor:
    pre = preprocess_config(model)
    with torch.no_grad():
        return torch.cat([
            model.encode_image(normalise(torch.from_numpy(images[s : s + batch_size].copy()), pre["mean"], pre["std"]), normalize=True).float()
            for s in range(0, len(images), batch_size)
        ])


def test_images_from_a_cache_an_array_or_a_tensor_embed_bit_identically(model, images):
    expected = _by_hand(model, images, 3)
    for source in (ImageCache.from_array(images), images, torch.from_numpy(images)):
        got = embed_images(model, source, 3)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.allclose(expected.norm(dim=1), torch.ones(7))
    flipped = embed_images(model, images, 3, hflip=True)
    assert torch.equal(flipped, _by_hand(model, images[..., ::-1], 3))
    assert not torch.equal(flipped, expected)


def test_texts_embed_bit_identically_batch_by_batch(model):
    tokens = tokenizer("lc-test-tiny")(TITLES)
    got = embed_texts(model, tokens, 3)
    with torch.no_grad():
        expected = torch.cat([encode_text(model, tokens[s : s + 3], normalize=True).float() for s in range(0, 7, 3)])
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.allclose(got.norm(dim=1), torch.ones(7))
    assert embed_texts(model, tokens[:0]).shape == (0, 0)


def test_the_model_runs_in_eval_mode_without_grad_and_keeps_its_mode(model, images):
    seen: list[bool] = []
    handle = model.visual.register_forward_hook(lambda module, args, out: seen.append(module.training or torch.is_grad_enabled()))
    model.train()
    try:
        out = embed_images(model, images, 4)
    finally:
        handle.remove()
        model.eval()
    assert seen == [False, False]  # two batches, each in eval mode with grad off
    assert not out.requires_grad
    model.train()
    embed_texts(model, tokenizer("lc-test-tiny")(TITLES))
    assert model.training
    model.eval()


def test_pairs_and_split_embed_both_sides(model, images):
    tok = tokenizer("lc-test-tiny")
    image_emb, text_emb = embed_pairs(model, images, tok(TITLES), 4)
    assert torch.equal(image_emb, embed_images(model, images, 4)) and torch.equal(text_emb, embed_texts(model, tok(TITLES), 4))
    split = embed_split(model, tok, ImageCache.from_array(images), TITLES, 4)
    assert torch.equal(split.images, image_emb) and torch.equal(split.texts, text_emb)
    assert split.image_seconds > 0 and split.text_seconds > 0 and split.truncated.tolist() == [False] * 7
    with pytest.raises(EvaluationError, match="7 images but 2 texts"):
        embed_pairs(model, images, tok(TITLES[:2]))


def test_images_of_the_wrong_size_or_type_are_refused(model, images):
    with pytest.raises(EvaluationError, match="the model expects"):
        embed_images(model, images[..., :-1, :-1])
    with pytest.raises(EvaluationError, match="expected uint8"):
        embed_images(model, images.astype(np.float32))


def test_long_titles_are_truncated_visibly():
    tok = tokenizer("lc-test-tiny")  # context 32: 30 BPE tokens between start and end
    exact = " ".join(["red"] * 30)
    long = " ".join(["red"] * 31)
    tokens, truncated = tokenize_checked(tok, ["blue shirt", exact, long])
    assert truncated.tolist() == [False, False, True]
    assert torch.equal(tokens[1], tokens[2])  # the tail past the context is dropped (open_clip's rule)
