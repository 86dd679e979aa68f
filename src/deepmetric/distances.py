"""Pairwise distances and similarities between embeddings.

Two functions keep TensorFlow Addons' exact semantics (`pairwise_distance`,
`angular_distance`); small serializable `Distance` objects serve the losses,
mining and evaluation, each knowing whether a larger value means closer.
Everything is computed in float32; float64 input gives float64 distances on TensorFlow only
(JAX turns it into float32, and on PyTorch `keras.ops.matmul` returns float32). The square root
has a zero, finite gradient where two embeddings coincide.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from deepmetric._api import export
from deepmetric._labels import check_embeddings


def _safe_sqrt(squared):
    """sqrt with a zero gradient where `squared` <= 0 (TFA's values and gradients).

    A double `where` instead of TFA's float error mask and products: the same
    result, with fewer B x B temporaries kept for the backward pass.
    """
    positive = ops.greater(squared, 0.0)
    return ops.where(positive, ops.sqrt(ops.where(positive, squared, 1.0)), 0.0)


def _squared_norms(x):
    return ops.sum(ops.square(x), axis=1)


def _squared_euclidean(query, reference):
    sq = ops.expand_dims(_squared_norms(query), 1) + ops.expand_dims(_squared_norms(reference), 0)
    sq = sq - 2.0 * ops.matmul(query, ops.transpose(reference))
    return ops.maximum(sq, 0.0)


def is_self(index, num_references):
    """(b, R) boolean, True where column j is row `index[i]` itself."""
    columns = ops.arange(num_references, dtype="int32")
    return ops.equal(ops.expand_dims(ops.cast(index, "int32"), 1), ops.expand_dims(columns, 0))


def _l2_normalize(x, epsilon=1e-12):
    """x / max(||x||, sqrt(epsilon)), as `tf.math.l2_normalize`."""
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=-1, keepdims=True), epsilon))


def pairwise_distance(embeddings, squared=False):
    """B x B Euclidean distances between the rows of `embeddings`, TFA semantics.

    `output[i, j] = ||embeddings[i] - embeddings[j]||_2` (squared if `squared`),
    computed as `|x|^2 + |y|^2 - 2 x.y`, clamped at 0, with an exactly zero
    diagonal and a zero gradient wherever a distance is 0.

    Args:
      embeddings: float tensor of shape (B, D).
      squared: return squared distances.

    Returns:
      float32 tensor of shape (B, B) (float64 for float64 input on TensorFlow).

    >>> import numpy as np
    >>> d = pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]]))
    >>> np.round(keras.ops.convert_to_numpy(d), 4).tolist()
    [[0.0, 5.0], [5.0, 0.0]]
    """
    return EuclideanDistance(squared=squared).matrix(check_embeddings(embeddings, "embeddings"))


def angular_distance(embeddings):
    """B x B angular distances `1 - cos(x_i, x_j)`, clamped at 0, TFA semantics.

    >>> import numpy as np
    >>> d = angular_distance(np.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> np.round(keras.ops.convert_to_numpy(d), 4).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    return AngularDistance().matrix(check_embeddings(embeddings, "embeddings"))


class Distance:
    """Base class: a distance or similarity between query and reference rows.

    `distance(query, reference=None)` checks its inputs and returns the (Q, R) matrix; with no
    reference, the query is compared with itself. `distance.matrix(...)` is the same on tensors
    that are already checked, and also builds a block of rows of a self-comparison.
    `distance.paired(x, y)` returns the row-wise values (x[i] against y[i]).
    `larger_is_closer` is True for similarities, so that a loss or miner is written once for
    both kinds. A subclass implements `_matrix` and `_paired`.
    """

    larger_is_closer = False
    # `matrix` can build a block of rows of the self-comparison on its own.
    blockable = True

    def __call__(self, query, reference=None):
        query = check_embeddings(query, "query")
        if reference is None:
            return self.matrix(query)
        return self.matrix(query, check_embeddings(reference, "reference"))

    def matrix(self, query, reference=None, *, self_index=None):
        """The (Q, R) matrix of checked float tensors: the one entry point of the losses.

        Args:
          query: (Q, D) rows.
          reference: (R, D) rows; None compares `query` with itself.
          self_index: int32 (Q,) positions of the query rows in `reference` when `query` is
            `reference[self_index]` (a block of rows of a self-comparison); the pair of an
            example with itself then gets its exact self-value (0 for the Euclidean distance).
            Implied (all rows) when `reference` is None.
        """
        if reference is None:
            reference = query
            self_index = ops.arange(ops.shape(query)[0], dtype="int32")
        return self._matrix(query, reference, self_index)

    def rows(self, query, reference, index):
        """Rows `index` of `self(reference)`, where `query` is `reference[index]`: the same as
        `matrix(query, reference, self_index=index)`."""
        return self.matrix(query, reference, self_index=index)

    def _matrix(self, query, reference, self_index):
        raise NotImplementedError

    def paired(self, x, y):
        """Row-wise values between `x[i]` and `y[i]` (any leading shape, last axis D)."""
        x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
        if "float64" not in str(x.dtype):
            x, y = ops.cast(x, "float32"), ops.cast(y, "float32")
        return self._paired(x, y)

    def _paired(self, x, y):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(type(self))


@export
class EuclideanDistance(Distance):
    """Euclidean (L2) distance; with `squared=True` the squared distance."""

    def __init__(self, squared=False):
        self.squared = bool(squared)

    def _matrix(self, query, reference, self_index):
        sq = _squared_euclidean(query, reference)
        if self_index is not None:
            sq = ops.where(is_self(self_index, ops.shape(reference)[0]), 0.0, sq)
        return sq if self.squared else _safe_sqrt(sq)

    def _paired(self, x, y):
        sq = ops.sum(ops.square(x - y), axis=-1)
        return sq if self.squared else _safe_sqrt(sq)

    def get_config(self):
        return {"squared": self.squared}

    def __repr__(self):
        return f"EuclideanDistance(squared={self.squared})"


@export
class AngularDistance(Distance):
    """`1 - cos(x, y)` clamped at 0 (TFA's "angular" distance)."""

    def _matrix(self, query, reference, self_index):
        q, r = _l2_normalize(query), _l2_normalize(reference)
        return ops.maximum(1.0 - ops.matmul(q, ops.transpose(r)), 0.0)

    def _paired(self, x, y):
        return ops.maximum(1.0 - ops.sum(_l2_normalize(x) * _l2_normalize(y), axis=-1), 0.0)


@export
class CosineSimilarity(Distance):
    """Cosine similarity of the L2-normalised rows (larger is closer)."""

    larger_is_closer = True

    def _matrix(self, query, reference, self_index):
        return ops.matmul(_l2_normalize(query), ops.transpose(_l2_normalize(reference)))

    def _paired(self, x, y):
        return ops.sum(_l2_normalize(x) * _l2_normalize(y), axis=-1)


@export
class DotProductSimilarity(Distance):
    """Inner product (larger is closer), of the L2-normalised rows with `normalize_embeddings`.

    The default is the plain inner product; pytorch-metric-learning's `DotProductSimilarity()`
    normalises (it is `DotProductSimilarity(normalize_embeddings=True)`, the cosine similarity).
    """

    larger_is_closer = True

    def __init__(self, normalize_embeddings=False):
        self.normalize_embeddings = bool(normalize_embeddings)

    def _prepare(self, x):
        return _l2_normalize(x) if self.normalize_embeddings else x

    def _matrix(self, query, reference, self_index):
        return ops.matmul(self._prepare(query), ops.transpose(self._prepare(reference)))

    def _paired(self, x, y):
        return ops.sum(self._prepare(x) * self._prepare(y), axis=-1)

    def get_config(self):
        return {"normalize_embeddings": self.normalize_embeddings}

    def __repr__(self):
        return f"DotProductSimilarity(normalize_embeddings={self.normalize_embeddings})"


@export
class LpDistance(Distance):
    """pytorch-metric-learning's `LpDistance`: Euclidean distance, to a power, of rows that
    are L2-normalised first with `normalize_embeddings` (the default, as in PML).

    `LpDistance()` is the default distance of PML's triplet and contrastive losses and of most
    of its miners. Only `p=2` is supported; `power=2` gives squared distances.

    >>> LpDistance()
    LpDistance(normalize_embeddings=True, p=2, power=1.0)
    """

    def __init__(self, normalize_embeddings=True, p=2, power=1):
        if p != 2:
            raise ValueError(f"`p` must be 2 (the Euclidean distance). Received: p={p!r}")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 0:
            raise ValueError(f"`power` must be a positive number. Received: power={power!r}")
        self.normalize_embeddings = bool(normalize_embeddings)
        self.p = 2
        self.power = float(power)

    def _prepare(self, x):
        return _l2_normalize(x) if self.normalize_embeddings else x

    def _from_squared(self, sq):
        if self.power == 2.0:
            return sq
        d = _safe_sqrt(sq)
        return d if self.power == 1.0 else ops.power(d, self.power)

    def _matrix(self, query, reference, self_index):
        sq = _squared_euclidean(self._prepare(query), self._prepare(reference))
        if self_index is not None:
            sq = ops.where(is_self(self_index, ops.shape(reference)[0]), 0.0, sq)
        return self._from_squared(sq)

    def _paired(self, x, y):
        return self._from_squared(ops.sum(ops.square(self._prepare(x) - self._prepare(y)), axis=-1))

    def get_config(self):
        return {"normalize_embeddings": self.normalize_embeddings, "p": self.p, "power": self.power}

    def __repr__(self):
        return (
            f"LpDistance(normalize_embeddings={self.normalize_embeddings}, p={self.p}, "
            f"power={self.power})"
        )


# Signal-to-noise ratios below this count as 0: float32 rounding of the matrix-product form
# leaves about 1e-7 of the query's variance where two rows are equal.
_SNR_FLOOR = 1e-6
# Centred squared norms below this are taken as this in the ratio's denominator, so an
# all-zero or constant row gives finite values.
_SNR_VARIANCE_FLOOR = 1e-12


def _centred(x):
    return x - ops.mean(x, axis=-1, keepdims=True)


@export
class SNRDistance(Distance):
    r"""pytorch-metric-learning's `SNRDistance`: the signal-to-noise ratio of two rows.

    $$d(x_i, x_j) = \operatorname{var}(x_j - x_i) / \operatorname{var}(x_i)$$

    (the variances over the D components; not symmetric: the query's variance is the signal).
    With `normalize_embeddings` (the default, as in PML) the rows are L2-normalised first. With
    $c = x - \bar x$ (each row minus its mean), $(D - 1)\operatorname{var}(x_i - x_j) =
    |c_i - c_j|^2$ and $(D - 1)\operatorname{var}(x_i) = |c_i|^2$, so the matrix is one matrix
    product of the centred rows: O(B^2) memory where PML builds the (B, R, D) differences.
    Ratios below 1e-6 (float32 rounding where two rows are equal) count as 0, the pair of a row
    with itself is exactly 0, and a row of zero variance gives finite values (PML divides by 0).
    Paper: Yuan et al., "Signal-To-Noise Ratio: A Robust Distance Metric for Deep Metric
    Learning", CVPR 2019, arXiv:1904.02616.

    >>> SNRDistance()
    SNRDistance(normalize_embeddings=True)
    """

    def __init__(self, normalize_embeddings=True):
        self.normalize_embeddings = bool(normalize_embeddings)

    def _prepare(self, x):
        return _centred(_l2_normalize(x) if self.normalize_embeddings else x)

    def _matrix(self, query, reference, self_index):
        q, r = self._prepare(query), self._prepare(reference)
        variance = ops.maximum(ops.expand_dims(_squared_norms(q), 1), _SNR_VARIANCE_FLOOR)
        ratio = _squared_euclidean(q, r) / variance
        ratio = ops.where(ops.greater(ratio, _SNR_FLOOR), ratio, 0.0)
        if self_index is not None:
            ratio = ops.where(is_self(self_index, ops.shape(r)[0]), 0.0, ratio)
        return ratio

    def _paired(self, x, y):
        cx, cy = self._prepare(x), self._prepare(y)
        variance = ops.maximum(ops.sum(ops.square(cx), axis=-1), _SNR_VARIANCE_FLOOR)
        return ops.sum(ops.square(cx - cy), axis=-1) / variance

    def get_config(self):
        return {"normalize_embeddings": self.normalize_embeddings}

    def __repr__(self):
        return f"SNRDistance(normalize_embeddings={self.normalize_embeddings})"


class _CallableDistance(Distance):
    """Wraps a user callable `f(embeddings) -> (B, B)` distances (TFA's `distance_metric`).

    It only computes the whole matrix: a loss with a callable distance runs as one block.
    """

    blockable = False

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, query, reference=None):
        return self.matrix(check_embeddings(query, "query"), reference)

    def _matrix(self, query, reference, self_index):
        # Only the whole self-comparison: `query` is the batch (a loss with a callable
        # distance runs as one block, so `reference[self_index]` is `reference` itself).
        if self_index is None:
            raise ValueError(
                "A callable `distance_metric` takes one batch of embeddings and cannot "
                "compare against reference embeddings; pass a `deepmetric.distances.Distance`."
            )
        return ops.cast(self.fn(reference), "float32")

    def __repr__(self):
        return f"_CallableDistance({self.fn!r})"

    def __eq__(self, other):
        return isinstance(other, _CallableDistance) and other.fn is self.fn

    def __hash__(self):
        return hash(self.fn)


_NAMES = {
    "l2": lambda: EuclideanDistance(),
    "euclidean": lambda: EuclideanDistance(),
    "squared-l2": lambda: EuclideanDistance(squared=True),
    "squared_l2": lambda: EuclideanDistance(squared=True),
    "squared_euclidean": lambda: EuclideanDistance(squared=True),
    "angular": lambda: AngularDistance(),
    "cosine": lambda: CosineSimilarity(),
    "cosine_similarity": lambda: CosineSimilarity(),
    "dot": lambda: DotProductSimilarity(),
    "dot_product": lambda: DotProductSimilarity(),
    "dot_product_similarity": lambda: DotProductSimilarity(),
    "lp": lambda: LpDistance(),
    "lp_distance": lambda: LpDistance(),
    "snr": lambda: SNRDistance(),
    "snr_distance": lambda: SNRDistance(),
}


_CLASS_NAMES = {
    cls.__name__: cls
    for cls in (
        EuclideanDistance,
        AngularDistance,
        CosineSimilarity,
        DotProductSimilarity,
        LpDistance,
        SNRDistance,
    )
}


def get(identifier, name: str = "distance") -> Distance:
    """Resolves a name, a config dict, a `Distance` or a callable into a `Distance`.

    Names (case-insensitive): "L2" / "euclidean", "squared-L2" /
    "squared_euclidean", "angular", "cosine" / "cosine_similarity",
    "dot" / "dot_product" / "dot_product_similarity" (the plain inner product), "lp" /
    "lp_distance" (pytorch-metric-learning's default `LpDistance()`: Euclidean distance of the
    L2-normalised rows), "snr" / "snr_distance" (pytorch-metric-learning's `SNRDistance()`, the
    signal-to-noise ratio of the L2-normalised rows). Class names ("LpDistance",
    "CosineSimilarity", ...) work too. A plain callable is taken as TFA's `distance_metric`:
    it receives the (B, D) embeddings and returns the (B, B) distance matrix.

    >>> get("L2")
    EuclideanDistance(squared=False)
    """
    if isinstance(identifier, Distance):
        return identifier
    if isinstance(identifier, str):
        factory = _NAMES.get(identifier.lower()) or _CLASS_NAMES.get(identifier)
        if factory is None:
            raise ValueError(
                f"Unknown `{name}`: {identifier!r}. Allowed names: "
                f"{', '.join(repr(k) for k in [*sorted(_NAMES), *_CLASS_NAMES])}, a "
                "`deepmetric.distances.Distance` or a callable."
            )
        return factory()
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Distance):
            return obj
        raise ValueError(f"`{name}` config does not describe a Distance: {identifier!r}")
    if callable(identifier):
        return _CallableDistance(identifier)
    raise TypeError(
        f"`{name}` must be a name, a `deepmetric.distances.Distance` or a callable. "
        f"Received: {identifier!r} of type {type(identifier).__name__}"
    )


def serialize(distance):
    """Config for a `distance` argument: names stay names, objects become dicts."""
    if isinstance(distance, str) or distance is None:
        return distance
    if isinstance(distance, _CallableDistance):
        distance = distance.fn
    return keras.saving.serialize_keras_object(distance)


def deserialize(config):
    """Inverse of `serialize`."""
    if config is None or isinstance(config, str):
        return config
    return keras.saving.deserialize_keras_object(config)
