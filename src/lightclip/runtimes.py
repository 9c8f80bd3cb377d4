"""Every model on every runtime: batch-1 encode latency beside test mean recall.

What the recall-vs-latency plot of ``lightclip bench`` shows (DVC plot data and an MLflow figure).
A figure for a runtime is only worth having with that runtime's own recall, so each (model,
runtime) is evaluated by the evaluate stage's own function (:func:`evaluation.evaluate_model`)
on that runtime, and a runtime whose recall moves more than :data:`MAX_RECALL_CHANGE` points from
PyTorch's is flagged (``recall_ok: false``) and said so in the log.

ONNX exports are made in a cache keyed by the weights' sha256 (a copy of the model directory
and its ``onnx/``), never inside the model directory: that is a pipeline output DVC tracks.
Latency is one image and one title per call on one thread (as the promotion gate times it),
timed in interleaved rounds over every (model, runtime): a machine that gets busier mid-run hits
every row alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lightclip.config import EvaluateConfig
from lightclip.data.catalogue import Catalogue
from lightclip.efficiency import interleaved_timings
from lightclip.evaluation import evaluate_model
from lightclip.io import staged_dir, torch_threads
from lightclip.models.onnx_runtime import RUNTIME_DIR, RuntimeMismatchError, export_onnx, load_runtime_model, read_runtime_info
from lightclip.models.zoo import load_tokenizer, preprocess_config, weights_sha256

RUNTIMES = ("torch", "onnx", "onnx-int8")
#: a runtime whose test mean recall differs from PyTorch's by more than this (points) is flagged
MAX_RECALL_CHANGE = 0.5
SAMPLE_TITLE = "Men Navy Blue Solid Polo Collar T-shirt"
PLOT_COLUMNS = ("model", "runtime", "label", "batch1_ms", "mean_recall")


def runtime_dir(model_dir: Path | str, runtime: str, cache_dir: Path | str) -> Path:
    """Where ``model_dir`` runs on ``runtime``: itself for ``torch``; for ``onnx`` and ``onnx-int8`` a
    copy in ``cache_dir`` keyed by the weights' sha256, exported once (re-exported if it no longer
    matches, or predates int8 graphs)."""
    model_dir = Path(model_dir)
    if runtime == "torch":
        return model_dir
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {RUNTIMES}")
    copy = Path(cache_dir) / weights_sha256(model_dir)[:16]
    try:
        if "int8" in read_runtime_info(copy):
            return copy
    except (RuntimeMismatchError, OSError):
        pass
    with staged_dir(copy) as staging:
        for path in model_dir.iterdir():
            if path.name == RUNTIME_DIR:
                continue
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, staging / path.name)
        export_onnx(staging)
    return copy


def batch1_latency(models: Mapping[tuple[str, str], torch.nn.Module], sizes: Mapping[str, int], tokens: Mapping[str, torch.Tensor], *,
                   rounds: int, calls: int) -> dict[tuple[str, str], float]:
    """Median ms of one image + one title per call, per (model, runtime), over interleaved rounds
    (each round every row in turn, starting one further along)."""
    keys = list(models)
    gen = torch.Generator().manual_seed(0)
    images = {name: torch.randn(1, 3, size, size, generator=gen) for name, size in sizes.items()}

    def call(key: tuple[str, str]) -> Callable[[], Any]:
        model, name = models[key], key[0]
        return lambda: (model.encode_image(images[name], normalize=True), model.encode_text(tokens[name], normalize=True))

    with torch.no_grad(), torch_threads(1):
        samples = interleaved_timings({key: {"pair": call(key)} for key in keys}, rounds=rounds, runs={"pair": calls}, warmup={"pair": 4})
    return {key: 1000.0 * float(np.median(kinds["pair"])) for key, kinds in samples.items()}


def compare_runtimes(model_dirs: Mapping[str, Path], runtimes: Sequence[str], catalogue: Catalogue, evaluate_config: EvaluateConfig, *,
                     cache_dir: Path, image_cache_dir: Path, rounds: int, calls: int,
                     log: Callable[[str], None] = print) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model: {runtime: {batch1_ms, mean_recall, recall_change, recall_ok}}}`` on ``evaluate_config.split``
    (exports under ``cache_dir``, the evaluated images' cache in ``image_cache_dir``)."""
    split = evaluate_config.split
    loaded: dict[tuple[str, str], torch.nn.Module] = {}
    recall: dict[tuple[str, str], float] = {}
    sizes: dict[str, int] = {}
    tokens: dict[str, torch.Tensor] = {}
    for name, model_dir in model_dirs.items():
        for runtime in runtimes:
            directory = runtime_dir(model_dir, runtime, cache_dir)
            evaluation = evaluate_model(name, directory, catalogue, evaluate_config, cache_dir=image_cache_dir, runtime=runtime)
            recall[name, runtime] = float(evaluation.metrics[f"{split}/mean_recall"])
            loaded[name, runtime] = load_runtime_model(directory, runtime, threads=1).eval()
        sizes[name] = int(preprocess_config(loaded[name, runtimes[0]])["size"])
        tokens[name] = load_tokenizer(model_dir)([SAMPLE_TITLE])
    latency = batch1_latency(loaded, sizes, tokens, rounds=rounds, calls=calls)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in model_dirs:
        out[name] = {}
        reference = recall.get((name, "torch"))
        for runtime in runtimes:
            change = None if reference is None else recall[name, runtime] - reference
            ok = change is None or abs(change) <= MAX_RECALL_CHANGE
            out[name][runtime] = {"batch1_ms": latency[name, runtime], "mean_recall": recall[name, runtime],
                                  "recall_change": change, "recall_ok": ok}
            log(f"  {name} on {runtime}: image + title at batch 1 {latency[name, runtime]:.2f} ms, {split} mean recall "
                f"{recall[name, runtime]:.2f}" + ("" if change is None else f" ({change:+.2f} vs torch)"))
            if not ok:
                log(f"  WARNING: {name} on {runtime} moves {split} mean recall by {change:+.2f} points (more than {MAX_RECALL_CHANGE}): "
                    "its speed is not the speed of the same model")
    return out


def plot_rows(report: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (model, runtime): the recall-vs-latency plot's data."""
    return [{"model": name, "runtime": runtime, "label": f"{name} ({runtime})", "batch1_ms": round(row["batch1_ms"], 4),
             "mean_recall": round(row["mean_recall"], 4)}
            for name, runtimes in report.items() for runtime, row in runtimes.items()]


def write_plot_data(report: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path) -> Path:
    """The DVC plot data (CSV, :data:`PLOT_COLUMNS`)."""
    lines = [",".join(PLOT_COLUMNS)] + [",".join(str(row[c]) for c in PLOT_COLUMNS) for row in plot_rows(report)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_figure(report: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path, split: str) -> Path:
    """The same plot as a PNG (logged to MLflow): a marker per runtime, a colour per model."""
    import matplotlib  # only to draw: pyplot is ~0.3 s of every importer that never plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    markers = {"torch": "o", "onnx": "s", "onnx-int8": "D"}
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for i, (name, runtimes) in enumerate(report.items()):
        colour = f"C{i}"
        for runtime, row in runtimes.items():
            ax.scatter([row["batch1_ms"]], [row["mean_recall"]], marker=markers.get(runtime, "^"), color=colour, s=45)
            ax.annotate(f"{name} ({runtime})", (row["batch1_ms"], row["mean_recall"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.25, y=0.12)
    ax.set_xlabel("image + title at batch 1, one thread (ms, log scale)")
    ax.set_ylabel(f"mean recall, {split} (%)")
    ax.set_title("recall vs latency, every model and runtime")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
