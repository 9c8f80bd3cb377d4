"""A saved model's two towers as ONNX graphs, run by ONNX Runtime: the same vectors, less overhead.

A small student's batch-1 encode is dominated by eager PyTorch's per-operator overhead, not its
arithmetic; ONNX Runtime runs the same graph with far less of it. Export writes both towers
(L2-normalised outputs, dynamic batch) beside the weights in ``<model>/onnx/`` and proves the
export on a probe batch before keeping it; loading checks that the graphs belong to these weights.
A mismatch is an error, never wrong vectors.

``<model>/onnx/runtime.json`` records the weights' sha256 the graphs were exported from, the
sha256 of each file of the export (graphs and their external data), the opset, the versions used
and the probe's worst cosine to PyTorch.

Beside the fp32 graphs the export writes int8 ones (``<tower>.int8.onnx``, runtime ``onnx-int8``):
ONNX Runtime's dynamic quantisation of every MatMul/Gemm weight to int8, activations quantised per
call. They are kept only when their probe cosine to PyTorch reaches :data:`MIN_INT8_PROBE_COSINE`
(else ``runtime.json`` says why there are none). On x86 a CPU without VNNI multiplies u8 x s8
pairs with an instruction that can saturate, so graphs quantised there use 7-bit weights
(``reduce_range``); graphs quantised on a VNNI CPU use the full 8 bits and refuse to load on a
CPU without VNNI rather than return saturated vectors (:func:`int8_cpu_problem`).
:class:`OnnxCLIP` wraps the two sessions as a module with ``encode_image``/``encode_text``, so
every caller of :mod:`lightclip.evaluation.embedding` embeds through it unchanged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lightclip.data.catalogue import file_sha256
from lightclip.devices import INT8_FLAGS, cpu_flags
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
#: the runtimes an export serves: its fp32 graphs, and its int8 ones
PRECISIONS = {"onnx": "fp32", "onnx-int8": "int8"}
INT8_SUFFIX = ".int8.onnx"
#: int8 graphs whose embeddings fall below this cosine to PyTorch's on the probe are not kept
MIN_INT8_PROBE_COSINE = 0.99
#: the ops whose weights are quantised (the towers' linear layers and attention projections)
INT8_OPS = ("MatMul", "Gemm")
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


def graph_name(tower: str, precision: str = "fp32") -> str:
    return f"{tower}{INT8_SUFFIX}" if precision == "int8" else f"{tower}.onnx"


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (detected from its flags, never assumed)."""
    return bool((cpu_flags() or frozenset()) & set(INT8_FLAGS))


def int8_cpu_problem(info: Mapping[str, Any]) -> str | None:
    """Why an export's int8 graphs would give wrong vectors on this CPU, or ``None`` when they run right.

    Full-range (8-bit) weights need VNNI on x86: AVX2/AVX-512 alone multiply u8 x s8 pairs into
    saturating 16-bit sums. 7-bit weights (``reduce_range``) run right everywhere.
    """
    int8 = info.get("int8") or {}
    if int8.get("reduce_range", True) or not _is_x86() or cpu_has_vnni():
        return None
    flags = cpu_flags()
    seen = "its flags could not be read" if flags is None else f"it has none of {', '.join(INT8_FLAGS)}"
    return (f"its int8 graphs were quantised with full 8-bit weights for a CPU with VNNI, and this CPU lacks VNNI ({seen}), where "
            "their int8 products can saturate; re-export on this machine (`lightclip export-onnx`, which quantises with 7-bit weights "
            "here) or use runtime onnx")


def _quantise(staging: Path, checks: Mapping[str, list[torch.Tensor]], references: Mapping[str, list[np.ndarray]],
              prefix: bool) -> dict[str, Any]:
    """int8 graphs of both towers in ``staging``, checked on the probe; ``{"available": False, ...}`` when they fall short."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = _is_x86() and not cpu_has_vnni()
    worst: dict[str, float] = {}
    quantiser_log = logging.getLogger()  # the quantiser logs its advice (pre-processing, opset) at INFO/WARNING on the root logger
    level = quantiser_log.level
    quantiser_log.setLevel(logging.ERROR)
    try:
        for tower in TOWERS:
            target = staging / graph_name(tower, "int8")
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_dynamic(staging / graph_name(tower), target, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS),
                                 reduce_range=reduce_range)
            session = _session(target, threads=1)
            worst[tower] = min(_worst_cosine(_run(session, _feed(tower, probe, prefix)), reference)
                               for probe, reference in zip(checks[tower], references[tower]))
    finally:
        quantiser_log.setLevel(level)
    if min(worst.values()) < MIN_INT8_PROBE_COSINE:
        for tower in TOWERS:
            (staging / graph_name(tower, "int8")).unlink(missing_ok=True)
        low = min(worst, key=worst.__getitem__)
        return {"available": False, "probe_worst_cosine": worst,
                "reason": f"the int8 {low} tower's worst probe cosine to PyTorch is {worst[low]:.5f} < {MIN_INT8_PROBE_COSINE}"}
    return {"available": True, "probe_worst_cosine": worst, "reduce_range": reduce_range, "ops": list(INT8_OPS),
            "weights": "int8 per tensor, symmetric", "activations": "uint8, quantised per call"}


def _feed(tower: str, probe: torch.Tensor, prefix: bool) -> np.ndarray:
    return _cut_after_end_of_text(probe.numpy()) if tower == "text" and prefix else probe.numpy()


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
    below ``MIN_PROBE_COSINE`` is an error. The int8 graphs are quantised from the checked fp32
    ones and kept only when they reach ``MIN_INT8_PROBE_COSINE`` on the same probe.
    """
    model_dir = Path(model_dir)
    model = load_model(model_dir)  # verifies the weights' sha256
    trace, checks = _probe_inputs(model, model_dir)
    worst: dict[str, float] = {}
    modules = {tower: _Tower(model, tower).eval() for tower in TOWERS}
    references: dict[str, list[np.ndarray]] = {}
    with staged_dir(model_dir / RUNTIME_DIR) as staging:
        for tower, module in modules.items():
            path = staging / graph_name(tower)
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
            with torch.no_grad():  # the production path in PyTorch, against which every graph is checked
                references[tower] = [(model.encode_image(probe, normalize=True) if tower == "image"
                                      else encode_text(model, probe, normalize=True)).numpy() for probe in checks[tower]]
            worst[tower] = min(_worst_cosine(_run(session, _feed(tower, probe, module.prefix)), reference)
                               for probe, reference in zip(checks[tower], references[tower]))
            if worst[tower] < MIN_PROBE_COSINE:
                raise RuntimeMismatchError(f"{model_dir}: the exported {tower} tower disagrees with PyTorch "
                                           f"(worst cosine {worst[tower]:.6f} < {MIN_PROBE_COSINE}); nothing was written")
        int8 = _quantise(staging, checks, references, modules["text"].prefix)
        # every file the exporter wrote: the graphs and their external weights (``<tower>.onnx.data``)
        files = {f.name: file_sha256(f) for f in sorted(staging.iterdir()) if f.is_file()}
        info = {"format": RUNTIME_FORMAT, "weights_sha256": weights_sha256(model_dir), "opset": opset, "files": files,
                "text_cut_after_end_of_text": modules["text"].prefix, "int8": int8,
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
    intra-op thread count (default: the CPUs this process may use); ``precision`` picks the
    export's ``fp32`` or ``int8`` graphs.
    """

    def __init__(self, model_dir: Path | str, *, threads: int | None = None, precision: str = "fp32") -> None:
        super().__init__()
        self.model_dir = Path(model_dir)
        self.runtime_info = read_runtime_info(self.model_dir)
        self.precision = precision
        if precision == "int8":
            int8 = self.runtime_info.get("int8") or {"reason": "it was exported before int8 graphs existed"}
            if not int8.get("available"):
                raise RuntimeMismatchError(f"{self.model_dir / RUNTIME_DIR}: no int8 graphs: {int8.get('reason')}; "
                                           "re-export it (`lightclip export-onnx`) or use runtime onnx")
            problem = int8_cpu_problem(self.runtime_info)
            if problem:
                raise RuntimeMismatchError(f"{self.model_dir / RUNTIME_DIR}: {problem}")
        elif precision != "fp32":
            raise ModelError(f"unknown ONNX precision {precision!r}: expected fp32 or int8")
        self.sessions = {tower: _session(self.model_dir / RUNTIME_DIR / graph_name(tower, precision), threads) for tower in TOWERS}
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
    """The model in ``model_dir`` on ``runtime``: ``torch`` (the weights), ``onnx`` or ``onnx-int8`` (its export)."""
    if runtime == "torch":
        return load_model(model_dir)
    if runtime in PRECISIONS:
        return OnnxCLIP(model_dir, threads=threads, precision=PRECISIONS[runtime])
    raise ModelError(f"unknown runtime {runtime!r}: expected torch, {' or '.join(PRECISIONS)}")
