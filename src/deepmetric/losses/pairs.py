"""Contrastive, lifted-structure and N-pairs losses (TFA semantics)."""

from __future__ import annotations

import keras
from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels
from deepmetric.losses._base import MetricLoss, per_anchor_share, reduce_losses
from deepmetric.losses.triplet import _check_margin


def _as_vector(x, name):
    x = ops.convert_to_tensor(x)
    shape = tuple(x.shape)
    if len(shape) == 2 and shape[1] == 1:
        return ops.reshape(x, (-1,))
    if len(shape) != 1:
        raise ValueError(
            f"`{name}` must have shape (batch_size,) or (batch_size, 1). "
            f"Received: {name}.shape={shape}"
        )
    return x


def contrastive_loss(y_true, y_pred, margin=1.0):
    r"""Contrastive loss of pairs (Hadsell, Chopra and LeCun, 2006; TFA semantics).

    Per pair with distance d and label y (1 similar, 0 dissimilar):
    $y d^2 + (1 - y) \max(m - d, 0)^2$.

    Args:
      y_true: 1 for a similar pair, 0 otherwise; shape (B,) or (B, 1).
      y_pred: the pair distances, shape (B,) or (B, 1).
      margin: the margin m.

    Returns:
      Per-pair losses, shape (B,).

    >>> import numpy as np
    >>> loss = contrastive_loss(np.array([1, 0]), np.array([0.5, 0.25]))
    >>> np.round(keras.ops.convert_to_numpy(loss), 4).tolist()
    [0.25, 0.5625]
    """
    d = _as_vector(y_pred, "y_pred")
    if "float64" not in str(d.dtype):
        d = ops.cast(d, "float32")
    y = _as_vector(y_true, "y_true")
    if y.shape[0] is not None and d.shape[0] is not None and y.shape[0] != d.shape[0]:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same length. Received: "
            f"y_true.shape={tuple(y.shape)}, y_pred.shape={tuple(d.shape)}"
        )
    y = ops.cast(y, d.dtype)
    margin = _check_margin(margin)
    return y * ops.square(d) + (1.0 - y) * ops.square(ops.relu(margin - d))


@export
class ContrastiveLoss(keras.losses.Loss):
    """Contrastive loss of pairs; see `contrastive_loss`.

    A drop-in replacement for `tfa.losses.ContrastiveLoss`: the model outputs
    the distance of each pair, `y_true` says whether the pair is similar.
    """

    def __init__(
        self, margin=1.0, reduction="sum_over_batch_size", name="contrastive_loss", **kwargs
    ):
        super().__init__(name=name, reduction=reduction, **kwargs)
        self.margin = _check_margin(margin)

    def call(self, y_true, y_pred):
        return contrastive_loss(y_true, y_pred, self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def _lifted_row_stats(d, negatives, margin):
    """Per row i: the largest `margin - d(i, k)` over its negatives k (TFA's stabiliser, the
    row minimum of `margin - d` without negatives) and sum_k exp(margin - d(i, k) - that)."""
    diff = margin - d
    row_max = mining.masked_maximum(diff, negatives)
    shifted = ops.where(negatives, diff - row_max, 0.0)
    row_sums = ops.sum(ops.where(negatives, ops.exp(shifted), 0.0), axis=1)
    return ops.squeeze(row_max, axis=1), row_sums


def _lifted_pairs(d, positives, row_max, row_sums, all_row_max, all_row_sums):
    """Per anchor i of a block, half the sum of max(J_ij, 0)^2 over its positives j.

    `log(sum_k e^{m - d_ik} + sum_l e^{m - d_jl})` is computed from both rows' statistics,
    shifted by the larger of the two maxima: O(B) per row instead of TFA's tiled O(B^2).
    """
    pair_max = ops.maximum(ops.expand_dims(row_max, 1), ops.expand_dims(all_row_max, 0))
    total = ops.exp(ops.expand_dims(all_row_max, 0) - pair_max) * ops.expand_dims(
        all_row_sums, 0
    ) + ops.exp(ops.expand_dims(row_max, 1) - pair_max) * ops.expand_dims(row_sums, 1)
    valid = ops.logical_and(positives, ops.greater(total, 0.0))
    j = pair_max + ops.log(ops.where(valid, total, 1.0)) + d
    return 0.5 * ops.sum(ops.where(valid, ops.square(ops.relu(j)), 0.0), axis=1)


def _lifted_terms(labels, embeddings, margin):
    distance = distances_lib.EuclideanDistance()
    rows, whole = (embeddings, labels), (embeddings, labels)

    def block(index, anchors, anchor_labels, embeddings, labels):
        return distance.rows(anchors, embeddings, index), mining.label_masks(
            anchor_labels, labels, anchor_index=index
        )

    def stats(index, *args):
        d, (_, negatives) = block(index, *args)
        return _lifted_row_stats(d, negatives, margin)

    def pairs(index, anchors, anchor_labels, row_max, row_sums, *rest):
        d, (positives, _) = block(index, anchors, anchor_labels, *rest[:2])
        per_anchor = _lifted_pairs(d, positives, row_max, row_sums, *rest[2:])
        return per_anchor, ops.sum(ops.cast(positives, d.dtype), axis=1)

    if _blocks.block_size(embeddings.shape[0], embeddings.shape[0]) is None:
        # One block: the distance matrix is built once for both passes.
        index = ops.arange(ops.shape(embeddings)[0], dtype="int32")
        d, (positives, negatives) = block(index, *rows, *whole)
        row_max, row_sums = _lifted_row_stats(d, negatives, margin)
        per_anchor = _lifted_pairs(d, positives, row_max, row_sums, row_max, row_sums)
        return per_anchor, ops.sum(ops.cast(positives, d.dtype))
    row_max, row_sums = _blocks.map_rows(stats, rows, whole)
    per_anchor, num_positives = _blocks.map_rows(
        pairs, (*rows, row_max, row_sums), (*whole, row_max, row_sums)
    )
    return per_anchor, ops.sum(num_positives)


def lifted_struct_loss(labels, embeddings, margin=1.0):
    r"""Lifted structured loss (Oh Song et al., 2016, arXiv:1511.06452; TFA semantics).

    For each positive pair (i, j):
    $J_{ij} = \log\big(\sum_{k \in N(i)} e^{m - d_{ik}}
    + \sum_{l \in N(j)} e^{m - d_{jl}}\big) + d_{ij}$,
    and the loss is $\frac{1}{2|P|} \sum_{(i,j) \in P} \max(J_{ij}, 0)^2$ over the
    unordered positive pairs P. Computed with TFA's max-shift for stability in
    O(B^2) memory (TFA tiles a B^2 x B tensor).

    Same value and gradient as `tfa.losses.lifted_struct_loss`, except that a
    batch with a single class (no negative) or without any positive pair gives 0
    where TFA gives NaN.

    Args:
      labels: integer labels, shape (B,) or (B, 1).
      embeddings: embeddings, shape (B, D), not L2-normalised (as in TFA).
      margin: the margin m.

    Returns:
      Scalar loss.
    """
    embeddings = check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels")
    per_anchor, num_positives = _lifted_terms(labels, embeddings, _check_margin(margin))
    return ops.divide_no_nan(ops.sum(per_anchor), num_positives)


@export
class LiftedStructLoss(MetricLoss):
    """Lifted structured loss; see `lifted_struct_loss`. Replaces `tfa.losses.LiftedStructLoss`."""

    def __init__(self, margin=1.0, name="lifted_struct_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = _check_margin(margin)

    def call(self, labels, embeddings):
        per_anchor, num_positives = _lifted_terms(labels, embeddings, self.margin)
        return per_anchor_share(per_anchor, num_positives)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def _check_similarity(y_pred):
    sim = check_embeddings(y_pred, "y_pred")
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
    return _softmax_cross_entropy(targets, similarity)


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
    return ops.mean(_npairs_rows(labels, sim))


def _multilabel_rows(y_true, similarity):
    y = ops.cast(ops.convert_to_tensor(y_true), similarity.dtype)
    if len(y.shape) != 2:
        raise ValueError(
            "`y_true` must be a (batch_size, num_classes) binary indicator matrix. "
            f"Received: y_true.shape={tuple(y.shape)}"
        )
    overlap = ops.matmul(y, ops.transpose(y))
    targets = ops.divide_no_nan(overlap, ops.sum(overlap, axis=1, keepdims=True))
    return _softmax_cross_entropy(targets, similarity)


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
    return ops.mean(_multilabel_rows(y_true, sim))


@export
class NpairsLoss(MetricLoss):
    """N-pairs loss; see `npairs_loss`. Replaces `tfa.losses.NpairsLoss`.

    `y_pred` is the (B, B) similarity matrix, as in TFA.
    """

    def __init__(self, name="npairs_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            sim = _check_similarity(y_pred)
            labels = check_labels(y_true, sim.shape[0], "y_true")
            return reduce_losses(_npairs_rows(labels, sim), sample_weight, self.reduction)

    def call(self, labels, similarity):
        return _npairs_rows(labels, similarity)


@export
class NpairsMultilabelLoss(keras.losses.Loss):
    """Multi-label N-pairs loss; see `npairs_multilabel_loss`."""

    def __init__(self, name="npairs_multilabel_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return _multilabel_rows(y_true, _check_similarity(y_pred))
