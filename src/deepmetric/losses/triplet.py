"""Triplet losses with online mining inside the batch: semi-hard, hard, batch-all.

All three build one B x B distance matrix and mine it with fixed-shape
operations (`deepmetric.mining`); none materialises a B x B x B tensor, so memory
grows as B^2 where TensorFlow Addons' semi-hard loss tiles a B^2 x B tensor.
"""

from __future__ import annotations

from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels, check_nonempty
from deepmetric.losses.base import (
    NON_NEGATIVE,
    MetricLoss,
    distance_option,
    flag_option,
    loss_inputs,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
    reduce_losses,
)

# The margin of the three losses: a finite number >= 0.
_MARGIN = number_option("margin", 1.0, NON_NEGATIVE)


def _rows(row_terms, labels, embeddings, distance):
    """`_blocks.anchor_rows` on the batch, larger farther, with the positives' order."""
    return _blocks.anchor_rows(
        row_terms,
        distances_lib.get(distance, "distance_metric"),
        labels,
        embeddings,
        farther_is_larger=True,
        with_order=True,
    )


def _inputs(y_true, y_pred):
    embeddings = check_nonempty(check_embeddings(y_pred, "y_pred"), "y_pred")
    return check_labels(y_true, embeddings.shape[0], "y_true"), embeddings


def _semihard_terms(labels, embeddings, margin, distance_metric):
    def rows(d, positives, negatives, order):
        w = mining.semihard_signed_weights(d, positives, negatives, margin, order)
        per_anchor = ops.sum(w * d + margin * ops.relu(w), axis=1)
        num_positives = ops.sum(ops.cast(positives, d.dtype), axis=1)
        return (per_anchor, num_positives, *mining.rows_with_pairs(positives, negatives))

    per_anchor, num_positives, has_positive, has_negative = _rows(
        rows, labels, embeddings, distance_metric
    )
    per_anchor = ops.where(mining.any_pairs(has_positive, has_negative), per_anchor, 0.0)
    return per_anchor, ops.sum(num_positives)


def _semihard_shares(labels, embeddings, *, margin=1.0, distance_metric="L2"):
    """Per-anchor shares of `triplet_semihard_loss` (their mean is the loss)."""
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    margin = _MARGIN.checked(margin)
    return per_anchor_share(*_semihard_terms(labels, embeddings, margin, distance_metric))


@export
def triplet_semihard_loss(y_true, y_pred, margin=1.0, distance_metric="L2"):
    r"""Triplet loss with FaceNet's semi-hard negative mining (TFA semantics).

    For every anchor-positive pair (a, p) of the batch, the negative is the
    closest one farther than the positive,
    $n^* = \arg\min \{ d_{an} : y_n \ne y_a, d_{an} > d_{ap} \}$, or, if there is
    none, the farthest negative. The loss is the mean over all positive pairs of
    $\max(d_{ap} - d_{an^*} + m, 0)$ (Schroff et al., 2015, arXiv:1503.03832).

    Same value and gradient as `tfa.losses.triplet_semihard_loss`, with two
    differences: where TFA returns NaN (no positive pair in the batch), this
    returns 0 with zero gradients; where the batch has a single class (no
    negative), this returns 0 where TFA returns the mean of `margin + d_ap`.
    With several negatives at exactly the same distance, the gradient is split
    equally among them, as TFA's `reduce_min` splits it.

    Memory is O(B^2): the mining loops over the k-th positive of each anchor
    (K - 1 steps in a P x K batch), and the loss is a weighted sum of distances
    with weights computed without gradient.

    Args:
      y_true: integer labels, shape (B,) or (B, 1).
      y_pred: embeddings, shape (B, D); usually L2-normalised.
      margin: the margin m, a finite number >= 0.
      distance_metric: "L2", "squared-L2", "angular", a
        `deepmetric.distances.Distance` (similarities are negated) or a callable
        returning the (B, B) distance matrix.

    Returns:
      Scalar loss (float32); NaN if an embedding is not finite.

    >>> import numpy as np
    >>> loss = triplet_semihard_loss(np.array([0, 0]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    >>> round(float(loss), 4)
    0.0
    """
    labels, embeddings = _inputs(y_true, y_pred)
    per_anchor, num_positives = _semihard_terms(
        labels, embeddings, _MARGIN.checked(margin), distance_metric
    )
    return nonfinite_to_nan(ops.divide_no_nan(ops.sum(per_anchor), num_positives), embeddings)


def _hard_terms(labels, embeddings, margin, soft, distance_metric):
    def rows(d, positives, negatives, order):
        hardest_positive = mining.hardest_positive(d, positives)
        hardest_negative = mining.hardest_negative(d, negatives)
        gap = ops.squeeze(hardest_positive - hardest_negative, axis=1)
        loss = ops.softplus(gap) if soft else ops.relu(gap + margin)
        return (loss, *mining.rows_with_pairs(positives, negatives))

    loss, has_positive, has_negative = _rows(rows, labels, embeddings, distance_metric)
    return ops.where(mining.any_pairs(has_positive, has_negative), loss, 0.0)


def _hard_shares(labels, embeddings, *, margin=1.0, soft=False, distance_metric="L2"):
    """Per-anchor losses of `triplet_hard_loss` (their mean is the loss)."""
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    margin = _MARGIN.checked(margin)
    return _hard_terms(labels, embeddings, margin, bool(soft), distance_metric)


@export
def triplet_hard_loss(y_true, y_pred, margin=1.0, soft=False, distance_metric="L2"):
    r"""Triplet loss with batch-hard mining (Hermans et al., 2017, TFA semantics).

    For every anchor a, the farthest positive and the closest negative:
    $\max(\max_p d_{ap} - \min_n d_{an} + m, 0)$, or with `soft=True`
    $\log(1 + \exp(\max_p d_{ap} - \min_n d_{an}))$; the mean over all anchors.

    Same value and gradient as `tfa.losses.triplet_hard_loss`, including TFA's
    handling of an anchor without positive in a batch that has positive pairs
    (its hardest positive distance is the row minimum, 0 for "L2"). Differences:
    a batch without any positive pair or without any negative gives 0 (TFA
    gives `mean(max(margin - min_n d_an, 0))` or the hardest positive distance);
    the soft margin uses a stable softplus, finite where TFA's `log1p(exp(x))`
    overflows to inf (x > 88).

    Args:
      y_true: integer labels, shape (B,) or (B, 1).
      y_pred: embeddings, shape (B, D).
      margin: the margin m, a finite number >= 0 (unused when `soft`).
      soft: use the soft margin.
      distance_metric: as in `triplet_semihard_loss`.

    Returns:
      Scalar loss (float32); NaN if an embedding is not finite.

    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    >>> round(float(triplet_hard_loss(np.array([0, 0, 1]), x)), 4)
    0.0
    """
    labels, embeddings = _inputs(y_true, y_pred)
    margin = _MARGIN.checked(margin)
    loss = reduce_losses(_hard_terms(labels, embeddings, margin, bool(soft), distance_metric))
    return nonfinite_to_nan(loss, embeddings)


def _batch_all_terms(labels, embeddings, margin, squared):
    def rows(d, positives, negatives, order):
        w = mining.batch_all_signed_counts(d, positives, negatives, margin, order)
        contributions = ops.sum(w * d + margin * ops.relu(w), axis=1)
        pos_f, neg_f = ops.cast(positives, d.dtype), ops.cast(negatives, d.dtype)
        num_valid = ops.sum(pos_f, axis=1) * ops.sum(neg_f, axis=1)
        return contributions, ops.sum(ops.relu(w), axis=1), num_valid

    contributions, num_active, num_valid = _rows(
        rows, labels, embeddings, distances_lib.EuclideanDistance(squared=squared)
    )
    return contributions, ops.sum(num_active), ops.sum(num_valid)


def _batch_all_shares(labels, embeddings, *, margin=1.0, squared=False):
    """Per-anchor shares of `triplet_batch_all_loss` (their mean is the loss)."""
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    margin = _MARGIN.checked(margin)
    contributions, num_active, _ = _batch_all_terms(labels, embeddings, margin, bool(squared))
    return per_anchor_share(contributions, num_active)


@export
def triplet_batch_all_loss(y_true, y_pred, margin=1.0, squared=False, return_fraction=False):
    r"""Batch-all triplet loss (Moindrot's "triplet loss and online triplet mining").

    Over all valid triplets (a, p, n) of the batch (a != p share a label, n has
    another), $\ell = \max(d_{ap} - d_{an} + m, 0)$; the loss is the sum of
    $\ell$ divided by the number of triplets with $\ell > 0$ (0 if there is none),
    on Euclidean (or, with `squared`, squared Euclidean) distances. Computed
    without enumerating triplets: per (anchor, positive) pair the number of
    active negatives, and per (anchor, negative) pair the number of active
    positives, so memory is O(B^2).

    Args:
      y_true: integer labels, shape (B,) or (B, 1).
      y_pred: embeddings, shape (B, D).
      margin: the margin m, a finite number >= 0.
      squared: use squared Euclidean distances.
      return_fraction: also return the fraction of valid triplets with a
        positive loss (Moindrot's `fraction_positive_triplets`).

    Returns:
      Scalar loss, or `(loss, fraction)`; NaN if an embedding is not finite.
    """
    labels, embeddings = _inputs(y_true, y_pred)
    contributions, num_active, num_valid = _batch_all_terms(
        labels, embeddings, _MARGIN.checked(margin), bool(squared)
    )
    loss = nonfinite_to_nan(ops.divide_no_nan(ops.sum(contributions), num_active), embeddings)
    if return_fraction:
        return loss, nonfinite_to_nan(ops.divide_no_nan(num_active, num_valid), embeddings)
    return loss


@export
class TripletSemiHardLoss(MetricLoss):
    """Triplet loss with semi-hard negative mining; see `triplet_semihard_loss`.

    A drop-in replacement for `tfa.losses.TripletSemiHardLoss`:

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.TripletSemiHardLoss(margin=1.0))
    ```

    `call` returns per-anchor shares of the batch loss (scaled so that Keras'
    default mean reduction gives exactly the TFA value); a `sample_weight`
    scales the share of that anchor's triplets.
    """

    function = staticmethod(_semihard_shares)
    default_name = "triplet_semihard_loss"
    options = (_MARGIN, distance_option("distance_metric", "L2"))
    takes_reference = False


@export
class TripletHardLoss(MetricLoss):
    """Triplet loss with batch-hard mining; see `triplet_hard_loss`.

    A drop-in replacement for `tfa.losses.TripletHardLoss`; `call` returns the
    loss of each anchor and Keras averages them.
    """

    function = staticmethod(_hard_shares)
    default_name = "triplet_hard_loss"
    options = (
        _MARGIN,
        flag_option("soft", False),
        distance_option("distance_metric", "L2"),
    )
    takes_reference = False


@export
class TripletBatchAllLoss(MetricLoss):
    """Batch-all triplet loss; see `triplet_batch_all_loss`.

    To watch the fraction of valid triplets whose loss is positive during
    `fit`, add `deepmetric.metrics.FractionPositiveTriplets` with the same
    margin to `compile(metrics=[...])`.
    """

    function = staticmethod(_batch_all_shares)
    default_name = "triplet_batch_all_loss"
    options = (_MARGIN, flag_option("squared", False))
    takes_reference = False
