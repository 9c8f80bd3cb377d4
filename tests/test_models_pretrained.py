"""Pretrained open_clip weights from a user's download: the hub directory layout, bare checkpoint
files, hf-hub names offline, and checkpoints of another architecture (errors naming the keys)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lightclip.models import ModelError, ModelSpec, arch_config, create_model, read_model_info, save_model
from lightclip.models.zoo import OPEN_CLIP_CONFIG_FILE, tokenizer_settings

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_download(directory: Path, arch: str, state: dict, *, weights: str = "open_clip_pytorch_model.bin", size: int = 32) -> Path:
    """A model directory as ``huggingface-cli download`` leaves an open_clip repo."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": arch_config(arch), "preprocess_cfg": {"mean": MEAN, "std": STD, "size": size, "interpolation": "bilinear"}}
    (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in state.items()}
    if weights.endswith(".safetensors"):
        save_file(tensors, str(directory / weights))
    else:
        torch.save(tensors, directory / weights)
    return directory


@pytest.fixture(scope="module")
def source():
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=7)
    return model


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("weights", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_download_directory_loads_weights_and_its_preprocessing(tmp_path, source, weights, no_network):
    directory = write_download(tmp_path / "download", "lc-test-tiny", source.state_dict(), weights=weights)
    model, preprocess = create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(directory), resize_mode="pad"))
    assert same_weights(model, source)
    assert preprocess["mean"] == MEAN and preprocess["std"] == STD and preprocess["size"] == 32
    assert preprocess["interpolation"] == "bilinear" and preprocess["resize_mode"] == "longest"  # the spec's resize mode wins
    save_model(model, ModelSpec(arch="lc-test-tiny"), tmp_path / "saved")
    info = read_model_info(tmp_path / "saved")
    assert info["image"]["mean"] == MEAN and info["image"]["std"] == STD and info["image"]["interpolation"] == "bilinear"
    assert info["tokenizer"] == tokenizer_settings("lc-test-tiny", arch_config("lc-test-tiny"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".safetensors"])
def test_bare_checkpoint_file_loads_through_open_clip(tmp_path, source, suffix, no_network):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # a DDP trainer's file
    model, preprocess = create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(path)))
    assert same_weights(model, source)
    assert preprocess["size"] == 32  # a bare file carries no preprocessing: the architecture's


def test_nested_model_state_loads_too(tmp_path, source):
    path = tmp_path / "trainer.pt"
    torch.save({"model": source.state_dict(), "epoch": torch.tensor(3)}, path)
    model, _ = create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(path)))
    assert same_weights(model, source)


def test_download_of_another_architecture_names_the_config_keys(tmp_path, source):
    directory = write_download(tmp_path / "download", "lc-test-tiny", source.state_dict())
    with pytest.raises(ModelError) as err:
        create_model(ModelSpec(arch="lc-vit-xt", pretrained=str(directory)))
    message = str(err.value)
    assert "is not a 'lc-vit-xt'" in message and "config key(s) differ" in message
    assert "text_cfg.layers: 2 vs 1" in message and "embed_dim: 128 vs 32" in message


def test_weights_of_another_architecture_name_the_keys_with_counts(tmp_path, source):
    # the config says lc-test-tiny but the weights file holds an lc-vit-xt: missing, unexpected and reshaped keys
    other, _ = create_model(ModelSpec(arch="lc-vit-xt"), seed=0)
    state = {k: v for k, v in other.state_dict().items() if k != "visual.proj"} | {"visual.extra_head.weight": torch.zeros(2, 2)}
    directory = write_download(tmp_path / "download", "lc-test-tiny", state)
    with pytest.raises(ModelError) as err:
        create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(directory)))
    message = str(err.value)
    assert str(directory / "open_clip_pytorch_model.bin") in message and "do not match" in message
    assert "1 missing key(s): visual.proj" in message
    assert "25 unexpected key(s): transformer.resblocks.1." in message  # the second text block, and visual.extra_head.weight
    assert "shape mismatch(es): " in message and "token_embedding.weight: checkpoint (49408, 64) vs model (49408, 32)" in message
    assert "more)" in message  # long lists are cut, with the count of the rest


def test_broken_downloads_are_clear_errors(tmp_path, source):
    directory = write_download(tmp_path / "no-weights", "lc-test-tiny", source.state_dict())
    (directory / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="no weights file"):
        create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(directory)))
    (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(ModelError, match="no 'model_cfg'"):
        create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(directory)))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a loadable weights-only torch checkpoint"):
        create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(junk)))


def test_hf_hub_name_offline_says_to_pass_a_local_directory(no_network):
    with pytest.raises(ModelError) as err:
        create_model(ModelSpec(arch="ViT-B-32", pretrained="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"))
    message = str(err.value)
    assert "could not fetch it from the Hugging Face hub" in message
    assert "huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K --local-dir DIR" in message and "pretrained: DIR" in message


def test_the_identity_of_local_pretrained_weights_follows_their_bytes_not_their_path(tmp_path, source):
    """What checkpoint keys hold: a download replaced at the same path is another run, not a resume."""
    from lightclip.models.zoo import pretrained_identity, weights_sha256

    assert pretrained_identity(None) is None and pretrained_identity("hf-hub:org/name") is None and pretrained_identity("openai") is None
    download = write_download(tmp_path / "dl", "lc-test-tiny", source.state_dict(), weights="open_clip_model.safetensors")
    first = pretrained_identity(str(download))
    assert first == pretrained_identity(str(download)) and len(first) == 64
    other, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=8)
    write_download(download, "lc-test-tiny", other.state_dict(), weights="open_clip_model.safetensors")
    assert pretrained_identity(str(download)) != first
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    before = pretrained_identity(str(file))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(file))
    assert pretrained_identity(str(file)) != before
    saved = save_model(source, "lc-test-tiny", tmp_path / "saved")
    assert pretrained_identity(str(saved)) == weights_sha256(saved)
