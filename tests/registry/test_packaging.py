"""What goes into a registered version: the models-from-code pyfunc (loaded here and in a fresh
process, it returns the Embedder's vectors), its tags and card, the gate's evidence."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from lightclip.config import load_params
from lightclip.registry import packaging
from lightclip.registry.gate import Evidence
from lightclip.serving import Embedder, ServingError

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDENT = "lightclip-student"


def _download(source: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(source, tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))


def test_the_logged_model_is_code_weights_and_pinned_requirements(staged):
    v = staged.registry().version(STUDENT, "@staging")
    local = _download(v.source)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert (local / "serving.py").read_bytes() == (REPO_ROOT / "src" / "lightclip" / "serving.py").read_bytes()
    shipped = local / "code" / "lightclip"
    assert (shipped / "registry" / "stage.py").is_file() and (shipped / "serving.py").is_file()
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("__pycache__"))
    assert sorted(p.name for p in (local / "artifacts" / "model").iterdir()) == ["model.json", "model.safetensors"]
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == packaging.pip_requirements() and all("==" in r for r in requirements)
    assert [r.split("==")[0] for r in requirements] == list(packaging.PIP_PACKAGES)
    assert [c["name"] for c in json.loads(mlmodel["signature"]["inputs"])] == ["text", "image"]
    assert json.loads(mlmodel["signature"]["outputs"])[0]["tensor-spec"]["shape"] == [-1, 32]
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["text", "image"] and len(example["data"]) == 3


def test_the_registered_pyfunc_returns_the_embedders_vectors(staged, assets: Path, mixed_request: pd.DataFrame):
    model = mlflow.pyfunc.load_model(f"models:/{STUDENT}@staging")
    vectors = model.predict(mixed_request)
    expected = Embedder(assets / "models" / "students" / "a").embed_frame(mixed_request)
    assert vectors.shape == (8, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-6)


def test_fresh_process_loads_staging_and_returns_the_same_embeddings(staged, assets: Path, mixed_request: pd.DataFrame, tmp_path: Path):
    mixed_request.to_json(tmp_path / "request.json", orient="split")
    script = (
        "import json, sys, numpy as np, pandas as pd, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/lightclip-student@staging')\n"
        "frame = pd.read_json(sys.argv[1], orient='split')\n"
        "frame = frame.astype(object).where(frame.notna(), None)\n"
        "np.save(sys.argv[2], model.predict(frame))\n"
        "import lightclip\n"
        "print(json.dumps({'lightclip': lightclip.__file__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "request.json"), str(tmp_path / "out.npy")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = np.load(tmp_path / "out.npy")
    expected = Embedder(assets / "models" / "students" / "a").embed_frame(mixed_request)
    assert fresh.shape == (8, 32) and fresh.dtype == np.float32
    np.testing.assert_allclose(fresh, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-5)
    # The fresh process ran the package shipped inside the model, not this checkout.
    shipped = json.loads(result.stdout.strip().splitlines()[-1])["lightclip"]
    assert str(REPO_ROOT) not in shipped and f"code{os.sep}lightclip" in shipped


def test_serving_contract_and_bad_rows(assets: Path, mixed_request: pd.DataFrame):
    embedder = Embedder(assets / "models" / "students" / "a")
    frame = mixed_request
    mixed = embedder.embed_frame(frame)
    as_bytes = frame.assign(image=[None] * 4 + [base64.b64decode(b) for b in frame["image"][4:]])
    np.testing.assert_allclose(embedder.embed_frame(as_bytes), mixed, atol=1e-6)
    np.testing.assert_allclose(mixed[:4], embedder.embed_texts(list(frame["text"][:4])), atol=1e-6)
    np.testing.assert_allclose(embedder.embed_frame(pd.DataFrame({"image": frame["image"][4:].tolist()})), mixed[4:], atol=1e-6)
    assert embedder.embed_frame(pd.DataFrame({"text": []})).shape == (0, 32)
    bad = [
        (pd.DataFrame({"text": ["a"], "image": [frame["image"][4]]}), "row 0: has both"),
        (pd.DataFrame({"text": [None]}), "row 0: has neither"),
        (pd.DataFrame({"title": ["a"]}), "unknown column(s) ['title']"),
        (pd.DataFrame({"image": ["not base64!"]}), "row 0: column 'image' is a string but not base64"),
        (pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}), "row 0: column 'image': cannot decode image"),
    ]
    for request, message in bad:
        with pytest.raises(ServingError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            embedder.embed_frame(request)


def test_encode_latency_is_measured_on_the_requested_threads_and_restores_them(assets: Path):
    before = torch.get_num_threads()
    speed = packaging.measure_encode_latency(assets / "models" / "students" / "a", runs=4, warmup=1, threads=1)
    assert torch.get_num_threads() == before
    assert set(speed) == {"encode_ms_p50", "encode_ms_p95", "runs", "threads"}
    assert speed["runs"] == 4.0 and speed["threads"] == 1.0 and 0 < speed["encode_ms_p50"] <= speed["encode_ms_p95"]


def test_test_set_fingerprint_follows_the_split(assets: Path):
    split = assets / "data" / "split"
    test, n_test = packaging.test_set_fingerprint(split, "test")
    assert (test, n_test) == packaging.test_set_fingerprint(split, "test") and n_test == 8 and len(test) == 16
    val, n_val = packaging.test_set_fingerprint(split, "val")
    assert val != test and n_val == 4


def test_params_hash_covers_every_param():
    params = load_params(REPO_ROOT / "params.yaml")
    digest = packaging.params_hash(params)
    assert len(digest) == 16 and int(digest, 16) >= 0 and digest == packaging.params_hash(load_params(REPO_ROOT / "params.yaml"))
    changed = params.model_copy(update={"promote": params.promote.model_copy(update={"max_regression": 2.0})})
    assert packaging.params_hash(changed) != digest


def test_version_tags_carry_the_gates_evidence_and_the_card_says_where_it_came_from():
    metrics = {"test/mean_recall": 57.0, "test/i2t_R@1": 28.5, "test/i2t_R@5": 57.0, "test/i2t_R@10": 67.0, "test/t2i_R@1": 28.5,
               "test/t2i_R@5": 57.0, "test/t2i_R@10": 67.0, "test/n_items": 8, "test/t2i_P@10_articleType": 40.0}
    speed = {"encode_ms_p50": 3.25, "encode_ms_p95": 4.5, "runs": 30.0, "threads": 1.0}
    lineage = {"git_commit": "abc", "git_dirty": "false", "data_hash": "d" * 32, "params_hash": "p" * 16, "test_set": "t" * 16,
               "weights_sha256": "w" * 64}
    teacher = {"ref": "lightclip-teacher/3", "mean_recall": 60.0}
    tags = packaging.version_tags(name="xt", role="student", arch="lc-tiny", model_dir="models/students/xt", metrics=metrics, split="test",
                                  speed=speed, lineage=lineage, teacher=teacher, run_id="r1", registered_at="now", registered_by="me")
    assert Evidence.from_tags("7", tags) == Evidence(version="7", mean_recall=57.0, teacher_mean_recall=60.0, encode_ms=3.25, test_set="t" * 16)
    assert tags["lightclip.weights_sha256"] == "w" * 64 and tags["lightclip.teacher_version"] == "lightclip-teacher/3"
    assert tags["lightclip.eval.test/t2i_P_at_10_articleType"] == "40" and tags["lightclip.register_run_id"] == "r1"
    assert all(isinstance(v, str) for v in tags.values())

    info = {"arch": "lc-tiny", "parameters": {"total": 3_400_000, "non_embedding": 2_100_000}, "image": {"size": 64},
            "tokenizer": {"type": "SimpleTokenizer", "context_length": 77},
            "extra": {"edges": [{"source": "image", "target": "text", "loss": "kl", "weight": 1.0}], "teacher_sha256": "x"}}
    card = packaging.model_card(name="xt", role="student", info=info, metrics=metrics, split="test", speed=speed, lineage=lineage,
                                teacher=teacher, file_mb=13.0, embed_dim=32).splitlines()
    assert card[0] == "# lightclip student `xt` (lc-tiny)"
    assert "- method: edges: image/text/kl x1" in card
    assert "- teacher: `lightclip-teacher/3` (test mean recall 60.00; this student reaches 95.0% of it)" in card
    assert "| i2t R@1 / R@5 / R@10 | 28.5 / 57.0 / 67.0 |" in card and "| t2i_P@10_articleType | 40.0 |" in card
    assert any(line.startswith("- encode one image + one title (batch 1, tokenisation included, 1 thread(s)): p50 3.25 ms") for line in card)
    assert "- images are resized to 64 px (shortest side, centre crop): fine detail below that is invisible to the model" in card
