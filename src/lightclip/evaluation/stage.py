"""The ``evaluate`` stage: embed a catalogue split with each model, score it, write the outputs.

Outputs (:class:`EvaluateOutputs`): the DVC metrics file (one object per model: the
``<split>/...`` metrics of :func:`~lightclip.evaluation.metrics.evaluate_retrieval`, item and
positive counts, ``timing/...`` and ``model_dir``), each query's rank per model (what the
promotion gate resamples for its interval), the DVC plot data and the same plots as PNGs (see
:func:`write_outputs`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lightclip.config import EvaluateConfig, ModelConfig
from lightclip.data.catalogue import Catalogue
from lightclip.data.geometry import compare, items_geometry, model_geometry
from lightclip.devices import resolve_device
from lightclip.evaluation.baselines import baseline_dirs
from lightclip.evaluation.embedding import Embeddings, embed_split, embed_split_stream
from lightclip.evaluation.errors import EvaluationError
from lightclip.evaluation.metrics import KS, evaluate_retrieval
from lightclip.evaluation.ranking import DIRECTIONS, Positives, catalogue_positives
from lightclip.imagecache import ImageCache, resize_mode_of
from lightclip.imagestream import open_image_source
from lightclip.io import read_format_json, staged_dir, torch_threads, write_json
from lightclip.models.zoo import INFO_FILE, WEIGHTS_FILE, load_model, load_tokenizer, preprocess_config, read_model_info
from lightclip.stage import StageContext


#: The metrics prefix of a whole-catalogue evaluation (``lightclip evaluate --catalogue``) in place of a split name.
WHOLE = "catalogue"


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateInputs:
    """The split catalogue (``data/split``); the models come from ``evaluate.models``.

    ``whole``: evaluate every item, ignoring ``split`` (a new batch of products, a holdout), its
    metrics named ``catalogue/...``; ``sample``: only that many items of it, drawn with ``seed``.
    """

    catalogue: Path
    whole: bool = False
    sample: int | None = None
    seed: int = 0

    @property
    def scope(self) -> str | None:
        """What the metrics are named after: ``None`` (the config's split) or :data:`WHOLE`."""
        return WHOLE if self.whole else None


def sample_catalogue(catalogue: Catalogue, n: int | None, seed: int) -> Catalogue:
    """``n`` items drawn with ``seed`` (catalogue order kept); every item for ``None`` or ``n`` >= its size."""
    total = len(catalogue.items)
    if n is None or n >= total:
        return catalogue
    if n < 1:
        raise EvaluationError(f"--sample must be at least 1, got {n}")
    rows = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    return Catalogue(root=catalogue.root, items=catalogue.items.iloc[rows].reset_index(drop=True))


@dataclass(frozen=True)
class EvaluateOutputs:
    """``metrics``: the DVC metrics JSON; ``plots``: the DVC plot data directory;
    ``figures``: the PNG directory (``None``: no PNGs); ``ranks``: each query's rank per model
    (``None``: not written; see :func:`read_ranks`)."""

    metrics: Path
    plots: Path
    figures: Path | None = None
    ranks: Path | None = None


@dataclass
class ModelEvaluation:
    """One model's result on one split."""

    name: str
    model_dir: str
    metrics: dict[str, float]
    recall_curve: dict[str, dict[int, float]]
    timings: dict[str, float]
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # direction -> each query's 0-based rank


def check_model_dirs(models: Mapping[str, str | Path], project_dir: Path | None = None) -> dict[str, Path]:
    """Resolve the model directories of ``evaluate.models``; a missing one is an error, never skipped."""
    if not models:
        raise EvaluationError("evaluate.models is empty: name at least one model directory (e.g. {teacher: models/teacher})")
    resolved: dict[str, Path] = {}
    problems = []
    for name, directory in models.items():
        path = Path(directory)
        if project_dir is not None and not path.is_absolute():
            path = Path(project_dir) / path
        if not path.is_dir():
            problems.append(f"{name}: {directory} does not exist")
        elif not (path / INFO_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            problems.append(f"{name}: {directory} is not a saved lightclip model (needs {INFO_FILE} and {WEIGHTS_FILE})")
        resolved[name] = path
    if problems:
        raise EvaluationError("evaluate.models: " + "; ".join(problems))
    return resolved


def item_attributes(items: Any, config: EvaluateConfig) -> dict[str, list[list[Any]]]:
    """The ``evaluate.attributes`` groups the items have (a column absent or all empty is left out)."""
    attributes = {}
    for group in config.attributes:
        if all(col in items.columns and items[col].notna().any() for col in group):
            attributes["_".join(group)] = [list(items[col]) for col in group]
    return attributes


def score_embeddings(
    emb: Embeddings, titles: Sequence[str], cache: ImageCache | None, attributes: Mapping[str, Sequence[Sequence[Any]]], config: EvaluateConfig,
    *, image_groups: np.ndarray | None = None,
) -> tuple[dict[str, Any], Positives, float]:
    """The evaluate stage's work after embedding: positives and every metric, with its seconds.

    One function for the stage and for ``lightclip bench``, which holds these seconds to under
    10% of the embedding time on a 10k gallery.
    """
    t0 = time.perf_counter()
    positives = catalogue_positives(titles, cache, config.positives, image_groups=image_groups)
    result = evaluate_retrieval(
        emb.images, emb.texts, positives, ks=config.ks, precision_ks=config.ks, attributes=attributes, curve_ks=config.curve_ks
    )
    return result, positives, time.perf_counter() - t0


class CatalogueGeometry:
    """The evaluated items' aspect-ratio summary, read from their headers once for every model."""

    def __init__(self, catalogue: Catalogue, items: Any) -> None:
        self.catalogue, self.items = catalogue, items

    @cached_property
    def summary(self) -> dict[str, Any]:
        return items_geometry(self.catalogue, self.items)


def geometry_check(name: str, model_dir: Path | str, geometry: CatalogueGeometry) -> float | None:
    """The share of the evaluated images in other shape buckets than the model's training
    catalogue (``None`` when its model.json records none); one warning line when they differ clearly."""
    reference = model_geometry(read_model_info(model_dir))
    checked = None if reference is None else compare(reference, geometry.summary)
    if checked is None:
        return None
    shift, warning = checked
    if warning is not None:
        log.warning("%s: %s", name, warning)
    return shift


def evaluate_model(
    name: str,
    model_dir: Path | str,
    catalogue: Catalogue,
    config: EvaluateConfig,
    *,
    cache_dir: Path | str,
    progress: bool = False,
    scope: str | None = None,
    geometry: CatalogueGeometry | None = None,
    runtime: str = "torch",
) -> ModelEvaluation:
    """Embed ``config.split`` of ``catalogue`` (every item for ``scope`` :data:`WHOLE`) with the
    model in ``model_dir`` and score it; the metrics are named ``<split or scope>/...``.

    ``geometry``: the same items' shapes, shared by the models of one evaluation (read once).
    ``runtime``: ``torch`` (the weights), ``onnx`` or ``onnx-int8`` (the export in ``model_dir/onnx``, checked
    against the weights): a runtime's figures are worth having only with its own recall.
    """
    whole = scope == WHOLE
    items = catalogue.items.reset_index(drop=True) if whole else catalogue.split(config.split)
    if len(items) == 0:
        raise EvaluationError(f"{catalogue.table_path}: " + ("no items to evaluate" if whole else f"split {config.split!r} has no items to evaluate"))
    if runtime == "torch":
        model = load_model(model_dir).to(resolve_device(config.device, field="evaluate.device"))
    else:  # ONNX Runtime (onnx, onnxruntime) loads only for the runs that ask for it
        from lightclip.models.onnx_runtime import load_runtime_model

        model = load_runtime_model(model_dir, runtime)
    tokenizer = load_tokenizer(model_dir)
    shift = geometry_check(name, model_dir, geometry or CatalogueGeometry(catalogue, items))
    pre = preprocess_config(model)
    source = open_image_source(config.images, catalogue, None if whole else config.split, int(pre["size"]), cache_dir, progress=progress,
                               resize_mode=resize_mode_of(pre))
    titles = [str(t) for t in items["title"]]
    cache: ImageCache | None = source if isinstance(source, ImageCache) else None
    image_groups = None
    if cache is not None:
        emb = embed_split(model, tokenizer, cache, titles, config.batch_size)
    else:  # a stream: the image positives come from its per-image hashes
        emb, image_groups = embed_split_stream(model, tokenizer, source, titles, config.batch_size, content_groups="image" in config.positives)

    attributes = item_attributes(items, config)
    result, positives, metric_seconds = score_embeddings(emb, titles, cache, attributes, config, image_groups=image_groups)
    n = len(items)
    embed_seconds = emb.image_seconds + emb.text_seconds
    prefix = f"{scope or config.split}/"
    metrics = {prefix + k: v for k, v in result["metrics"].items()}
    metrics[prefix + "n_items"] = n
    metrics[prefix + "titles_truncated"] = int(emb.truncated.sum())
    metrics[prefix + "positive_pairs"] = int(positives.image_texts.size)
    if shift is not None:
        metrics[prefix + "geometry_shift"] = shift
    timings = {
        "encode_ms_per_item": 1000.0 * embed_seconds / n,
        "image_encode_ms_per_item": 1000.0 * emb.image_seconds / n,
        "text_encode_ms_per_item": 1000.0 * emb.text_seconds / n,
        "embed_seconds": embed_seconds,
        "metric_seconds": metric_seconds,
        "metric_share_of_embed": metric_seconds / embed_seconds if embed_seconds > 0 else float("nan"),
    }
    return ModelEvaluation(name=name, model_dir=str(model_dir), metrics=metrics, recall_curve=result["recall_curve"], timings=timings,
                           ranks=result["ranks"])


RANKS_FORMAT = "lightclip-eval-ranks/1"


def write_ranks(path: Path, results: Sequence[ModelEvaluation], split: str, ks: Sequence[int]) -> None:
    """Each model's per-query ranks on ``split``: what the gate's bootstrap resamples.

    ``{"format", "split", "ks", "models": {name: {"i2t": [rank per image query], "t2i": [...]}}}``,
    ranks 0-based; query ``i`` of each direction is item ``i`` of the split.
    """
    write_json(path, {"format": RANKS_FORMAT, "split": split, "ks": [int(k) for k in ks],
                      "models": {r.name: {d: [int(x) for x in r.ranks[d]] for d in DIRECTIONS} for r in results}})


def read_ranks(path: Path) -> dict[str, Any]:
    """The file :func:`write_ranks` wrote; a missing, foreign or malformed one is an error naming it."""
    data = read_format_json(path, RANKS_FORMAT, EvaluationError, missing=f"{path}: not found; run the evaluate stage (`lightclip evaluate --ranks {path}`)",
                            foreign=f"{path}: not a ranks file of lightclip evaluate (format {RANKS_FORMAT!r})")
    for name, entry in data.get("models", {}).items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(d), list) for d in DIRECTIONS):
            raise EvaluationError(f"{path}: model {name!r} has no i2t/t2i rank lists")
        if len(entry["i2t"]) != len(entry["t2i"]):
            raise EvaluationError(f"{path}: model {name!r} has {len(entry['i2t'])} image but {len(entry['t2i'])} text queries")
    return data



def write_outputs(results: Sequence[ModelEvaluation], split: str, *, metrics_path: Path, plots_dir: Path, figures_dir: Path | None) -> list[Path]:
    """``metrics_path`` (DVC metrics), the DVC plot data under ``plots_dir`` and PNGs under ``figures_dir``.

    Plot data: ``recall_at_k/<model>.csv`` (columns ``k``, ``i2t_recall``, ``t2i_recall``: one
    recall@k curve pair per model) and ``recall_vs_latency.csv`` (one row per model:
    ``model``, ``encode_ms_per_item``, ``mean_recall``, ``i2t_R@1``, ``t2i_R@1``). Returns the PNGs.
    Each directory is built aside and swapped in whole.
    """
    payload = {r.name: {**r.metrics, **{f"timing/{k}": v for k, v in r.timings.items()}, "model_dir": r.model_dir} for r in results}
    write_json(metrics_path, payload)
    with staged_dir(plots_dir) as staging:
        curve_dir = staging / "recall_at_k"
        curve_dir.mkdir()
        for r in results:
            ks = sorted(r.recall_curve["i2t"])
            lines = ["k,i2t_recall,t2i_recall"] + [f"{k},{r.recall_curve['i2t'][k]:.4f},{r.recall_curve['t2i'][k]:.4f}" for k in ks]
            (curve_dir / f"{r.name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        rows = ["model,encode_ms_per_item,mean_recall,i2t_R@1,t2i_R@1"]
        for r in results:
            m = r.metrics
            rows.append(f"{r.name},{r.timings['encode_ms_per_item']:.4f},{m[f'{split}/mean_recall']:.4f},{m[f'{split}/i2t_R@1']:.4f},{m[f'{split}/t2i_R@1']:.4f}")
        (staging / "recall_vs_latency.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if figures_dir is None:
        return []
    with staged_dir(figures_dir) as staging:
        names = [path.name for path in write_figures(results, split, staging)]
    return [Path(figures_dir) / name for name in names]


def write_figures(results: Sequence[ModelEvaluation], split: str, figures_dir: Path) -> list[Path]:
    """Matplotlib PNGs of the same two plots (for MLflow and the reports folder)."""
    # matplotlib loads only to draw: pyplot costs ~0.3 s of every process that imports
    # lightclip.evaluation (training, the index, serving) and never plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = [figures_dir / "recall_at_k.png", figures_dir / "recall_vs_latency.png"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, direction, label in zip(axes, DIRECTIONS, ("image -> text", "text -> image")):
        for r in results:
            ks = sorted(r.recall_curve[direction])
            ax.plot(ks, [r.recall_curve[direction][k] for k in ks], marker="o", label=r.name)
        ax.set_xscale("log")
        ticks = sorted(results[0].recall_curve[direction]) if results else []
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_xlabel("k")
        ax.set_title(f"{label} recall@k ({split})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@k (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for r in results:
        x, y = r.timings["encode_ms_per_item"], r.metrics[f"{split}/mean_recall"]
        ax.scatter([x], [y], s=40)
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("encode latency (ms per image + title)")
    ax.set_ylabel(f"mean recall, {split} (%)")
    ax.set_title("recall vs encode latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def run_evaluate(config: EvaluateConfig, inputs: EvaluateInputs, outputs: EvaluateOutputs, context: StageContext) -> dict[str, float]:
    """The ``evaluate`` stage: every model of ``config.models`` on ``config.split``, outputs written.

    Returns the metrics as logged: ``<model>/<split>/<metric>`` and ``<model>/timing/<name>``
    (``<model>/catalogue/<metric>`` for a whole catalogue: ``inputs.whole``).
    """
    catalogue = Catalogue.load(context.resolve(inputs.catalogue))
    model_dirs = check_model_dirs(config.models, context.project_dir)
    model_dirs.update(baseline_dirs(config.baselines, config.models, context.cache_dir, context.project_dir))
    scope = inputs.scope
    label = scope or config.split
    if inputs.whole:
        catalogue = sample_catalogue(catalogue, inputs.sample, inputs.seed)
        if len(catalogue.items) == 0:
            raise EvaluationError(f"{catalogue.table_path}: no items to evaluate")
    elif len(catalogue.split(config.split)) == 0:
        raise EvaluationError(f"{catalogue.table_path}: split {config.split!r} has no items to evaluate")
    geometry = CatalogueGeometry(catalogue, catalogue.items.reset_index(drop=True) if inputs.whole else catalogue.split(config.split))
    # without a thread count, torch keeps the process's own (its default: the physical cores)
    with torch_threads(config.num_threads) if config.num_threads else nullcontext():
        results = [
            evaluate_model(name, model_dirs[name], catalogue, config, cache_dir=context.image_cache_dir, progress=context.progress, scope=scope,
                           geometry=geometry)
            for name in model_dirs
        ]
    for r in results:  # record the paths as given in params (portable), not resolved
        r.model_dir = str(config.models[r.name]) if r.name in config.models else _baseline_label(config.baselines[r.name])
    write_outputs(results, label, metrics_path=context.resolve(outputs.metrics), plots_dir=context.resolve(outputs.plots),
                  figures_dir=None if outputs.figures is None else context.resolve(outputs.figures))
    if outputs.ranks is not None:
        write_ranks(context.resolve(outputs.ranks), results, label, config.ks)
    metrics: dict[str, float] = {}
    for r in results:
        metrics.update({f"{r.name}/{k}": v for k, v in r.metrics.items()})
        metrics.update({f"{r.name}/timing/{k}": v for k, v in r.timings.items()})
    return metrics


def _baseline_label(config: ModelConfig) -> str:
    """How a zero-shot baseline is named where a model directory would be: ``arch@pretrained``."""
    return f"{config.arch}@{config.pretrained}" if config.pretrained else config.arch


def summarise(metrics: Mapping[str, float], split: str, models: Sequence[str]) -> str:
    """One line per model of :func:`run_evaluate`'s metrics (what the CLI prints)."""
    return "\n".join(_summarise_model(name, {k[len(name) + 1 :]: v for k, v in metrics.items() if k.startswith(f"{name}/")}, split) for name in models)


def _summarise_model(name: str, values: Mapping[str, float], split: str) -> str:
    m = {k: v for k, v in values.items() if k.startswith(f"{split}/")}
    t = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("timing/")}
    parts = [
        f"{name}: mean recall {m[f'{split}/mean_recall']:.2f}",
        "i2t R@1/5/10 " + "/".join(f"{m[f'{split}/i2t_R@{k}']:.1f}" for k in KS if f"{split}/i2t_R@{k}" in m),
        "t2i R@1/5/10 " + "/".join(f"{m[f'{split}/t2i_R@{k}']:.1f}" for k in KS if f"{split}/t2i_R@{k}" in m),
        f"median rank i2t {m[f'{split}/i2t_median_rank']:g} t2i {m[f'{split}/t2i_median_rank']:g}",
    ]
    for key in (f"{split}/t2i_P@10_articleType", f"{split}/t2i_P@10_articleType_baseColour"):
        if key in m:
            parts.append(f"{key.split('/', 1)[1]} {m[key]:.1f}")
    parts.append(
        f"{int(m[f'{split}/n_items'])} items, embed {t['embed_seconds']:.2f}s ({t['encode_ms_per_item']:.2f} ms/item), "
        f"metrics {t['metric_seconds']:.3f}s ({100 * t['metric_share_of_embed']:.1f}% of embedding)"
    )
    return "; ".join(parts)
