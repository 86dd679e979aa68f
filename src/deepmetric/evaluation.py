"""Retrieval evaluation of an embedding: precision@1, R-precision, MAP@R, recall@k, NMI.

The verification metrics of pair distances (ROC AUC, EER, TAR@FAR, the LFW k-fold
accuracy) are defined in `deepmetric.verification` and re-exported here.

`retrieval_metrics` ranks reference embeddings by Euclidean distance to each
query and scores the rankings with the definitions of "A Metric Learning Reality
Check" (Musgrave, Belongie and Lim, ECCV 2020), as pytorch-metric-learning's
`AccuracyCalculator` computes them. The ranking is the exact k-nearest-neighbour
search of `deepmetric.index`, taken in chunks of queries so that memory stays
bounded (a 100,000 x 128 self-retrieval needs a few hundred MB beyond the
embeddings), with faiss's `IndexFlatL2` when faiss is installed and numpy otherwise.

Everything here is numpy: embeddings from any backend (or from `model.predict`)
are converted to float32 arrays first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from deepmetric.datasets import class_labels
from deepmetric.index import ExactSearch, faiss_installed
from deepmetric.verification import (
    pair_distances,
    verification_kfold,
    verification_metrics,
    verification_pairs,
    verification_roc,
)

__all__ = [
    "pair_distances",
    "retrieval_metrics",
    "verification_kfold",
    "verification_metrics",
    "verification_pairs",
    "verification_roc",
]


def _as_embeddings(x, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"`{name}` must be a 2-D array of embeddings. Received: {name}=None")
    try:
        array = np.asarray(x)
    except (TypeError, ValueError, RuntimeError):  # e.g. a torch tensor on GPU or with grad
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
    array = class_labels(y, name)
    if array.shape[0] != num:
        raise ValueError(
            f"`{name}` must have one label per row of `{embeddings_name}`: expected {num} "
            f"labels, received {name}.shape={np.shape(y)}"
        )
    return array.astype(np.int64) if array.dtype.kind == "i" else array


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


def _engine(use_faiss) -> str:
    if use_faiss is False:
        return "numpy"
    if use_faiss not in ("auto", True):
        raise ValueError(f"`use_faiss` must be 'auto', True or False. Received: {use_faiss!r}")
    if faiss_installed():
        return "faiss"
    if use_faiss is True:
        raise ImportError(
            "`use_faiss=True` needs faiss: `pip install faiss-cpu`, or pass use_faiss='auto'."
        )
    return "numpy"


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
    True) the search is faiss's exact `IndexFlatL2`, which is faster on CPU for few
    neighbours per query (with about a thousand, as MAP@R over classes of a thousand
    needs, the numpy search is the faster: docs/evaluation.md); faiss and numpy give
    the same neighbours up to float rounding of near-equal distances.

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
    engine = _engine(use_faiss)

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
                chunk_size, engine,
            )
        )  # fmt: skip
    if clustering:
        results.update(_clustering_metrics(query, q_codes, seed))
    return results


def _ranking_metrics(
    query, q_codes, reference, r_codes, big_r, valid, ks, self_search, chunk_size, engine
) -> dict[str, float]:
    num_r = len(reference)
    available = num_r - 1 if self_search else num_r
    k = int(min(max(int(big_r[valid].max()), max(ks)), available))
    search = ExactSearch(reference, r_codes, engine=engine)
    if chunk_size is None:
        chunk_size = min(len(query), search.chunk_size(k))
    q_idx = np.flatnonzero(valid)
    sums = {"p1": 0.0, "rp": 0.0, "ap": 0.0, "rr": 0.0}
    hits = dict.fromkeys(ks, 0)
    positions = np.arange(1, k + 1)
    for start in range(0, len(q_idx), chunk_size):
        rows = q_idx[start : start + chunk_size]
        codes = q_codes[rows]
        found = search.search(
            query[rows], k, exclude=rows if self_search else None, query_labels=codes
        )
        r = big_r[rows]
        rel = r_codes[found.indices] == codes[:, None]
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
        sums["rr"] += float((1.0 / found.first_match).sum())
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
