"""Exact k-nearest-neighbour search over embeddings, in numpy or with faiss.

`exact_search(queries, reference, k)` returns, for each query, the `k` reference
items closest in Euclidean distance, ties broken by reference index, so that the
result is deterministic. `ExactSearch` is the same search over a fixed reference
set, for callers that search it chunk by chunk (`deepmetric.evaluation` does): it
prepares the reference once and sizes the chunks to a memory budget.

Two engines give the same neighbours up to float rounding of near-equal
distances:

- "numpy": a chunk of queries gets its distances from one matrix product; each
  row's k-th smallest distance is bounded from a fixed sample of the columns
  (an exact partition where the sample falls short), and the candidates below the
  bound are sorted exactly.
- "faiss": faiss's exact `IndexFlatL2`, its neighbours re-sorted by (distance,
  index) where distances tie.

Everything here is numpy; inputs are float32 arrays of shape (n, dim).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["ENGINES", "ExactSearch", "SearchResult", "exact_search", "faiss_installed"]

ENGINES = ("numpy", "faiss")

# Working memory of one chunk of the search, beyond the inputs.
CHUNK_BYTES = 256 * 2**20
# Columns sampled to bound each row's k-th smallest distance, and the margin above it.
_SAMPLE = 8192
_MARGIN = 1.3


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


def _squared_distances(query: np.ndarray, reference: np.ndarray, ref_sq: np.ndarray):
    """||r||^2 - 2 q.r: the squared distance up to a per-row constant (same ranking)."""
    d = query @ reference.T
    d *= -2.0
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
    order = np.argsort(padded, axis=1, kind="stable")[:, :k]
    return cols[starts[:, None] + order]


def _topk_faiss(index, q: np.ndarray, k: int, exclude: np.ndarray | None):
    """faiss's k nearest neighbours, `exclude` removed, ties re-sorted by index."""
    dist, nn = index.search(q, k if exclude is None else k + 1)
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

    `distances` (n, k) float32 Euclidean distances, ascending; `indices` (n, k) int64
    reference indices; `first_match` (n,) int64 or None: with `query_labels`, the
    1-based rank over the whole reference set of the first item whose label equals
    the query's (0 where no reference item has it).
    """

    distances: np.ndarray
    indices: np.ndarray
    first_match: np.ndarray | None


class ExactSearch:
    """Exact Euclidean k-nearest-neighbour search over a fixed reference set.

    Args:
      reference: float32 array (num_references, dim), C-contiguous.
      labels: optional (num_references,) labels of the references, for
        `search(..., query_labels=...)`.
      engine: "numpy" or "faiss".
    """

    def __init__(self, reference: np.ndarray, labels: np.ndarray | None = None, *, engine="numpy"):
        self.engine = _check_engine(engine)
        self.reference = np.ascontiguousarray(reference, dtype=np.float32)
        self.labels = None if labels is None else np.asarray(labels)
        self._ref_sq = np.einsum("ij,ij->i", self.reference, self.reference)
        self._faiss: Any = None
        if engine == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatL2(self.reference.shape[1])
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
        return max(1, CHUNK_BYTES // (12 * len(self) + 48 * k))

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
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64)
        available = len(self) - (0 if exclude is None else 1)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
            raise ValueError(f"`k` must be an integer in [1, {available}]. Received: k={k!r}")
        rows = np.arange(len(queries))
        d = None
        if self._faiss is None:
            d = _squared_distances(queries, self.reference, self._ref_sq)
            if exclude is not None:
                d[rows, exclude] = np.inf
            nn = _topk_numpy(d, k)
            sq = np.take_along_axis(d, nn, axis=1)
            sq += np.einsum("ij,ij->i", queries, queries)[:, None]
        else:
            sq, nn = _topk_faiss(self._faiss, queries, k, exclude)
        distances = np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)
        first = None
        if query_labels is not None:
            first = self._first_match(queries, np.asarray(query_labels), nn, exclude, d)
        return SearchResult(distances, nn.astype(np.int64, copy=False), first)

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
            if d is not None:
                dd = d[part]
            else:
                dd = _squared_distances(queries[part], self.reference, self._ref_sq)
            relevant = self.labels[None, :] == query_labels[part, None]
            if exclude is not None:
                n = np.arange(len(part))
                dd[n, exclude[part]] = np.inf
                relevant[n, exclude[part]] = False
            rank[part] = np.where(relevant.any(axis=1), _first_match_rank(dd, relevant), 0)
        return rank


def exact_search(queries, reference, k: int, *, exclude_self: bool = False, engine="numpy"):
    """The `k` nearest reference items of each query: `(distances, indices)`.

    Euclidean distances, exact, ties broken by reference index. `distances` is
    (n, k) float32 ascending, `indices` (n, k) int64. With `exclude_self`, query i
    is reference item i (pass the same array twice) and is left out of its own
    neighbours. The queries are searched in chunks of bounded working memory.

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
    searcher = ExactSearch(reference, engine=engine)
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
