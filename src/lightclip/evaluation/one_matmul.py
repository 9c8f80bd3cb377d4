"""Both retrieval directions from one matrix product: :func:`ranks_both_ways`.

Same inputs and the same results as :func:`~lightclip.evaluation.ranking.ranks_per_direction`
(:func:`~lightclip.evaluation.ranking.retrieval_ranks` once per direction), at half the matrix
products. The results are equal bit for bit when the BLAS rounds each image-text product the
same in both operand orders (it does for the tile sizes used here; for tiny tiles it may not,
and then only similarities within float32 rounding of each other can swap places, as they can
between two chunk sizes of ``retrieval_ranks``). The evaluate stage uses it because it measured
a third to a half faster than ``ranks_per_direction`` at 10k and at 100k items, 128-d and 384-d,
on the 2-core CPU this project runs on (``benchmarks/one_matmul.py``; figures in
``docs/results.md``).

How: the similarity matrix is computed once, in tiles of text rows x all images. Each tile's
rows rank the text queries exactly as ``retrieval_ranks`` does. Its columns carry the image
queries' counts, but an image query's best-positive similarity ``c`` is only known once every
tile holding one of its positives has been computed. So each column is split against a band
``[L, U]`` proven to hold ``c``: the exact (float64) similarity of the best positive +- a
float32 dot-product error bound (``4 * D * 2**-24`` for unit vectors). Keys above ``U`` are
counted at once; the few inside the band are kept and compared with ``c`` at the end, where
ties follow the usual rule (lower text index first). Byte-identical text vectors are folded
into one row first, so duplicate texts tie exactly. The tiles are spread over as many
single-threaded workers as torch has threads (numpy's passes run on one core).

When the band cannot be proven (a matmul less precise than float32) or would hold mass ties
(collapsed embeddings), :func:`ranks_both_ways` returns what ``ranks_per_direction`` returns,
by running it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lightclip.evaluation.ranking import (
    BothWays,
    Positives,
    _as_words,
    _csr_entries,
    _mask_buffer,
    _rank_from_candidates,
    _rank_rows,
    _row_hashes,
    _stable_topk,
    _top_candidates,
    ranks_per_direction,
)
from lightclip.io import torch_threads


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


def _equal_rows(matrix: np.ndarray) -> np.ndarray:
    """A group id per row, first-seen order: rows with equal values share one.

    Rows are grouped by a hash of their bytes and each member is compared with its group's
    first row; should two different rows ever share a hash, the rows are grouped by their bytes
    instead (slower, exact).
    """
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


def ranks_both_ways(images: torch.Tensor, texts: torch.Tensor, positives: Positives, *, chunk: int = 256, topk: int = 0) -> BothWays:
    """Image -> text ranks, text -> image ranks and the text queries' top-``topk`` images.

    Exactly :func:`~lightclip.evaluation.ranking.ranks_per_direction`'s result, from one matrix
    product (see the module docstring); ``chunk``: text rows per tile.
    """
    both = _one_matmul(images, texts, positives, chunk=chunk, topk=topk)
    return ranks_per_direction(images, texts, positives, chunk=chunk, topk=topk) if both is None else both


def _one_matmul(images: torch.Tensor, texts: torch.Tensor, positives: Positives, *, chunk: int, topk: int) -> BothWays | None:
    """:func:`ranks_both_ways`, or ``None`` when a best positive falls outside its band or the
    bands fill up with mass ties."""
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
        with torch_threads(1), ThreadPoolExecutor(max_workers=n_workers) as pool:  # each worker's matmul on one core
            results = list(pool.map(work, range(n_workers)))
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

