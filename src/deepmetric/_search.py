"""Exact k-nearest-neighbour search over embeddings, in numpy or with faiss.

The search core of `deepmetric.index` (which re-exports these names).

`exact_search(queries, reference, k)` returns, for each query, the `k` reference
items closest in Euclidean distance (or another of `METRICS`), ties broken by
reference index, so that the result is deterministic. `ExactSearch` is the same
search over a fixed reference set, for callers that search it chunk by chunk
(`deepmetric.evaluation` and `deepmetric.index.Index` do): it prepares the
reference once and sizes the chunks to a memory budget.

Two engines give the same neighbours up to float rounding of near-equal
distances:

- "numpy": each row's k-th smallest distance is bounded from a fixed sample of
  8192 reference columns; then a chunk of queries meets the references block by
  block (16384 columns, one matrix product each, chunks of up to 2048 queries split
  over threads, one a core) and
  keeps only the values below its bound, which are sorted exactly (rows where the
  sample falls short are searched again over all columns). With fewer than
  32768 references, or k too large for the sample, a chunk gets all its
  distances from one product and an exact partition. The product gives
  ||r||^2 - 2 q.r for the Euclidean metrics (||q||^2 is added to the k winners
  only), -q.r for the others.
- "faiss": faiss's exact `IndexFlatL2` (`IndexFlatIP` for the cosine and inner
  product metrics), its neighbours re-sorted by (distance,
  index) where distances tie.

Everything here is numpy; inputs are float32 arrays of shape (n, dim).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ENGINES", "METRICS", "ExactSearch", "SearchResult", "exact_search",
    "faiss_installed",
]  # fmt: skip

ENGINES = ("numpy", "faiss")
METRICS = ("euclidean", "squared_euclidean", "cosine", "inner_product")

# Working memory of one chunk of the search, beyond the inputs.
CHUNK_BYTES = 256 * 2**20
# Columns sampled to bound each row's k-th smallest distance, and the margin above it.
_SAMPLE = 8192
_MARGIN = 1.3
# Reference columns per block of the blocked numpy search.
_BLOCK = 16384
# Fewest queries per thread of the blocked numpy search.
_MIN_ROWS = 32


def _threads() -> int:
    """Threads of the blocked numpy search: the cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _one_blas_thread():
    """A context in which BLAS (and OpenMP) run one thread (threadpoolctl, a dependency
    of deepmetric). The limit is the process's, so for its duration other threads'
    matrix products run on one thread."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def faiss_installed() -> bool:
    """Whether the "faiss" engine can run (faiss is importable)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}. Received: engine={engine!r}")
    if engine == "faiss" and not faiss_installed():
        raise ImportError("engine='faiss' needs faiss: `pip install faiss-cpu`.")
    return engine


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}. Received: metric={metric!r}")
    return metric


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length; a zero row stays zero (cosine similarity 0)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _squared_distances(query: np.ndarray, reference: np.ndarray, ref_sq: np.ndarray):
    """||r||^2 - 2 q.r: the squared distance up to a per-row constant (same ranking).

    The factor -2 scales the (small) queries, not the (large) product: scaling by a
    power of two is exact, so the values are those of -2 (q @ r.T), one pass fewer.
    """
    d = (query * np.float32(-2.0)) @ reference.T
    d += ref_sq[None, :]
    return d


def _topk_numpy(d: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest entries of each row, sorted by (value, index).

    A threshold t per row with at least k entries <= t is found cheaply from a
    fixed subsample of the columns (falling back to an exact partition for rows
    where it falls short); the entries <= t are then sorted exactly, so ties at
    the k-th place go to the lower index.
    """
    rows_n, n = d.shape
    if k >= n:
        cols = np.broadcast_to(np.arange(n), d.shape)
        return np.lexsort((cols, d), axis=-1)[:, :k]
    j = int(math.ceil(_MARGIN * k * _SAMPLE / n)) + 16
    if n >= 4 * _SAMPLE and j < _SAMPLE:
        subset = np.random.default_rng(0).choice(n, _SAMPLE, replace=False)
        threshold = np.partition(d[:, subset], j - 1, axis=1)[:, j - 1]
        mask = d <= threshold[:, None]
        short = np.flatnonzero(np.count_nonzero(mask, axis=1) < k)
        if len(short):
            exact = np.partition(d[short], k - 1, axis=1)[:, k - 1]
            mask[short] = d[short] <= exact[:, None]
    else:
        threshold = np.partition(d, k - 1, axis=1)[:, k - 1]
        mask = d <= threshold[:, None]
    rows, cols = np.nonzero(mask)  # row-major: columns ascending within a row
    del mask
    counts = np.bincount(rows, minlength=rows_n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Candidates of each row side by side, padded with +inf, then a stable sort:
    # equal distances keep their ascending column order.
    slot = np.arange(len(rows)) - starts[rows]
    padded = np.full((rows_n, int(counts.max())), np.inf, dtype=d.dtype)
    padded[rows, slot] = d[rows, cols]
    order = _stable_argsort_rows(padded, k)
    return cols[starts[:, None] + order]


def _sorted_candidates(rows, cols, values, rows_n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns) of the k smallest candidates of each row, sorted by (value, column).

    `rows`, `cols`, `values` list the candidates row-major, columns ascending within a
    row; every row has at least k of them.
    """
    counts = np.bincount(rows, minlength=rows_n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # Candidates of each row side by side, padded with +inf, then a stable sort:
    # equal distances keep their ascending column order.
    slot = np.arange(len(rows)) - starts[rows]
    padded = np.full((rows_n, int(counts.max())), np.inf, dtype=np.float32)
    padded[rows, slot] = values
    order = _stable_argsort_rows(padded, k)
    return np.take_along_axis(padded, order, axis=1), cols[starts[:, None] + order]


def _stable_argsort_rows(values: np.ndarray, k: int) -> np.ndarray:
    """The first k positions of each row's stable argsort.

    numpy's default argsort (vectorised quicksort) is several times faster than its
    stable sort but orders equal values arbitrarily; rows where equal values meet
    among the first k + 1 sorted places (where their order decides what is kept and
    how it is ranked) are sorted again, stably.
    """
    order = np.argsort(values, axis=1)[:, : k + 1]
    ranked = np.take_along_axis(values, order, axis=1)
    tied = np.flatnonzero((ranked[:, 1:] == ranked[:, :-1]).any(axis=1))
    order = order[:, :k]
    if len(tied):
        order[tied] = np.argsort(values[tied], axis=1, kind="stable")[:, :k]
    return order


def _topk_faiss(index, q: np.ndarray, k: int, exclude: np.ndarray | None, similarity: bool):
    """faiss's k nearest neighbours, `exclude` removed, ties re-sorted by index.

    Returns (value, index) with values ascending: squared distances, or minus the
    similarities of an inner-product index (`similarity`).
    """
    dist, nn = index.search(q, k if exclude is None else k + 1)
    if similarity:
        dist = -dist
    if exclude is not None and np.array_equal(nn[:, 0], exclude):  # the usual case: self first
        nn, dist = nn[:, 1:], dist[:, 1:]
    elif exclude is not None:
        is_self = nn == exclude[:, None]
        # Skip the excluded item, or the last neighbour when it is not among them.
        pos = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        cols = np.arange(k)[None, :]
        take = cols + (cols >= pos[:, None])
        nn = np.take_along_axis(nn, take, axis=1)
        dist = np.take_along_axis(dist, take, axis=1)
    tied = np.flatnonzero((dist[:, 1:] == dist[:, :-1]).any(axis=1))
    if len(tied):
        order = np.lexsort((nn[tied], dist[tied]), axis=-1)
        nn[tied] = np.take_along_axis(nn[tied], order, axis=1)
        dist[tied] = np.take_along_axis(dist[tied], order, axis=1)
    return dist, nn


def _first_match_rank(d: np.ndarray, match: np.ndarray) -> np.ndarray:
    """1-based rank of the first matching item per row, ties broken by index.

    `d` holds distances with excluded items at +inf; every row has a match.
    """
    masked = np.where(match, d, np.inf)
    best = masked.argmin(axis=1)  # first index among equal minima
    best_d = masked[np.arange(len(d)), best]
    del masked
    cols = np.arange(d.shape[1])[None, :]
    closer = (d < best_d[:, None]) | ((d == best_d[:, None]) & (cols < best[:, None]))
    return closer.sum(axis=1) + 1


class SearchResult(NamedTuple):
    """The k nearest references of each query.

    `distances` (n, k) float32 distances of the search's metric, ascending; `indices`
    (n, k) int64 reference indices; `first_match` (n,) int64 or None: with
    `query_labels`, the 1-based rank over the whole reference set of the first item
    whose label equals the query's (0 where no reference item has it).
    """

    distances: np.ndarray
    indices: np.ndarray
    first_match: np.ndarray | None


class ExactSearch:
    """Exact k-nearest-neighbour search over a fixed reference set.

    Args:
      reference: float32 array (num_references, dim), C-contiguous.
      labels: optional (num_references,) labels of the references, for
        `search(..., query_labels=...)`.
      engine: "numpy" or "faiss" (`IndexFlatL2`, or `IndexFlatIP` for the cosine and
        inner-product metrics).
      metric: one of `METRICS`, smaller is closer: "euclidean", "squared_euclidean",
        "cosine" (1 - cosine similarity; a zero vector has similarity 0 to
        everything) or "inner_product" (minus the inner product).
    """

    def __init__(self, reference: np.ndarray, labels=None, *, engine="numpy", metric="euclidean"):
        self.engine = _check_engine(engine)
        self.metric = _check_metric(metric)
        self._similarity = metric in ("cosine", "inner_product")
        self.reference = np.ascontiguousarray(reference, dtype=np.float32)
        if metric == "cosine":
            self.reference = _unit_rows(self.reference)
        self.labels = None if labels is None else np.asarray(labels)
        self._ref_sq = None
        if not self._similarity:
            self._ref_sq = np.einsum("ij,ij->i", self.reference, self.reference)
        self._faiss: Any = None
        self._sample: tuple | None = None
        if engine == "faiss":
            import faiss

            flat = faiss.IndexFlatIP if self._similarity else faiss.IndexFlatL2
            self._faiss = flat(self.reference.shape[1])
            self._faiss.add(self.reference)

    def __len__(self) -> int:
        return len(self.reference)

    def chunk_size(self, k: int) -> int:
        """Queries per `search` call that keep its working memory near `CHUNK_BYTES`."""
        if self._faiss is not None:
            size = max(1, CHUNK_BYTES // (40 * (k + 1)))
            if size > 4096:
                size -= size % 4096  # whole blocks of faiss's BLAS search
            return size
        if self._blocked(k):
            # A block of keys and its mask, the sampled keys and ~_MARGIN k candidates
            # (row, column, value, copies while they are merged) a query: more queries
            # a chunk than the whole rows of the unblocked search allow, and larger
            # matrix products.
            return max(1, min(2048, CHUNK_BYTES // (5 * _BLOCK + 4 * _SAMPLE + 80 * k)))
        return max(1, CHUNK_BYTES // (12 * len(self) + 48 * k))

    def _keys(self, queries: np.ndarray) -> np.ndarray:
        """(n, num_references) values that rank like the distances, from one product."""
        if self._ref_sq is not None:
            return _squared_distances(queries, self.reference, self._ref_sq)
        return np.negative(queries) @ self.reference.T  # exact, as -(q @ r.T)

    def search(self, queries: np.ndarray, k: int, *, exclude=None, query_labels=None):
        """The `k` nearest references of each row of `queries`, as a `SearchResult`.

        Args:
          queries: float32 array (n, dim).
          k: neighbours per query, at most the number of references (less one with
            `exclude`).
          exclude: optional (n,) reference index to leave out for each query (the
            query itself in a self-search).
          query_labels: optional (n,) labels; fills `first_match` (needs `labels`).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.metric == "cosine":
            queries = _unit_rows(queries)
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
        available = len(self) - (0 if exclude is None else 1)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
            raise ValueError(f"`k` must be an integer in [1, {available}]. Received: k={k!r}")
        rows = np.arange(len(queries))
        d = None
        if self._faiss is None and self._blocked(k):
            values, nn = self._search_threads(queries, k, exclude)
            if not self._similarity:
                values += np.einsum("ij,ij->i", queries, queries)[:, None]
        elif self._faiss is None:
            d = self._keys(queries)
            if exclude is not None:
                d[rows, exclude] = np.inf
            nn = _topk_numpy(d, k)
            values = np.take_along_axis(d, nn, axis=1)
            if not self._similarity:
                values += np.einsum("ij,ij->i", queries, queries)[:, None]
        else:
            values, nn = self._search_faiss(queries, k, exclude, available)
        distances = _to_distances(values, self.metric)
        first = None
        if query_labels is not None:
            first = self._first_match(queries, np.asarray(query_labels), nn, exclude, d)
        return SearchResult(distances, nn.astype(np.int64, copy=False), first)

    def _blocked(self, k: int) -> bool:
        """Whether the numpy search goes by column blocks: where a sample of the columns
        bounds each row's k-th smallest value (many references, k small beside them)."""
        n = len(self)
        return n >= 4 * _SAMPLE and int(math.ceil(_MARGIN * k * _SAMPLE / n)) + 16 < _SAMPLE

    def _search_threads(self, queries, k, exclude):
        """`_search_blocked` over slices of the queries, one per thread (see `_threads`).

        numpy's matrix products, comparisons, `flatnonzero` and sorts release the GIL,
        so the selection after each product, one-threaded in numpy, runs on every core.
        Meanwhile BLAS runs one thread per product (`_one_blas_thread`): a thread per
        core already, BLAS's own threads would only contend with them (8,192 queries
        in 100,000 x 128 references: 2.5 s instead of 3.0 to 4.0 s on 2 cores).
        The slices are searched independently, so the result is the same.
        """
        parts = min(_threads(), len(queries) // _MIN_ROWS)
        if parts < 2:
            return self._search_blocked(queries, k, exclude)
        self._prepare_sample()  # once, before the threads share it
        bounds = np.linspace(0, len(queries), parts + 1).astype(np.int64)
        slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        with _one_blas_thread(), ThreadPoolExecutor(parts) as pool:
            found = list(pool.map(
                lambda part: self._search_blocked(
                    queries[part], k, None if exclude is None else exclude[part]
                ),
                slices,
            ))  # fmt: skip
        return np.concatenate([v for v, _ in found]), np.concatenate([i for _, i in found])

    def _prepare_sample(self) -> None:
        """The `_SAMPLE` reference columns (and their squared norms) of the bound."""
        if self._sample is None:
            n = len(self)
            subset = np.sort(np.random.default_rng(0).choice(n, _SAMPLE, replace=False))
            where = np.full(n, -1, np.int64)
            where[subset] = np.arange(_SAMPLE)
            self._sample = (self.reference[subset], None if self._ref_sq is None else
                            self._ref_sq[subset], where)  # fmt: skip

    def _search_blocked(self, queries, k, exclude):
        """(values, indices) of the k smallest keys of each query, sorted by (value, index).

        The keys of a chunk are never held whole: a threshold per query comes from a
        fixed sample of `_SAMPLE` reference columns (its j-th smallest key, j about
        `_MARGIN` k times the sampled fraction); then blocks of `_BLOCK` columns are
        computed one at a time (at most 2048 x 16384 keys, 128 MB), and only
        their keys <= the threshold are kept. Rows with fewer than k candidates (rare)
        are searched again over all columns. The result is the exact k smallest, ties
        to the lower index, as `_topk_numpy` on the whole matrix.
        """
        n, rows_n = len(self), len(queries)
        j = int(math.ceil(_MARGIN * k * _SAMPLE / n)) + 16
        self._prepare_sample()
        assert self._sample is not None
        sample_ref, sample_sq, where = self._sample
        scaled = queries * np.float32(-1.0 if self._similarity else -2.0)  # exact scaling
        keys = scaled @ sample_ref.T
        if sample_sq is not None:
            keys += sample_sq[None, :]
        if exclude is not None:
            hit = np.flatnonzero(where[exclude] >= 0)
            keys[hit, where[exclude[hit]]] = np.inf
        threshold = np.partition(keys, j - 1, axis=1)[:, j - 1]
        del keys
        found_rows, found_cols, found_values = [], [], []
        # One buffer for every block's keys and one for its mask, written in place: a fresh
        # 10-100 MB array a block costs its page faults each time (up to half the block's time).
        keys_buffer = np.empty(rows_n * min(_BLOCK, n), np.float32)
        mask_buffer = np.empty(rows_n * min(_BLOCK, n), bool)
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            width = stop - start
            block = keys_buffer[: rows_n * width].reshape(rows_n, width)
            np.matmul(scaled, self.reference[start:stop].T, out=block)
            if self._ref_sq is not None:
                block += self._ref_sq[None, start:stop]
            if exclude is not None:
                inside = np.flatnonzero((exclude >= start) & (exclude < stop))
                block[inside, exclude[inside] - start] = np.inf
            # Flat positions: one index array, not two, and a 1-D gather (several
            # times faster than a 2-D nonzero and fancy index).
            mask = mask_buffer[: rows_n * width].reshape(rows_n, width)
            flat = np.flatnonzero(np.less_equal(block, threshold[:, None], out=mask))
            found_rows.append(flat // width)
            found_cols.append(flat % width + start)
            found_values.append(block.ravel()[flat])
        rows = np.concatenate(found_rows)
        order = np.argsort(rows, kind="stable")  # row-major, columns ascending in a row
        rows, cols = rows[order], np.concatenate(found_cols)[order]
        values = np.concatenate(found_values)[order]
        counts = np.bincount(rows, minlength=rows_n)
        short = np.flatnonzero(counts < k)
        if len(short):  # the sample's bound fell short: these rows over all columns
            keep = ~np.isin(rows, short)
            d = self._keys(queries[short])
            if exclude is not None:
                d[np.arange(len(short)), exclude[short]] = np.inf
            kth = np.partition(d, k - 1, axis=1)[:, k - 1]
            r, c = np.nonzero(d <= kth[:, None])
            rows = np.concatenate([rows[keep], short[r]])
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
            cols = np.concatenate([cols[keep], c])[order]
            values = np.concatenate([values[keep], d[r, c]])[order]
        return _sorted_candidates(rows, cols, values, rows_n, k)

    def _search_faiss(self, queries, k, exclude, available):
        """faiss's k nearest, one more fetched: where the k-th and the next tie, faiss
        may have kept a higher index, so those rows are ranked again in numpy."""
        extra = 1 if k < available else 0
        values, nn = _topk_faiss(self._faiss, queries, k + extra, exclude, self._similarity)
        if not extra:
            return values, nn
        tied = np.flatnonzero(values[:, k - 1] == values[:, k])
        values, nn = values[:, :k].copy(), nn[:, :k].copy()
        if len(tied):
            d = self._keys(queries[tied])
            if exclude is not None:
                d[np.arange(len(tied)), exclude[tied]] = np.inf
            nn[tied] = _topk_numpy(d, k)
            values[tied] = np.take_along_axis(d, nn[tied], axis=1)
            if not self._similarity:
                values[tied] += np.einsum("ij,ij->i", queries[tied], queries[tied])[:, None]
        return values, nn

    def _first_match(self, queries, query_labels, nn, exclude, d):
        if self.labels is None:
            raise ValueError("`query_labels` needs an `ExactSearch` built with `labels`.")
        match = self.labels[nn] == query_labels[:, None]
        rank = np.zeros(len(queries), dtype=np.int64)
        found = match.any(axis=1)
        rank[found] = match[found].argmax(axis=1) + 1
        # Beyond the k neighbours: over the full ranking, row by row in chunks.
        missing = np.flatnonzero(~found)
        step = max(1, CHUNK_BYTES // (12 * len(self)))
        for s in range(0, len(missing), step):
            part = missing[s : s + step]
            dd = d[part] if d is not None else self._keys(queries[part])
            relevant = self.labels[None, :] == query_labels[part, None]
            if exclude is not None:
                n = np.arange(len(part))
                dd[n, exclude[part]] = np.inf
                relevant[n, exclude[part]] = False
            rank[part] = np.where(relevant.any(axis=1), _first_match_rank(dd, relevant), 0)
        return rank


def _to_distances(values: np.ndarray, metric: str) -> np.ndarray:
    """Ranking values (squared distances or minus similarities) as float32 distances."""
    if metric == "euclidean":
        return np.sqrt(np.maximum(values, 0.0)).astype(np.float32)
    if metric == "squared_euclidean":
        return np.maximum(values, 0.0).astype(np.float32)
    if metric == "cosine":
        return (values + 1.0).astype(np.float32)
    return values.astype(np.float32)


def exact_search(
    queries, reference, k: int, *, exclude_self: bool = False, engine="numpy", metric="euclidean"
):
    """The `k` nearest reference items of each query: `(distances, indices)`.

    Distances of `metric` (see `ExactSearch`; Euclidean by default), exact, ties
    broken by reference index. `distances` is (n, k) float32 ascending, `indices`
    (n, k) int64. With `exclude_self`, query i is reference item i (pass the same
    array twice) and is left out of its own neighbours. The queries are searched in
    chunks of bounded working memory.

    >>> x = np.array([[0.0], [1.0], [3.0]], "float32")
    >>> d, i = exact_search(x, x, 1, exclude_self=True)
    >>> i[:, 0].tolist(), d[:, 0].tolist()
    ([1, 0, 1], [1.0, 1.0, 2.0])
    """
    queries = _as_points(queries, "queries")
    reference = _as_points(reference, "reference")
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(
            "`queries` and `reference` must have the same dimension. "
            f"Received: {queries.shape[1]} and {reference.shape[1]}"
        )
    if exclude_self and len(queries) != len(reference):
        raise ValueError(
            "`exclude_self=True` needs query i to be reference item i: as many queries as "
            f"references. Received: {len(queries)} queries, {len(reference)} references"
        )
    available = len(reference) - (1 if exclude_self else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(f"`k` must be an integer in [1, {available}]. Received: k={k!r}")
    searcher = ExactSearch(reference, engine=engine, metric=metric)
    step = min(len(queries), searcher.chunk_size(int(k)))
    distances = np.empty((len(queries), int(k)), np.float32)
    indices = np.empty((len(queries), int(k)), np.int64)
    for start in range(0, len(queries), step):
        part = slice(start, start + step)
        exclude = np.arange(len(queries))[part] if exclude_self else None
        distances[part], indices[part], _ = searcher.search(queries[part], int(k), exclude=exclude)
    return distances, indices


def _as_points(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2 or array.shape[0] == 0 or array.dtype.kind not in "fiu":
        raise ValueError(
            f"`{name}` must be a non-empty 2-D array of numbers (n, dim). "
            f"Received: shape {array.shape}, dtype {array.dtype}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def build_structure(rows: np.ndarray, structure: str, metric: str, options: dict):
    """A faiss "hnsw" or "ivf" structure over `rows` (unit rows for cosine), ids = positions.

    HNSW: `IndexHNSWFlat` with `options["m"]` links per node, built with
    `options["ef_construction"]` candidates per insertion. IVF: `IndexIVFFlat` with
    `options["nlist"]` cells (default 4 sqrt(n), at most n), trained on at most 256
    rows per cell, sampled with a fixed seed.
    """
    import faiss

    kind = faiss.METRIC_INNER_PRODUCT if metric in ("cosine", "inner_product") else faiss.METRIC_L2
    dim = rows.shape[1]
    if structure == "hnsw":
        index = faiss.index_factory(dim, f"HNSW{options['m']},Flat", kind)
        hnsw: Any = faiss.downcast_index(index)
        hnsw.hnsw.efConstruction = options.get("ef_construction", 40)
    else:
        nlist = min(options["nlist"] or max(1, round(4 * math.sqrt(len(rows)))), len(rows))
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", kind)
        sample = rows
        if len(rows) > 256 * nlist:
            pick = np.random.default_rng(0).choice(len(rows), 256 * nlist, replace=False)
            sample = rows[np.sort(pick)]
        index.train(sample)
    index.add(rows)
    return index


def set_search_options(index: Any, structure: str, options: dict) -> None:
    """HNSW's `efSearch` or IVF's `nprobe` from `options`."""
    import faiss

    if structure == "hnsw":
        hnsw: Any = faiss.downcast_index(index)
        hnsw.hnsw.efSearch = options["ef_search"]
    else:
        faiss.extract_index_ivf(index).nprobe = options["nprobe"]


def approximate_search(index, queries: np.ndarray, k: int, metric: str):
    """`(distances, indices)` from a faiss structure; a missing neighbour: -1 and +inf."""
    if metric == "cosine":
        queries = _unit_rows(queries)
    values, nn = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    if metric in ("cosine", "inner_product"):
        values = -values
    distances = _to_distances(values, metric)
    distances[nn < 0] = np.inf
    return distances, nn.astype(np.int64, copy=False)
