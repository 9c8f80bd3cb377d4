"""The pooled-embedding text tower: one model like any other to build, save, load, export and distill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightclip.evaluation import embed_texts
from lightclip.models.common import ModelError, encode_text
from lightclip.models.onnx_runtime import export_onnx, load_runtime_model
from lightclip.models.pooled_text import PooledTextCLIP
from lightclip.models.zoo import ModelSpec, arch_config, build_from_config, count_parameters, create_model, load_model, save_model, tokenizer

ARCH = "lc-test-tiny-pooled"
TITLES = ["red floral midi dress", "men navy blue slim fit jeans", "black leather watch", "kurta"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = create_model(ModelSpec(arch=ARCH), seed=0)
    return save_model(model, ARCH, tmp_path_factory.mktemp("pooled") / "model")


def test_the_architecture_builds_a_pooled_text_model_that_saves_and_loads_exactly(saved: Path):
    model, loaded = create_model(ModelSpec(arch=ARCH), seed=0)[0], load_model(saved)
    assert isinstance(loaded, PooledTextCLIP)
    tokens = tokenizer(ARCH)(TITLES)
    assert torch.equal(encode_text(loaded, tokens), encode_text(model, tokens))
    assert encode_text(loaded, tokens, normalize=True).shape == (len(TITLES), 32)
    counts = count_parameters(loaded)
    # the embeddings are the token table and the image tower's positions, nothing else
    assert counts["total"] - counts["non_embedding"] == 49408 * 32 + loaded.visual.positional_embedding.numel()


def test_padding_after_the_end_of_text_token_never_changes_a_title(saved: Path):
    model = load_model(saved)
    tokens = tokenizer(ARCH)(TITLES)
    end = int(tokens.argmax(dim=1).max()) + 1
    reference = model.encode_text(tokens)
    assert torch.allclose(model.encode_text(tokens[:, :end]), reference, atol=1e-6)  # cut after the end token
    noisy = tokens.clone()
    for row, last in enumerate(tokens.argmax(dim=1).tolist()):
        noisy[row, last + 1:] = 400  # any id after the end token is padding
    assert torch.allclose(model.encode_text(noisy), reference, atol=1e-6)
    changed = tokens.clone()
    changed[0, 1] = 400  # a word before it is not
    assert not torch.allclose(model.encode_text(changed)[0], reference[0])


def test_a_bad_text_tower_config_is_a_clear_error():
    config = arch_config(ARCH)
    with pytest.raises(ModelError, match=r"unknown text_tower 'bag'.*'pooled'"):
        build_from_config({**config, "text_tower": "bag"})
    with pytest.raises(ModelError, match=r"unknown text_cfg key\(s\) \['layers'\]"):
        build_from_config({**config, "text_cfg": {**config["text_cfg"], "layers": 2}})


def test_the_onnx_export_gives_the_pytorch_vectors(saved: Path):
    info = export_onnx(saved)
    assert min(info["probe_worst_cosine"].values()) >= 0.999 and info["text_cut_after_end_of_text"] is False
    tokens = tokenizer(ARCH)(TITLES)
    ours = embed_texts(load_runtime_model(saved, "onnx", threads=1), tokens, 3)
    reference = embed_texts(load_model(saved), tokens, 3)
    assert float((ours * reference).sum(dim=1).min()) >= 0.999
