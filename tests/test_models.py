"""The model zoo: configs build offline, parameter counts, save/load round trip, clear errors."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from lightclip.models import (
    OUR_ARCHS,
    ModelError,
    ModelSpec,
    count_parameters,
    create_model,
    encode_text,
    load_model,
    load_tokenizer,
    read_model_info,
    save_model,
    tokenizer,
)

#: (total, non-embedding) parameter ranges in millions; BASELINES.md: 20.8M and 7.4M.
EXPECTED_M = {
    "lc-teacher-vit-s": ((20.6, 21.0), (7.9, 8.3)),
    "lc-vit-t": ((7.3, 7.5), (1.0, 1.1)),
    "lc-vit-xt": ((3.4, 3.7), (0.3, 0.45)),
    "lc-vit-xxt": ((3.2, 3.5), (0.15, 0.2)),
    "lc-resnet18": ((17.5, 18.5), (11.4, 11.9)),
    "lc-test-tiny": ((1.5, 1.7), (0.02, 0.05)),
}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_every_config_is_known_and_counted():
    assert set(OUR_ARCHS) == set(EXPECTED_M)


@pytest.mark.parametrize("arch", sorted(EXPECTED_M))
def test_each_config_builds_offline_with_expected_size(arch, no_network):
    spec = ModelSpec(arch=arch)
    model, pre = create_model(spec, seed=0)
    counts = count_parameters(model)
    (lo, hi), (nlo, nhi) = EXPECTED_M[arch]
    assert lo <= counts["total"] / 1e6 <= hi, counts
    assert nlo <= counts["non_embedding"] / 1e6 <= nhi, counts
    assert pre["size"] == spec.image_size
    assert spec.context_length == 32
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.zeros(2, 3, spec.image_size, spec.image_size))
        text = encode_text(model, tokenizer(spec)(["a photo of a shirt", "Red Tshirt"]))
    assert image.shape == text.shape == (2, spec.embed_dim)


def test_seed_makes_init_reproducible():
    spec = ModelSpec(arch="lc-test-tiny")
    a, _ = create_model(spec, seed=3)
    b, _ = create_model(spec, seed=3)
    c, _ = create_model(spec, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.visual.conv1.weight, c.visual.conv1.weight)


def test_trimmed_text_encoder_matches_open_clip():
    spec = ModelSpec(arch="lc-test-tiny")
    model, _ = create_model(spec, seed=0)
    model.eval()
    tokens = tokenizer(spec)(["Brand Women Red Tshirt", "a photo of shirt", "long " * 40])
    with torch.no_grad():
        torch.testing.assert_close(encode_text(model, tokens[:2]), model.encode_text(tokens[:2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens))


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    spec = ModelSpec(arch="lc-test-tiny")
    model, _ = create_model(spec, seed=0)
    model.eval()
    out = save_model(model, spec, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    info = read_model_info(out)
    assert info["arch"] == "lc-test-tiny" and info["embed_dim"] == 32
    assert info["tokenizer"]["context_length"] == 32 and info["image"]["size"] == 32
    assert len(info["image"]["mean"]) == len(info["image"]["std"]) == 3
    loaded = load_model(out)
    tok = load_tokenizer(out)
    images = torch.rand(2, 3, 32, 32)
    tokens = tok(["red shirt", "blue dress"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    # a saved directory is also a valid `pretrained` source
    again, _ = create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(out)))
    assert torch.equal(again.visual.conv1.weight, model.visual.conv1.weight)


def test_mismatching_checkpoint_is_a_clear_error(tmp_path):
    small, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=0)
    path = tmp_path / "tiny.pt"
    torch.save(small.state_dict(), path)
    with pytest.raises(ModelError) as err:
        create_model(ModelSpec(arch="lc-vit-xt", pretrained=str(path)))
    message = str(err.value)
    assert "do not match" in message and "shape mismatch" in message
    assert "token_embedding.weight: checkpoint (49408, 32) vs model (49408, 64)" in message
    assert "missing key" in message  # the xt model has a second text layer


def test_saved_model_of_another_arch_is_refused(tmp_path):
    spec = ModelSpec(arch="lc-test-tiny")
    model, _ = create_model(spec, seed=0)
    save_model(model, spec, tmp_path / "m")
    with pytest.raises(ModelError, match="holds a 'lc-test-tiny' model"):
        create_model(ModelSpec(arch="lc-vit-xt", pretrained=str(tmp_path / "m")))
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    info["format"] = "pickle"
    (tmp_path / "m" / "model.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match="unknown format"):
        load_model(tmp_path / "m")


def test_unknown_arch_and_pretrained_are_clear_errors(no_network):
    with pytest.raises(ValueError) as err:
        ModelSpec(arch="lc-vit-huge")
    assert "lc-vit-t" in str(err.value) and "open_clip.list_models()" in str(err.value)
    with pytest.raises(ValueError, match="extra"):
        ModelSpec(arch="lc-vit-t", pretrianed=None)
    with pytest.raises(ModelError, match="neither an existing local path nor an open_clip tag"):
        create_model(ModelSpec(arch="lc-vit-t", pretrained="no-such-tag"))


def test_builtin_open_clip_names_are_accepted():
    spec = ModelSpec(arch="RN50")
    assert spec.image_size == 224 and spec.embed_dim == 1024


def _tiny(seed: int):
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=seed)
    return model.eval()


def test_ensemble_is_unit_norm_mean_cosine_and_round_trips(tmp_path):
    from lightclip.models import make_ensemble
    from lightclip.models.ensemble import EnsembleCLIP

    members = [_tiny(0), _tiny(1)]
    for i, m in enumerate(members):
        save_model(m, "lc-test-tiny", tmp_path / f"m{i}")
    ensemble = make_ensemble([tmp_path / "m0", tmp_path / "m1"])
    size = ModelSpec(arch="lc-test-tiny").image_size
    images = torch.randn(4, 3, size, size)
    tokens = tokenizer("lc-test-tiny")(["red dress", "blue shirt", "black shoes", "white tee"])
    with torch.no_grad():
        img, txt = ensemble.encode_image(images), ensemble.encode_text(tokens)
        assert img.shape[-1] == 2 * members[0].lightclip_config["embed_dim"]
        assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
        member_cos = [m.encode_image(images, normalize=True) @ encode_text(m, tokens, normalize=True).T for m in members]
        assert torch.allclose(img @ txt.T, (member_cos[0] + member_cos[1]) / 2, atol=1e-5)
    save_model(ensemble, "ensemble", tmp_path / "ens")
    info = read_model_info(tmp_path / "ens")
    assert info["arch"] == "ensemble(lc-test-tiny x2)" and len(info["ensemble"]["members"]) == 2
    reloaded = load_model(tmp_path / "ens")
    assert isinstance(reloaded, EnsembleCLIP)
    with torch.no_grad():
        assert torch.allclose(reloaded.encode_image(images), img, atol=1e-6)
        assert torch.allclose(reloaded.encode_text(load_tokenizer(tmp_path / "ens")(["red dress"])), txt[:1], atol=1e-6)
    assert count_parameters(reloaded)["total"] == 2 * count_parameters(members[0])["total"]


def test_ensemble_members_must_share_preprocessing(tmp_path):
    from lightclip.models.ensemble import EnsembleCLIP

    other, _ = create_model(ModelSpec(arch="lc-vit-xt"), seed=0)
    with pytest.raises(ModelError, match="preprocesses images differently"):
        EnsembleCLIP([_tiny(0), other])
    with pytest.raises(ModelError, match="at least 2 members"):
        EnsembleCLIP([_tiny(0)])
