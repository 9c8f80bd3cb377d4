"""One servable unit: a model, the index built from exactly its weights, and the catalogue rows.

:func:`load_served` gives a :class:`ServedModel` whose index records the same weights sha256 as
the model it embeds queries with, or raises: the index is reused from ``serve.index`` only when
it records that sha256 and the catalogue's ids in order, else taken from (or built into) a cache
keyed by the weights' and the catalogue table's sha256. A swap therefore never pairs a model with
another model's index.

Filtered search (``gender``, ``articleType``, ``baseColour``, ... and ``price`` when the
catalogue has that column) over-fetches from the ANN index in proportion to how rare the filter
is, re-queries with twice the depth while too few hits pass, and when the index has given all it
can (IVF and HNSW may miss items) scores the matching items exactly: a result list is short only
when fewer items match, and the answer says how many match.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import faiss
import numpy as np
import pandas as pd

from lightclip.config import IndexConfig
from lightclip.data.catalogue import Catalogue, file_sha256
from lightclip.errors import LightclipError
from lightclip.index import CatalogueIndex, CatalogueIndexError, Hit, IndexMismatchError, build_catalogue_index, normalise_rows, search_faiss
from lightclip.serving import Embedder, ServingError
from lightclip.service.models import ResolvedModel

log = logging.getLogger(__name__)

#: Catalogue columns a query may filter on by exact value (case-insensitive), when present.
FILTER_COLUMNS: tuple[str, ...] = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage")
PRICE_COLUMN = "price"
#: Extra depth asked of the ANN index beyond what the filter's selectivity predicts.
OVERFETCH = 1.5


class ServiceError(LightclipError, ValueError):
    """A request the service refuses; ``field`` names the input at fault, ``status`` the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class Filters:
    """Exact attribute values (column -> value) and an optional price range."""

    values: Mapping[str, str] = field(default_factory=dict)
    price_min: float | None = None
    price_max: float | None = None

    def __bool__(self) -> bool:
        return bool(self.values) or self.price_min is not None or self.price_max is not None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.values)
        if self.price_min is not None:
            out["price_min"] = self.price_min
        if self.price_max is not None:
            out["price_max"] = self.price_max
        return out


@dataclass(frozen=True)
class TextQuery:
    """One text search as the batcher takes it: the words, how many hits, and the filters."""

    text: str
    k: int
    filters: Filters = Filters()


@dataclass(frozen=True)
class Outcome:
    """The hits of one query, and how many catalogue items passed its filters (all of them unfiltered)."""

    hits: list[Hit]
    matching: int
    index_queries: int  # ANN queries it took (re-queries included); 0 = exact scoring of the matches


class CatalogueRows:
    """The catalogue items in index row order: attributes to filter on and image files to serve."""

    def __init__(self, catalogue: Catalogue, ids: Sequence[str]) -> None:
        items = catalogue.items.copy()
        items["id"] = items["id"].astype(str)
        by_id = items.set_index("id", drop=False)
        missing = [i for i in ids if i not in by_id.index]
        if missing:
            raise IndexMismatchError(f"{len(missing)} indexed item(s) are not in the catalogue {catalogue.root} (e.g. {missing[:5]}); rebuild the index")
        self.items = by_id.loc[list(ids)].reset_index(drop=True)
        self.root = catalogue.root
        self.row_of = {item_id: row for row, item_id in enumerate(ids)}
        self.filterable = [c for c in FILTER_COLUMNS if c in self.items.columns and self.items[c].notna().any()]
        self._folded = {c: self.items[c].astype("string").str.casefold().fillna("").to_numpy() for c in self.filterable}
        self.prices = pd.to_numeric(self.items[PRICE_COLUMN], errors="coerce").to_numpy(dtype=float) if PRICE_COLUMN in self.items.columns else None
        self.image_paths = [catalogue.image_path(p) for p in self.items["image"]]
        #: The deepest directory holding every image: /images serves nothing outside it.
        self.image_root = Path(os.path.commonpath([str(p.parent) for p in self.image_paths])) if self.image_paths else None
        self._attributes = [self._record(row) for row in range(len(self.items))]

    def __len__(self) -> int:
        return len(self.items)

    def facets(self) -> dict[str, Any]:
        """The values each filter column takes (for the page's drop-downs), and the price range if any."""
        out: dict[str, Any] = {c: sorted(str(v) for v in self.items[c].dropna().unique()) for c in self.filterable}
        if self.prices is not None and np.isfinite(self.prices).any():
            out[PRICE_COLUMN] = {"min": float(np.nanmin(self.prices)), "max": float(np.nanmax(self.prices))}
        return out

    def check(self, filters: Filters) -> None:
        for column in filters.values:
            if column not in self.filterable:
                raise ServiceError(column, f"not a filter of this catalogue; filters: {self.filterable}")
        if (filters.price_min is not None or filters.price_max is not None) and self.prices is None:
            raise ServiceError("price_min" if filters.price_min is not None else "price_max", "this catalogue has no price column")

    def mask(self, filters: Filters) -> np.ndarray | None:
        """Rows passing ``filters`` (None = no filter)."""
        if not filters:
            return None
        self.check(filters)
        keep = np.ones(len(self), dtype=bool)
        for column, value in filters.values.items():
            keep &= self._folded[column] == str(value).casefold()
        if self.prices is not None:
            if filters.price_min is not None:
                keep &= self.prices >= filters.price_min
            if filters.price_max is not None:
                keep &= self.prices <= filters.price_max
        return keep

    def attributes(self, row: int) -> dict[str, Any]:
        """The filterable attributes (and price) of one row, as the API returns them."""
        return dict(self._attributes[row])

    def _record(self, row: int) -> dict[str, Any]:
        record = self.items.iloc[row]
        out = {c: (None if pd.isna(record[c]) else str(record[c])) for c in self.filterable}
        if self.prices is not None and np.isfinite(self.prices[row]):
            out[PRICE_COLUMN] = float(self.prices[row])
        return out


class ServedModel:
    """A model and the index of its own weights: what one request is answered with, start to end."""

    def __init__(self, resolved: ResolvedModel, embedder: Embedder, index: CatalogueIndex, rows: CatalogueRows, vectors: np.ndarray) -> None:
        built = str(index.meta.get("model", {}).get("weights_sha256"))
        if built != resolved.weights_sha256:
            raise IndexMismatchError(f"{resolved.label}: the index was built from weights {built[:12]}..., the model is "
                                     f"{resolved.weights_sha256[:12]}...; refusing to serve them together")
        self.resolved = resolved
        self.embedder = embedder
        self.index = index
        self.rows = rows
        self.vectors = vectors
        self.batcher: Any = None  # set by the service state (a MicroBatcher bound to this model)
        self._lock = threading.Lock()  # one torch call at a time on this model

    @property
    def version(self) -> str:
        return self.resolved.version

    @property
    def label(self) -> str:
        return self.resolved.label

    @property
    def weights_sha256(self) -> str:
        return self.resolved.weights_sha256

    def agree(self) -> bool:
        """Whether the index records the model's weights (what /readyz checks)."""
        return str(self.index.meta.get("model", {}).get("weights_sha256")) == self.weights_sha256

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "label": self.label, "weights_sha256": self.weights_sha256, "alias": self.resolved.alias,
                "index_items": len(self.index), "index_kind": self.index.meta.get("kind"), "runtime": self.embedder.runtime}

    # -- embedding (called on the model's worker thread) --------------------------------------

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return self.embedder.embed_texts(list(texts))

    def answer_texts(self, queries: Sequence[TextQuery]) -> list[Outcome | Exception]:
        """The outcome of each query of a batch: one encoder pass for all, one index search for
        all unfiltered ones (its top hits are the same as each query's own search), a filtered
        one searched alone; a query that fails gets its exception, the others their answers."""
        vectors = self.embed_texts([q.text for q in queries])
        outcomes: list[Outcome | Exception | None] = [None] * len(queries)
        plain = [i for i, q in enumerate(queries) if not q.filters]
        n = len(self.index)
        if plain:
            depth = max(queries[i].k for i in plain)
            scores, rows = search_faiss(self.index.index, normalise_rows(vectors[plain]), depth)
            for i, srow, rrow in zip(plain, scores.tolist(), rows.tolist()):
                want = min(queries[i].k, n)
                found = [(s, r) for s, r in zip(srow, rrow) if r >= 0][:want]
                # An ANN index may return fewer than asked: that query takes the filtered path's exact fall-back.
                outcomes[i] = self._outcome(found, n, 1) if len(found) == want else None
        for i, query in enumerate(queries):
            if outcomes[i] is None:
                try:
                    outcomes[i] = self.search(vectors[i : i + 1], query.k, query.filters)
                except Exception as exc:  # this query's own fault (e.g. a filter): the rest of the batch is answered
                    outcomes[i] = exc
        return outcomes  # type: ignore[return-value]

    def embed_image(self, data: bytes) -> np.ndarray:
        with self._lock:
            try:
                array = self.embedder.decode(data)
            except ServingError as exc:
                raise ServiceError("image", str(exc).split(": ", 2)[-1]) from None
            return self.embedder.embed_uint8(array[None])

    # -- search ---------------------------------------------------------------------------------

    def vector_of(self, item_id: str) -> tuple[int, np.ndarray]:
        row = self.rows.row_of.get(str(item_id))
        if row is None:
            raise ServiceError("id", f"unknown product id {item_id!r}", status=404)
        return row, self.vectors[row : row + 1]

    def search(self, vector: np.ndarray, k: int, filters: Filters = Filters(), exclude: int | None = None) -> Outcome:
        """Top-``k`` items for one query vector among those passing ``filters`` (never silently short)."""
        n = len(self.index)
        mask = self.rows.mask(filters)
        if exclude is not None:
            mask = np.ones(n, dtype=bool) if mask is None else mask.copy()
            mask[exclude] = False
        matching = n if mask is None else int(mask.sum())
        want = min(k, matching)
        if want == 0:
            return Outcome(hits=[], matching=0, index_queries=0)
        query = normalise_rows(vector)
        # Deep enough that, at the filter's selectivity, about 1.5x the hits needed pass it.
        depth = want if mask is None else min(n, max(want, math.ceil(want * n / matching * OVERFETCH)))
        queries = 0
        while True:
            scores, rows = search_faiss(self.index.index, query, depth)
            queries += 1
            found = [(s, r) for s, r in zip(scores[0].tolist(), rows[0].tolist()) if r >= 0 and (mask is None or mask[r])]
            if len(found) >= want:
                return self._outcome(found[:want], matching, queries)
            if depth >= n:
                break
            depth = min(n, depth * 2)
        # The ANN index returned all it would (IVF/HNSW can miss items): score the matching items exactly.
        candidates = np.flatnonzero(mask) if mask is not None else np.arange(n)
        exact = self.vectors[candidates] @ query[0]
        order = np.lexsort((candidates, -exact))[:want]
        return self._outcome([(float(exact[i]), int(candidates[i])) for i in order], matching, 0)

    def _outcome(self, found: list[tuple[float, int]], matching: int, queries: int) -> Outcome:
        hits = [Hit(rank=i + 1, row=r, id=self.index.ids[r], title=self.index.titles[r], score=float(s), attributes=self.rows.attributes(r))
                for i, (s, r) in enumerate(found)]
        return Outcome(hits=hits, matching=matching, index_queries=queries)


# ----------------------------------------------------------------------------------------------
# Loading: the index of exactly these weights
# ----------------------------------------------------------------------------------------------


def index_vectors(index: CatalogueIndex) -> np.ndarray:
    """The indexed (normalised) vectors, read back from the FAISS index, for exact scoring and /similar."""
    base = index.index
    if index.meta.get("kind") == "ivf":
        faiss.extract_index_ivf(base).make_direct_map()
    return np.ascontiguousarray(base.reconstruct_n(0, base.ntotal), dtype=np.float32)


def _usable(directory: Path, sha: str, ids: Sequence[str] | None) -> CatalogueIndex | None:
    """The index at ``directory`` if it records weights ``sha`` (and these ids, when given); else None."""
    try:
        index = CatalogueIndex.load(directory)
    except CatalogueIndexError:
        return None
    if index.meta.get("model", {}).get("weights_sha256") != sha:
        return None
    if ids is not None and index.ids != list(ids):
        return None
    return index


def served_index(resolved: ResolvedModel, catalogue: Catalogue, config: IndexConfig, *, reuse: Path | None, cache_dir: Path,
                 image_cache_dir: Path) -> tuple[CatalogueIndex, str]:
    """The index of ``resolved``'s weights over ``catalogue``: (index, where it came from)."""
    items = catalogue.items if config.split is None else catalogue.split(config.split)
    ids = [str(i) for i in items["id"]]
    if reuse is not None and (found := _usable(reuse, resolved.weights_sha256, ids)) is not None:
        return found, f"reused {reuse}"
    key = f"{resolved.weights_sha256[:16]}-{file_sha256(catalogue.table_path)[:12]}-{config.kind}-{config.split or 'all'}"
    cached = Path(cache_dir) / key
    if (found := _usable(cached, resolved.weights_sha256, ids)) is not None:
        return found, f"cached {cached}"
    index, _ = build_catalogue_index(catalogue, resolved.model_dir, config.model_copy(update={"eval_queries": 0}),
                                     cache_dir=image_cache_dir)
    index.save(cached)
    return index, f"built into {cached}"


def load_served(resolved: ResolvedModel, catalogue: Catalogue, config: IndexConfig, *, reuse: Path | None, cache_dir: Path,
                image_cache_dir: Path, runtime: str = "auto") -> ServedModel:
    """Load the model and the index of its weights, checked against each other and the catalogue.

    ``runtime`` (``serve.runtime``) is what embeds the queries; the index is built with PyTorch
    from the same weights (an ONNX export is refused at export unless its vectors match them to
    a cosine of 0.999), so either runtime searches the same index.
    """
    index, source = served_index(resolved, catalogue, config, reuse=reuse, cache_dir=cache_dir, image_cache_dir=image_cache_dir)
    index.check_model(resolved.model_dir)  # the weights on disk are the ones the index records
    embedder = Embedder(resolved.model_dir, runtime=runtime)
    served = ServedModel(resolved, embedder, index, CatalogueRows(catalogue, index.ids), index_vectors(index))
    log.info("serving %s on %s: %s index of %d items (%s)", resolved.label, embedder.runtime, index.meta.get("kind"), len(index), source)
    return served
