"""``lightclip bench``: how fast, how big, how hungry each model is; a benchmark, not a test.

Per model (``bench.models``, default ``evaluate.models``):

* ``image_ms_p50/p95``, ``text_ms_p50/p95``: encode latency at batch 1, over ``bench.runs``
  (>= 100) timed calls after ``bench.warmup`` untimed ones; images are random tensors at the
  model's input size (speed does not depend on pixels), the text is a typical catalogue title
  (tokenised beforehand; ``lightclip.models.encode_text``, the path search uses), on the
  process's threads; ``image_ms_p50_one_thread``, ``text_ms_p50_one_thread``: the same on one
  thread (how a batch-1 service runs here: a small model loses to a second thread what a big
  one gains from it, so the teacher/student ratio depends on the thread count).
* ``image_per_s``, ``text_per_s``: throughput at batch ``bench.batch_size`` (64), the median
  of ``bench.throughput_batches`` timed batches.
* Both are timed in ``bench.rounds`` interleaved rounds over all the models (each round a share
  of every model's calls, a different model first), so that the teacher/student ratios do not
  depend on when each model happened to be measured on a shared machine.
* ``index_build_s``, ``query_ms_p50/p95``: the ``index.kind`` index over a synthetic gallery
  of ``bench.gallery_size`` vectors at the model's width, and batch-1 search latency;
  ``search_text_ms_p50/p95``: a whole text query (tokenise, encode, search).
* ``params_total``, ``params_non_embedding``, ``file_mb`` (``model.safetensors``),
  ``peak_rss_mb`` (the peak resident memory of a fresh process that loads the model and encodes
  a batch of ``bench.batch_size`` images and titles: what serving the model costs, free of what
  the bench process did before).
* ``efficiency`` (a section of its own): FLOPs per image and per title (counted), achieved
  GFLOP/s at batch ``bench.efficiency_batch_size`` (256) and its ratio to a square-matmul peak
  timed in the same run, fp32 and bf16 where the CPU has it, and int8 (the ONNX int8 graphs)
  where ``bench.runtimes`` lists ``onnx-int8`` (``lightclip.efficiency``, docs/efficiency.md).
* ``eval_overhead/*``: the evaluate stage's own time (positives and every metric:
  ``evaluation.score_embeddings``) on a split of ``bench.gallery_size`` products rendered by the
  embedded default's generator vs the
  stage's time to embed it (``evaluation.embed_split``: images from an image cache, titles
  tokenised, at ``evaluate.batch_size``); the first must stay under 10% of the second, both
  the median of ``bench.eval_rounds`` embed-then-score rounds.

Ratios (``ratios/<student>/...``) are teacher / student: ``x`` > 1 means the student is that
many times faster, smaller or lighter. ``index_scaling`` rows: build time, batch-1 query
latency and recall@10 against exact search for each index kind at 10k, 100k and 1M synthetic
vectors (clustered, L2-normalised: 1,024 Gaussian clusters, so neighbours are meaningful);
an HNSW size whose build is estimated (from the previous size, ``N log N``) to take longer than
``bench.hnsw_max_build_seconds`` is skipped and says so.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import platform
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lightclip.config import BenchConfig, EvaluateConfig, IndexConfig
from lightclip.efficiency import efficiency_metrics, efficiency_report, interleaved_timings, time_calls
from lightclip.io import cpu_budget, torch_threads, write_json
from lightclip.models.zoo import WEIGHTS_FILE, count_parameters, encode_text, load_model, load_tokenizer, preprocess_config
from lightclip.stage import StageContext

# The serving-memory probe runs this module in a fresh process, so its module-level imports
# count in the peak RSS it reports: those above are what serving a model loads anyway. The
# evaluation, the index (FAISS), the image cache and the synthetic renderer each add 90-105 MiB
# (pandas, pyarrow, FAISS) and are imported in the functions that use them.

SAMPLE_TITLE = "Maple Row Men Pink & Teal Striped Slim Fit V-Neck Long Sleeve T-shirt"
EVAL_OVERHEAD_LIMIT = 0.10


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def p50_p95_ms(samples: Sequence[float] | np.ndarray) -> tuple[float, float]:
    s = np.asarray(samples, dtype=np.float64) * 1000.0
    return float(np.percentile(s, 50)), float(np.percentile(s, 95))


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM, else getrusage)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _serving_rss_probe(model_dir: str, batch_size: int) -> float:
    """In a fresh process: load the model, encode a batch of images and of titles; peak RSS in MiB."""
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    size = int(preprocess_config(model)["size"])
    with torch.no_grad():
        model.encode_image(torch.zeros(batch_size, 3, size, size), normalize=True)
        encode_text(model, tokenizer([SAMPLE_TITLE] * batch_size), normalize=True)
    return peak_rss_mb()


def serving_peak_rss_mb(model_dir: Path, batch_size: int) -> float:
    """Peak RSS of a process that loads ``model_dir`` and encodes one batch of each kind.

    A fresh (spawned) process per model: in the bench's own process every model would carry
    what the ones before it left in the allocator, and the comparison would say nothing.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return float(pool.apply(_serving_rss_probe, (str(model_dir), batch_size)))


def machine_info() -> dict[str, Any]:
    import faiss  # see the note at the imports

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    budget = cpu_budget()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": budget.usable,  # the affinity mask capped by the cgroup CPU quota
        "cpu_affinity": budget.affinity,
        "cpu_quota": budget.quota,
        "threads_chosen": budget.describe(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "load_average_1min": load,
    }


# ----------------------------------------------------------------------------------------------
# Synthetic vectors for index timing
# ----------------------------------------------------------------------------------------------


def clustered_vectors(n: int, dim: int, *, seed: int, n_clusters: int = 1024, spread: float = 0.75, centre_seed: int = 12345) -> np.ndarray:
    """``n`` L2-normalised float32 vectors around ``n_clusters`` shared random centres."""
    centres = np.random.default_rng(centre_seed).standard_normal((n_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(spread / math.sqrt(dim))
        block += centres[rng.integers(0, n_clusters, stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def _index_config(base: IndexConfig, kind: str) -> IndexConfig:
    return base.model_copy(update={"kind": kind})


def bench_index_scaling(
    dim: int,
    config: BenchConfig,
    index_config: IndexConfig,
    *,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Build time, batch-1 query latency and recall@10 vs exact, per index kind and size."""
    from lightclip.index import build_faiss_index, recall_against, search_faiss  # see the note at the imports

    rows: list[dict[str, Any]] = []
    hnsw_prev: tuple[int, float] | None = None
    queries = clustered_vectors(config.index_queries, dim, seed=config.seed + 1)
    for n in config.index_sizes:
        base = clustered_vectors(n, dim, seed=config.seed)
        exact, _ = build_faiss_index(base, _index_config(index_config, "flat"), normalise=False)
        _, reference = search_faiss(exact, queries, 10)
        del exact
        for kind in config.index_kinds:
            row: dict[str, Any] = {"n": n, "kind": kind, "dim": dim}
            if kind == "hnsw" and hnsw_prev is not None:
                n0, t0 = hnsw_prev
                estimate = t0 * (n / n0) * (math.log(n) / math.log(n0))
                row["build_s_estimate"] = estimate
                if estimate > config.hnsw_max_build_seconds:
                    row["skipped"] = f"estimated build {estimate:.0f}s > {config.hnsw_max_build_seconds:.0f}s"
                    log(f"  index {kind:<4} n={n:>9,}: skipped ({row['skipped']})")
                    rows.append(row)
                    continue
            index, info = build_faiss_index(base, _index_config(index_config, kind), normalise=False)
            row["build_s"] = info["build_seconds"]
            row.update({k: v for k, v in info.items() if k in ("nlist", "nprobe", "m", "ef_construction", "ef_search")})
            if kind == "hnsw":
                hnsw_prev = (n, info["build_seconds"])
            single = iter(range(10**9))
            lat = time_calls(lambda: search_faiss(index, queries[next(single) % len(queries)][None, :], 10), warmup=3, runs=len(queries))
            row["query_ms_p50"], row["query_ms_p95"] = p50_p95_ms(lat)
            _, got = search_faiss(index, queries, 10)
            row["recall@10_vs_flat"] = recall_against(reference, got, 10)
            log(
                f"  index {kind:<4} n={n:>9,}: build {row['build_s']:7.2f}s, query p50 {row['query_ms_p50']:7.3f} ms "
                f"p95 {row['query_ms_p95']:7.3f} ms, recall@10 vs flat {row['recall@10_vs_flat']:.3f}"
            )
            rows.append(row)
            del index
            gc.collect()
        del base
        gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------
# Per model
# ----------------------------------------------------------------------------------------------


def synthetic_gallery(n: int, image_size: int, *, seed: int = 0) -> tuple[Any, list[str], dict[str, list[list[Any]]]]:
    """``n`` catalogue-like items drawn by the embedded default's generator (``data.synth``):
    product images in an image cache, their titles (some repeat, as in real catalogues) and
    articleType/baseColour attributes. Pixel noise would not do: a model maps noise images to
    nearly one embedding, and the flood of exactly tied similarities that follows is not what
    a real split costs."""
    from lightclip.data.synth import compose_title, render_item, sample_spec  # see the note at the imports
    from lightclip.imagecache import ImageCache

    rng = random.Random(seed)
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    titles, types, colours = [], [], []
    for i in range(n):
        spec = sample_spec(rng, f"bench-{i}")
        images[i] = np.asarray(render_item(spec, image_size)).transpose(2, 0, 1)
        titles.append(compose_title(spec, rng))
        types.append(spec.article)
        colours.append(spec.base)
    attributes = {"articleType": [types], "articleType_baseColour": [types, colours]}
    return ImageCache.from_array(images), titles, attributes


def eval_overhead(
    model: Any, tokenizer: Callable[..., Any], split: tuple[Any, list[str], dict[str, list[list[Any]]]], evaluate_config: EvaluateConfig, *, rounds: int = 3
) -> dict[str, Any]:
    """The evaluate stage's own time on ``split`` (from :func:`synthetic_gallery`) vs the time it takes to embed it.

    Both halves are the stage's code: ``embed_split`` (images from the cache, normalised;
    titles tokenised; at ``evaluate.batch_size``) and ``score_embeddings`` (positives by the
    ``evaluate.positives`` rules, every metric), on the whole split. Each of ``rounds`` rounds
    embeds the split, then scores it; the check compares the medians, since on a shared
    machine either half alone can be off by a third for a minute.
    """
    from lightclip.evaluation import embed_split, score_embeddings  # see the note at the imports

    cache, titles, attributes = split
    embed_times, metric_times = [], []
    for _ in range(max(1, rounds)):
        emb = embed_split(model, tokenizer, cache, titles, evaluate_config.batch_size)
        embed_times.append(emb.image_seconds + emb.text_seconds)
        metric_times.append(score_embeddings(emb, titles, cache, attributes, evaluate_config)[2])
    embed_s, metrics_s = float(np.median(embed_times)), float(np.median(metric_times))
    return {
        "gallery": len(titles),
        "rounds": len(embed_times),
        "embed_s": embed_s,
        "metrics_s": metrics_s,
        "share": metrics_s / embed_s,
        "ok": bool(metrics_s / embed_s < EVAL_OVERHEAD_LIMIT),
    }


def encode_speed(model_dirs: Mapping[str, Path], config: BenchConfig, *, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Batch-1 encode latency and batch throughput of every model, timed in interleaved rounds.

    Each of ``bench.rounds`` rounds times every model in turn (a share of the ``bench.runs``
    batch-1 calls of each kind, and throughput batches), starting with a different model each
    round: a change of machine state during the bench (another tenant, clock speed) then hits
    every model alike, which keeps the teacher/student ratios honest on a shared machine.
    """
    names = list(model_dirs)
    gen = torch.Generator().manual_seed(config.seed)
    calls: dict[str, dict[str, Callable[[], Any]]] = {}
    sizes: dict[str, int] = {}
    for name in names:
        model, tokenizer = load_model(model_dirs[name]).eval(), load_tokenizer(model_dirs[name])
        size = int(preprocess_config(model)["size"])
        sizes[name] = size
        one_image = torch.randn(1, 3, size, size, generator=gen)
        batch_images = torch.randn(config.batch_size, 3, size, size, generator=gen)
        one_text = tokenizer([SAMPLE_TITLE])
        batch_text = tokenizer([f"{SAMPLE_TITLE} {i}" for i in range(config.batch_size)])
        calls[name] = {
            "image": lambda m=model, x=one_image: m.encode_image(x, normalize=True),
            "text": lambda m=model, t=one_text: encode_text(m, t, normalize=True),
            "image_batch": lambda m=model, x=batch_images: m.encode_image(x, normalize=True),
            "text_batch": lambda m=model, t=batch_text: encode_text(m, t, normalize=True),
        }
    latency, batch = {"image": config.runs, "text": config.runs}, {"image_batch": config.throughput_batches, "text_batch": config.throughput_batches}
    with torch.no_grad():
        samples = interleaved_timings(calls, rounds=config.rounds, runs=latency | batch,
                                      warmup={kind: config.warmup if kind in latency else 1 for kind in latency | batch})
        # Batch 1 again on one thread: a small model loses time to a second thread that a big one
        # gains from, and one thread is how a batch-1 service runs here (serve.threads, the gate).
        with torch_threads(1):
            single = interleaved_timings({name: {kind: calls[name][kind] for kind in latency} for name in names}, rounds=config.rounds,
                                         runs=latency, warmup={kind: config.warmup for kind in latency})
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row: dict[str, float] = {}
        row["image_ms_p50"], row["image_ms_p95"] = p50_p95_ms(samples[name]["image"])
        row["text_ms_p50"], row["text_ms_p95"] = p50_p95_ms(samples[name]["text"])
        row["image_ms_p50_one_thread"] = p50_p95_ms(single[name]["image"])[0]
        row["text_ms_p50_one_thread"] = p50_p95_ms(single[name]["text"])[0]
        row["image_per_s"] = config.batch_size / float(np.median(samples[name]["image_batch"]))
        row["text_per_s"] = config.batch_size / float(np.median(samples[name]["text_batch"]))
        row["latency_runs"] = len(samples[name]["image"])
        row["image_size"] = sizes[name]
        out[name] = row
        log(
            f"  {name}: image p50 {row['image_ms_p50']:.2f} ms p95 {row['image_ms_p95']:.2f} ms, text p50 {row['text_ms_p50']:.2f} ms "
            f"p95 {row['text_ms_p95']:.2f} ms (one thread: image {row['image_ms_p50_one_thread']:.2f}, text {row['text_ms_p50_one_thread']:.2f} ms); batch {config.batch_size}: {row['image_per_s']:.0f} images/s, {row['text_per_s']:.0f} texts/s"
        )
    return out


def bench_model(
    name: str,
    model_dir: Path,
    config: BenchConfig,
    evaluate_config: EvaluateConfig,
    index_config: IndexConfig,
    split: tuple[Any, list[str], dict[str, list[list[Any]]]],
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Size, index, search and evaluate-overhead figures of one model (``split``: the rendered
    evaluate-overhead split at the model's image size)."""
    from lightclip.index import build_faiss_index, search_faiss  # see the note at the imports

    t0 = time.perf_counter()
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    pre = preprocess_config(model)
    size = int(pre["size"])
    params = count_parameters(model)
    out: dict[str, Any] = {
        "model_dir": str(model_dir),
        "params_total": params["total"],
        "params_non_embedding": params["non_embedding"],
        "file_mb": (Path(model_dir) / WEIGHTS_FILE).stat().st_size / 2**20,
        "load_s": load_s,
        "image_size": size,
    }
    with torch.no_grad():
        dim = int(model.encode_image(torch.zeros(1, 3, size, size), normalize=True).shape[-1])
    out["embed_dim"] = dim

    gallery = clustered_vectors(config.gallery_size, dim, seed=config.seed)
    index, info = build_faiss_index(gallery, index_config, normalise=False)
    out["index_kind"] = index_config.kind
    out["index_items"] = config.gallery_size
    out["index_build_s"] = info["build_seconds"]
    queries = clustered_vectors(config.runs, dim, seed=config.seed + 1)
    counter = iter(range(10**9))
    lat = time_calls(lambda: search_faiss(index, queries[next(counter) % len(queries)][None, :], 10), warmup=config.warmup, runs=config.runs)
    out["query_ms_p50"], out["query_ms_p95"] = p50_p95_ms(lat)

    def text_search() -> None:
        with torch.no_grad():
            vector = encode_text(model, tokenizer([SAMPLE_TITLE]), normalize=True).float().numpy()
        search_faiss(index, vector, 10)

    lat = time_calls(text_search, warmup=config.warmup, runs=config.runs)
    out["search_text_ms_p50"], out["search_text_ms_p95"] = p50_p95_ms(lat)
    log(
        f"  {name}: {index_config.kind} index of {config.gallery_size:,}: build {out['index_build_s']:.3f}s, query p50 "
        f"{out['query_ms_p50']:.3f} ms p95 {out['query_ms_p95']:.3f} ms; text search end to end p50 {out['search_text_ms_p50']:.2f} ms"
    )
    del index, gallery

    out["peak_rss_mb"] = serving_peak_rss_mb(Path(model_dir), config.batch_size)
    overhead = eval_overhead(model, tokenizer, split, evaluate_config, rounds=config.eval_rounds)
    out.update({f"eval_overhead/{k}": v for k, v in overhead.items()})
    verdict = "OK" if overhead["ok"] else f"TOO SLOW (limit {EVAL_OVERHEAD_LIMIT:.0%})"
    log(
        f"  {name}: evaluate on a {overhead['gallery']:,}-item gallery: metrics {overhead['metrics_s']:.2f}s vs embedding "
        f"{overhead['embed_s']:.1f}s = {overhead['share']:.1%} of the embedding time: {verdict}"
    )
    log(f"  {name}: {params['total'] / 1e6:.2f}M parameters ({params['non_embedding'] / 1e6:.2f}M non-embedding), {out['file_mb']:.1f} MiB, peak RSS {out['peak_rss_mb']:.0f} MiB")
    return out


RATIO_KEYS: dict[str, tuple[str, bool]] = {
    # name: (key, higher_is_better)
    "image_latency_x": ("image_ms_p50", False),
    "text_latency_x": ("text_ms_p50", False),
    "image_latency_one_thread_x": ("image_ms_p50_one_thread", False),
    "text_latency_one_thread_x": ("text_ms_p50_one_thread", False),
    "image_throughput_x": ("image_per_s", True),
    "text_throughput_x": ("text_per_s", True),
    "params_x": ("params_total", False),
    "params_non_embedding_x": ("params_non_embedding", False),
    "file_size_x": ("file_mb", False),
    "peak_rss_x": ("peak_rss_mb", False),
}


def model_ratios(models: Mapping[str, Mapping[str, Any]], teacher: str) -> dict[str, dict[str, float]]:
    """Per student: how many times faster/smaller than the teacher (> 1 = the student wins)."""
    if teacher not in models:
        return {}
    t = models[teacher]
    ratios: dict[str, dict[str, float]] = {}
    for name, s in models.items():
        if name == teacher:
            continue
        ratios[name] = {
            label: float(s[key] / t[key] if better else t[key] / s[key]) for label, (key, better) in RATIO_KEYS.items() if t.get(key) and s.get(key)
        }
    return ratios


@dataclass(frozen=True)
class BenchInputs:
    """What the bench reads besides ``bench``: the models and metric settings of ``evaluate`` (its
    models when ``bench.models`` is null; its metrics for the evaluate-overhead check) and the
    ``index`` settings; ``index_scaling: False`` skips the index kinds x sizes table."""

    evaluate: EvaluateConfig
    index: IndexConfig
    index_scaling: bool = True
    catalogue: Path | None = None  # the evaluated catalogue (data/split): each runtime's recall; None skips the runtimes


@dataclass(frozen=True)
class BenchOutputs:
    report: Path  # metrics/speed.json
    plot_data: Path | None = None  # metrics/plots/bench/recall_vs_latency.csv (DVC plot): every model and runtime
    figure: Path | None = None  # the same plot as a PNG (MLflow)


def run_bench(config: BenchConfig, inputs: BenchInputs, outputs: BenchOutputs, context: StageContext, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``lightclip bench``: the speed report, written to ``outputs.report`` and returned; with a
    catalogue and ``bench.runtimes``, the recall-vs-latency plot of every model and runtime too."""
    report = bench_report(config, inputs.evaluate, inputs.index, project_dir=context.project_dir, index_scaling=inputs.index_scaling, log=log,
                          catalogue=inputs.catalogue, cache_dir=context.cache_dir)
    write_json(outputs.report, report)
    if report.get("runtimes"):
        from lightclip.runtimes import write_figure, write_plot_data  # see the note at the imports

        if outputs.plot_data is not None:
            write_plot_data(report["runtimes"], outputs.plot_data)
        if outputs.figure is not None:
            write_figure(report["runtimes"], outputs.figure, inputs.evaluate.split)
    return report


def bench_report(
    config: BenchConfig,
    evaluate_config: EvaluateConfig,
    index_config: IndexConfig,
    *,
    project_dir: Path,
    index_scaling: bool = True,
    log: Callable[[str], None] = print,
    catalogue: Path | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Benchmark every model (a missing model dir is an error) and the index kinds at scale; with
    ``catalogue``, every model on every runtime of ``bench.runtimes`` (:mod:`lightclip.runtimes`)."""
    from lightclip.evaluation import check_model_dirs  # see the note at the imports

    models = config.models if config.models is not None else evaluate_config.models
    model_dirs = check_model_dirs(models, project_dir)
    if config.num_threads:
        index_config = index_config.model_copy(update={"threads": config.num_threads})
    # without bench.num_threads, torch and FAISS keep the process's own counts
    with torch_threads(config.num_threads, faiss_too=True) if config.num_threads else nullcontext():
        machine = machine_info()
        log(f"machine: {machine['cpu']}, {machine['cores_usable']} usable cores, torch {machine['torch_threads']} threads, load {machine['load_average_1min']:.2f}")
        log(f"encode speed, {config.rounds} interleaved rounds:")
        speed = encode_speed(model_dirs, config, log=log)
        gc.collect()
        caches = Path(cache_dir if cache_dir is not None else project_dir / ".cache")
        efficiency: dict[str, Any] = {}
        if config.efficiency_batch_size:
            int8_dirs = None
            if catalogue is not None and "onnx-int8" in config.runtimes:
                from lightclip.runtimes import runtime_dir  # see the note at the imports

                int8_dirs = {name: runtime_dir(directory, "onnx-int8", caches / "runtimes") for name, directory in model_dirs.items()}
            efficiency = efficiency_report(model_dirs, batch_size=config.efficiency_batch_size, runs=config.efficiency_runs, seed=config.seed,
                                           log=log, int8_dirs=int8_dirs)
            gc.collect()
        # the evaluate-overhead split, rendered once per image size and shared by the models
        splits = {size: synthetic_gallery(config.gallery_size, size, seed=config.seed) for size in sorted({r["image_size"] for r in speed.values()})}
        results = {}
        for name in models:
            split = splits[speed[name]["image_size"]]
            results[name] = {**speed[name], **bench_model(name, model_dirs[name], config, evaluate_config, index_config, split, log=log)}
            results[name]["model_dir"] = str(models[name])
            gc.collect()
        ratios = model_ratios(results, config.teacher)
        for name, r in ratios.items():
            log(f"  {config.teacher} / {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
        runtimes: dict[str, Any] = {}
        if catalogue is not None and config.runtimes:
            from lightclip.data.catalogue import Catalogue  # see the note at the imports
            from lightclip.runtimes import compare_runtimes

            log(f"runtimes ({', '.join(config.runtimes)}): batch-1 latency, {config.rounds} interleaved rounds, and {evaluate_config.split} recall:")
            runtimes = compare_runtimes(model_dirs, config.runtimes, Catalogue.load(catalogue), evaluate_config, cache_dir=caches / "runtimes",
                                        image_cache_dir=caches / "images", rounds=config.rounds, calls=config.runs, log=log)
            gc.collect()
        scaling: list[dict[str, Any]] = []
        if index_scaling and config.index_sizes:
            dim = next(iter(results.values()))["embed_dim"]
            log(f"index scaling at {dim} dims ({', '.join(config.index_kinds)}; {config.index_queries} queries):")
            scaling = bench_index_scaling(dim, config, index_config, log=log)
    return {
        "machine": machine,
        "models": results,
        "ratios": ratios,
        "index_scaling": scaling,
        "efficiency": efficiency,
        "runtimes": runtimes,
        "config": {"bench": config.model_dump(mode="json"), "index": index_config.model_dump(mode="json")},
    }


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Numeric values of a bench report as flat MLflow metric names."""
    out: dict[str, float] = {}
    for name, values in report["models"].items():
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{name}/{k}"] = float(v)
    for name, values in report["ratios"].items():
        for k, v in values.items():
            out[f"ratios/{name}/{k}"] = float(v)
    for row in report["index_scaling"]:
        for k in ("build_s", "query_ms_p50", "query_ms_p95", "recall@10_vs_flat"):
            if k in row:
                out[f"index_scaling/{row['kind']}/{row['n']}/{k}"] = float(row[k])
    out.update(efficiency_metrics(report.get("efficiency") or {}))
    for name, runtimes in (report.get("runtimes") or {}).items():
        for runtime, row in runtimes.items():
            for k in ("batch1_ms", "mean_recall", "recall_change"):
                if row.get(k) is not None:
                    out[f"runtimes/{name}/{runtime}/{k}"] = float(row[k])
    return out
