"""Triplet margin loss on explicit (anchor, positive, negative) triplets, torch semantics."""

from __future__ import annotations

import keras
from keras import ops

from deepmetric import distances as distances_lib
from deepmetric import distributed
from deepmetric._api import export
from deepmetric._labels import check_nonempty
from deepmetric.losses.base import POSITIVE, check_number, nonfinite_to_nan, reduce_losses

_REDUCTIONS = ("none", "mean", "sum")


def _torch_pairwise_distance(x1, x2, eps=1e-6):
    """`torch.nn.functional.pairwise_distance(x1, x2, p=2, eps=1e-6)`: ||x1 - x2 + eps||."""
    return ops.sqrt(ops.sum(ops.square(x1 - x2 + eps), axis=-1))


def _resolve_distance(distance_function):
    if distance_function is None:
        return _torch_pairwise_distance
    if isinstance(distance_function, (str, dict, distances_lib.Distance)):
        distance = distances_lib.get(distance_function, "distance_function")
        if distance.larger_is_closer:
            return lambda x, y: -distance.paired(x, y)
        return distance.paired
    if callable(distance_function):
        return distance_function
    raise TypeError(
        "`distance_function` must be None, a callable (x1, x2) -> distances, a "
        f"`deepmetric.distances.Distance` or its name. Received: {distance_function!r}"
    )


def tie_splitting_minimum(x, y):
    """`minimum(x, y)` whose gradient is split equally between x and y where they are equal.

    torch's `minimum` splits the gradient of a tie; TensorFlow's gives it all to one side. The
    value is the minimum exactly (at a tie `0.5 * (x + y)` is `x`).
    """
    return ops.where(ops.equal(x, y), 0.5 * (x + y), ops.minimum(x, y))


def _check_shapes(tensors):
    """A ValueError naming the three arguments and their shapes unless they have one rank,
    a batch that is not empty, and shapes that broadcast against each other (as torch's)."""
    shapes = [tuple(t.shape) for t in tensors]
    received = ", ".join(
        f"{name}.shape={shape}" for name, shape in zip(_NAMES, shapes, strict=True)
    )
    if len({len(shape) for shape in shapes}) != 1:
        raise ValueError(
            "`anchor`, `positive` and `negative` must have the same number of dimensions. "
            f"Received: {received}"
        )
    for sizes in zip(*shapes, strict=True):
        known = {size for size in sizes if size is not None and size != 1}
        if len(known) > 1:
            raise ValueError(
                "`anchor`, `positive` and `negative` must have the same shape (or shapes that "
                f"broadcast, with 1 where they differ). Received: {received}"
            )
    for name, shape in zip(_NAMES, shapes, strict=True):
        if len(shape) > 1 and shape[0] == 0:
            raise ValueError(
                f"`{name}` must hold at least one triplet: the batch is empty. Received: {received}"
            )


_NAMES = ("anchor", "positive", "negative")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {', '.join(repr(r) for r in _REDUCTIONS)}. "
            f"Received: reduction={reduction!r}"
        )


@export
def triplet_margin_with_distance_loss(
    anchor, positive, negative, *, distance_function=None, margin=1.0, swap=False, reduction="mean"
):
    r"""Triplet margin loss of explicit triplets, torch semantics.

    Same value and gradients as `torch.nn.functional.triplet_margin_with_distance_loss`.

    Per triplet $\ell = \max(d(a, p) - d(a, n) + m, 0)$; with `swap` (Balntas et
    al., 2016) $d(a, n)$ is replaced by $\min(d(a, n), d(p, n))$, whose gradient is split
    equally where the two are equal (as torch's `minimum`) on every backend. The default
    distance is torch's `pairwise_distance`, $\|x_1 - x_2 + 10^{-6}\|_2$ along
    the last axis.

    Args:
      anchor, positive, negative: float tensors of the same rank, shape (..., D).
      distance_function: None (torch's default), a callable `(x1, x2)` returning
        row-wise distances, or a `deepmetric.distances.Distance` or name
        ("L2", "squared-L2", "angular", "cosine", "dot"; similarities are negated).
      margin: the margin m, a finite number > 0 (as in torch).
      swap: use the distance swap.
      reduction: "none", "mean" or "sum".

    Returns:
      The reduced loss, or per-triplet losses for "none"; NaN (every triplet's) if an
      embedding is not finite.

    Raises:
      ValueError: the three tensors differ in rank or in shape (shapes that broadcast, as
        torch's, are accepted), or the batch is empty.

    >>> import numpy as np
    >>> a, p, n = np.zeros((1, 2)), np.array([[0.0, 1.0]]), np.array([[0.0, 3.0]])
    >>> round(float(triplet_margin_with_distance_loss(a, p, n)), 4)
    0.0
    """
    _check_reduction(reduction)
    margin = check_number("margin", margin, POSITIVE)
    tensors = [ops.convert_to_tensor(t) for t in (anchor, positive, negative)]
    _check_shapes(tensors)
    # float32, or float64 where the backend keeps it (TensorFlow, PyTorch; not JAX by default).
    a, p, n = (t if "float64" in str(t.dtype) else ops.cast(t, "float32") for t in tensors)
    distance = _resolve_distance(distance_function)
    d_ap = distance(a, p)
    d_an = distance(a, n)
    if swap:
        d_an = tie_splitting_minimum(d_an, distance(p, n))
    losses = nonfinite_to_nan(ops.relu(margin + d_ap - d_an), a, p, n)
    if reduction == "none":
        return losses
    # The mean of an empty batch (possible only in a graph of unknown batch size) is 0.
    return reduce_losses(losses, reduction="sum" if reduction == "sum" else "sum_over_batch_size")


@export
class TripletMarginLoss(keras.losses.Loss):
    """Triplet margin loss for models that output (anchor, positive, negative).

    `y_pred` stacks the three embeddings as shape (B, 3, D); `y_true` is
    ignored (pass any array of length B, for example zeros). Each triplet's
    loss is `triplet_margin_with_distance_loss`'s; Keras' `reduction` reduces
    them (the default is the mean, as torch's).

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.TripletMarginLoss(margin=0.5))
    ```
    """

    def __init__(
        self,
        margin=1.0,
        distance_function=None,
        swap=False,
        name="triplet_margin_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.margin = check_number("margin", margin, POSITIVE)
        _resolve_distance(distance_function)
        self.distance_function = distance_function
        self.swap = bool(swap)

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            # Keras' division by the replicas under tf.distribute (deepmetric.distributed).
            loss = reduce_losses(self.call(y_true, y_pred), sample_weight, self.reduction)
            return distributed.scale_for_replicas(loss, self.reduction)

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        if len(y_pred.shape) != 3 or (y_pred.shape[1] is not None and y_pred.shape[1] != 3):
            raise ValueError(
                "`y_pred` must stack (anchor, positive, negative) embeddings with shape "
                f"(batch_size, 3, embedding_dim). Received: y_pred.shape={tuple(y_pred.shape)}"
            )
        check_nonempty(y_pred, "y_pred")
        return triplet_margin_with_distance_loss(
            y_pred[:, 0],
            y_pred[:, 1],
            y_pred[:, 2],
            distance_function=self.distance_function,
            margin=self.margin,
            swap=self.swap,
            reduction="none",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "margin": self.margin,
            "distance_function": distances_lib.serialize(self.distance_function),
            "swap": self.swap,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["distance_function"] = distances_lib.deserialize(config.get("distance_function"))
        return cls(**config)
