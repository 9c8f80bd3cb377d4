"""ONNX export of a saved model's towers: the same vectors as PyTorch, and never wrong ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lightclip.cli import main
from lightclip.evaluation import embed_images, embed_texts, evaluate_retrieval
from lightclip.models.common import ModelError
from lightclip.models import onnx_runtime
from lightclip.models.onnx_runtime import (
    MIN_INT8_PROBE_COSINE,
    RUNTIME_DIR,
    RUNTIME_FILE,
    OnnxCLIP,
    RuntimeMismatchError,
    export_onnx,
    has_onnx,
    load_runtime_model,
)
from lightclip.models.zoo import ModelSpec, create_model, load_model, load_tokenizer, preprocess_config, save_model

TITLES = ["red floral midi dress", "men navy blue slim fit jeans", "black leather watch", "white sneakers", "kurta", "grey melange hoodie with zip"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx")
    model, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=3)
    save_model(model, "lc-test-tiny", root / "student")
    export_onnx(root / "student")
    return root / "student"


def _inputs(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    size = int(preprocess_config(load_model(model_dir))["size"])
    images = torch.randint(0, 256, (len(TITLES), 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return images, load_tokenizer(model_dir)(TITLES)


def test_onnx_embeddings_equal_pytorch_through_the_embedding_path(exported: Path):
    info = json.loads((exported / RUNTIME_DIR / RUNTIME_FILE).read_text())
    # the graphs and their external weights, every one hashed
    assert set(info["files"]) == {"image.onnx", "image.onnx.data", "text.onnx", "text.onnx.data", "image.int8.onnx", "text.int8.onnx"}
    assert min(info["probe_worst_cosine"].values()) >= 0.999
    torch_model, onnx_model = load_model(exported), load_runtime_model(exported, "onnx", threads=1)
    assert isinstance(onnx_model, OnnxCLIP) and preprocess_config(onnx_model) == preprocess_config(torch_model)
    images, tokens = _inputs(exported)
    for batch_size in (1, 4):  # the batch axis is dynamic: other sizes than the export's probe
        ours = embed_images(onnx_model, images, batch_size), embed_texts(onnx_model, tokens, batch_size)
        reference = embed_images(torch_model, images, batch_size), embed_texts(torch_model, tokens, batch_size)
        for a, b in zip(ours, reference):
            assert a.dtype == torch.float32 and a.shape == b.shape
            assert float((a * b).sum(dim=1).min()) >= 0.999
    onnx_metrics = evaluate_retrieval(*ours)["metrics"]
    torch_metrics = evaluate_retrieval(*reference)["metrics"]
    assert abs(onnx_metrics["mean_recall"] - torch_metrics["mean_recall"]) <= 0.5


def test_graphs_from_other_weights_or_changed_files_are_refused(exported: Path, tmp_path: Path):
    copy = tmp_path / "student"
    shutil.copytree(exported, copy)
    assert has_onnx(copy) and OnnxCLIP(copy, threads=1)
    # retrained weights saved over the model, the old export left beside them
    other, _ = create_model(ModelSpec(arch="lc-test-tiny"), seed=4)
    shutil.move(str(copy / RUNTIME_DIR), str(tmp_path / "kept"))
    save_model(other, "lc-test-tiny", copy)
    shutil.move(str(tmp_path / "kept"), str(copy / RUNTIME_DIR))
    with pytest.raises(RuntimeMismatchError, match=r"runtime.json: exported from weights sha256 .* the graphs belong to other weights"):
        OnnxCLIP(copy)
    export_onnx(copy)  # re-export: fine again
    OnnxCLIP(copy, threads=1)
    graph = copy / RUNTIME_DIR / "text.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(RuntimeMismatchError, match=r"text.onnx: sha256 .* the file changed after export"):
        OnnxCLIP(copy)
    shutil.rmtree(copy / RUNTIME_DIR)
    with pytest.raises(RuntimeMismatchError, match=r"no ONNX export .* run `lightclip export-onnx --model"):
        load_runtime_model(copy, "onnx")
    with pytest.raises(ModelError, match="unknown runtime 'tensorrt'"):
        load_runtime_model(copy, "tensorrt")


def test_an_opset_the_runtime_cannot_run_is_a_clear_error(exported: Path, tmp_path: Path):
    copy = tmp_path / "student"
    shutil.copytree(exported, copy)
    graph = onnx.load(str(copy / RUNTIME_DIR / "image.onnx"))
    for entry in graph.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99
    onnx.save(graph, str(copy / RUNTIME_DIR / "image.onnx"))
    info_path = copy / RUNTIME_DIR / RUNTIME_FILE
    info = json.loads(info_path.read_text())
    from lightclip.data.catalogue import file_sha256

    info["files"]["image.onnx"] = file_sha256(copy / RUNTIME_DIR / "image.onnx")
    info_path.write_text(json.dumps(info))
    with pytest.raises(RuntimeMismatchError, match=r"image.onnx: onnxruntime .* cannot run this graph \(opset 99\).* use the PyTorch weights"):
        OnnxCLIP(copy)


def test_export_onnx_cli(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    copy = tmp_path / "student"
    shutil.copytree(exported, copy)
    shutil.rmtree(copy / RUNTIME_DIR)
    assert main(["-q", "export-onnx", "--model", str(copy)]) == 0
    out = capsys.readouterr().out
    assert f"{copy / RUNTIME_DIR}" in out and "worst cosine to PyTorch" in out and "int8 graphs (runtime onnx-int8;" in out
    assert np.isclose(json.loads((copy / RUNTIME_DIR / RUNTIME_FILE).read_text())["opset"], 18)


def test_int8_graphs_run_beside_the_fp32_ones_close_to_pytorch(exported: Path):
    info = json.loads((exported / RUNTIME_DIR / RUNTIME_FILE).read_text())
    int8 = info["int8"]
    assert int8["available"] and int8["ops"] == ["MatMul", "Gemm"]
    assert min(int8["probe_worst_cosine"].values()) >= MIN_INT8_PROBE_COSINE
    # 7-bit weights exactly where the exporting CPU lacks VNNI (x86)
    assert int8["reduce_range"] == (onnx_runtime._is_x86() and not onnx_runtime.cpu_has_vnni())
    fp32_model, int8_model = load_runtime_model(exported, "onnx", threads=1), load_runtime_model(exported, "onnx-int8", threads=1)
    assert isinstance(int8_model, OnnxCLIP) and int8_model.precision == "int8"
    for tower in ("image", "text"):  # integer matmuls on int8 weights, activations quantised per call
        ops = {node.op_type for node in onnx.load(str(exported / RUNTIME_DIR / f"{tower}.int8.onnx")).graph.node}
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, ops
    images, tokens = _inputs(exported)
    reference = embed_images(load_model(exported), images, 4), embed_texts(load_model(exported), tokens, 4)
    for batch_size in (1, 4):
        quantised = embed_images(int8_model, images, batch_size), embed_texts(int8_model, tokens, batch_size)
        for a, b in zip(quantised, reference):
            assert a.shape == b.shape and float((a * b).sum(dim=1).min()) >= MIN_INT8_PROBE_COSINE
    # not the fp32 graphs under another name
    assert not torch.equal(embed_images(fp32_model, images, 4), quantised[0])


def test_full_range_int8_graphs_refuse_a_cpu_without_vnni(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    copy = tmp_path / "student"
    shutil.copytree(exported, copy)
    monkeypatch.setattr(onnx_runtime, "_is_x86", lambda: True)
    monkeypatch.setattr(onnx_runtime, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx2"}))
    export_onnx(copy)  # quantised on a VNNI CPU: full 8-bit weights
    assert json.loads((copy / RUNTIME_DIR / RUNTIME_FILE).read_text())["int8"]["reduce_range"] is False
    OnnxCLIP(copy, threads=1, precision="int8")
    monkeypatch.setattr(onnx_runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # served on a CPU without VNNI
    with pytest.raises(RuntimeMismatchError, match=r"full 8-bit weights .* this CPU lacks VNNI \(it has none of avx512_vnni.*can saturate; re-export"):
        load_runtime_model(copy, "onnx-int8")
    OnnxCLIP(copy, threads=1)  # its fp32 graphs still run
    export_onnx(copy)  # re-exported on that CPU: 7-bit weights, which run right there
    assert json.loads((copy / RUNTIME_DIR / RUNTIME_FILE).read_text())["int8"]["reduce_range"] is True
    OnnxCLIP(copy, threads=1, precision="int8")


def test_int8_graphs_that_miss_the_probe_are_not_kept(exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    copy = tmp_path / "student"
    shutil.copytree(exported, copy)
    monkeypatch.setattr(onnx_runtime, "MIN_INT8_PROBE_COSINE", 1.01)
    info = export_onnx(copy)
    assert info["int8"]["available"] is False and "worst probe cosine to PyTorch is" in info["int8"]["reason"]
    assert not list((copy / RUNTIME_DIR).glob("*.int8.onnx")) and "image.int8.onnx" not in info["files"]
    with pytest.raises(RuntimeMismatchError, match=r"no int8 graphs: the int8 .* tower's worst probe cosine .* < 1.01; re-export it .* or use runtime onnx"):
        load_runtime_model(copy, "onnx-int8")
    OnnxCLIP(copy, threads=1)
