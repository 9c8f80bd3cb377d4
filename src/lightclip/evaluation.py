"""Retrieval evaluation: recall@k, ranks and attribute precision, in both directions.

Semantics (as in CLIP_benchmark's ``zeroshot_retrieval``, with our names):

* ``i2t_R@k`` (image -> text): for each image query, the texts are ranked by cosine
  similarity; the query is a hit at ``k`` when **any** of its positive texts is among the first
  ``k``. ``t2i_R@k`` (text -> image) is the same from the texts. Beware: CLIP_benchmark calls
  the text -> image number ``image_retrieval_recall@k``; here the prefix is always the query
  side first (``i2t``: image queries, ``t2i``: text queries).
* Positives are a many-to-many relation (:class:`Positives`): several titles per image and
  several images per title. ``retrieval_metrics(..., groups)`` keeps the simple form: items
  with equal group ids are mutual positives (identical titles, see :func:`title_groups`).
* The **rank** of a query is the 1-based position of its best-ranked positive.
  ``*_median_rank`` is the median over the queries (numpy's: the mean of the two middle
  values for an even count) and ``*_mean_rank`` the mean; lower is better.
* **Ties** are broken deterministically: keys are ordered by similarity, descending, and at
  exactly equal similarity by key index, ascending (the order of a stable sort). So a positive
  that ties with a negative of lower index ranks after it. Similarities are computed once per
  (image, text) pair in float32, for both directions, and the best positive's similarity is
  read from that same matrix, so a query is always compared with itself consistently.
* ``mean_recall`` is the mean of the six recalls (i2t and t2i R@1, R@5, R@10): the number the
  papers report (as ``rsum / 6``). All recalls and precisions are percentages.
* ``t2i_P@k_<attrs>`` (e-commerce relevance): for each text query, the fraction of the first
  ``k`` retrieved images whose product has the same value of every attribute in ``<attrs>``
  (``articleType``, or ``articleType`` and ``baseColour`` joined by ``_``) as the query's
  product, averaged over the queries whose product has those attributes. A retrieved product
  without the attribute counts as a miss. The top ``k`` follows the same tie rule.

Similarities are computed once, in tiles of text rows x all images (one reused buffer per
worker thread, so a 10k x 10k evaluation needs only ``chunk x N`` floats at a time), and each
tile serves both directions (:func:`ranks_both_ways`): rows rank the text queries, columns add
up the image queries' counts against a proven error band (exact ties between duplicate texts
are kept by folding byte-identical text vectors into one row first). Where the band cannot be
proven (a reduced-precision matmul mode) or would hold mass ties, each direction does its own
matmul (:func:`retrieval_ranks`); both give the same numbers (tested). On this 2-core CPU the
metrics of a 10k x 10k split (positives included) take 0.21-0.25 s at 64-d and 0.28-0.33 s at
128-d (``lightclip bench`` reports the share of embedding time).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from lightclip.config import EvaluateConfig
    from lightclip.data.catalogue import Catalogue
    from lightclip.imagecache import ImageCache

KS: tuple[int, ...] = (1, 5, 10)
DIRECTIONS: tuple[str, ...] = ("i2t", "t2i")


class EvaluationError(ValueError):
    """An evaluation that cannot run (no items, a missing model, inconsistent inputs); the message says why."""


def title_groups(titles: Sequence[Any]) -> np.ndarray:
    """A group id per title: equal after lower-casing and collapsing whitespace -> same id."""
    import pandas as pd

    keys = [" ".join(str(t).split()).lower() if t is not None else f"\0missing{i}" for i, t in enumerate(titles)]
    return pd.factorize(pd.Series(keys, dtype=object))[0].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Positives: which texts describe which images
# ----------------------------------------------------------------------------------------------


def _csr(n_rows: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(ptr, rows + 1, 1)
    return np.cumsum(ptr), cols


def _expand_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(which range, position)`` for every position of the ranges ``[starts[i], starts[i] + counts[i])``, in order."""
    which = np.repeat(np.arange(starts.size), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return which, np.repeat(starts, counts) + offsets


def group_pairs(image_groups: np.ndarray, text_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(images, texts)`` index pairs with equal group ids (every image x text of a group)."""
    t_order = np.argsort(text_groups, kind="stable")
    t_sorted = text_groups[t_order]
    lo = np.searchsorted(t_sorted, image_groups, side="left")
    hi = np.searchsorted(t_sorted, image_groups, side="right")
    images, positions = _expand_ranges(lo, hi - lo)
    return images, t_order[positions]


@dataclass(frozen=True)
class Positives:
    """A many-to-many image-text relation, stored both ways as CSR (sorted, no duplicates).

    ``image_ptr``/``image_texts``: the positive texts of image ``i`` are
    ``image_texts[image_ptr[i]:image_ptr[i + 1]]``; ``text_ptr``/``text_images`` likewise.
    Every image and every text must have at least one positive (a query without any cannot be
    scored: an error, not a silent miss).
    """

    n_images: int
    n_texts: int
    image_ptr: np.ndarray
    image_texts: np.ndarray
    text_ptr: np.ndarray
    text_images: np.ndarray

    @classmethod
    def from_pairs(cls, n_images: int, n_texts: int, image_index: Sequence[int] | np.ndarray, text_index: Sequence[int] | np.ndarray) -> "Positives":
        """From (image, text) index pairs; duplicates are merged."""
        images = np.asarray(image_index, dtype=np.int64).ravel()
        texts = np.asarray(text_index, dtype=np.int64).ravel()
        if images.shape != texts.shape:
            raise EvaluationError(f"positives: {images.size} image indices but {texts.size} text indices")
        if images.size and (images.min() < 0 or images.max() >= n_images or texts.min() < 0 or texts.max() >= n_texts):
            raise EvaluationError(f"positives: an index is out of range ({n_images} images, {n_texts} texts)")
        if images.size:
            key = np.unique(images * max(n_texts, 1) + texts)
            images, texts = key // max(n_texts, 1), key % max(n_texts, 1)
        image_ptr, image_texts = _csr(n_images, images, texts)
        text_ptr, text_images = _csr(n_texts, texts, images)
        positives = cls(int(n_images), int(n_texts), image_ptr, image_texts, text_ptr, text_images)
        positives.check()
        return positives

    @classmethod
    def identity(cls, n: int) -> "Positives":
        """Item ``i``'s image and text are each other's only positive."""
        return cls.from_pairs(n, n, np.arange(n), np.arange(n))

    @classmethod
    def from_groups(cls, image_groups: Sequence[int] | np.ndarray | torch.Tensor, text_groups: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> "Positives":
        """Image ``i`` and text ``j`` are positives when ``image_groups[i] == text_groups[j]``."""
        ig = np.asarray(image_groups, dtype=np.int64).ravel()
        tg = ig if text_groups is None else np.asarray(text_groups, dtype=np.int64).ravel()
        return cls.from_pairs(ig.size, tg.size, *group_pairs(ig, tg))

    @classmethod
    def from_text_image_index(cls, text_image_index: Sequence[int] | np.ndarray, n_images: int) -> "Positives":
        """CLIP_benchmark's layout: text ``j`` is a caption of image ``text_image_index[j]`` (several per image)."""
        texts_of = np.asarray(text_image_index, dtype=np.int64).ravel()
        return cls.from_pairs(n_images, texts_of.size, texts_of, np.arange(texts_of.size))

    def union(self, *others: "Positives") -> "Positives":
        """Positive in any of the relations (all over the same images and texts)."""
        images, texts = [self.pairs()[0]], [self.pairs()[1]]
        for other in others:
            if (other.n_images, other.n_texts) != (self.n_images, self.n_texts):
                raise EvaluationError("positives: cannot combine relations over different images/texts")
            i, t = other.pairs()
            images.append(i)
            texts.append(t)
        return Positives.from_pairs(self.n_images, self.n_texts, np.concatenate(images), np.concatenate(texts))

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All (image, text) positive pairs, sorted by image then text."""
        return np.repeat(np.arange(self.n_images), np.diff(self.image_ptr)), self.image_texts.copy()

    def check(self) -> None:
        no_text = np.flatnonzero(np.diff(self.image_ptr) == 0)
        no_image = np.flatnonzero(np.diff(self.text_ptr) == 0)
        if no_text.size or no_image.size:
            parts = []
            if no_text.size:
                parts.append(f"{no_text.size} image(s) without a positive text, e.g. {no_text[:5].tolist()}")
            if no_image.size:
                parts.append(f"{no_image.size} text(s) without a positive image, e.g. {no_image[:5].tolist()}")
            raise EvaluationError("positives: every query needs at least one positive; " + "; ".join(parts))

    def csr(self, direction: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ptr, keys)`` of the positives of each query in ``direction`` (``i2t`` or ``t2i``)."""
        if direction == "i2t":
            return self.image_ptr, self.image_texts
        if direction == "t2i":
            return self.text_ptr, self.text_images
        raise ValueError(f"unknown direction {direction!r}; allowed: {list(DIRECTIONS)}")


# ----------------------------------------------------------------------------------------------
# Ranks and top-k under the deterministic tie rule
# ----------------------------------------------------------------------------------------------


def _mask_buffer(rows: int, columns: int) -> np.ndarray:
    """A zeroed bool scratch matrix whose rows are padded to whole 8-byte words (see :func:`_count_rows`)."""
    return np.zeros((rows, columns + (-columns) % 8), dtype=bool)


def _count_rows(mask: np.ndarray) -> np.ndarray:
    """Per-row count of ``True`` in a bool matrix made by :func:`_mask_buffer`.

    Pops the bits of 8 bytes at a time (a ``True`` byte has exactly one bit set); the padding
    columns stay ``False``. About 4x faster than ``np.count_nonzero(mask, axis=1)`` here
    (0.21 vs 0.77 ms for a 256 x 10,000 mask).
    """
    return np.bitwise_count(mask.view(np.uint64)).sum(axis=1, dtype=np.int64)


# rows are cut into at most this many blocks for the top-k threshold (torch's topk has a fast
# path for rows this short)
_TOPK_BLOCKS = 100


@dataclass(frozen=True)
class _TopCandidates:
    """Per row, every entry ``>= tau`` (a lower bound of the row's ``(k+1)``-th largest value),
    sorted by row, similarity (desc) and column: the exact top ``k + 1`` with all its ties."""

    tau: np.ndarray  # rows
    ptr: np.ndarray  # rows + 1: row r's entries are [ptr[r], ptr[r + 1])
    columns: np.ndarray
    values: np.ndarray

    def top(self, k: int) -> np.ndarray:
        return self.columns[self.ptr[:-1, None] + np.arange(k)]


def _top_candidates(sims: torch.Tensor, k: int, mask: np.ndarray | None = None) -> _TopCandidates | None:
    """The entries that hold each row's top ``k + 1`` (``None`` when rows are too short for blocks).

    The ``(k+1)``-th largest of a row's block maxima, ``tau``, is at most the row's ``(k+1)``-th
    largest value (``k + 1`` blocks reach it), so the entries ``>= tau`` hold the top ``k + 1``
    with every tie among them; they are few, and sorted exactly (~1.5x cheaper than ``topk`` on
    candidate blocks, and exact ties need no second pass). ``mask``: an optional
    :func:`_mask_buffer` of at least ``sims``' shape to reuse.
    """
    n_rows, n = sims.shape
    block = -(-n // _TOPK_BLOCKS)
    n_blocks = n // block
    if n_blocks <= k or sims.stride(1) != 1:
        return None
    blocks = sims.as_strided((n_rows, n_blocks, block), (sims.stride(0), block, 1))  # the ragged end is left out
    tau = blocks.amax(dim=2).topk(k + 1, dim=1).values[:, k:].numpy()
    values = sims.numpy()
    mask = _mask_buffer(n_rows, n) if mask is None else mask[:n_rows]
    np.greater_equal(values, tau, out=mask[:, :n])
    rows, columns = np.divmod(np.flatnonzero(mask), mask.shape[1])
    entries = values[rows, columns]
    order = np.lexsort((columns, -entries, rows))
    ptr = np.searchsorted(rows[order], np.arange(n_rows + 1))
    return _TopCandidates(tau=tau.ravel(), ptr=ptr, columns=columns[order], values=entries[order])


def _stable_topk(sims: torch.Tensor, k: int, mask: np.ndarray | None = None) -> torch.Tensor:
    """Indices of the first ``k`` keys per row, ordered by (similarity desc, index asc)."""
    k = min(k, sims.shape[1])
    candidates = _top_candidates(sims, k, mask)
    if candidates is None:
        return torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.from_numpy(candidates.top(k))


def _csr_positions(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(local row, position)`` for every CSR entry of ``rows``, in row order."""
    return _expand_ranges(ptr[rows], ptr[rows + 1] - ptr[rows])


def _csr_entries(ptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(local row, value)`` for every CSR entry of ``rows``, in row order."""
    local, position = _csr_positions(ptr, rows)
    return local, values[position]


def _best_positives(sims: np.ndarray, rows: np.ndarray, queries: np.ndarray, ptr: np.ndarray, positive_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query (its similarities in row ``rows[q]`` of ``sims``): the best positive's similarity,
    read from that same matrix, and the lowest key index at it."""
    counts = ptr[queries + 1] - ptr[queries]
    if (counts == 0).any():
        raise EvaluationError(f"query {int(queries[np.flatnonzero(counts == 0)[0]])} has no positive")
    which, cols = _csr_entries(ptr, positive_keys, queries)
    values = sims[rows[which], cols]
    best = np.full(queries.size, -np.inf, dtype=sims.dtype)
    np.maximum.at(best, which, values)
    at_best = values == best[which]
    first = np.full(queries.size, sims.shape[1], dtype=np.int64)
    np.minimum.at(first, which[at_best], cols[at_best])
    return best, first


def _rank_rows(sims: np.ndarray, queries: np.ndarray, ptr: np.ndarray, positive_keys: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best positive; row ``r`` of ``sims`` holds query ``queries[r]``.

    ``mask``: a :func:`_mask_buffer` of at least ``sims``' shape (its rows are reused).
    """
    n_rows, n_keys = sims.shape
    best, first = _best_positives(sims, np.arange(n_rows), queries, ptr, positive_keys)
    threshold = best[:, None]
    mask, mask_keys = mask[:n_rows], mask[:n_rows, :n_keys]
    np.greater(sims, threshold, out=mask_keys)
    rank = _count_rows(mask)
    np.equal(sims, threshold, out=mask_keys)
    for row in np.flatnonzero(_count_rows(mask) > 1).tolist():  # an exact tie at the best positive's similarity: lower index first
        rank[row] += int(np.count_nonzero(sims[row, : first[row]] == best[row]))
    return rank


def _rank_from_candidates(
    sims: np.ndarray, candidates: _TopCandidates, rows: np.ndarray, queries: np.ndarray, ptr: np.ndarray, positive_keys: np.ndarray, mask: np.ndarray
) -> np.ndarray | None:
    """:func:`_rank_rows` for queries whose rows' top candidates are known (``rows[q]``: query ``q``'s row).

    A query whose best positive reaches its row's ``tau`` has everything ranked before it among
    the candidates, so it is counted there; the others are counted on copies of their rows.
    ``None`` when over a quarter of the queries are of those (a weak model): whole rows are
    then cheaper than copies.
    """
    best, first = _best_positives(sims, rows, queries, ptr, positive_keys)
    below = best < candidates.tau[rows]
    if np.count_nonzero(below) > queries.size // 4:
        return None
    rank = np.empty(queries.size, dtype=np.int64)
    known = np.flatnonzero(~below)
    which, position = _csr_positions(candidates.ptr, rows[known])
    values, columns = candidates.values[position], candidates.columns[position]
    q_best, q_first = best[known][which], first[known][which]
    before = (values > q_best) | ((values == q_best) & (columns < q_first))
    rank[known] = np.bincount(which[before], minlength=known.size)
    rest = np.flatnonzero(below)
    if rest.size:
        copies = sims[rows[rest]]
        rank[rest] = _rank_rows(copies, queries[rest], ptr, positive_keys, mask if rest.size <= mask.shape[0] else _mask_buffer(*copies.shape))
    return rank


def retrieval_ranks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    ptr: np.ndarray,
    positive_keys: np.ndarray,
    *,
    chunk: int = 256,
    topk: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """0-based rank of each query's best-ranked positive key, and optionally its top-``k`` keys.

    ``queries`` (Q x D) and ``keys`` (N x D) are compared by dot product (normalise them first
    for cosine). Query ``q``'s positives are ``positive_keys[ptr[q]:ptr[q + 1]]``. The rank
    counts the keys ranked before that positive: higher similarity, or equal similarity and a
    lower index. Returns ``(ranks, top)`` with ``top`` Q x k (or None when ``topk == 0``).

    One direction at a time (see :func:`ranks_both_ways` for both from one matmul). The
    similarity rows are written into one preallocated ``chunk x N`` buffer (small enough to
    stay in cache; a fresh 40 MB array per chunk doubled the matmul time) and the comparisons
    into one reused, word-padded bool buffer, counted with :func:`_count_rows`.
    """
    n_queries, n_keys = queries.shape[0], keys.shape[0]
    ptr = np.asarray(ptr, dtype=np.int64)
    positive_keys = np.asarray(positive_keys, dtype=np.int64)
    ranks = np.empty(n_queries, dtype=np.int64)
    top = torch.empty((n_queries, min(topk, n_keys)), dtype=torch.long) if topk > 0 else None
    keys_t = keys.T.contiguous()
    rows_per_chunk = max(1, min(chunk, n_queries))
    sims_buffer = torch.empty((rows_per_chunk, n_keys), dtype=torch.float32)
    mask_buffer = _mask_buffer(rows_per_chunk, n_keys)
    for start in range(0, n_queries, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_queries)
        sims_t = torch.mm(queries[start:stop], keys_t, out=sims_buffer[: stop - start])  # each similarity computed once
        ranks[start:stop] = _rank_rows(sims_t.numpy(), np.arange(start, stop), ptr, positive_keys, mask_buffer)
        if top is not None:
            top[start:stop] = _stable_topk(sims_t, topk, mask_buffer)
    return torch.from_numpy(ranks), top


def _count_columns(mask: np.ndarray) -> np.ndarray:
    """Per-column count of ``True`` in a :func:`_mask_buffer` matrix.

    Adds the rows as 64-bit words, 255 rows at a time: each byte lane holds one column's count
    and cannot carry into the next below 256 (~20x faster than ``mask.sum(axis=0)``).
    """
    words = mask.view(np.uint64)
    total = np.zeros(mask.shape[1], dtype=np.int64)
    for start in range(0, mask.shape[0], 255):
        total += np.add.reduce(words[start : start + 255], axis=0).view(np.uint8)
    return total


def _as_words(rows: np.ndarray) -> np.ndarray:
    """Each row's bytes as 64-bit words (zero-padded to whole words)."""
    data = np.ascontiguousarray(rows).view(np.uint8).reshape(rows.shape[0], -1)
    if data.shape[1] % 8:
        data = np.pad(data, ((0, 0), (0, (-data.shape[1]) % 8)))
    return data.view(np.uint64)


def _row_hashes(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of words (a weighted sum that wraps on purpose)."""
    weights = (np.arange(1, words.shape[1] + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    return (words * weights).sum(axis=1, dtype=np.uint64)


def _equal_rows(matrix: np.ndarray) -> np.ndarray:
    """A group id per row, first-seen order: rows with equal values share one.

    Rows are grouped by a hash of their bytes and each member is compared with its group's
    first row; should two different rows ever share a hash, the rows are grouped by their bytes
    instead (slower, exact).
    """
    import pandas as pd

    n = matrix.shape[0]
    groups = pd.factorize(_row_hashes(_as_words(matrix)))[0].astype(np.int64)
    first = np.full(int(groups.max()) + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, groups, np.arange(n))
    leader = first[groups]
    strangers = np.flatnonzero(~(matrix == matrix[leader]).all(axis=1))
    if strangers.size:  # a hash collision: those rows go through the slow, exact way
        return pd.factorize(pd.Series([row.tobytes() for row in matrix], dtype=object))[0].astype(np.int64)
    return groups


@dataclass(frozen=True)
class _FoldedTexts:
    """Byte-identical text vectors folded into one row each (first-seen order).

    Exact ties between duplicate texts need identical similarities, and rows of different
    matmul calls may differ in the last bit; one row per distinct vector makes them identical.
    """

    rows: torch.Tensor  # distinct vectors
    row_of: np.ndarray  # text -> its row
    multiplicity: np.ndarray  # row -> how many texts it stands for
    order: np.ndarray  # texts grouped by row: row r's texts are order[ptr[r]:ptr[r + 1]]
    ptr: np.ndarray

    @classmethod
    def fold(cls, texts: torch.Tensor) -> "_FoldedTexts":
        vectors = texts.numpy()
        row_of = _equal_rows(vectors)
        multiplicity = np.bincount(row_of, minlength=int(row_of.max()) + 1 if row_of.size else 0)
        first = np.full(multiplicity.size, vectors.shape[0], dtype=np.int64)
        np.minimum.at(first, row_of, np.arange(vectors.shape[0]))
        order = np.argsort(row_of, kind="stable")
        return cls(texts[torch.from_numpy(first)], row_of, multiplicity, order, np.concatenate([[0], np.cumsum(multiplicity)]))

    def texts_in(self, start: int, stop: int) -> np.ndarray:
        """The texts of rows ``start:stop``."""
        return self.order[self.ptr[start] : self.ptr[stop]]


@dataclass(frozen=True)
class _ImageBands:
    """The image queries' side: for each image, a band ``[lower, upper]`` proven to hold its
    best positive's float32 similarity, and its positive pairs by the folded row of their text."""

    lower: np.ndarray  # 1 x images, float32
    upper: np.ndarray
    pair_image: np.ndarray  # the image -> text positive pairs
    pair_text: np.ndarray
    pair_row: np.ndarray
    by_row: np.ndarray  # the pairs sorted by row
    sorted_rows: np.ndarray

    @classmethod
    def build(cls, images: torch.Tensor, texts: torch.Tensor, positives: Positives, row_of: np.ndarray) -> "_ImageBands":
        ptr, pair_text = positives.csr("i2t")
        pair_image = np.repeat(np.arange(images.shape[0]), np.diff(ptr))
        exact = np.einsum("pd,pd->p", images.numpy()[pair_image].astype(np.float64), texts.numpy()[pair_text].astype(np.float64))
        best = np.full(images.shape[0], -np.inf)
        np.maximum.at(best, pair_image, exact)
        bound = 4.0 * images.shape[1] * 2.0**-24  # float32 dot products of unit vectors, with room to spare
        pair_row = row_of[pair_text]
        by_row = np.argsort(pair_row, kind="stable")
        return cls(
            lower=(best - bound).astype(np.float32)[None, :],
            upper=(best + bound).astype(np.float32)[None, :],
            pair_image=pair_image,
            pair_text=pair_text,
            pair_row=pair_row,
            by_row=by_row,
            sorted_rows=pair_row[by_row],
        )

    def pairs_in(self, start: int, stop: int) -> np.ndarray:
        """The pairs whose text sits in rows ``start:stop``."""
        return self.by_row[np.searchsorted(self.sorted_rows, start) : np.searchsorted(self.sorted_rows, stop)]


@dataclass
class _ColumnCounts:
    """One worker's share of the image queries: texts above the band, and the band's entries."""

    above: np.ndarray
    rows: list[np.ndarray] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(part.size for part in self.rows)


# Worker threads pay from a few tiles' worth of similarities on (at 300 x 300 the pool made the
# ranks 3.1 ms instead of 2.3 ms).
_THREADED_SIMILARITIES = 4_000_000

# A band wider than this many entries per image means mass ties (e.g. collapsed embeddings):
# the caller then falls back to one matmul per direction rather than hold them all.
_BAND_ENTRIES_PER_QUERY = 64


def _rank_text_tile(
    sims_t: torch.Tensor, start: int, texts: _FoldedTexts, positives: Positives, topk: int, mask: np.ndarray, ranks: np.ndarray, top: torch.Tensor | None
) -> None:
    """Rank the text queries of the tile of rows ``start:...`` (and their top-k images), in place.

    Every text of a folded row reads that row. With a top-k, queries whose best positive is
    among the row's top candidates are ranked from them.
    """
    ptr, keys = positives.csr("t2i")
    sims = sims_t.numpy()
    stop = start + sims.shape[0]
    queries = texts.texts_in(start, stop)
    rows = texts.row_of[queries] - start
    candidates = _top_candidates(sims_t, topk, mask) if top is not None else None
    if top is not None:
        tile_top = _stable_topk(sims_t, topk, mask).numpy() if candidates is None else candidates.top(topk)
        top[torch.from_numpy(queries)] = torch.from_numpy(tile_top[rows])
    from_candidates = None if candidates is None else _rank_from_candidates(sims, candidates, rows, queries, ptr, keys, mask)
    if from_candidates is not None:
        ranks[queries] = from_candidates
        return
    firsts = texts.order[texts.ptr[start:stop]]
    ranks[firsts] = _rank_rows(sims, firsts, ptr, keys, mask)
    others = np.setdiff1d(queries, firsts, assume_unique=True)
    if others.size:  # the folded rows' other texts, on copies of their rows
        copies = sims[texts.row_of[others] - start]
        ranks[others] = _rank_rows(copies, others, ptr, keys, _mask_buffer(*copies.shape))


def _count_image_tile(
    sims: np.ndarray, start: int, texts: _FoldedTexts, bands: _ImageBands, high: np.ndarray, at_least: np.ndarray, pair_values: np.ndarray, counts: _ColumnCounts
) -> None:
    """Add the tile of rows ``start:...`` to the image queries' counts (``high``, ``at_least``:
    :func:`_mask_buffer` scratch); record the positives' similarities in ``pair_values``."""
    n_rows, n_images = sims.shape
    in_tile = bands.pairs_in(start, start + n_rows)
    pair_values[in_tile] = sims[bands.pair_row[in_tile] - start, bands.pair_image[in_tile]]
    high, at_least = high[:n_rows], at_least[:n_rows]
    high_keys, at_least_keys = high[:, :n_images], at_least[:, :n_images]
    np.greater(sims, bands.upper, out=high_keys)
    high_count = _count_columns(high)[:n_images]
    counts.above += high_count
    repeated = np.flatnonzero(texts.multiplicity[start : start + n_rows] > 1)
    if repeated.size:  # a folded row stands for several texts
        counts.above += (texts.multiplicity[start + repeated] - 1) @ high_keys[repeated].astype(np.int64)
    np.greater_equal(sims, bands.lower, out=at_least_keys)
    in_band = np.flatnonzero(_count_columns(at_least)[:n_images] > high_count)
    r, c = np.nonzero(at_least_keys[:, in_band] & ~high_keys[:, in_band])
    counts.rows.append(r + start)
    counts.images.append(in_band[c])
    counts.values.append(sims[r, in_band[c]])


def ranks_both_ways(
    images: torch.Tensor, texts: torch.Tensor, positives: Positives, *, chunk: int = 256, topk: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Image->text and text->image ranks (and the text queries' top-``k`` images) from one matmul.

    Same results as :func:`retrieval_ranks` run both ways, at half the matrix products: the
    similarity matrix is computed once, in tiles of ``chunk`` texts x all images. Each tile's
    rows rank the text queries as :func:`retrieval_ranks` does. Its columns carry the image
    queries' counts, but an image query's best-positive similarity ``c`` is only known once
    every tile holding one of its positives has been computed. So each column is split against
    a band ``[L, U]`` proven to hold ``c``: the exact (float64) similarity of the best positive
    +- a float32 dot-product error bound (``4 * D * 2**-24`` for unit vectors). Keys above ``U``
    are counted at once; the few inside the band are kept and compared with ``c`` at the end,
    where ties follow the usual rule (lower text index first).

    Byte-identical text vectors are folded into one row first (:class:`_FoldedTexts`). The
    tiles are spread over as many single-threaded workers as torch has threads (numpy's passes
    run on one core). Returns ``None`` (the caller then runs one matmul per direction) when a
    best positive falls outside its band (a reduced-precision matmul mode) or the bands fill up
    with mass ties.
    """
    from concurrent.futures import ThreadPoolExecutor

    n_images, n_texts = images.shape[0], texts.shape[0]
    folded = _FoldedTexts.fold(texts)
    n_rows = folded.rows.shape[0]
    bands = _ImageBands.build(images, texts, positives, folded.row_of)
    pair_values = np.empty(bands.pair_text.size, dtype=np.float32)
    t2i_ranks = np.empty(n_texts, dtype=np.int64)
    top = torch.empty((n_texts, min(topk, n_images)), dtype=torch.long) if topk > 0 else None

    images_t = images.T.contiguous()
    rows_per_tile = max(1, min(chunk, n_rows))
    starts = list(range(0, n_rows, rows_per_tile))
    n_workers = max(1, min(torch.get_num_threads(), len(starts))) if n_rows * n_images >= _THREADED_SIMILARITIES else 1
    band_limit = (_BAND_ENTRIES_PER_QUERY * n_images + n_texts) // n_workers

    def work(worker: int) -> _ColumnCounts | None:
        """Every ``n_workers``-th tile from ``worker`` on."""
        sims_buffer = torch.empty((rows_per_tile, n_images), dtype=torch.float32)
        high, at_least, query_mask = (_mask_buffer(rows_per_tile, n_images) for _ in range(3))
        counts = _ColumnCounts(above=np.zeros(n_images, dtype=np.int64))
        for start in starts[worker::n_workers]:
            stop = min(start + rows_per_tile, n_rows)
            sims_t = torch.mm(folded.rows[start:stop], images_t, out=sims_buffer[: stop - start])  # each similarity computed once
            _rank_text_tile(sims_t, start, folded, positives, topk, query_mask, t2i_ranks, top)
            _count_image_tile(sims_t.numpy(), start, folded, bands, high, at_least, pair_values, counts)
            if counts.size > band_limit:
                return None
        return counts

    if n_workers == 1:  # one tile (or one thread): no pool, torch keeps its threads for the matmul
        results = [work(0)]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                results = list(pool.map(work, range(n_workers)))
        finally:
            torch.set_num_threads(threads)
    if any(counts is None for counts in results):
        return None

    best = np.full(n_images, -np.inf, dtype=np.float32)
    np.maximum.at(best, bands.pair_image, pair_values)
    if not np.all((bands.lower[0] <= best) & (best <= bands.upper[0])):  # what the counts above rely on
        return None
    at_best = pair_values == best[bands.pair_image]
    first = np.full(n_images, n_texts, dtype=np.int64)
    np.minimum.at(first, bands.pair_image[at_best], bands.pair_text[at_best])
    # the band's entries, one per original text (a folded row stands for each of its texts)
    rows = np.concatenate([np.zeros(0, dtype=np.int64)] + [part for counts in results for part in counts.rows])
    band_image = np.concatenate([np.zeros(0, dtype=np.int64)] + [part for counts in results for part in counts.images])
    values = np.concatenate([np.zeros(0, dtype=np.float32)] + [part for counts in results for part in counts.values])
    which, text = _csr_entries(folded.ptr, folded.order, rows)
    band_image, values = band_image[which], values[which]
    before = (values > best[band_image]) | ((values == best[band_image]) & (text < first[band_image]))
    i2t_ranks = sum(counts.above for counts in results) + np.bincount(band_image[before], minlength=n_images)
    return torch.from_numpy(i2t_ranks), torch.from_numpy(t2i_ranks), top


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def recall_at_k(ranks: torch.Tensor | np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Percent of queries whose best positive has 0-based rank < k."""
    r = torch.as_tensor(ranks)
    return {int(k): float((r < k).to(torch.float64).mean().item() * 100.0) for k in ks}


def _as_matrix(emb: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(emb) if not isinstance(emb, torch.Tensor) else emb).detach().to("cpu", torch.float32)
    if t.ndim != 2:
        raise EvaluationError(f"{what}: expected an N x D matrix, got shape {tuple(t.shape)}")
    # a float64 sum of float32 values cannot overflow, so it is finite exactly when they all are
    # (one reduction instead of a bool matrix)
    if not bool(torch.isfinite(t.sum(dtype=torch.float64))):
        raise EvaluationError(f"{what}: contains NaN or inf")
    return t


def _label_codes(values: Sequence[Any]) -> np.ndarray:
    """Integer code per value (equal values, equal codes); missing (None/NaN/NA/blank) -> -1."""
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(list(values), dtype=object), use_na_sentinel=True)
    codes = codes.astype(np.int64)
    blank = [i for i, v in enumerate(uniques) if _missing(v)]
    if blank:
        codes[np.isin(codes, blank)] = -1
    return codes


def _missing(value: Any) -> bool:
    if value is None or (isinstance(value, float) and value != value) or (isinstance(value, str) and not value.strip()):
        return True
    return type(value).__name__ == "NAType"  # pandas.NA


def _joint_codes(columns: Sequence[Sequence[Any]]) -> np.ndarray:
    """Codes of value tuples; missing when any value is missing."""
    joint = np.zeros(len(columns[0]) if columns else 0, dtype=np.int64)
    missing = np.zeros(joint.size, dtype=bool)
    for column in columns:  # mixed radix: distinct tuples, distinct numbers
        codes = _label_codes(column)
        missing |= codes < 0
        joint = joint * (int(codes.max(initial=0)) + 2) + codes + 1
        joint = _dense(joint)
    joint[missing] = -1
    return joint


def _dense(values: np.ndarray) -> np.ndarray:
    """Equal values, equal codes ``0..k-1`` (first-seen order): keeps mixed-radix codes small."""
    import pandas as pd

    return pd.factorize(values)[0].astype(np.int64)


def attribute_precision(top: torch.Tensor, query_labels: np.ndarray, key_labels: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Mean over labelled queries of the percent of the first k retrieved keys with the query's label."""
    q = np.asarray(query_labels)
    valid = q >= 0
    if not valid.any():
        return {}
    retrieved = np.asarray(key_labels)[top.numpy()]  # Q x K
    same = retrieved == q[:, None]
    return {int(k): float(same[valid, :k].mean(axis=1).mean() * 100.0) for k in ks if k <= same.shape[1]}


def evaluate_retrieval(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    positives: Positives | None = None,
    *,
    ks: Sequence[int] = KS,
    precision_ks: Sequence[int] = KS,
    attributes: Mapping[str, Sequence[Sequence[Any]]] | None = None,
    curve_ks: Sequence[int] = (),
    chunk: int = 256,
) -> dict[str, Any]:
    """Every retrieval metric of one model on one split (see the module docstring).

    ``positives`` defaults to item ``i``'s image and text only. ``attributes`` maps a metric
    suffix (``"articleType"``, ``"articleType_baseColour"``) to one column of values per
    attribute, per item (images and texts are the same items then), e.g.
    ``{"articleType": [types]}``. Returns ``{"metrics": {...}, "recall_curve": {"i2t": {k: %},
    "t2i": {...}}}``; metric names: ``i2t_R@k``, ``t2i_R@k``, ``mean_recall``,
    ``{i2t,t2i}_{median,mean}_rank``, ``t2i_P@k_<suffix>``.
    """
    images = torch.nn.functional.normalize(_as_matrix(image_emb, "image embeddings"), dim=-1)
    texts = torch.nn.functional.normalize(_as_matrix(text_emb, "text embeddings"), dim=-1)
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise EvaluationError("no items to evaluate (empty image or text set)")
    if images.shape[1] != texts.shape[1]:
        raise EvaluationError(f"image embeddings are {images.shape[1]}-d but text embeddings {texts.shape[1]}-d")
    if positives is None:
        if images.shape[0] != texts.shape[0]:
            raise EvaluationError(f"{images.shape[0]} images but {texts.shape[0]} texts: pass the positives")
        positives = Positives.identity(images.shape[0])
    if (positives.n_images, positives.n_texts) != (images.shape[0], texts.shape[0]):
        raise EvaluationError(
            f"positives are over {positives.n_images} images x {positives.n_texts} texts, embeddings {images.shape[0]} x {texts.shape[0]}"
        )
    attribute_codes: dict[str, np.ndarray] = {}
    for name, columns in (attributes or {}).items():
        if images.shape[0] != texts.shape[0]:
            raise EvaluationError("attribute precision needs one image and one text per item")
        columns = [list(c) for c in columns]
        if any(len(c) != images.shape[0] for c in columns):
            raise EvaluationError(f"attribute {name!r}: expected {images.shape[0]} values per column")
        codes = _joint_codes(columns)
        if (codes >= 0).any():
            attribute_codes[name] = codes
    max_p = max(precision_ks) if (attribute_codes and precision_ks) else 0
    all_ks = sorted({int(k) for k in (*ks, *curve_ks)})

    metrics: dict[str, float] = {}
    curves: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        both = ranks_both_ways(images, texts, positives, chunk=chunk, topk=max_p)
        if both is not None:
            i2t_ranks, t2i_ranks, top = both
        else:
            i2t_ranks, _ = retrieval_ranks(images, texts, *positives.csr("i2t"), chunk=chunk)
            t2i_ranks, top = retrieval_ranks(texts, images, *positives.csr("t2i"), chunk=chunk, topk=max_p)
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        recalls = recall_at_k(ranks, all_ks)
        for k in ks:
            metrics[f"{direction}_R@{k}"] = recalls[int(k)]
        curves[direction] = {k: recalls[k] for k in all_ks}
        one_based = ranks.numpy() + 1
        metrics[f"{direction}_median_rank"] = float(np.median(one_based))
        metrics[f"{direction}_mean_rank"] = float(one_based.mean())
    if top is not None:
        for name, codes in attribute_codes.items():
            for k, value in attribute_precision(top, codes, codes, precision_ks).items():
                metrics[f"t2i_P@{k}_{name}"] = value
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_R@{k}"] for d in DIRECTIONS for k in ks]))
    return {"metrics": metrics, "recall_curve": curves}


def retrieval_metrics(
    image_emb: torch.Tensor | np.ndarray,
    text_emb: torch.Tensor | np.ndarray,
    image_to_text_positives: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    ks: Sequence[int] = KS,
    chunk: int = 256,
) -> dict[str, float]:
    """Recall@k (percent) image->text and text->image, and their mean (used during training).

    ``image_to_text_positives``: a group id per item (items with equal ids are mutual
    positives); ``None`` = item ``i``'s positive is text ``i`` only. Embeddings are
    L2-normalised here (cosine similarity). See :func:`evaluate_retrieval` for everything else.
    """
    images = _as_matrix(image_emb, "image embeddings")
    texts = _as_matrix(text_emb, "text embeddings")
    if texts.shape != images.shape:
        raise ValueError(f"expected two N x D embedding matrices of equal shape, got {tuple(images.shape)} and {tuple(texts.shape)}")
    n = images.shape[0]
    if n == 0:
        raise EvaluationError("no items to evaluate")
    if image_to_text_positives is None:
        positives = Positives.identity(n)
    else:
        groups = np.asarray(image_to_text_positives)
        if groups.shape != (n,):
            raise ValueError(f"image_to_text_positives: expected {n} group ids, got shape {tuple(groups.shape)}")
        positives = Positives.from_groups(groups)
    result = evaluate_retrieval(images, texts, positives, ks=ks, chunk=chunk)["metrics"]
    keys = [f"{d}_R@{k}" for d in DIRECTIONS for k in ks] + ["mean_recall"]
    return {k: result[k] for k in keys}


# ----------------------------------------------------------------------------------------------
# Texts: tokenisation with truncation made visible
# ----------------------------------------------------------------------------------------------


def tokenize_checked(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Tokenise ``texts``; return the tokens and a bool mask of the texts that were truncated.

    Truncation (documented, not an error): a text longer than the model's context keeps its
    first ``context_length - 2`` BPE tokens between start and end of text (open_clip's rule).
    A row is truncated when its tokens fill the context and the text encodes to more; a
    tokenizer without ``encode`` marks every full row as truncated (conservative).
    """
    tokens = tokenizer(list(texts))
    full = np.flatnonzero((tokens[:, -1] != 0).numpy())
    truncated = np.zeros(len(texts), dtype=bool)
    encode = getattr(tokenizer, "encode", None)
    for i in full:
        truncated[i] = True if encode is None else len(encode(texts[i])) + 2 > tokens.shape[1]
    return tokens, truncated


# ----------------------------------------------------------------------------------------------
# The evaluate stage: embed a catalogue split with each model, score it, write the outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """Normalised embeddings of one split with one model, and what embedding them cost."""

    images: torch.Tensor
    texts: torch.Tensor
    image_seconds: float
    text_seconds: float
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def embed_images(model: torch.nn.Module, cache: "ImageCache", batch_size: int = 256) -> torch.Tensor:
    """Normalised image embeddings of every row of an image cache (eval mode, no grad)."""
    from lightclip.imagecache import normalise
    from lightclip.models.zoo import preprocess_config

    pre = preprocess_config(model)
    if int(pre["size"]) != cache.image_size:
        raise EvaluationError(f"images are cached at {cache.image_size}px but the model expects {pre['size']}px")
    out = []
    with torch.no_grad():
        for start in range(0, len(cache), batch_size):
            rows = np.arange(start, min(start + batch_size, len(cache)))
            batch = normalise(cache.batch(rows), pre["mean"], pre["std"])
            out.append(model.encode_image(batch, normalize=True).float())
    return torch.cat(out) if out else torch.zeros((0, 0))


def embed_texts(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised text embeddings of tokenised texts (eval mode, no grad)."""
    from lightclip.models.zoo import encode_text

    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            out.append(encode_text(model, tokens[start : start + batch_size], normalize=True).float())
    return torch.cat(out) if out else torch.zeros((0, 0))


def embed_pairs(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], cache: "ImageCache", titles: Sequence[str], batch_size: int = 256) -> Embeddings:
    """Embed images and titles (tokenisation included in the text time)."""
    model.eval()
    t0 = time.perf_counter()
    images = embed_images(model, cache, batch_size)
    t1 = time.perf_counter()
    tokens, truncated = tokenize_checked(tokenizer, list(titles))
    texts = embed_texts(model, tokens, batch_size)
    t2 = time.perf_counter()
    return Embeddings(images=images, texts=texts, image_seconds=t1 - t0, text_seconds=t2 - t1, truncated=truncated)


def image_content_groups(cache: "ImageCache") -> np.ndarray:
    """A group id per row: rows with byte-identical decoded images (what the model sees) share one.

    Candidates share a hash of 512 bytes sampled across the image (8 runs of 64); only those
    are hashed whole, so a 10k gallery costs ~5 ms instead of ~0.2 s of hashing every image.
    """
    import pandas as pd

    n = len(cache)
    flat = np.ascontiguousarray(cache.images).reshape(n, -1)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    words = _as_words(flat)
    # 8 runs of 8 words spread over the image: whole cache lines (the gallery is far larger than
    # the cache, so lines fetched, not bytes, are the cost) and whole pixel rows, not one column
    starts = np.unique(np.linspace(0, max(0, words.shape[1] - 8), 8).astype(np.int64))
    sample = np.concatenate([words[:, a : a + 8] for a in starts.tolist()], axis=1)
    groups = pd.factorize(_row_hashes(sample))[0].astype(np.int64)
    next_id = int(groups.max()) + 1
    shared = np.flatnonzero(np.bincount(groups) > 1)
    candidates = np.flatnonzero(np.isin(groups, shared))
    order = candidates[np.argsort(groups[candidates], kind="stable")]
    for members in np.split(order, np.flatnonzero(np.diff(groups[order])) + 1) if order.size else []:
        seen: dict[bytes, int] = {}
        for row in members.tolist():  # same sample: confirm on the whole image
            digest = hashlib.blake2b(flat[row].tobytes(), digest_size=16).digest()
            if digest not in seen:  # the first content keeps the sample's id, any other gets a new one
                seen[digest] = int(groups[row]) if not seen else next_id
                next_id += len(seen) > 1
            groups[row] = seen[digest]
    return groups


def catalogue_positives(titles: Sequence[str], cache: "ImageCache | None", rules: Sequence[str]) -> Positives:
    """Item-level positives: item ``i``'s own text, plus the texts of items sharing a rule's group.

    ``title``: identical titles (after case and whitespace folding) are interchangeable, so
    every image of that title is a positive of the title and vice versa. ``image``: items whose
    decoded images are byte-identical give the model identical inputs, so each one's title is
    a positive of the other's image (otherwise the metric would score a forced tie by index).
    """
    n = len(titles)
    images, texts = [np.arange(n)], [np.arange(n)]
    for rule in rules:
        if rule == "title":
            groups = title_groups(titles)
        elif rule == "image":
            if cache is None:
                raise EvaluationError("positives rule 'image' needs the decoded images")
            groups = image_content_groups(cache)
        else:
            raise EvaluationError(f"unknown positives rule {rule!r}; allowed: title, image")
        if np.unique(groups).size < n:  # all distinct: nothing beyond the items' own pairs
            i, t = group_pairs(groups, groups)
            images.append(i)
            texts.append(t)
    # one merge of every relation (from_pairs removes the duplicate pairs)
    return Positives.from_pairs(n, n, np.concatenate(images), np.concatenate(texts))


@dataclass
class ModelEvaluation:
    """One model's result on one split."""

    name: str
    model_dir: str
    metrics: dict[str, float]
    recall_curve: dict[str, dict[int, float]]
    timings: dict[str, float]


def check_model_dirs(models: Mapping[str, str | Path], project_dir: Path | None = None) -> dict[str, Path]:
    """Resolve the model directories of ``evaluate.models``; a missing one is an error, never skipped."""
    from lightclip.models.zoo import INFO_FILE, WEIGHTS_FILE

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


def item_attributes(items: Any, config: "EvaluateConfig") -> dict[str, list[list[Any]]]:
    """The ``evaluate.attributes`` groups the items have (a column absent or all empty is left out)."""
    attributes = {}
    for group in config.attributes:
        if all(col in items.columns and items[col].notna().any() for col in group):
            attributes["_".join(group)] = [list(items[col]) for col in group]
    return attributes


def score_embeddings(
    emb: Embeddings, titles: Sequence[str], cache: "ImageCache | None", attributes: Mapping[str, Sequence[Sequence[Any]]], config: "EvaluateConfig"
) -> tuple[dict[str, Any], Positives, float]:
    """The evaluate stage's work after embedding: positives and every metric, with its seconds.

    One function for the stage and for ``lightclip bench``, which holds these seconds to under
    10% of the embedding time on a 10k gallery.
    """
    t0 = time.perf_counter()
    positives = catalogue_positives(titles, cache, config.positives)
    result = evaluate_retrieval(
        emb.images, emb.texts, positives, ks=config.ks, precision_ks=config.ks, attributes=attributes, curve_ks=config.curve_ks
    )
    return result, positives, time.perf_counter() - t0


def evaluate_model(
    name: str,
    model_dir: Path | str,
    catalogue: "Catalogue",
    config: "EvaluateConfig",
    *,
    cache_dir: Path | str,
    progress: bool = False,
) -> ModelEvaluation:
    """Embed ``config.split`` of ``catalogue`` with the model in ``model_dir`` and score it."""
    from lightclip.imagecache import build_image_cache
    from lightclip.models.zoo import load_model, load_tokenizer, preprocess_config

    items = catalogue.split(config.split)
    if len(items) == 0:
        raise EvaluationError(f"{catalogue.table_path}: split {config.split!r} has no items to evaluate")
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    size = int(preprocess_config(model)["size"])
    cache = build_image_cache(catalogue, config.split, size, cache_dir, progress=progress)
    titles = [str(t) for t in items["title"]]
    emb = embed_pairs(model, tokenizer, cache, titles, config.batch_size)

    attributes = item_attributes(items, config)
    result, positives, metric_seconds = score_embeddings(emb, titles, cache, attributes, config)
    n = len(items)
    embed_seconds = emb.image_seconds + emb.text_seconds
    prefix = f"{config.split}/"
    metrics = {prefix + k: v for k, v in result["metrics"].items()}
    metrics[prefix + "n_items"] = n
    metrics[prefix + "titles_truncated"] = int(emb.truncated.sum())
    metrics[prefix + "positive_pairs"] = int(positives.image_texts.size)
    timings = {
        "encode_ms_per_item": 1000.0 * embed_seconds / n,
        "image_encode_ms_per_item": 1000.0 * emb.image_seconds / n,
        "text_encode_ms_per_item": 1000.0 * emb.text_seconds / n,
        "embed_seconds": embed_seconds,
        "metric_seconds": metric_seconds,
        "metric_share_of_embed": metric_seconds / embed_seconds if embed_seconds > 0 else float("nan"),
    }
    return ModelEvaluation(name=name, model_dir=str(model_dir), metrics=metrics, recall_curve=result["recall_curve"], timings=timings)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_outputs(results: Sequence[ModelEvaluation], split: str, *, metrics_path: Path, plots_dir: Path, figures_dir: Path | None) -> list[Path]:
    """``metrics_path`` (DVC metrics), the DVC plot data under ``plots_dir`` and PNGs under ``figures_dir``.

    Plot data: ``recall_at_k/<model>.csv`` (columns ``k``, ``i2t_recall``, ``t2i_recall``: one
    recall@k curve pair per model) and ``recall_vs_latency.csv`` (one row per model:
    ``model``, ``encode_ms_per_item``, ``mean_recall``, ``i2t_R@1``, ``t2i_R@1``). Returns the PNGs.
    """
    import shutil

    payload = {r.name: {**r.metrics, **{f"timing/{k}": v for k, v in r.timings.items()}, "model_dir": r.model_dir} for r in results}
    _write_json(Path(metrics_path), payload)
    plots_dir = Path(plots_dir)
    curve_dir = plots_dir / "recall_at_k"
    shutil.rmtree(curve_dir, ignore_errors=True)
    curve_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        ks = sorted(r.recall_curve["i2t"])
        lines = ["k,i2t_recall,t2i_recall"] + [f"{k},{r.recall_curve['i2t'][k]:.4f},{r.recall_curve['t2i'][k]:.4f}" for k in ks]
        (curve_dir / f"{r.name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["model,encode_ms_per_item,mean_recall,i2t_R@1,t2i_R@1"]
    for r in results:
        m = r.metrics
        rows.append(f"{r.name},{r.timings['encode_ms_per_item']:.4f},{m[f'{split}/mean_recall']:.4f},{m[f'{split}/i2t_R@1']:.4f},{m[f'{split}/t2i_R@1']:.4f}")
    (plots_dir / "recall_vs_latency.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return write_figures(results, split, Path(figures_dir)) if figures_dir is not None else []


def write_figures(results: Sequence[ModelEvaluation], split: str, figures_dir: Path) -> list[Path]:
    """Matplotlib PNGs of the same two plots (for MLflow and the reports folder)."""
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


def run_evaluate(
    catalogue: "Catalogue",
    config: "EvaluateConfig",
    *,
    project_dir: Path,
    cache_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    figures_dir: Path | None,
    progress: bool = False,
) -> tuple[list[ModelEvaluation], list[Path]]:
    """The ``evaluate`` stage: every model of ``config.models``, outputs written; returns results and PNGs."""
    model_dirs = check_model_dirs(config.models, project_dir)
    if len(catalogue.split(config.split)) == 0:
        raise EvaluationError(f"{catalogue.table_path}: split {config.split!r} has no items to evaluate")
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        results = [
            evaluate_model(name, model_dirs[name], catalogue, config, cache_dir=cache_dir, progress=progress) for name in config.models
        ]
    finally:
        torch.set_num_threads(previous)
    for r in results:  # record the paths as given in params (portable), not resolved
        r.model_dir = str(config.models[r.name])
    figures = write_outputs(results, config.split, metrics_path=metrics_path, plots_dir=plots_dir, figures_dir=figures_dir)
    return results, figures


def summarise(result: ModelEvaluation, split: str) -> str:
    m, t = result.metrics, result.timings
    parts = [
        f"{result.name}: mean recall {m[f'{split}/mean_recall']:.2f}",
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
