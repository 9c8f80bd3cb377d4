"""The model zoo: configs build offline, parameter counts, save/load round trip, clear errors,
weights verified on every load, byte-stable saves."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors

from lightclip.config import EvaluateConfig, IndexConfig, SplitConfig, SynthConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.split import assign_splits
from lightclip.data.synth import generate_catalogue
from lightclip.evaluation import EvaluateInputs, EvaluateOutputs, run_evaluate
from lightclip.index import IndexInputs, IndexOutputs, Searcher, build_catalogue_index, run_index
from lightclip.models import (
    OUR_ARCHS,
    CorruptWeightsError,
    ModelError,
    ModelSpec,
    canonical_safetensors,
    count_parameters,
    create_model,
    encode_text,
    load_model,
    load_tokenizer,
    make_ensemble,
    read_model_info,
    save_model,
    tokenizer,
    weights_sha256,
)
from lightclip.stage import StageContext
from lightclip.teacher_cache import teacher_weights_sha256

#: (total, non-embedding) parameter ranges in millions; BASELINES.md: 20.8M and 7.4M.
EXPECTED_M = {
    "lc-teacher-vit-s": ((20.6, 21.0), (7.9, 8.3)),
    "lc-vit-t": ((7.3, 7.5), (1.0, 1.1)),
    "lc-vit-xt": ((3.4, 3.7), (0.3, 0.45)),
    "lc-vit-xxt": ((3.2, 3.5), (0.15, 0.2)),
    "lc-resnet18": ((17.5, 18.5), (11.4, 11.9)),
    "lc-test-tiny": ((1.5, 1.7), (0.02, 0.05)),
    "lc-fast": ((3.3, 3.4), (0.17, 0.2)),
    "lc-fast-w128": ((3.6, 3.8), (0.5, 0.57)),
    "lc-test-tiny-pooled": ((1.55, 1.65), (0.02, 0.03)),
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


# -- weights are verified when loaded ------------------------------------------------------------


def flip_middle_bytes(path: Path, count: int = 4) -> None:
    """Invert ``count`` bytes in the middle of a file (inside the tensor data); its size stays."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def corrupt_copy(source: Path, target: Path) -> tuple[Path, str, str]:
    """A copy of a saved model with flipped weight bytes; returns it, the recorded and the new sha256."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    size = weights.stat().st_size
    flip_middle_bytes(weights)
    assert weights.stat().st_size == size
    recorded = read_model_info(target)["weights_sha256"]
    return target, recorded, _sha256_file(weights)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_refused(exc: pytest.ExceptionInfo, model_dir: Path, recorded: str, actual: str) -> None:
    message = str(exc.value)
    assert f"{model_dir / 'model.safetensors'}: weights sha256 {actual} does not match {recorded}" in message
    assert f"recorded in {model_dir / 'model.json'}" in message


def test_model_json_records_the_weights_sha256_and_loading_checks_it(tmp_path):
    """Every reader of a saved model (load, pretrained=, ensembles, the teacher hash) refuses flipped bits."""
    model = _tiny(0)
    good = save_model(model, "lc-test-tiny", tmp_path / "good")
    assert read_model_info(good)["weights_sha256"] == _sha256_file(good / "model.safetensors") == weights_sha256(good)
    bad, recorded, actual = corrupt_copy(good, tmp_path / "bad")
    assert recorded != actual
    for read in (load_model, weights_sha256, teacher_weights_sha256,
                 lambda d: create_model(ModelSpec(arch="lc-test-tiny", pretrained=str(d))),
                 lambda d: make_ensemble([good, d])):
        with pytest.raises(CorruptWeightsError) as exc:
            read(bad)
        assert_refused(exc, bad, recorded, actual)
    assert issubclass(CorruptWeightsError, ModelError)
    # a model.json edited to claim other weights is refused the same way
    info = json.loads((good / "model.json").read_text())
    info["weights_sha256"] = "0" * 64
    (good / "model.json").write_text(json.dumps(info))
    with pytest.raises(CorruptWeightsError, match="does not match 0000"):
        load_model(good)


def test_a_model_saved_without_the_hash_loads_with_a_warning(tmp_path, caplog):
    """Older directories (registered MLflow artifacts among them) still load, unverified, and say so once."""
    model = _tiny(0)
    old = save_model(model, "lc-test-tiny", tmp_path / "old")
    info = json.loads((old / "model.json").read_text())
    del info["weights_sha256"]
    (old / "model.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="lightclip.models.zoo"):
        loaded = load_model(old)
        load_model(old)
    warnings = [r.getMessage() for r in caplog.records if "records no weights_sha256" in r.getMessage()]
    assert len(warnings) == 1 and str(old / "model.safetensors") in warnings[0] and "Re-save the model" in warnings[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.fixture(scope="module")
def integrity_workspace(tmp_path_factory) -> Path:
    """A tiny split catalogue, a tiny model and its index; the model's weights are then flipped in place."""
    root = tmp_path_factory.mktemp("integrity")
    raw = generate_catalogue(root / "raw", SynthConfig(seed=3, n_items=16, image_size=32), progress=False)
    assign_splits(raw, SplitConfig(seed=0, val=4, test=4)).save(root / "split")
    save_model(_tiny(0), "lc-test-tiny", root / "models" / "m")
    index, _ = build_catalogue_index(Catalogue.load(root / "split"), root / "models" / "m", IndexConfig(eval_queries=4), cache_dir=root / "cache")
    index.save(root / "index")
    flip_middle_bytes(root / "models" / "m" / "model.safetensors")
    return root


def _refusal(root: Path) -> tuple[Path, str, str]:
    model_dir = root / "models" / "m"
    return model_dir, read_model_info(model_dir)["weights_sha256"], _sha256_file(model_dir / "model.safetensors")


def test_evaluate_refuses_flipped_weights(integrity_workspace: Path, tmp_path: Path):
    context = StageContext(project_dir=integrity_workspace, progress=False)
    outputs = EvaluateOutputs(metrics=tmp_path / "eval.json", plots=tmp_path / "plots")
    with pytest.raises(CorruptWeightsError) as exc:
        run_evaluate(EvaluateConfig(models={"m": "models/m"}), EvaluateInputs(catalogue=integrity_workspace / "split"), outputs, context)
    assert_refused(exc, *_refusal(integrity_workspace))
    assert not (tmp_path / "eval.json").exists()


def test_search_refuses_flipped_weights_rather_than_calling_the_index_stale(integrity_workspace: Path):
    with pytest.raises(CorruptWeightsError) as exc:
        Searcher(integrity_workspace / "index", integrity_workspace / "models" / "m")
    assert_refused(exc, *_refusal(integrity_workspace))


def test_index_refuses_flipped_weights(integrity_workspace: Path, tmp_path: Path):
    context = StageContext(project_dir=integrity_workspace, progress=False)
    outputs = IndexOutputs(index=tmp_path / "index", metrics=tmp_path / "index.json")
    with pytest.raises(CorruptWeightsError) as exc:
        run_index(IndexConfig(model="models/m", eval_queries=4), IndexInputs(catalogue=integrity_workspace / "split"), outputs, context)
    assert_refused(exc, *_refusal(integrity_workspace))
    assert not (tmp_path / "index").exists()


# -- saves are byte-stable -------------------------------------------------------------------------


def _header(data: bytes) -> tuple[int, bytes]:
    length = int.from_bytes(data[:8], "little")
    return length, data[8 : 8 + length]


def test_canonical_safetensors_sorts_the_header_and_keeps_the_format():
    tensors = {"b": torch.arange(6, dtype=torch.float32), "a": torch.ones(3, dtype=torch.float16), "C": torch.zeros(2, 2, dtype=torch.int64)}
    metadata = {f"key{i}": f"value {i} é" for i in range(8)}
    variants = {canonical_safetensors(tensors, dict(reversed(metadata.items()))) for _ in range(5)}
    variants.add(canonical_safetensors(dict(reversed(tensors.items())), metadata))
    assert len(variants) == 1
    data = variants.pop()
    length, header = _header(data)
    assert length % 8 == 0 and header.decode("utf-8").rstrip(" ").endswith("}")
    parsed = json.loads(header)
    assert list(parsed) == sorted(parsed) and list(parsed["__metadata__"]) == sorted(metadata)
    assert parsed["__metadata__"] == metadata
    loaded = load_safetensors_bytes(data)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    # the tensor bytes are safetensors' own; only the header is re-encoded
    raw = save_safetensors(tensors, metadata=metadata)
    assert data[8 + length :] == raw[8 + _header(raw)[0] :]
    assert canonical_safetensors(tensors)[8:].startswith(b'{"C":')  # no metadata: no __metadata__ entry


SAVE_EVERYWHERE = """
import random, sys
from pathlib import Path
import numpy as np, torch
from torch import nn
from lightclip.config import TrainConfig
from lightclip.distill import projections_bytes
from lightclip.models import ModelSpec, create_model, make_ensemble, save_model
from lightclip.teacher_cache import TeacherEmbeddings
from lightclip.training import CHECKPOINT_FORMAT, _rng_state, make_optimizer, make_scheduler, save_checkpoint

out = Path(sys.argv[1])
spec = ModelSpec(arch="lc-test-tiny")
members = [create_model(spec, seed=seed)[0] for seed in (0, 1)]
for i, member in enumerate(members):
    save_model(member, spec, out / f"member{i}", extra={"stage": "test", "seed": i, "tags": {"z": 1, "a": 2}})
save_model(make_ensemble([out / "member0", out / "member1"]), "ensemble", out / "ensemble", extra={"stage": "ensemble"})

rng = np.random.default_rng(0)
image, text = rng.standard_normal((6, 8), dtype=np.float32), rng.standard_normal((6, 8), dtype=np.float32)
TeacherEmbeddings(ids=tuple(f"id{i}" for i in range(6)), image=image, text=text, image_hflip=image[::-1].copy(), split="train",
                  catalogue_sha256="c" * 64, teacher_sha256="t" * 64, teacher_arch="ensemble(lc-test-tiny x2)", image_size=32,
                  teacher_logit_scale=14.3).save(out / "train.safetensors")

torch.manual_seed(0)
(out / "projections.safetensors").write_bytes(projections_bytes(nn.ModuleDict({"image": nn.Linear(32, 64), "text": nn.Linear(32, 64)}), teacher_dim=64))

random.seed(0); np.random.seed(0); torch.manual_seed(0)
model, config = members[0], TrainConfig(epochs=1, batch_size=2)
optimizer = make_optimizer(model.named_parameters(), config)
scheduler = make_scheduler(optimizer, config, total_steps=4)
model.encode_image(torch.randn(2, 3, 32, 32)).square().mean().backward()
optimizer.step(); scheduler.step()
save_checkpoint(out / "last.pt", {"format": CHECKPOINT_FORMAT, "task": {"model": model.state_dict()}, "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": 1, "epoch": 1, "best_metric": 12.5,
                                  "best_epoch": 1, "bad_epochs": 0, "stopped_early": False, "history": [{"epoch": 1.0, "val/mean_recall": 12.5}],
                                  "config": config.model_dump(mode="json"), "train_seconds": 1.25, "pairs_seen": 2})
"""


@pytest.mark.slow
def test_the_same_state_saved_in_two_processes_gives_the_same_bytes(tmp_path: Path):
    """Weights (single and ensemble), model.json, the teacher cache, projections and a training
    checkpoint, each written by two processes with different hash seeds: identical files."""
    trees = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", SAVE_EVERYWHERE, str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        trees.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    expected = {"ensemble/model.json", "ensemble/model.safetensors", "last.pt", "member0/model.json", "member0/model.safetensors",
                "member1/model.json", "member1/model.safetensors", "projections.safetensors", "train.safetensors"}
    assert set(trees[0]) == set(trees[1]) == expected
    differ = [name for name in sorted(expected) if trees[0][name] != trees[1][name]]
    assert differ == [], f"saved differently by two processes: {differ}"
