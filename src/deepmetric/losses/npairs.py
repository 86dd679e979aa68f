"""N-pairs losses on a given similarity matrix (TFA semantics).

These take the (B, B) similarity matrix a model computes (for example anchors against their
positives), not a batch of embeddings, so they are plain `keras.losses.Loss` classes.
"""

from __future__ import annotations

import keras
from keras import ops

from deepmetric import distributed
from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels, check_nonempty
from deepmetric.losses.base import nonfinite_to_nan, reduce_losses


def _check_similarity(y_pred):
    sim = check_nonempty(check_embeddings(y_pred, "y_pred"), "y_pred")
    rows, cols = sim.shape
    if rows is not None and cols is not None and rows != cols:
        raise ValueError(
            "`y_pred` must be the (batch_size, batch_size) similarity matrix of the batch. "
            f"Received: y_pred.shape={tuple(sim.shape)}"
        )
    return sim


def _softmax_cross_entropy(targets, logits):
    return -ops.sum(targets * ops.log_softmax(logits, axis=1), axis=1)


def _npairs_rows(labels, similarity):
    same = ops.cast(
        ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0)), similarity.dtype
    )
    targets = same / ops.sum(same, axis=1, keepdims=True)
    return nonfinite_to_nan(_softmax_cross_entropy(targets, similarity), similarity)


@export
def npairs_loss(y_true, y_pred):
    r"""N-pairs loss (Sohn, 2016; TFA semantics) on a given similarity matrix.

    Each row i of the (B, B) similarity matrix `y_pred` is a set of logits; the
    target distribution is uniform over the columns j with $y_j = y_i$. The loss
    is the mean over rows of the softmax cross-entropy. Labels are compared as
    integers (TFA compares them after a float cast).

    Args:
      y_true: integer labels, shape (B,) or (B, 1).
      y_pred: (B, B) similarity matrix, for example `a @ b.T` for the anchors
        and positives of N pairs.

    Returns:
      Scalar loss.

    >>> import numpy as np
    >>> loss = npairs_loss(np.array([0, 1]), np.array([[10.0, 0.0], [0.0, 10.0]]))
    >>> round(float(loss), 4)
    0.0
    """
    sim = _check_similarity(y_pred)
    labels = check_labels(y_true, sim.shape[0], "y_true")
    return reduce_losses(_npairs_rows(labels, sim))  # the mean; 0 for an empty batch


def _multilabel_rows(y_true, similarity):
    y = ops.cast(ops.convert_to_tensor(y_true), similarity.dtype)
    if len(y.shape) != 2:
        raise ValueError(
            "`y_true` must be a (batch_size, num_classes) binary indicator matrix. "
            f"Received: y_true.shape={tuple(y.shape)}"
        )
    overlap = ops.matmul(y, ops.transpose(y))
    targets = ops.divide_no_nan(overlap, ops.sum(overlap, axis=1, keepdims=True))
    return nonfinite_to_nan(_softmax_cross_entropy(targets, similarity), similarity)


@export
def npairs_multilabel_loss(y_true, y_pred):
    r"""N-pairs loss for multi-label data (TFA semantics).

    The target of row i is proportional to $|labels(i) \cap labels(j)|$.
    An example without any label contributes 0 (TFA gives NaN).

    Args:
      y_true: (B, C) binary indicators, `y_true[i, c] = 1` if i is in class c.
      y_pred: (B, B) similarity matrix.

    Returns:
      Scalar loss.
    """
    sim = _check_similarity(y_pred)
    return reduce_losses(_multilabel_rows(y_true, sim))


@export
class NpairsLoss(keras.losses.Loss):
    """N-pairs loss; see `npairs_loss`. Replaces `tfa.losses.NpairsLoss`.

    `y_pred` is the (B, B) similarity matrix, as in TFA.
    """

    def __init__(self, name="npairs_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            sim = _check_similarity(y_pred)
            labels = check_labels(y_true, sim.shape[0], "y_true")
            # Keras' division by the replicas under tf.distribute (deepmetric.distributed).
            loss = reduce_losses(_npairs_rows(labels, sim), sample_weight, self.reduction)
            return distributed.scale_for_replicas(loss, self.reduction)

    def call(self, y_true, y_pred):
        sim = _check_similarity(y_pred)
        return _npairs_rows(check_labels(y_true, sim.shape[0], "y_true"), sim)


@export
class NpairsMultilabelLoss(keras.losses.Loss):
    """Multi-label N-pairs loss; see `npairs_multilabel_loss`."""

    def __init__(self, name="npairs_multilabel_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return _multilabel_rows(y_true, _check_similarity(y_pred))
