"""A saved model's two towers as ONNX graphs, run by ONNX Runtime: the same vectors, less overhead.

A small student's batch-1 encode is dominated by eager PyTorch's per-operator overhead, not its
arithmetic; ONNX Runtime runs the same graph with far less of it. Export writes both towers
(L2-normalised outputs, dynamic batch) beside the weights in ``<model>/onnx/`` and proves the
export on a probe batch before keeping it; loading checks that the graphs belong to these weights.
A mismatch is an error, never wrong vectors.

``<model>/onnx/runtime.json`` records the weights' sha256 the graphs were exported from, the
sha256 of each file of the export (graphs and their external data), the opset, the versions used and the probe's worst cosine to PyTorch.
:class:`OnnxCLIP` wraps the two sessions as a module with ``encode_image``/``encode_text``, so
every caller of :mod:`lightclip.evaluation.embedding` embeds through it unchanged.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lightclip.data.catalogue import file_sha256
from lightclip.io import default_threads, read_format_json, staged_dir, write_json
from lightclip.models.common import ModelError, can_trim_text, encode_text, encode_text_prefix, preprocess_config, unfused_attention
from lightclip.models.ensemble import EnsembleCLIP
from lightclip.models.zoo import INFO_FILE, load_model, load_tokenizer, read_model_info, weights_sha256

RUNTIME_DIR = "onnx"
RUNTIME_FILE = "runtime.json"
RUNTIME_FORMAT = "lightclip-onnx/1"
TOWERS = ("image", "text")
DEFAULT_OPSET = 18
#: below this cosine between the exported graph's and PyTorch's embeddings the export is refused
MIN_PROBE_COSINE = 0.999
MAX_BATCH = 1 << 16


class RuntimeMismatchError(ModelError):
    """The ONNX graphs are not those of these weights, or cannot run here."""


def _prefix_text_tower(model: nn.Module) -> bool:
    """Can the text graph take titles cut after their end-of-text token (a dynamic length axis)?"""
    members = model.members if isinstance(model, EnsembleCLIP) else [model]
    return all(can_trim_text(m) for m in members)


def _text_prefix_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if isinstance(model, EnsembleCLIP):
        return model._combine([_text_prefix_features(m, tokens) for m in model.members])
    return encode_text_prefix(model, tokens, normalize=True)


class _Tower(nn.Module):
    """One tower of a CLIP model with L2-normalised output: what gets traced.

    The text tower takes token ids cut to the batch's longest title when the model allows it
    (as :func:`~lightclip.models.common.encode_text` does in PyTorch): short titles then cost
    a fraction of the full context in ONNX Runtime too.
    """

    def __init__(self, model: nn.Module, tower: str) -> None:
        super().__init__()
        self.model, self.tower = model, tower
        self.prefix = tower == "text" and _prefix_text_tower(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tower == "image":
            return self.model.encode_image(x, normalize=True)
        return _text_prefix_features(self.model, x) if self.prefix else self.model.encode_text(x, normalize=True)


def _cut_after_end_of_text(tokens: np.ndarray) -> np.ndarray:
    """Token ids cut after the batch's last end-of-text token (the largest id, as open_clip pools)."""
    return tokens[:, : int(tokens.argmax(axis=1).max()) + 1] if tokens.shape[1] > 1 else tokens


def _probe_inputs(model: nn.Module, model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Inputs to trace with, and checks of other batch sizes and (for titles) other lengths."""
    size = int(preprocess_config(model)["size"])
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, size, size, generator=generator)
    tokenize = load_tokenizer(model_dir)
    short = tokenize(["red floral dress", "watch"])
    varied = tokenize(["men black leather formal shoes with laces and a padded collar, size 9", "kurta", "blue jeans",
                       "women grey melange printed round neck t-shirt", "bag"])
    trace = {"image": images[:2], "text": short}  # export_onnx cuts the titles when the text graph takes cut ones
    checks = {"image": [images, images[:1]], "text": [varied, varied[1:2]]}
    return {k: torch.as_tensor(v) for k, v in trace.items()}, checks


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), "?")
        raise RuntimeMismatchError(f"{path}: onnxruntime {ort.__version__} cannot run this graph (opset {opset}): "
                                   f"{str(exc).splitlines()[0]}; re-export it (`lightclip export-onnx`) or use the PyTorch weights") from None


def _run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def export_onnx(model_dir: Path | str, *, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export both towers of the model saved in ``model_dir`` to ``model_dir/onnx/``; returns runtime.json.

    Traced on two short titles and two images, the graphs are checked against the PyTorch path
    on other batch sizes and title lengths before they replace any earlier export; a worst cosine
    below ``MIN_PROBE_COSINE`` is an error.
    """
    model_dir = Path(model_dir)
    model = load_model(model_dir)  # verifies the weights' sha256
    trace, checks = _probe_inputs(model, model_dir)
    worst: dict[str, float] = {}
    modules = {tower: _Tower(model, tower).eval() for tower in TOWERS}
    with staged_dir(model_dir / RUNTIME_DIR) as staging:
        for tower, module in modules.items():
            path = staging / f"{tower}.onnx"
            example = torch.as_tensor(_cut_after_end_of_text(trace[tower].numpy())) if module.prefix else trace[tower]
            # torch.export's exporter: the batch and (for cut titles) the length are symbolic, so no
            # size seen while tracing is baked into a reshape
            shape = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
            if module.prefix:
                shape[1] = torch.export.Dim("length", min=2, max=int(checks["text"][0].shape[1]))
            with unfused_attention(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["output"],
                                  dynamic_shapes=(shape,), opset_version=opset, dynamo=True, verbose=False)
            session = _session(path, threads=1)
            worst[tower] = 1.0
            for probe in checks[tower]:  # the production path in PyTorch against the graph
                with torch.no_grad():
                    reference = (model.encode_image(probe, normalize=True) if tower == "image" else encode_text(model, probe, normalize=True)).numpy()
                feed = probe.numpy() if tower == "image" else (_cut_after_end_of_text(probe.numpy()) if module.prefix else probe.numpy())
                worst[tower] = min(worst[tower], _worst_cosine(_run(session, feed), reference))
            if worst[tower] < MIN_PROBE_COSINE:
                raise RuntimeMismatchError(f"{model_dir}: the exported {tower} tower disagrees with PyTorch "
                                           f"(worst cosine {worst[tower]:.6f} < {MIN_PROBE_COSINE}); nothing was written")
        # every file the exporter wrote: the graphs and their external weights (``<tower>.onnx.data``)
        files = {f.name: file_sha256(f) for f in sorted(staging.iterdir()) if f.is_file()}
        info = {"format": RUNTIME_FORMAT, "weights_sha256": weights_sha256(model_dir), "opset": opset, "files": files,
                "text_cut_after_end_of_text": modules["text"].prefix,
                "probe_worst_cosine": worst, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                "preprocess": preprocess_config(model)}
        write_json(staging / RUNTIME_FILE, info, indent=2, sort_keys=True)
    return info


def has_onnx(model_dir: Path | str) -> bool:
    return (Path(model_dir) / RUNTIME_DIR / RUNTIME_FILE).is_file()


def read_runtime_info(model_dir: Path | str) -> dict[str, Any]:
    """``runtime.json``, checked against the model's weights and the graphs' bytes."""
    model_dir = Path(model_dir)
    path = model_dir / RUNTIME_DIR / RUNTIME_FILE
    info = read_format_json(path, RUNTIME_FORMAT, RuntimeMismatchError,
                            missing=f"{model_dir}: no ONNX export ({path} missing); run `lightclip export-onnx --model {model_dir}`")
    recorded = weights_sha256(model_dir)  # the weights' bytes, checked against model.json
    if info.get("weights_sha256") != recorded:
        raise RuntimeMismatchError(f"{path}: exported from weights sha256 {str(info.get('weights_sha256'))[:16]}..., but {model_dir / INFO_FILE} "
                                   f"records {str(recorded)[:16]}...: the graphs belong to other weights; re-export them")
    listed = set(info.get("files", {}))
    unlisted = sorted(f.name for f in (model_dir / RUNTIME_DIR).iterdir() if f.is_file() and f.name != RUNTIME_FILE and f.name not in listed)
    if unlisted:  # e.g. a graph's external weights an older export did not record: they could change unnoticed
        raise RuntimeMismatchError(f"{path}: the export holds files it does not record ({', '.join(unlisted)}), so they cannot be "
                                   "checked; re-export it (`lightclip export-onnx`)")
    for name, expected in info.get("files", {}).items():
        actual = file_sha256(model_dir / RUNTIME_DIR / name)
        if actual != expected:
            raise RuntimeMismatchError(f"{model_dir / RUNTIME_DIR / name}: sha256 {actual[:16]}... but {RUNTIME_FILE} records "
                                       f"{expected[:16]}...: the file changed after export; re-export it")
    return info


class _Visual(nn.Module):
    """Carries the preprocessing as open_clip's ``visual.preprocess_cfg`` (what callers read)."""

    def __init__(self, preprocess: Mapping[str, Any]) -> None:
        super().__init__()
        self.preprocess_cfg = dict(preprocess)


class OnnxCLIP(nn.Module):
    """A saved model's towers on ONNX Runtime, with the ``encode_image``/``encode_text`` of a CLIP model.

    Outputs are the exported graphs' (already L2-normalised, float32); ``threads`` is the
    intra-op thread count (default: the CPUs this process may use).
    """

    def __init__(self, model_dir: Path | str, *, threads: int | None = None) -> None:
        super().__init__()
        self.model_dir = Path(model_dir)
        self.runtime_info = read_runtime_info(self.model_dir)
        self.sessions = {tower: _session(self.model_dir / RUNTIME_DIR / f"{tower}.onnx", threads) for tower in TOWERS}
        self.visual = _Visual(self.runtime_info["preprocess"])
        self.lightclip_arch = read_model_info(self.model_dir).get("arch")

    def _encode(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy()
        return torch.from_numpy(_run(self.sessions[tower], array.astype(np.float32 if tower == "image" else np.int64, copy=False)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self._encode("image", images)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.runtime_info.get("text_cut_after_end_of_text"):
            tokens = torch.from_numpy(_cut_after_end_of_text(tokens.detach().cpu().numpy()))
        return self._encode("text", tokens)


def load_runtime_model(model_dir: Path | str, runtime: str = "torch", *, threads: int | None = None) -> nn.Module:
    """The model in ``model_dir`` on ``runtime``: ``torch`` (the weights) or ``onnx`` (its export)."""
    if runtime == "torch":
        return load_model(model_dir)
    if runtime == "onnx":
        return OnnxCLIP(model_dir, threads=threads)
    raise ModelError(f"unknown runtime {runtime!r}: expected torch or onnx")

