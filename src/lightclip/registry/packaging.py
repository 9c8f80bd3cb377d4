"""What goes into a registered version: the logged pyfunc, its tags, its model card, the evidence.

A version is an MLflow "models from code" pyfunc: ``lightclip/registry/model_code.py`` as the
code file, the model's weights and ``model.json`` as an artifact, the ``lightclip`` package as one
archive in ``code_paths`` (:mod:`lightclip.registry.model_code` unpacks it on load), explicit pip
requirements, a signature and an input example; no pickles. Beside it: lineage and
metric tags (what the gate and ``lightclip registry`` read), a Markdown model card as its
description, and the measurements the gate needs (encode latency, test-set fingerprint).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image, ImageDraw

import lightclip
from lightclip.bench import SAMPLE_TITLE
from lightclip.config import Params
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.io import cpu_budget, torch_threads
from lightclip.models.onnx_runtime import read_runtime_info
from lightclip.models.zoo import INFO_FILE, WEIGHTS_FILE, encode_text, load_tokenizer, preprocess_config
from lightclip.registry import model_code
from lightclip.registry.aliases import TAG_CANDIDATE, TAG_WEIGHTS, RegistryError
from lightclip.registry.gate import (
    RUNTIME_NAMES,
    SPEED_TAG_PREFIX,
    TAG_FRACTION_HIGH,
    TAG_FRACTION_INTERVAL,
    TAG_FRACTION_LOW,
    TAG_MEAN_RECALL,
    TAG_TEACHER_RECALL,
    TAG_TEST_SET,
    latency_conditions,
)
from lightclip.serving import IMAGE_COLUMN, MODEL_ARTIFACT, ONNX_RUNTIME_FILE, TEXT_COLUMN, load_serving_model
from lightclip.tracking import TAG_PREFIX, mlflow_metric_name

# Version tags (all under the lightclip. prefix, so they sort together in the UI); the gate's
# evidence tags live in lightclip.registry.gate, the identity tags (weights, candidate name) that
# the store reads in lightclip.registry.aliases.
TAG_ROLE = f"{TAG_PREFIX}role"  # teacher | student
TAG_MODEL_DIR = f"{TAG_PREFIX}model_dir"
TAG_PARAMS_HASH = f"{TAG_PREFIX}params_hash"
TAG_TEACHER_VERSION = f"{TAG_PREFIX}teacher_version"
TAG_SPLIT = f"{TAG_PREFIX}split"
TAG_REGISTERED_AT = f"{TAG_PREFIX}registered_at"
TAG_REGISTERED_BY = f"{TAG_PREFIX}registered_by"
EVAL_TAG_PREFIX = f"{TAG_PREFIX}eval."

PIP_PACKAGES: tuple[str, ...] = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "numpy", "pillow", "pandas",
                                 "pyarrow", "pydantic", "pyyaml")
#: What a version that carries an ONNX export needs besides (lightclip.models.onnx_runtime imports both).
ONNX_PACKAGES: tuple[str, ...] = ("onnx", "onnxruntime")


# ----------------------------------------------------------------------------------------------
# The evidence the gate reads
# ----------------------------------------------------------------------------------------------


#: The reference workload timed between the candidate's calls: an N x N fp32 matmul on one thread.
REFERENCE_MATMUL = 256
#: Contention (the reference's wall time / its CPU time) above which the machine counts as busy.
BUSY_CONTENTION = 1.2
METHOD_THREAD_CPU = "thread-cpu min-round p50"
METHOD_WALL = "wall min-round p50"


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of the calling thread for one call of ``fn``."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def _load_1min() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def measure_encode_latency(model_dir: Path, *, runs: int, warmup: int, threads: int | None, rounds: int = 5,
                           max_rounds: int = 15, runtime: str = "torch") -> dict[str, float | str]:
    """Batch-1 latency of one image + one title (tokenisation included) on ``runtime`` (``torch``,
    or ``onnx``: the export in ``model_dir/onnx`` on ONNX Runtime, the runtime that will serve it),
    measured so that machine load does not flip the gate.

    Method: ``rounds`` rounds of ``runs`` calls; every call of the model alternates with a call of
    a fixed reference workload (a 256 x 256 fp32 matmul, one thread). Each call is timed by the
    wall clock and by the calling thread's CPU clock. The figure the gate reads
    (``encode_ms_p50``) is the lowest per-round p50 of:

    * the thread's CPU time, on one thread (the default, ``thread-cpu min-round p50``): the
      cost of the call on a core of its own. Time the OS gives the core to other processes does
      not count, and that time is what made the plain wall-clock p50 of the same weights swing
      several-fold with the machine's load;
    * the wall time, on several threads (``wall min-round p50``): one thread's CPU time does not
      cover the call then; the least disturbed round is taken, but load still shows.

    Load-aware: the 1-min load average and the usable CPUs are read first; ``contention`` is the
    wall time over the thread's CPU time of the calls that ran on one thread (all of them on one
    thread, the reference's on several; 1.0 = the core was ours), measured in the same rounds.
    On a busy machine (contention > 1.2 or load above the usable CPUs) rounds continue up to
    ``max_rounds`` and ``busy`` is 1. Everything returned becomes a version tag and the model card
    shows it: the method, rounds, runs, threads, load, CPUs, contention, the reference's CPU time
    (how fast this machine is) and the naive wall-clock p50 beside the figure.
    """
    tokenizer = load_tokenizer(model_dir)
    generator = torch.Generator().manual_seed(0)
    left, right = (torch.randn(REFERENCE_MATMUL, REFERENCE_MATMUL, generator=generator) for _ in range(2))
    cpus, load = cpu_budget().usable, _load_1min()
    with torch_threads(threads) as used, torch.no_grad():
        model, runtime = load_serving_model(model_dir, runtime, threads=used)  # ONNX Runtime's threads are set when it loads
        size = int(preprocess_config(model)["size"])
        image = torch.randn(1, 3, size, size, generator=generator)

        def encode() -> None:
            model.encode_image(image, normalize=True)
            encode_text(model, tokenizer([SAMPLE_TITLE]), normalize=True)

        def reference() -> None:
            if used > 1:
                torch.set_num_threads(1)
            torch.mm(left, right)
            if used > 1:
                torch.set_num_threads(used)

        for _ in range(warmup):
            encode()
            reference()
        timings: list[np.ndarray] = []  # per round: runs x (encode wall, encode cpu, reference wall, reference cpu)
        busy = False
        while len(timings) < rounds or (busy and len(timings) < max_rounds):
            one = np.empty((runs, 4))
            for i in range(runs):
                one[i, :2] = _timed(encode)
                one[i, 2:] = _timed(reference)
            timings.append(one)
            every = np.concatenate(timings)
            # the calls that ran on the calling thread alone: wall time over CPU time = 1 when the core was ours
            timed = every if used == 1 else every[:, 2:]
            contention = float(timed[:, 0::2].sum() / max(timed[:, 1::2].sum(), 1e-12))
            busy = contention > BUSY_CONTENTION or load > cpus
    column = 1 if used == 1 else 0
    every = np.concatenate(timings) * 1000.0
    per_round = [float(np.percentile(t[:, column], 50)) * 1000.0 for t in timings]
    return {
        "encode_ms_p50": min(per_round),
        "encode_ms_p95": float(np.percentile(every[:, column], 95)),
        "encode_wall_ms_p50": float(np.percentile(every[:, 0], 50)),
        "method": METHOD_THREAD_CPU if used == 1 else METHOD_WALL,
        "runtime": runtime,
        "runs": float(runs),
        "rounds": float(len(timings)),
        "threads": float(used),
        "reference_ms": min(float(np.percentile(t[:, 3], 50)) * 1000.0 for t in timings),
        "contention": contention,
        "load_1min": load,
        "cpus": float(cpus),
        "busy": float(busy),
    }


def test_set_fingerprint(catalogue_dir: Path, split: str) -> tuple[str, int]:
    """A short hash of the evaluated split (ids, titles, image bytes) and its size.

    Two versions are compared by the gate only when they were evaluated on the same fingerprint.
    """
    catalogue = Catalogue.load(catalogue_dir)
    items = catalogue.split(split)
    if len(items) == 0:
        raise RegistryError(f"{catalogue.table_path}: split {split!r} has no items (evaluate.split)")
    digest = hashlib.sha256(f"lightclip-test-set/1:{split}\n".encode())
    for item_id, title, image in zip(items["id"], items["title"], items["image"]):
        digest.update(f"{item_id}\t{title}\t{file_sha256(catalogue.image_path(image))}\n".encode())
    return digest.hexdigest()[:16], len(items)


def params_hash(params: Params) -> str:
    """sha256 (16 hex) of the whole validated params file, canonical JSON."""
    text = json.dumps(params.model_dump(by_alias=True, mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The logged model
# ----------------------------------------------------------------------------------------------


def pip_requirements(extra: Sequence[str] = ()) -> list[str]:
    """What the pyfunc imports (and ``extra`` packages), pinned to the versions installed here
    (inferring them costs seconds)."""
    out = []
    for package in (*PIP_PACKAGES, *extra):
        try:
            out.append(f"{package}=={installed_version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def signature(embed_dim: int) -> ModelSignature:
    """Input: ``text`` (titles) and/or ``image`` (base64 image files), one per row; output: embeddings."""
    inputs = Schema([ColSpec("string", TEXT_COLUMN, required=False), ColSpec("string", IMAGE_COLUMN, required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, int(embed_dim)))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(image_size: int) -> pd.DataFrame:
    """Two titles and one image (a base64 PNG): the shape of a mixed request."""
    image = Image.new("RGB", (image_size, image_size), (176, 32, 48))
    ImageDraw.Draw(image).rectangle([image_size // 4, image_size // 4, 3 * image_size // 4, 3 * image_size // 4], fill=(240, 220, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return pd.DataFrame({TEXT_COLUMN: ["Harbor Lane Women Red Floral Midi Dress", "Maple Row Men Navy Blue Check Shirt", None],
                         IMAGE_COLUMN: [None, None, encoded]})


#: A fixed timestamp for every archive entry: the same source gives the same archive, byte for byte.
ARCHIVE_DATE = (1980, 1, 1, 0, 0, 0)
#: What the package directory holds that is not source (caches, build metadata): never shipped.
NOT_SHIPPED = ("__pycache__", "*.pyc", "*.egg-info")


def package_files(source: Path) -> list[Path]:
    """The package's files to ship, relative to ``source``, sorted (no caches, no build metadata)."""
    def shipped(relative: Path) -> bool:
        return not any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in NOT_SHIPPED)

    return sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and shipped(p.relative_to(source)))


def write_package_archive(source: Path, archive: Path) -> Path:
    """Zip the package directory ``source`` as ``lightclip/...`` entries into ``archive``, reproducibly."""
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for relative in package_files(source):
            entry = zipfile.ZipInfo(f"{model_code.PACKAGE}/{relative.as_posix()}", date_time=ARCHIVE_DATE)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            bundle.writestr(entry, (source / relative).read_bytes())
    return archive


@contextmanager
def package_archive() -> Iterator[Path]:
    """The ``lightclip`` package source as one archive, ``lightclip.zip``, to ship as ``code_paths``.

    One file, not the source tree: through a tracking server that proxies artifacts each file of
    a logged model is one upload (about 90 per model for the tree).
    """
    source = Path(lightclip.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="lightclip-code-") as tmp:
        yield write_package_archive(source, Path(tmp) / model_code.ARCHIVE_NAME)


@contextmanager
def model_files(model_dir: Path, onnx_from: Path | None = None) -> Iterator[Path]:
    """The files that make the model (weights + ``model.json``) in a directory named ``model``,
    and, from ``onnx_from`` (a directory holding the same weights' export), its ``onnx/``.

    Training by-products beside them (history, prototypes) are not shipped; the stable name
    gives every logged model the same layout (``artifacts/model/``). The export is checked
    against these weights before it is shipped.
    """
    with tempfile.TemporaryDirectory(prefix="lightclip-model-") as tmp:
        target = Path(tmp) / "model"
        target.mkdir()
        for name in (WEIGHTS_FILE, INFO_FILE):
            shutil.copy2(Path(model_dir) / name, target / name)
        if onnx_from is not None:
            shutil.copytree(Path(onnx_from) / ONNX_RUNTIME_FILE.parent, target / ONNX_RUNTIME_FILE.parent)
            read_runtime_info(target)  # the graphs are these weights' (sha256), byte for byte
        yield target


def active_run_id() -> str | None:
    """The MLflow run models are logged in now (the stage's run), if one is open."""
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def log_pyfunc(model_dir: Path, *, artifact_name: str, embed_dim: int, image_size: int, onnx_from: Path | None = None) -> ModelInfo:
    """Log one saved model as a models-from-code pyfunc in the active run; returns MLflow's ModelInfo.

    ``onnx_from``: a directory with the same weights and their ONNX export, shipped beside them
    (the pyfunc then runs on ONNX Runtime, and its requirements include it).
    """
    with package_archive() as code, model_files(model_dir, onnx_from) as files:
        return mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=str(Path(model_code.__file__).resolve()),
            artifacts={MODEL_ARTIFACT: str(files)},
            code_paths=[str(code)],
            signature=signature(embed_dim),
            input_example=input_example(image_size),
            pip_requirements=pip_requirements(ONNX_PACKAGES if onnx_from is not None else ()),
        )


# ----------------------------------------------------------------------------------------------
# Tags and model card
# ----------------------------------------------------------------------------------------------


def version_tags(
    *,
    name: str,
    role: str,
    arch: Any,
    model_dir: str,
    metrics: Mapping[str, float],
    split: str,
    speed: Mapping[str, float | str],
    lineage: Mapping[str, str],
    teacher: Mapping[str, Any] | None,
    run_id: str | None,
    registered_at: str,
    registered_by: str,
) -> dict[str, str]:
    """Every tag of a version: identity, lineage, the gate's evidence, all eval and speed metrics."""
    tags: dict[str, str] = {
        TAG_ROLE: role,
        TAG_CANDIDATE: name,
        TAG_MODEL_DIR: model_dir,
        TAG_WEIGHTS: lineage["weights_sha256"],
        f"{TAG_PREFIX}arch": str(arch),
        f"{TAG_PREFIX}git_commit": lineage.get("git_commit", "unknown"),
        f"{TAG_PREFIX}git_dirty": lineage.get("git_dirty", "unknown"),
        f"{TAG_PREFIX}data_hash": lineage.get("data_hash", "untracked"),
        TAG_PARAMS_HASH: lineage.get("params_hash", ""),
        TAG_TEST_SET: lineage.get("test_set", ""),
        TAG_SPLIT: split,
        TAG_MEAN_RECALL: f"{float(metrics[f'{split}/mean_recall']):.6f}",
        TAG_REGISTERED_AT: registered_at,
        TAG_REGISTERED_BY: registered_by,
    }
    if run_id:
        tags[f"{TAG_PREFIX}register_run_id"] = run_id
    tags.update({f"{EVAL_TAG_PREFIX}{mlflow_metric_name(k)}": f"{v:.6g}" for k, v in metrics.items()})
    tags.update({f"{SPEED_TAG_PREFIX}{k}": f"{v:.6g}" if isinstance(v, (int, float)) else str(v) for k, v in speed.items()})
    if teacher:
        tags[TAG_TEACHER_VERSION] = str(teacher["ref"])
        tags[TAG_TEACHER_RECALL] = f"{float(teacher['mean_recall']):.6f}"
        interval = teacher.get("fraction_interval")
        if interval is not None:
            tags[TAG_FRACTION_LOW] = f"{interval.low:.6f}"
            tags[TAG_FRACTION_HIGH] = f"{interval.high:.6f}"
            tags[TAG_FRACTION_INTERVAL] = interval.describe()
    return tags


#: open_clip's resize modes (as model.json records them) in words, for the card
_FITS = {"shortest": "shortest side, centre crop", "longest": "longest side, padded", "squash": "squashed to a square"}


def _describe_value(value: Any) -> str:
    """``model.json`` extras in words: a list of dicts (the distillation edges) as ``a/b x1.0, ...``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        def one(entry: dict) -> str:
            weight = entry.get("weight")
            text = "/".join(str(x) for k, x in entry.items() if x is not None and k != "weight")
            return text + (f" x{weight:g}" if isinstance(weight, (int, float)) else "")

        return ", ".join(one(v) for v in value)
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def _speed_conditions(speed: Mapping[str, Any]) -> list[str]:
    """The card's lines on how the latency was measured and under what load (nothing for older versions)."""
    if "method" not in speed:
        return []
    how = ("CPU time of the calling thread (time the OS gave the core to other processes is not counted)"
           if speed["method"] == METHOD_THREAD_CPU else "wall-clock time (includes waiting for a core)")
    busy = "; the machine was busy, so more rounds were measured" if float(speed.get("busy", 0)) else ""
    return [
        f"- method: {speed['method']}: the lowest per-round p50 of the {how}; each call alternated with a reference "
        f"{REFERENCE_MATMUL}x{REFERENCE_MATMUL} fp32 matmul (1 thread)",
        f"- conditions: {latency_conditions(speed)}{busy}",
        f"- reference matmul {float(speed.get('reference_ms', float('nan'))):.3f} ms CPU (this machine's speed); "
        f"wall-clock p50 of the encode, load included: {float(speed.get('encode_wall_ms_p50', float('nan'))):.2f} ms",
    ]


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def model_card(
    *,
    name: str,
    role: str,
    info: Mapping[str, Any],
    metrics: Mapping[str, Any],
    split: str,
    speed: Mapping[str, float | str],
    lineage: Mapping[str, str],
    teacher: Mapping[str, Any] | None,
    file_mb: float,
    embed_dim: int,
) -> str:
    """The version description (Markdown): what it is, how it was made, how good, how fast, limits."""
    params = info.get("parameters") or {}
    extra = info.get("extra") or {}
    image = info.get("image") or {}
    tokenizer = info.get("tokenizer") or {}
    method = "; ".join(f"{k}: {_describe_value(v)}" for k, v in extra.items() if k != "teacher_sha256") or "not recorded"
    p = f"{split}/"
    lines = [
        f"# lightclip {role} `{name}` ({info.get('arch', '?')})",
        "",
        f"Text-image retrieval embedder for a product catalogue: titles and images map to one {embed_dim}-d space (cosine similarity).",
        "",
        "## Lineage",
        f"- method: {method}",
    ]
    if teacher:
        ratio = metrics.get(f"{p}mean_recall", 0.0) / teacher["mean_recall"] if teacher.get("mean_recall") else float("nan")
        interval = teacher.get("fraction_interval")
        sampling = f"; {interval.describe()}" if interval is not None else ""
        lines.append(f"- teacher: `{teacher['ref']}` (test mean recall {_fmt(teacher.get('mean_recall'))}; this student reaches {ratio:.1%} of it{sampling})")
    lines += [
        f"- data: DVC hash `{lineage.get('data_hash')}` (data.dvc); {split} set `{lineage.get('test_set')}` ({int(metrics.get(f'{p}n_items', 0))} items)",
        f"- code: git `{lineage.get('git_commit')}` (dirty: {lineage.get('git_dirty')}); params hash `{lineage.get('params_hash')}`",
        f"- weights: sha256 `{lineage.get('weights_sha256')}`, {file_mb:.1f} MiB; {params.get('total', 0) / 1e6:.2f}M parameters "
        f"({params.get('non_embedding', 0) / 1e6:.2f}M non-embedding)",
        "",
        f"## Metrics ({split} split, percent)",
        "| metric | value |",
        "|---|---|",
        f"| mean recall (i2t and t2i R@1/5/10) | {_fmt(metrics.get(f'{p}mean_recall'))} |",
    ]
    for direction in ("i2t", "t2i"):
        values = [metrics.get(f"{p}{direction}_R@{k}") for k in (1, 5, 10)]
        if all(v is not None for v in values):
            lines.append(f"| {direction} R@1 / R@5 / R@10 | {' / '.join(_fmt(v, 1) for v in values)} |")
    for key in sorted(metrics):
        if key.startswith(f"{p}t2i_P@"):
            lines.append(f"| {key[len(p):]} | {_fmt(metrics[key], 1)} |")
    lines += [
        "",
        "## Speed (the registering machine)",
        f"- encode one image + one title on {RUNTIME_NAMES.get(str(speed.get('runtime', 'torch')), speed.get('runtime'))} "
        f"(batch 1, tokenisation included, {int(speed.get('threads', 1))} thread(s)): "
        f"p50 {speed.get('encode_ms_p50', float('nan')):.2f} ms, p95 {speed.get('encode_ms_p95', float('nan')):.2f} ms over "
        + (f"{int(speed.get('rounds', 0))} rounds of {int(speed.get('runs', 0))} runs" if "rounds" in speed else f"{int(speed.get('runs', 0))} runs"),
        *_speed_conditions(speed),
        "",
        "## Use",
        "`mlflow.pyfunc.load_model(\"models:/<name>@staging\").predict(df)`: `df` has a `text` column (titles) and/or an `image` "
        "column (base64-encoded image files, or bytes in-process), one of the two per row; the result is a float32 array, one "
        "L2-normalised embedding per row."
        + (" The version carries its ONNX export (`model/onnx/`, checked against the weights' sha256 on load), so the pyfunc and "
           "`lightclip serve` run it on ONNX Runtime, as timed above." if speed.get("runtime") == "onnx" else ""),
        "",
        "## Limits",
        f"- images are resized to {image.get('size', '?')} px ({_FITS.get(str(image.get('resize_mode', 'shortest')), image.get('resize_mode'))}): "
        "fine detail below that is invisible to the model",
        f"- titles are cut at {tokenizer.get('context_length', '?')} tokens ({tokenizer.get('name', tokenizer.get('type', '?'))} tokenizer, English)",
        f"- metrics hold for this catalogue's {split} split only (same distribution as training); other catalogues need their own evaluation",
        "- latency was measured on the machine that registered the model; it is a relative number, not a serving SLA",
        "- no evaluation of robustness, fairness or adversarial inputs",
    ]
    return "\n".join(lines) + "\n"
