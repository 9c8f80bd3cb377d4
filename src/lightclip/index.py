"""The FAISS catalogue index: image embeddings of every product, searchable by text or image.

An index directory (the ``index`` stage's DVC output) holds

* ``index.faiss``: the FAISS index over L2-normalised image embeddings, inner product metric
  (so scores are cosine similarities): ``flat`` (exact, the default), ``ivf`` (inverted
  lists, ``nlist``/``nprobe``) or ``hnsw`` (graph, ``m``/``ef_construction``/``ef_search``);
* ``items.json``: the item ids and titles (and ``articleType``/``baseColour``) in index row
  order: row ``r`` of the index is item ``ids[r]``;
* ``index.json``: format, kind and knobs, dimension and count, and the model it was built
  with (its directory, ``model.safetensors`` sha256, architecture and embedding size) and the
  catalogue table's sha256.

Loading checks that the three files agree (row count, dimension, unique ids); searching with a
model checks that the model is the one the index was built with (same embedding size, same
weights hash), so a stale index after retraining is an error that says to rebuild it, never
a silently wrong answer.

Ranking: results are ordered by score (descending) and, at exactly equal scores, by index row
(ascending), the same tie rule as :mod:`lightclip.evaluation`. ``flat`` returns exactly the
brute-force top-k (which of several items tied at the k-th score is kept is FAISS's choice).

Queries: a text longer than the model's context is truncated to its first
``context_length - 2`` BPE tokens (open_clip's rule); the result says so (``truncated``) and
the CLI prints a warning. An empty query is an error.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from lightclip.config import IndexConfig
from lightclip.devices import resolve_device
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.data.geometry import check_items, model_geometry
from lightclip.errors import LightclipError
from lightclip.evaluation import embed_images, embed_texts, tokenize_checked
from lightclip.imagecache import ImageCache, ImageCacheError, decode_image, resize_mode_of
from lightclip.imagestream import embed_image_stream, open_image_source
from lightclip.io import staged_dir, torch_threads, write_json
from lightclip.models.zoo import WEIGHTS_FILE, load_model, load_tokenizer, preprocess_config, read_model_info, weights_sha256
from lightclip.stage import StageContext

INDEX_FORMAT = "lightclip-index/1"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.json"
META_FILE = "index.json"
KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
ITEM_ATTRIBUTES: tuple[str, ...] = ("articleType", "baseColour")

log = logging.getLogger(__name__)


class CatalogueIndexError(LightclipError, ValueError):
    """An index that cannot be built, read or searched; the message says which and why."""


class IndexMismatchError(CatalogueIndexError):
    """An index and a model (or catalogue) that disagree: dimension, ids or a stale weights hash."""


# ----------------------------------------------------------------------------------------------
# FAISS indexes
# ----------------------------------------------------------------------------------------------


def auto_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about ``4 sqrt(n)``, with at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def _as_vectors(vectors: Any, what: str = "vectors") -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(vectors.detach().cpu().numpy() if hasattr(vectors, "detach") else vectors, dtype=np.float32))
    if x.ndim != 2:
        raise CatalogueIndexError(f"{what}: expected an N x D matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise CatalogueIndexError(f"{what}: contain NaN or inf")
    return x


def normalise_rows(vectors: Any) -> np.ndarray:
    """L2-normalised float32 copy (zero rows stay zero)."""
    x = _as_vectors(vectors).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _threads(config: IndexConfig, *, faiss_too: bool) -> Any:
    """``index.threads`` for torch (and FAISS) while a block runs; null = the CPUs this process may use."""
    return torch_threads(config.threads, faiss_too=faiss_too)


def build_faiss_index(vectors: Any, config: IndexConfig, *, normalise: bool = True) -> tuple[faiss.Index, dict[str, Any]]:
    """A FAISS inner-product index of ``config.kind`` over ``vectors``; returns it and build facts."""
    x = normalise_rows(vectors) if normalise else _as_vectors(vectors)
    n, dim = x.shape
    if n == 0:
        raise CatalogueIndexError("no vectors to index")
    with _threads(config, faiss_too=True):
        return _build(x, config)


def _build(x: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, dict[str, Any]]:
    n, dim = x.shape
    info: dict[str, Any] = {"kind": config.kind, "count": int(n), "dim": int(dim)}
    t0 = time.perf_counter()
    if config.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif config.kind == "ivf":
        nlist = config.ivf.nlist or auto_nlist(n)
        if nlist > n:
            raise CatalogueIndexError(f"index.ivf.nlist = {nlist} lists for only {n} vectors; use at most {n} (or null for auto: {auto_nlist(n)})")
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = config.seed
        sample_size = min(n, config.ivf.train_points_per_list * nlist)
        sample = x if sample_size == n else x[np.sort(np.random.default_rng(config.seed).choice(n, sample_size, replace=False))]
        ivf.cp.max_points_per_centroid = max(1, -(-sample_size // nlist))  # use the whole sample, no second subsampling
        index.train(sample)
        ivf.nprobe = min(config.ivf.nprobe, nlist)
        info.update(nlist=int(nlist), nprobe=int(ivf.nprobe), train_points=int(sample_size))
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw.ef_construction
        index.hnsw.efSearch = config.hnsw.ef_search
        info.update(m=config.hnsw.m, ef_construction=config.hnsw.ef_construction, ef_search=config.hnsw.ef_search)
    else:  # the config validates this; kept for direct callers
        raise CatalogueIndexError(f"unknown index kind {config.kind!r}; allowed: {list(KINDS)}")
    index.add(x)
    info["build_seconds"] = time.perf_counter() - t0
    return index, info


def search_faiss(index: faiss.Index, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, rows) per query, ordered by score desc then row asc; missing = (-inf, -1)."""
    q = _as_vectors(queries, "queries")
    if q.shape[1] != index.d:
        raise IndexMismatchError(f"queries are {q.shape[1]}-d but the index is {index.d}-d")
    k = max(1, min(int(k), index.ntotal))
    scores, rows = index.search(q, k)
    scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
    rows = rows.astype(np.int64)
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=-1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def recall_against(reference_rows: np.ndarray, rows: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the reference top-``k`` (exact search) that ``rows`` also returns."""
    hits = [len(set(ref[:k].tolist()) & set(got[:k].tolist()) - {-1}) / max(1, min(k, (ref[:k] >= 0).sum())) for ref, got in zip(reference_rows, rows)]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------------------------
# The catalogue index: FAISS + ids + the model it belongs to
# ----------------------------------------------------------------------------------------------


def model_fingerprint(model_dir: Path | str) -> dict[str, Any]:
    """What identifies a saved model for the index: weights sha256 (verified), architecture, embedding size."""
    info = read_model_info(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CatalogueIndexError(f"{model_dir}: no {WEIGHTS_FILE}")
    return {"dir": str(model_dir), "weights_sha256": weights_sha256(model_dir), "arch": info["arch"], "embed_dim": int(info["embed_dim"])}


@dataclass(frozen=True)
class Hit:
    rank: int
    row: int
    id: str
    title: str
    score: float
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CatalogueIndex:
    """A FAISS index with the item of each row and the model that embedded them."""

    index: faiss.Index
    ids: list[str]
    titles: list[str]
    meta: dict[str, Any]
    attributes: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def validate(self, source: str = "index") -> None:
        """The FAISS index, the item list and the metadata must agree."""
        n = int(self.index.ntotal)
        problems = []
        if len(self.ids) != n:
            problems.append(f"{len(self.ids)} item ids for {n} index rows")
        if len(self.titles) != len(self.ids):
            problems.append(f"{len(self.titles)} titles for {len(self.ids)} ids")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted(i for i, c in Counter(self.ids).items() if c > 1)
            problems.append(f"{len(dup)} duplicate item id(s), e.g. {dup[:5]}")
        if int(self.meta.get("dim", self.index.d)) != int(self.index.d):
            problems.append(f"metadata says {self.meta.get('dim')}-d, the FAISS index is {self.index.d}-d")
        if int(self.meta.get("count", n)) != n:
            problems.append(f"metadata says {self.meta.get('count')} items, the FAISS index holds {n}")
        for name, values in self.attributes.items():
            if len(values) != len(self.ids):
                problems.append(f"{len(values)} {name} values for {len(self.ids)} ids")
        if problems:
            raise IndexMismatchError(f"{source}: the index files disagree: " + "; ".join(problems) + " (rebuild it: lightclip index)")

    def check_model(self, model_dir: Path | str) -> dict[str, Any]:
        """Raise :class:`IndexMismatchError` unless ``model_dir`` holds the model the index was built with."""
        current = model_fingerprint(model_dir)
        built = self.meta.get("model", {})
        if current["embed_dim"] != self.dim:
            raise IndexMismatchError(
                f"the model at {model_dir} embeds to {current['embed_dim']} dims but the index holds {self.dim}-d vectors "
                f"(built with {built.get('dir')}, {built.get('arch')}); search with that model or rebuild the index"
            )
        if built.get("weights_sha256") != current["weights_sha256"]:
            raise IndexMismatchError(
                f"stale index: it was built from weights {str(built.get('weights_sha256'))[:12]}... ({built.get('dir')}), but "
                f"{model_dir} now holds {current['weights_sha256'][:12]}...; rebuild it (lightclip index, or dvc repro index)"
            )
        return current

    def check_catalogue(self, ids: Sequence[Any]) -> None:
        """Raise :class:`IndexMismatchError` unless the index rows are exactly these item ids, in order."""
        ids = [str(i) for i in ids]
        if ids != self.ids:
            missing = sorted(set(ids) - set(self.ids))
            extra = sorted(set(self.ids) - set(ids))
            raise IndexMismatchError(
                f"the index does not match the catalogue: {len(self.ids)} indexed vs {len(ids)} catalogue items, "
                f"{len(missing)} not indexed (e.g. {missing[:5]}), {len(extra)} no longer in the catalogue (e.g. {extra[:5]})"
                + ("" if missing or extra else ", same ids in another order")
                + "; rebuild it (lightclip index)"
            )

    def search(self, vectors: Any, k: int = 10) -> list[list[Hit]]:
        """Top-``k`` hits per query vector (normalised here), ordered by score desc then row asc."""
        q = normalise_rows(vectors)
        if q.shape[1] != self.dim:
            raise IndexMismatchError(f"query vectors are {q.shape[1]}-d but the index holds {self.dim}-d vectors")
        scores, rows = search_faiss(self.index, q, k)
        results = []
        for srow, rrow in zip(scores, rows):
            hits = []
            for score, row in zip(srow.tolist(), rrow.tolist()):
                if row < 0:
                    continue
                attrs = {name: values[row] for name, values in self.attributes.items()}
                hits.append(Hit(rank=len(hits) + 1, row=row, id=self.ids[row], title=self.titles[row], score=float(score), attributes=attrs))
            results.append(hits)
        return results

    def save(self, directory: Path | str) -> Path:
        """Write ``index.faiss``, ``items.json`` and ``index.json`` (replacing the directory atomically)."""
        with staged_dir(directory) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            write_json(tmp / ITEMS_FILE, {"ids": self.ids, "titles": self.titles, **self.attributes}, indent=None, sort_keys=False)
            write_json(tmp / META_FILE, self.meta)
        return Path(directory)

    @classmethod
    def load(cls, directory: Path | str) -> "CatalogueIndex":
        directory = Path(directory)
        for name in (META_FILE, INDEX_FILE, ITEMS_FILE):
            if not (directory / name).is_file():
                raise CatalogueIndexError(f"{directory}: not a lightclip index (no {name}); build one with: lightclip index")
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            items = json.loads((directory / ITEMS_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CatalogueIndexError(f"{directory}: unreadable index metadata: {exc}") from None
        if meta.get("format") != INDEX_FORMAT:
            raise CatalogueIndexError(f"{directory / META_FILE}: unknown format {meta.get('format')!r}; expected {INDEX_FORMAT!r}")
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as exc:
            raise CatalogueIndexError(f"{directory / INDEX_FILE}: not a readable FAISS index: {exc}") from None
        _apply_search_knobs(index, meta)
        attributes = {k: v for k, v in items.items() if k not in ("ids", "titles")}
        obj = cls.__new__(cls)
        obj.index, obj.ids, obj.titles, obj.meta, obj.attributes = index, [str(i) for i in items.get("ids", [])], list(items.get("titles", [])), meta, attributes
        obj.validate(str(directory))
        return obj


def _apply_search_knobs(index: faiss.Index, meta: dict[str, Any]) -> None:
    params = meta.get("params", {})
    if meta.get("kind") == "ivf" and "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    elif meta.get("kind") == "hnsw" and "ef_search" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


# ----------------------------------------------------------------------------------------------
# The index stage
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexInputs:
    catalogue: Path  # the catalogue to index (data/split); the model is ``index.model``


@dataclass(frozen=True)
class IndexOutputs:
    index: Path  # models/index: the FAISS index, item ids and the index's facts
    metrics: Path  # metrics/index.json


def run_index(config: IndexConfig, inputs: IndexInputs, outputs: IndexOutputs, context: StageContext) -> dict[str, Any]:
    """The ``index`` stage: embed and index the catalogue, save the index and its metrics."""
    index, metrics = build_catalogue_index(
        Catalogue.load(inputs.catalogue), context.resolve(config.model), config, cache_dir=context.image_cache_dir, progress=context.progress
    )
    index.meta["model"]["dir"] = config.model  # as given: relative to the project, so the index is portable
    out = index.save(outputs.index)
    metrics["index/file_mb"] = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    write_json(outputs.metrics, metrics)
    return metrics


def build_catalogue_index(
    catalogue: Catalogue,
    model_dir: Path | str,
    config: IndexConfig,
    *,
    cache_dir: Path | str,
    progress: bool = False,
) -> tuple[CatalogueIndex, dict[str, Any]]:
    """Embed the catalogue's images (``config.split``, or every item) and index them.

    Returns the index and the stage metrics (counts, timings, recall@10 against exact search
    for ``ivf``/``hnsw`` on up to ``config.eval_queries`` of the items' titles as queries).
    """
    items = catalogue.items if config.split is None else catalogue.split(config.split)
    if len(items) == 0:
        raise CatalogueIndexError(f"{catalogue.table_path}: {'no items' if config.split is None else f'split {config.split!r} has no items'} to index")
    fingerprint = model_fingerprint(model_dir)
    model = load_model(model_dir).to(resolve_device(config.device, field="index.device"))
    checked = check_items(model_geometry(read_model_info(model_dir)), catalogue, items)
    if checked is not None and checked[1] is not None:
        log.warning("index of %s with %s: %s", catalogue.root, model_dir, checked[1])
    pre = preprocess_config(model)
    size = int(pre["size"])
    with _threads(config, faiss_too=False):  # the query latencies below: FAISS on its default threads
        source = open_image_source(config.images, catalogue, config.split, size, cache_dir, resize_mode=resize_mode_of(pre), progress=progress)
        t0 = time.perf_counter()
        vectors = (embed_images(model, source, config.batch_size) if isinstance(source, ImageCache) else embed_image_stream(model, source, config.batch_size).image).numpy()
        embed_seconds = time.perf_counter() - t0
        if vectors.shape[1] != fingerprint["embed_dim"]:
            raise IndexMismatchError(f"{model_dir}: model.json says {fingerprint['embed_dim']} dims, the model embeds to {vectors.shape[1]}")
        index, info = build_faiss_index(vectors, config)
        meta = {
            "format": INDEX_FORMAT,
            "kind": config.kind,
            "metric": "inner_product (cosine on L2-normalised vectors)",
            "dim": int(vectors.shape[1]),
            "count": int(vectors.shape[0]),
            "params": {k: v for k, v in info.items() if k not in ("kind", "count", "dim", "build_seconds")},
            "model": fingerprint,
            "catalogue": {"dir": str(catalogue.root), "table_sha256": file_sha256(catalogue.table_path), "split": config.split},
        }
        attributes = {a: [None if v is None else str(v) for v in items[a]] for a in ITEM_ATTRIBUTES if a in items.columns and items[a].notna().any()}
        cat_index = CatalogueIndex(index=index, ids=[str(i) for i in items["id"]], titles=[str(t) for t in items["title"]], meta=meta, attributes=attributes)

        metrics: dict[str, Any] = {
            "index/count": int(vectors.shape[0]),
            **({"index/geometry_shift": checked[0]} if checked is not None else {}),
            "index/dim": int(vectors.shape[1]),
            "index/build_seconds": info["build_seconds"],
            "index/embed_seconds": embed_seconds,
        }
        n_queries = min(config.eval_queries, len(items))
        if n_queries:
            rows = np.linspace(0, len(items) - 1, n_queries).round().astype(int)
            tokens, _ = tokenize_checked(load_tokenizer(model_dir), [str(items["title"].iloc[r]) for r in rows])
            queries = embed_texts(model, tokens, config.batch_size).numpy()
            latencies = []
            for q in queries:
                t = time.perf_counter()
                search_faiss(index, q[None, :], 10)
                latencies.append(time.perf_counter() - t)
            metrics["index/query_ms_p50"] = float(np.percentile(latencies, 50) * 1000)
            metrics["index/query_ms_p95"] = float(np.percentile(latencies, 95) * 1000)
            if config.kind != "flat":
                exact = _exact_index(vectors)
                _, reference = search_faiss(exact, queries, 10)
                _, got = search_faiss(index, queries, 10)
                metrics["index/recall@10_vs_flat"] = recall_against(reference, got, 10)
            else:
                metrics["index/recall@10_vs_flat"] = 1.0
    return cat_index, metrics


def _exact_index(vectors: np.ndarray) -> faiss.Index:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(normalise_rows(vectors))
    return exact


# ----------------------------------------------------------------------------------------------
# Search: text or image queries against a saved index
# ----------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    query: str
    hits: list[Hit]
    truncated: bool = False
    tokens: int = 0
    context_length: int = 0


class Searcher:
    """A loaded index and the model that embeds queries for it (checked against each other)."""

    def __init__(self, index_dir: Path | str, model_dir: Path | str | None = None, *, project_dir: Path | str | None = None) -> None:
        self.index = CatalogueIndex.load(index_dir)
        self.model_label = str(model_dir) if model_dir is not None else str(self.index.meta.get("model", {}).get("dir"))
        if model_dir is None:
            recorded = self.index.meta.get("model", {}).get("dir")
            if not recorded:
                raise CatalogueIndexError(f"{index_dir}: the index does not record its model; pass --model")
            model_dir = Path(recorded)
            if not model_dir.is_absolute() and project_dir is not None:
                model_dir = Path(project_dir) / model_dir
        self.model_dir = Path(model_dir)
        self.index.check_model(self.model_dir)
        self.model = load_model(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)

    def embed_text(self, text: str) -> tuple[np.ndarray, bool, int, int]:
        if not str(text).strip():
            raise CatalogueIndexError("empty query: give some words to search for")
        tokens, truncated = tokenize_checked(self.tokenizer, [str(text)])
        encode = getattr(self.tokenizer, "encode", None)
        n_tokens = len(encode(str(text))) + 2 if encode is not None else int((tokens[0] != 0).sum())
        return embed_texts(self.model, tokens).numpy(), bool(truncated[0]), n_tokens, int(tokens.shape[1])

    def text(self, query: str, k: int = 10) -> SearchResult:
        vector, truncated, n_tokens, context = self.embed_text(query)
        return SearchResult(query=query, hits=self.index.search(vector, k)[0], truncated=truncated, tokens=n_tokens, context_length=context)

    def image(self, path: Path | str, k: int = 10) -> SearchResult:
        path = Path(path)
        if not path.is_file():
            raise CatalogueIndexError(f"{path}: image not found")
        pre = preprocess_config(self.model)
        try:
            array = decode_image(path, int(pre["size"]), resize_mode=resize_mode_of(pre))
        except ImageCacheError as exc:
            raise CatalogueIndexError(str(exc)) from None
        vector = embed_images(self.model, array[None]).numpy()
        return SearchResult(query=str(path), hits=self.index.search(vector, k)[0])


def format_result(result: SearchResult, searcher: Searcher) -> str:
    """A plain-text table of hits (what ``lightclip search`` prints)."""
    meta = searcher.index.meta
    lines = [f"query: {result.query!r}  (model {searcher.model_label}, {meta['kind']} index of {len(searcher.index)} items)"]
    width = max([len(h.id) for h in result.hits] + [2])
    lines.append(f"{'rank':>4}  {'score':>6}  {'id':<{width}}  title")
    for h in result.hits:
        lines.append(f"{h.rank:>4}  {h.score:6.3f}  {h.id:<{width}}  {h.title}")
    return "\n".join(lines)
