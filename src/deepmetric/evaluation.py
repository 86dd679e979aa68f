"""Retrieval evaluation of an embedding: precision@1, R-precision, MAP@R, recall@k, NMI.

`retrieval_metrics` ranks reference embeddings by Euclidean distance to each
query and scores the rankings with the definitions of "A Metric Learning Reality
Check" (Musgrave, Belongie and Lim, ECCV 2020), as pytorch-metric-learning's
`AccuracyCalculator` computes them. The search is an exact k-nearest-neighbour
search, done in chunks of queries so that memory stays bounded (a 100,000 x 128
self-retrieval needs a few hundred MB beyond the embeddings), with faiss's
`IndexFlatL2` when faiss is installed and numpy otherwise.

Everything here is numpy: embeddings from any backend (or from `model.predict`)
are converted to float32 arrays first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["retrieval_metrics"]

# Working memory of one chunk of the search, beyond the inputs.
_CHUNK_BYTES = 256 * 2**20
# Columns sampled to estimate each row's k-th smallest distance, and the margin above it.
_SAMPLE = 8192
_MARGIN = 1.3


def _as_embeddings(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"`{name}` must be a 2-D array of embeddings. Received: {name}=None")
    try:
        array = np.asarray(x)
    except Exception:  # a tensor that does not convert directly
        import keras

        array = np.asarray(keras.ops.convert_to_numpy(x))
    if array.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D array of embeddings with shape (num_items, embedding_dim). "
            f"Received: {name}.shape={array.shape}"
        )
    if array.dtype.kind not in "fiu":
        raise TypeError(f"`{name}` must hold numbers. Received: {name}.dtype={array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"`{name}` must not be empty. Received: {name}.shape={array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must hold finite values; it contains NaN or inf.")
    return array


def _as_labels(y, num: int, name: str, embeddings_name: str) -> np.ndarray:
    """Returns labels as a 1-D int64 or str array (never through a float cast)."""
    if y is None:
        raise ValueError(f"`{name}` must be given with `{embeddings_name}`. Received: {name}=None")
    array = np.asarray(y)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must hold one label per item, with shape (num_items,) or (num_items, 1). "
            f"Received: {name}.shape={np.shape(y)}"
        )
    if array.shape[0] != num:
        raise ValueError(
            f"`{name}` must have one label per row of `{embeddings_name}`: expected {num} "
            f"labels, received {name}.shape={np.shape(y)}"
        )
    if array.dtype.kind == "O":
        if all(isinstance(v, str) for v in array):
            array = array.astype(str)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in array):
            array = array.astype(np.int64)
        else:
            raise TypeError(f"`{name}` must hold integer or string labels, not a mixture.")
    if array.dtype.kind in "iu":
        return array.astype(np.int64) if array.dtype.kind == "i" else array
    if array.dtype.kind in "US":
        return array.astype(str)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array) & (array == np.round(array))):
            raise ValueError(
                f"`{name}` must hold class labels: integers or strings. Float labels must be "
                f"integer-valued; received values such as {array[array != np.round(array)][:3]}"
            )
        return array.astype(np.int64)
    raise TypeError(
        f"`{name}` must hold integer or string class labels. Received: {name}.dtype={array.dtype}"
    )


def _encode(query_labels: np.ndarray, reference_labels: np.ndarray | None):
    """Maps labels to dense int codes shared by queries and references."""
    if reference_labels is None:
        _, codes = np.unique(query_labels, return_inverse=True)
        return codes.reshape(-1).astype(np.int32), None
    if (query_labels.dtype.kind == "U") != (reference_labels.dtype.kind == "U"):
        raise TypeError(
            "`query_labels` and `reference_labels` must both hold integers or both hold strings. "
            f"Received dtypes {query_labels.dtype} and {reference_labels.dtype}"
        )
    both = np.concatenate([query_labels, reference_labels])
    _, codes = np.unique(both, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int32)
    return codes[: len(query_labels)], codes[len(query_labels) :]


def _check_recall_at(recall_at) -> tuple[int, ...]:
    values = (recall_at,) if isinstance(recall_at, (int, np.integer)) else tuple(recall_at)
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(
                f"`recall_at` must be a sequence of positive integers. Received: {recall_at!r}"
            )
    return tuple(int(k) for k in values)


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


def _first_relevant_rank(d: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the first relevant item per row, ties broken by index.

    `d` holds distances with excluded items at +inf; every row has a relevant item.
    """
    masked = np.where(relevant, d, np.inf)
    best = masked.argmin(axis=1)  # first index among equal minima
    best_d = masked[np.arange(len(d)), best]
    del masked
    cols = np.arange(d.shape[1])[None, :]
    closer = (d < best_d[:, None]) | ((d == best_d[:, None]) & (cols < best[:, None]))
    return closer.sum(axis=1) + 1


def _exact_ranks(q, rows, codes, reference, ref_sq, r_codes, self_search, d=None):
    """First-relevant ranks over the full ranking, for queries whose k neighbours had none."""
    step = max(1, _CHUNK_BYTES // (12 * len(reference)))
    ranks = np.empty(len(rows), dtype=np.float64)
    for s in range(0, len(rows), step):
        part = slice(s, s + step)
        dd = d[part] if d is not None else _squared_distances(q[part], reference, ref_sq)
        relevant = r_codes[None, :] == codes[part, None]
        if self_search:
            n = np.arange(len(rows[part]))
            dd[n, rows[part]] = np.inf
            relevant[n, rows[part]] = False
        ranks[part] = _first_relevant_rank(dd, relevant)
    return ranks


def _faiss_module(use_faiss):
    if use_faiss is False:
        return None
    if use_faiss not in ("auto", True):
        raise ValueError(f"`use_faiss` must be 'auto', True or False. Received: {use_faiss!r}")
    try:
        import faiss
    except ImportError:
        if use_faiss is True:
            raise ImportError(
                "`use_faiss=True` needs faiss: `pip install faiss-cpu`, or pass use_faiss='auto'."
            ) from None
        return None
    return faiss


def retrieval_metrics(
    query_embeddings,
    query_labels,
    reference_embeddings=None,
    reference_labels=None,
    *,
    recall_at: Sequence[int] = (1, 2, 4, 8),
    clustering: bool = True,
    chunk_size: int | None = None,
    use_faiss: bool | str = "auto",
    seed: int = 0,
) -> dict[str, float]:
    """Retrieval metrics of an embedding: precision@1, R-precision, MAP@R, MRR, recall@k.

    Each query ranks the references by Euclidean distance (exact search, ties
    broken by reference index). Without a reference set the queries search
    each other, leaving themselves out. For a query of class c, R is the number
    of references of class c (itself excluded); queries with R = 0 are left out
    of every metric except NMI/AMI. With rel(i) = 1 when the i-th neighbour has
    the query's class and P(i) the precision among the first i neighbours:

    - `precision_at_1`: rel(1).
    - `r_precision`: (number of relevant items among the first R) / R.
    - `map_at_r`: (1 / R) * sum_{i <= R} P(i) * rel(i).
    - `mrr`: 1 / (rank of the first relevant item) over the full ranking.
    - `recall_at_{k}`: 1 if a relevant item is among the first k, for each k of
      `recall_at` (k is capped at the number of references).
    - `nmi`, `ami` (when `clustering`): k-means (scikit-learn) of the query
      embeddings into as many clusters as query classes, scored against the
      labels with normalized / adjusted mutual information.

    Each value is the mean over queries, a Python float, as
    pytorch-metric-learning's `AccuracyCalculator` ("A Metric Learning Reality
    Check", Musgrave et al. 2020) with its default `avg_of_avgs=False`. If no
    query has a relevant reference the ranking metrics are NaN (with a warning).

    The search takes chunks of queries so that working memory stays near
    256 MB whatever the size; each query keeps only its max(R_max, max
    recall_at) nearest neighbours. With faiss installed (`use_faiss="auto"` or
    True) the search is faiss's exact `IndexFlatL2`, which is faster on CPU;
    faiss and numpy give the same neighbours up to float rounding of near-equal
    distances.

    Args:
        query_embeddings: array of shape (num_queries, dim).
        query_labels: class labels of shape (num_queries,) or (num_queries, 1):
            integers or strings. They are compared as given, never through floats.
        reference_embeddings: optional array (num_references, dim) to search;
            if None the queries search each other, leaving one out.
        reference_labels: labels of the references; required with them.
        recall_at: the k of the `recall_at_{k}` keys.
        clustering: also compute `nmi` and `ami` (needs scikit-learn).
        chunk_size: queries per chunk of the search; None sizes chunks to
            about 256 MB of working memory.
        use_faiss: "auto" (faiss if installed), True (require it) or False.
        seed: random state of the k-means.

    Returns:
        A dict of Python floats: `precision_at_1`, `r_precision`, `map_at_r`,
        `mrr`, `recall_at_{k}` for each k, and `nmi`, `ami` when `clustering`.

    Example: two classes on a line. Query 0 (class 0 at x=0) has neighbours
    1 (x=1, class 0), 2 (x=2, class 1), 3 (x=3, class 1); R = 1 and its first
    neighbour is relevant, so its precision@1, R-precision and AP@R are 1.
    Query 3 (class 1 at x=3) ranks 2, 1, 0: also 1. Query 1 (x=1) ranks 0 and 2
    at equal distance; the tie goes to the lower index 0, relevant: 1. Query 2
    (x=2) ranks 1 then 3 (tie, lower index first): neighbour 1 is of class 0,
    so precision@1 = R-precision = AP@R = 0 and its first relevant item is at
    rank 2 (reciprocal rank 1/2). Means: 3/4, and MRR = 3.5/4.

    >>> x = [[0.0], [1.0], [2.0], [3.0]]
    >>> m = retrieval_metrics(x, [0, 0, 1, 1], recall_at=(1, 2), clustering=False)
    >>> m["precision_at_1"], m["map_at_r"], m["mrr"], m["recall_at_2"]
    (0.75, 0.75, 0.875, 1.0)
    """
    query = _as_embeddings(query_embeddings, "query_embeddings")
    q_labels = _as_labels(query_labels, len(query), "query_labels", "query_embeddings")
    self_search = reference_embeddings is None
    if self_search:
        if reference_labels is not None:
            raise ValueError(
                "`reference_labels` was given without `reference_embeddings`; pass both or neither."
            )
        reference = query
        q_codes, _ = _encode(q_labels, None)
        r_codes = q_codes
    else:
        reference = _as_embeddings(reference_embeddings, "reference_embeddings")
        r_labels = _as_labels(
            reference_labels, len(reference), "reference_labels", "reference_embeddings"
        )
        if reference.shape[1] != query.shape[1]:
            raise ValueError(
                "`query_embeddings` and `reference_embeddings` must have the same embedding "
                f"dimension. Received: {query.shape[1]} and {reference.shape[1]}"
            )
        q_codes, r_codes = _encode(q_labels, r_labels)
    ks = _check_recall_at(recall_at)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
    ):
        raise TypeError(f"`chunk_size` must be an int or None. Received: {chunk_size!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer. Received: {chunk_size}")
    faiss = _faiss_module(use_faiss)

    num_r = len(reference)
    available = num_r - 1 if self_search else num_r
    counts = np.bincount(r_codes, minlength=int(max(q_codes.max(), r_codes.max())) + 1)
    big_r = counts[q_codes] - (1 if self_search else 0)
    valid = big_r > 0
    results: dict[str, float] = {}
    if not valid.any() or available < 1:
        warnings.warn(
            "No query has a relevant reference (an item of its class other than itself); "
            "the retrieval metrics are NaN.",
            stacklevel=2,
        )
        for key in ["precision_at_1", "r_precision", "map_at_r", "mrr"]:
            results[key] = math.nan
        for k in ks:
            results[f"recall_at_{k}"] = math.nan
    else:
        results.update(
            _ranking_metrics(
                query, q_codes, reference, r_codes, big_r, valid, ks, self_search,
                chunk_size, faiss,
            )
        )  # fmt: skip
    if clustering:
        results.update(_clustering_metrics(query, q_codes, seed))
    return results


def _ranking_metrics(
    query, q_codes, reference, r_codes, big_r, valid, ks, self_search, chunk_size, faiss
) -> dict[str, float]:
    num_r = len(reference)
    available = num_r - 1 if self_search else num_r
    k = int(min(max(int(big_r[valid].max()), max(ks)), available))
    ref_sq = np.einsum("ij,ij->i", reference, reference)
    index = None
    if faiss is not None:
        index = faiss.IndexFlatL2(reference.shape[1])
        index.add(reference)
    if chunk_size is None:
        per_row = 40 * (k + 1) if index is not None else 12 * num_r + 48 * k
        chunk_size = max(1, _CHUNK_BYTES // per_row)
        if index is not None and chunk_size > 4096:
            chunk_size -= chunk_size % 4096  # whole blocks of faiss's BLAS search
        chunk_size = min(len(query), chunk_size)
    q_idx = np.flatnonzero(valid)
    sums = {"p1": 0.0, "rp": 0.0, "ap": 0.0, "rr": 0.0}
    hits = dict.fromkeys(ks, 0)
    positions = np.arange(1, k + 1)
    for start in range(0, len(q_idx), chunk_size):
        rows = q_idx[start : start + chunk_size]
        q = query[rows]
        d = None
        if index is None:
            d = _squared_distances(q, reference, ref_sq)
            if self_search:
                d[np.arange(len(rows)), rows] = np.inf
            nn = _topk_numpy(d, k)
        else:
            nn = _topk_faiss(index, q, rows, k, self_search)
        codes = q_codes[rows]
        r = big_r[rows]
        rel = r_codes[nn] == codes[:, None]
        # Relevant items among the first R: the j-th of them at position i adds
        # P(i) = j / i to the query's AP@R.
        ri, ci = np.nonzero(rel & (positions[None, :] <= r[:, None]))
        in_r = np.bincount(ri, minlength=len(rows))
        ordinal = np.arange(1, len(ri) + 1) - np.repeat(np.cumsum(in_r) - in_r, in_r)
        ap = np.bincount(ri, weights=ordinal / (ci + 1.0), minlength=len(rows))
        sums["p1"] += float(rel[:, 0].sum())
        sums["rp"] += float((in_r / r).sum())
        sums["ap"] += float((ap / r).sum())
        for kk in ks:
            hits[kk] += int(rel[:, : min(kk, k)].any(axis=1).sum())
        found = rel.any(axis=1)
        rank = np.zeros(len(rows), dtype=np.float64)
        rank[found] = rel[found].argmax(axis=1) + 1
        missing = np.flatnonzero(~found)
        if len(missing):
            rank[missing] = _exact_ranks(
                q[missing], rows[missing], codes[missing], reference, ref_sq, r_codes,
                self_search, None if d is None else d[missing],
            )  # fmt: skip
        sums["rr"] += float((1.0 / rank).sum())
        del d
    n = len(q_idx)
    out = {
        "precision_at_1": sums["p1"] / n,
        "r_precision": sums["rp"] / n,
        "map_at_r": sums["ap"] / n,
        "mrr": sums["rr"] / n,
    }
    for kk in ks:
        out[f"recall_at_{kk}"] = hits[kk] / n
    return out


def _topk_faiss(index, q, rows, k, self_search):
    """faiss's k nearest neighbours, self removed, ties re-sorted by index."""
    dist, nn = index.search(q, k + 1 if self_search else k)
    if self_search and np.array_equal(nn[:, 0], rows):  # the usual case: self first
        nn, dist = nn[:, 1:], dist[:, 1:]
    elif self_search:
        is_self = nn == rows[:, None]
        # Skip the query itself, or the last neighbour when it is not among them.
        pos = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        cols = np.arange(k)[None, :]
        take = cols + (cols >= pos[:, None])
        nn = np.take_along_axis(nn, take, axis=1)
        dist = np.take_along_axis(dist, take, axis=1)
    tied = np.flatnonzero((dist[:, 1:] == dist[:, :-1]).any(axis=1))
    if len(tied):
        order = np.lexsort((nn[tied], dist[tied]), axis=-1)
        nn[tied] = np.take_along_axis(nn[tied], order, axis=1)
    return nn


def _clustering_metrics(query: np.ndarray, q_codes: np.ndarray, seed: int) -> dict[str, Any]:
    try:
        from sklearn.cluster import KMeans
        from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
    except ImportError:
        raise ImportError(
            "`clustering=True` needs scikit-learn (`pip install scikit-learn`); "
            "or pass clustering=False."
        ) from None
    n_clusters = len(np.unique(q_codes))
    kmeans = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    clusters = kmeans.fit_predict(query)
    return {
        "nmi": float(normalized_mutual_info_score(q_codes, clusters)),
        "ami": float(adjusted_mutual_info_score(q_codes, clusters)),
    }
