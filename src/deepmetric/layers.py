"""Serializable layers for embedding models: normalisation, search, pair distances.

`L2Normalization` ends an embedding model; `NearestNeighbors` serves a search from
inside a saved model; `PairDistance` is the distance layer of a Siamese network.
Each saves to `.keras` and loads back with `safe_mode=True`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from deepmetric._api import export
from deepmetric.distances import _safe_sqrt


@export
class L2Normalization(keras.layers.Layer):
    r"""Scales each embedding to unit Euclidean length.

    $y = x / \sqrt{\max(\sum_i x_i^2, \epsilon)}$ along `axis`. The last layer of an
    embedding model, so that the distances of the metric-learning losses live on the
    unit sphere. Unlike a `Lambda` layer it is serializable: a model that ends with it
    saves to `.keras` and loads back with `safe_mode=True`. The norm is computed in
    float32 under a mixed-precision policy and the result cast back to the compute dtype.

    Args:
      axis: the axis (or axes) to normalise along.
      epsilon: lower bound of the squared norm; a zero vector maps to zero.

    >>> import numpy as np
    >>> y = L2Normalization()(np.array([[3.0, 4.0], [0.0, 0.0]]))
    >>> np.round(keras.ops.convert_to_numpy(y).astype("float64"), 4).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """

    def __init__(self, axis=-1, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, list):
            axis = tuple(axis)
        if not isinstance(axis, (int, tuple)):
            raise TypeError(f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}")
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon!r}")
        self.axis = axis
        self.epsilon = float(epsilon)
        self.supports_masking = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        squared = ops.sum(ops.square(x), axis=self.axis, keepdims=True)
        y = x * ops.rsqrt(ops.maximum(squared, self.epsilon))
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        axis = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        config.update({"axis": axis, "epsilon": self.epsilon})
        return config


METRICS = ("euclidean", "squared_euclidean", "cosine", "inner_product")


def _check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}. Received: metric={metric!r}")
    return metric


def _unit(x):
    """Rows scaled to unit length in float32; a zero row stays zero."""
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, 1e-30))


@export
class NearestNeighbors(keras.layers.Layer):
    """The k nearest of a fixed set of candidate embeddings: `(distances, indices)`.

    The candidates are a non-trainable weight of the layer, so a model that ends
    with it, `keras.Sequential([embedder, NearestNeighbors(candidates)])`, saves
    them inside its `.keras` file and answers nearest-neighbour queries from raw
    inputs after `keras.saving.load_model(path, safe_mode=True)`. One matrix product
    and `ops.top_k` per batch, in float32: the same neighbours as
    `deepmetric.index.Index.search` up to float rounding of near-equal distances;
    ties come in the order of the backend's `top_k` (lower index first on JAX and
    TensorFlow). `Index.as_layer(k)` builds it from an index. Its dtype policy is
    float32 unless `dtype` says otherwise, so that under mixed precision the queries
    are not rounded to float16 first.

    Args:
      candidates: (num_candidates, dim) embeddings. None with `num_candidates` and
        `dim` gives zero candidates to be filled by loading weights (`from_config`).
      k: neighbours per query, in [1, num_candidates].
      metric: "euclidean", "squared_euclidean", "cosine" (1 - cosine similarity) or
        "inner_product" (minus the inner product); smaller is closer.

    Returns, for inputs (batch, dim): `distances` (batch, k) float32 ascending and
    `indices` (batch, k) int32 candidate positions.

    >>> layer = NearestNeighbors(np.array([[0.0, 0.0], [3.0, 4.0]]), k=1)
    >>> d, i = layer(np.array([[3.0, 3.0]]))
    >>> keras.ops.convert_to_numpy(d).tolist(), keras.ops.convert_to_numpy(i).tolist()
    ([[1.0]], [[1]])
    """

    def __init__(self, candidates=None, k=10, metric="euclidean", *, num_candidates=None,
                 dim=None, **kwargs):  # fmt: skip
        kwargs.setdefault("dtype", "float32")  # no float16 autocast of the queries
        super().__init__(**kwargs)
        self.metric = _check_metric(metric)
        values = None
        if candidates is not None:
            values = np.asarray(candidates, dtype="float32")
            if values.ndim != 2 or 0 in values.shape:
                raise ValueError(
                    "`candidates` must be a non-empty 2-D array (num_candidates, dim). "
                    f"Received: shape {values.shape}"
                )
            num_candidates, dim = values.shape
        elif not all(isinstance(v, int) and v > 0 for v in (num_candidates, dim)):
            raise ValueError(
                "`candidates` is None: `num_candidates` and `dim` must be positive ints. "
                f"Received: num_candidates={num_candidates!r}, dim={dim!r}"
            )
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or not 1 <= k <= num_candidates
        ):
            raise ValueError(f"`k` must be an integer in [1, {num_candidates}]. Received: k={k!r}")
        self.k = int(k)
        self.candidates = self.add_weight(
            shape=(int(num_candidates), int(dim)), initializer="zeros", trainable=False,
            dtype="float32", name="candidates",
        )  # fmt: skip
        if values is not None:
            self.candidates.assign(values)
        self.built = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        c = ops.convert_to_tensor(self.candidates)
        if self.metric == "cosine":
            x, c = _unit(x), _unit(c)
        score = ops.matmul(x, ops.transpose(c))  # larger is closer
        if self.metric in ("euclidean", "squared_euclidean"):
            score = 2.0 * score - ops.sum(ops.square(c), axis=-1)[None, :]
        values, indices = ops.top_k(score, self.k)
        if self.metric == "cosine":
            distances = 1.0 - values
        elif self.metric == "inner_product":
            distances = -values
        else:
            squared = ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True) - values, 0.0)
            distances = _safe_sqrt(squared) if self.metric == "euclidean" else squared
        return distances, ops.cast(indices, "int32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.k), (input_shape[0], self.k)

    def compute_output_spec(self, inputs):
        shape = (inputs.shape[0], self.k)
        return keras.KerasTensor(shape, "float32"), keras.KerasTensor(shape, "int32")

    def get_config(self):
        config = super().get_config()
        num_candidates, dim = self.candidates.shape
        config.update({"k": self.k, "metric": self.metric, "num_candidates": int(num_candidates),
                       "dim": int(dim)})  # fmt: skip
        return config


@export
class PairDistance(keras.layers.Layer):
    """The distance of two batches of embeddings, row by row: `PairDistance()([a, b])`.

    The layer of a Siamese network (two towers sharing weights, a contrastive loss
    on their distance): serialisable, so the model saves to `.keras` and loads in
    safe mode, which a `Lambda` does not. A float32 dtype policy unless `dtype`
    says otherwise (mixed precision does not round the embeddings to float16);
    returns (batch,) float32 distances.

    Args:
      metric: "euclidean" (default; its gradient at distance 0 is 0, not infinite),
        "squared_euclidean", "cosine" (1 - cosine similarity; a zero vector has
        similarity 0) or "inner_product" (minus the inner product).

    >>> d = PairDistance()([np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])])
    >>> keras.ops.convert_to_numpy(d).tolist()
    [5.0]
    """

    def __init__(self, metric="euclidean", **kwargs):
        kwargs.setdefault("dtype", "float32")  # no float16 autocast of the embeddings
        super().__init__(**kwargs)
        self.metric = _check_metric(metric)

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(
                "`PairDistance` takes a pair [a, b] of (batch, dim) tensors. "
                f"Received: {type(inputs).__name__}"
            )
        a, b = (ops.cast(t, "float32") for t in inputs)
        if self.metric == "cosine":
            return 1.0 - ops.sum(_unit(a) * _unit(b), axis=-1)
        if self.metric == "inner_product":
            return -ops.sum(a * b, axis=-1)
        squared = ops.sum(ops.square(a - b), axis=-1)
        return _safe_sqrt(squared) if self.metric == "euclidean" else squared

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0],)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((inputs[0].shape[0],), "float32")

    def get_config(self):
        config = super().get_config()
        config.update({"metric": self.metric})
        return config
