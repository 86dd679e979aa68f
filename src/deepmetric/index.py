"""A nearest-neighbour index over embeddings: search, match with an "unknown" answer, calibrate.

`Index` holds embeddings with optional labels and metadata (a file path, say) and
answers the questions a trained embedding model is for:

- `search(queries, k)`: the k nearest rows of each query, exact by default;
- `match(queries)`: one label per query, or the "unknown" value where the deciding
  distance is above a threshold;
- `calibrate(queries, labels)`: the threshold, chosen on held-out queries;
- `save(directory)` / `Index.load(directory)`: open formats, no pickle;
- `as_layer(k)`: the search as a Keras layer that saves inside a `.keras` model.

>>> index = Index().add(np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]), labels=["a", "b", "c"])
>>> found = index.search(np.array([[0.9, 0.0]]), k=2)
>>> found.indices.tolist(), found.labels.tolist()
([[1, 0]], [['b', 'a']])
>>> index.match(np.array([[0.9, 0.0], [9.0, 9.0]]), threshold=1.0).tolist()
['b', None]

The exact search, `exact_search` and `ExactSearch`, lives in `deepmetric._search`
and is re-exported here. Everything is numpy; faiss is optional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deepmetric import _index_files
from deepmetric._index_files import IndexFileError
from deepmetric._matching import VOTES, Calibration, calibration_table, vote_labels
from deepmetric._search import (
    ENGINES,
    METRICS,
    ExactSearch,
    SearchResult,
    _as_points,
    _check_metric,
    _unit_rows,
    approximate_search,
    build_structure,
    exact_search,
    faiss_installed,
    set_search_options,
)
from deepmetric.datasets import class_labels

__all__ = [
    "ENGINES", "METRICS", "Calibration", "ExactSearch", "Index", "IndexFileError", "Neighbors",
    "SearchResult", "exact_search", "faiss_installed",
]  # fmt: skip

INDEX_ENGINES = ("exact", "faiss")
STRUCTURES = ("flat", "hnsw", "ivf")
CALIBRATION_METRICS = ("f1", "accuracy", "precision", "recall")
_DEFAULT = object()


class Neighbors(NamedTuple):
    """`Index.search`'s answer for n queries and k' = min(k, len(index)) neighbours.

    `distances` (n, k') float32, ascending; `indices` (n, k') int64 row positions in
    the index; `labels` (n, k') the rows' labels, or None for an index without
    labels; `metadata` n lists of k' items, or None. An approximate structure may
    find fewer than k' rows for a query: the missing entries have index -1,
    distance +inf, label -1 (or "" for string labels) and metadata None.
    """

    distances: np.ndarray
    indices: np.ndarray
    labels: np.ndarray | None
    metadata: list | None


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def _choice(value, name: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")
    return value


class Index:
    """Embeddings with optional labels and metadata, searched by distance.

    Args:
      metric: "euclidean", "squared_euclidean", "cosine" (1 - cosine similarity, a
        zero vector has similarity 0 to everything) or "inner_product" (minus the
        inner product). Smaller is closer, for every metric.
      engine: "exact" (numpy: blocked matrix products in chunks of queries whose
        working memory stays near 256 MiB, ties broken by row position) or "faiss"
        (needs `pip install faiss-cpu`).
      structure: with engine="faiss": "flat" (exact; the same neighbours as
        "exact" up to float rounding of near-equal distances), "hnsw"
        (`IndexHNSWFlat` with `m` links per node, built with `ef_construction`
        candidates per insertion, searched with `ef_search` candidates per query)
        or "ivf" (`IndexIVFFlat` with `nlist` cells, default 4 sqrt(n), trained on
        the rows present at the first search, and `nprobe` cells visited per query).
        The approximate structures trade recall for speed: `measure_recall` gives it.
      m, ef_construction, ef_search, nlist, nprobe: the options of the approximate
        structures, positive integers
        (kept in `options`, saved with the index; a changed `ef_search` or
        `nprobe` applies to the next search).

    The index keeps the rows as one float32 array (`vectors`); the faiss engine, and
    the cosine metric (unit rows), hold a second copy for the search.

    Attributes:
      threshold: the distance `match` accepts up to when it gets none (None: accept
        every query); set by `calibrate`, saved with the index.
      calibration: the figures of the last `calibrate` (a dict), or None.
    """

    def __init__(
        self,
        metric="euclidean",
        engine="exact",
        *,
        structure="flat",
        m=32,
        ef_construction=40,
        ef_search=64,
        nlist=None,
        nprobe=8,
    ) -> None:
        self.metric = _check_metric(metric)
        self.engine = _choice(engine, "engine", INDEX_ENGINES)
        self.structure = _choice(structure, "structure", STRUCTURES)
        if engine == "exact" and structure != "flat":
            raise ValueError(
                f"structure={structure!r} needs engine='faiss'; engine='exact' is flat."
            )
        if engine == "faiss" and not faiss_installed():
            raise ImportError("engine='faiss' needs faiss: `pip install faiss-cpu`.")
        self.options = {
            "m": _positive_int(m, "m"),
            "ef_construction": _positive_int(ef_construction, "ef_construction"),
            "ef_search": _positive_int(ef_search, "ef_search"),
            "nlist": None if nlist is None else _positive_int(nlist, "nlist"),
            "nprobe": _positive_int(nprobe, "nprobe"),
        }
        self._vectors = np.empty((0, 0), np.float32)
        self.labels: np.ndarray | None = None
        self.metadata: list | None = None
        self.threshold: float | None = None
        self.calibration: dict | None = None
        self._exact: ExactSearch | None = None
        self._faiss: Any = None
        self._faiss_rows = 0

    def __len__(self) -> int:
        return len(self._vectors)

    def __repr__(self) -> str:
        return (
            f"Index(metric={self.metric!r}, engine={self.engine!r}, "
            f"structure={self.structure!r}, size={len(self)}, dim={self.dim})"
        )

    @property
    def dim(self) -> int | None:
        """The embedding size, None while the index is empty."""
        return self._vectors.shape[1] if len(self) else None

    @property
    def vectors(self) -> np.ndarray:
        """The float32 (len, dim) embeddings, read-only."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    def add(self, embeddings, labels=None, metadata=None) -> Index:
        """Appends rows; returns the index.

        Args:
          embeddings: (n, dim) numbers, finite; dim as the rows already there.
          labels: optional (n,) integer or string labels. An index has labels for all
            its rows or for none, of one kind.
          metadata: optional list of n JSON-serialisable items (for example file
            paths), for all rows or for none.
        """
        x = _as_points(embeddings, "embeddings")
        if not np.isfinite(x).all():
            raise ValueError("`embeddings` must be finite. Received: NaN or infinite values")
        if len(self) and x.shape[1] != self.dim:
            raise ValueError(
                f"`embeddings` must have dimension {self.dim} like the rows in the index. "
                f"Received: shape {x.shape}"
            )
        n = len(x)
        if len(self) and (labels is None) != (self.labels is None):
            raise ValueError(
                "`labels` must be given for all rows or for none: the index holds "
                f"{'labelled' if self.labels is not None else 'unlabelled'} rows. "
                f"Received: labels={'None' if labels is None else 'an array'}"
            )
        if len(self) and (metadata is None) != (self.metadata is None):
            raise ValueError(
                "`metadata` must be given for all rows or for none: the index holds rows "
                f"{'with' if self.metadata is not None else 'without'} metadata."
            )
        new_labels = None
        if labels is not None:
            new_labels = class_labels(labels, "labels")
            if len(new_labels) != n:
                raise ValueError(
                    f"`labels` must have one label per row: {n}. Received: {len(new_labels)}"
                )
            if self.labels is not None and (new_labels.dtype.kind == "U") != (
                self.labels.dtype.kind == "U"
            ):
                raise TypeError(
                    "`labels` must be of the kind already in the index "
                    f"({self.labels.dtype}). Received: {new_labels.dtype}"
                )
        if metadata is not None:
            metadata = _index_files.check_metadata(metadata, n)
        self._vectors = np.concatenate([self._vectors, x]) if len(self) else x.copy()
        if new_labels is not None:
            self.labels = (
                new_labels if self.labels is None else np.concatenate([self.labels, new_labels])
            )
        if metadata is not None:
            self.metadata = (self.metadata or []) + metadata
        self._exact = None
        return self

    def _queries(self, queries) -> np.ndarray:
        if not len(self):
            raise ValueError("The index is empty: `add` embeddings before searching it.")
        q = _as_points(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(
                f"`queries` must have the index's dimension {self.dim}. Received: shape {q.shape}"
            )
        return q

    def search(self, queries, k: int = 10) -> Neighbors:
        """The k nearest rows of each query, as `Neighbors`.

        `k` larger than the index gives every row: k' = min(k, len(index)) columns.
        The exact engines break distance ties by row position.
        """
        k = _positive_int(k, "k")
        q = self._queries(queries)
        k = min(k, len(self))
        distances = np.empty((len(q), k), np.float32)
        indices = np.empty((len(q), k), np.int64)
        if self.structure == "flat":
            if self._exact is None:
                engine = "numpy" if self.engine == "exact" else "faiss"
                self._exact = ExactSearch(self._vectors, engine=engine, metric=self.metric)
            step = min(len(q), self._exact.chunk_size(k))
            for start in range(0, len(q), step):
                part = slice(start, start + step)
                distances[part], indices[part], _ = self._exact.search(q[part], k)
        else:
            structure = self._structure()
            step = 65536
            for start in range(0, len(q), step):
                part = slice(start, start + step)
                distances[part], indices[part] = approximate_search(
                    structure, q[part], k, self.metric
                )
        return Neighbors(distances, indices, *self._row_data(indices))

    def _row_data(self, indices: np.ndarray):
        missing = indices < 0
        labels = None
        if self.labels is not None:
            labels = self.labels[indices]
            if missing.any():
                labels[missing] = "" if labels.dtype.kind == "U" else -1
        metadata = None
        if self.metadata is not None:
            meta = self.metadata
            metadata = [[meta[i] if i >= 0 else None for i in row] for row in indices.tolist()]
        return labels, metadata

    def _structure(self):
        """The faiss HNSW / IVF structure, holding every row (built or extended here)."""
        if self._faiss is None:
            self._faiss = build_structure(self._prepared(0), self.structure, self.metric,
                                          self.options)  # fmt: skip
            self._faiss_rows = len(self)
        if self._faiss_rows < len(self):
            self._faiss.add(self._prepared(self._faiss_rows))
            self._faiss_rows = len(self)
        set_search_options(self._faiss, self.structure, self.options)
        return self._faiss

    def _prepared(self, start: int) -> np.ndarray:
        rows = np.ascontiguousarray(self._vectors[start:])
        return _unit_rows(rows) if self.metric == "cosine" else rows

    def measure_recall(self, queries, k: int = 10) -> float:
        """Recall@k of this index's search against the exact search of the same rows.

        The mean over queries of |found ∩ exact| / k', the exact neighbours from the
        numpy engine (k' = min(k, len)). 1.0 for the flat structures, up to ties.
        """
        k = min(_positive_int(k, "k"), max(len(self), 1))
        q = self._queries(queries)
        found = self.search(q, k).indices
        _, exact = exact_search(q, self._vectors, k, metric=self.metric)
        hits = sum(len(np.intersect1d(a, b)) for a, b in zip(found, exact, strict=True))
        return hits / (len(q) * k)

    def _decide(self, queries, k, vote):
        """Each query's label by `vote` over its k nearest rows, and the deciding distance.

        The deciding distance is that of the nearest of the k rows that carry the
        chosen label.
        """
        if self.labels is None:
            raise ValueError("`match` and `calibrate` need an index with labels.")
        k = _positive_int(k, "k")
        _choice(vote, "vote", VOTES)
        if vote == "weighted" and self.metric == "inner_product":
            raise ValueError(
                "vote='weighted' weighs each neighbour by 1 / distance and needs "
                "non-negative distances; metric='inner_product' has negative ones."
            )
        found = self.search(queries, 1 if vote == "nearest" else k)
        return vote_labels(found.distances, found.labels, found.indices >= 0, vote)

    def match(self, queries, threshold=None, k=1, vote="nearest", unknown=_DEFAULT):
        """One label per query, or `unknown` where the deciding distance exceeds the threshold.

        Args:
          queries: (n, dim) embeddings.
          threshold: accept a query when its deciding distance is <= threshold. None
            takes `self.threshold` (from `calibrate` or a loaded index); when that is
            None too, every query gets a label.
          k: neighbours that vote (vote="nearest" looks at the first only).
          vote: "nearest" (the nearest row's label), "majority" (the most frequent
            label among the k nearest) or "weighted" (the label of the largest sum of
            1 / distance; not for inner_product). Ties between labels go to the label
            whose nearest row is nearest; that row's distance is the deciding one.
          unknown: the answer of a rejected query; default -1 for integer labels,
            None for string labels.

        Returns:
          (n,) int64 array for integer labels with an integer `unknown`, otherwise an
          object array.
        """
        labels, deciding = self._decide(queries, k, vote)
        if threshold is None:
            threshold = self.threshold
        accept = np.ones(len(labels), bool) if threshold is None else deciding <= threshold
        is_int = labels.dtype.kind in "iu"
        if unknown is _DEFAULT:
            unknown = -1 if is_int else None
        if is_int and isinstance(unknown, (int, np.integer)) and not isinstance(unknown, bool):
            return np.where(accept, labels.astype(np.int64), np.int64(unknown))
        out = np.empty(len(labels), object)
        out[:] = labels.tolist()
        out[~accept] = unknown
        return out

    def calibrate(self, queries, labels, *, target_precision=None, metric="f1", k=1,
                  vote="nearest") -> Calibration:  # fmt: skip
        """Chooses `self.threshold` on held-out labelled queries and returns its figures.

        Every query gets its label and deciding distance as in `match(queries, k=k,
        vote=vote)`; each distinct deciding distance t is a candidate threshold, which
        accepts the queries whose deciding distance is <= t. With t:
        - precision = correct accepted / accepted;
        - recall = correct accepted / queries whose label is in the index (a query
          whose label is not in the index can never be matched correctly);
        - F1 = 2 precision recall / (precision + recall), 0 when both are 0;
        - accuracy = (correct accepted + rejected queries whose label is not in the
          index) / queries: the fraction answered rightly, with "unknown" the right
          answer for a label the index does not hold.
        With `target_precision` p, the candidate of highest recall among those with
        precision >= p, the smallest on ties (ValueError when none reaches p);
        otherwise the candidate that maximises `metric` ("f1", "accuracy",
        "precision" or "recall"), the smallest on ties. The threshold is stored on
        the index (saved with it, used by `match` when given none).
        """
        if self.labels is None:
            raise ValueError("`calibrate` needs an index with labels.")
        q = self._queries(queries)
        truth = class_labels(labels, "labels")
        if len(truth) != len(q):
            raise ValueError(
                f"`labels` must have one label per query: {len(q)}. Received: {len(truth)}"
            )
        if (truth.dtype.kind == "U") != (self.labels.dtype.kind == "U"):
            raise TypeError(
                f"`labels` must be of the index's label kind ({self.labels.dtype}). "
                f"Received: {truth.dtype}"
            )
        _choice(metric, "metric", CALIBRATION_METRICS)
        if target_precision is not None and not 0.0 <= target_precision <= 1.0:
            raise ValueError(
                f"`target_precision` must be in [0, 1]. Received: {target_precision!r}"
            )
        predicted, deciding = self._decide(q, k, vote)
        figures = calibration_table(deciding, predicted == truth, np.isin(truth, self.labels))
        thresholds, precision, recall, f1, accuracy = figures
        if target_precision is not None:
            reach = precision >= target_precision
            if not reach.any():
                raise ValueError(
                    f"No threshold reaches target_precision={target_precision}: the highest "
                    f"precision on these queries is {precision.max():.4f}."
                )
            best = int(np.argmax(np.where(reach, recall, -1.0)))
        else:
            by = {"f1": f1, "accuracy": accuracy, "precision": precision, "recall": recall}
            best = int(np.argmax(by[metric]))
        result = Calibration(*(float(column[best]) for column in figures))
        self.threshold = result.threshold
        self.calibration = {
            **result._asdict(), "target_precision": target_precision, "metric": metric,
            "k": k, "vote": vote, "queries": len(q),
        }  # fmt: skip
        return result

    def as_layer(self, k: int = 10):
        """A `deepmetric.layers.NearestNeighbors` over these rows (k' = min(k, len))."""
        from deepmetric.layers import NearestNeighbors

        if not len(self):
            raise ValueError("The index is empty: `add` embeddings before `as_layer`.")
        return NearestNeighbors(self._vectors, k=min(_positive_int(k, "k"), len(self)),
                                metric=self.metric)  # fmt: skip

    def save(self, directory, *, overwrite: bool = False) -> Path:
        """Writes the index to the folder `directory` (see `deepmetric._index_files`).

        Atomic: the files go to a temporary folder beside it that is then renamed. An
        existing index folder is replaced only with `overwrite=True`.
        """
        if not len(self):
            raise ValueError("The index is empty: there is nothing to save.")
        settings = {
            "metric": self.metric, "engine": self.engine, "structure": self.structure,
            "options": self.options, "size": len(self), "dim": self.dim,
            "labels": None if self.labels is None else
            ("str" if self.labels.dtype.kind == "U" else "int"),
            "metadata": self.metadata is not None,
            "threshold": self.threshold, "calibration": self.calibration,
        }  # fmt: skip
        arrays = {"vectors.npy": self._vectors}
        if self.labels is not None:
            arrays["labels.npy"] = self.labels
        structure = None if self.structure == "flat" else self._structure()
        _index_files.write(directory, settings, arrays, self.metadata, structure,
                           overwrite=overwrite)  # fmt: skip
        return Path(directory)

    @classmethod
    def load(cls, directory) -> Index:
        """The index saved in `directory`; IndexFileError names a missing or damaged file."""
        settings = _index_files.read_settings(directory)
        try:
            index = cls(settings["metric"], settings["engine"],
                        structure=settings.get("structure", "flat"),
                        **settings.get("options", {}))  # fmt: skip
        except (ValueError, TypeError) as error:
            where = Path(directory) / _index_files.SETTINGS
            raise IndexFileError(f"{where}: unusable settings ({error})") from None
        rows = _index_files.read_rows(directory, settings, faiss=index.structure != "flat")
        index._vectors, index.labels, index.metadata, index._faiss = rows
        index._faiss_rows = len(index._vectors) if index._faiss is not None else 0
        index.threshold, index.calibration = settings["threshold"], settings["calibration"]
        return index
