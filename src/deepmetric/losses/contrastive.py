"""Contrastive losses on distances with margins: TFA's pair loss, all pairs, lifted structure.

`contrastive_loss` takes the distance of each pair (TFA); `online_contrastive_loss` takes class
labels and embeddings and uses all pairs of the batch (pytorch-metric-learning's
`ContrastiveLoss`); `lifted_struct_loss` is TFA's lifted structured loss.
"""

from __future__ import annotations

import keras
from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric._labels import check_nonempty
from deepmetric.losses.base import (
    LARGE,
    NON_NEGATIVE,
    MetricLoss,
    count_positive,
    distance_option,
    loss_inputs,
    masked_logsumexp,
    miner_option,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)
from deepmetric.losses.softmax import _margin, normalized_rows

# Margins on distances: finite numbers >= 0.
_MARGIN = number_option("margin", 1.0, NON_NEGATIVE)
_POS_MARGIN = number_option("pos_margin", 0.0, NON_NEGATIVE)
_NEG_MARGIN = number_option("neg_margin", 1.0, NON_NEGATIVE)

# Squared Euclidean distances of unit vectors below this are rounding noise of
# |x|^2 + |y|^2 - 2 x.y in float32 (about 1e-7 per term): they are taken as 0.
_SQUARED_DISTANCE_FLOOR = 1e-6


class _UnitEuclidean(distances_lib.Distance):
    """Euclidean distances of L2-normalised rows; squared values below the noise floor are 0."""

    def _matrix(self, query, reference, self_index):
        squared = distances_lib._squared_euclidean(query, reference)
        squared = ops.where(ops.greater(squared, _SQUARED_DISTANCE_FLOOR), squared, 0.0)
        return distances_lib._safe_sqrt(squared)


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


@export
def contrastive_loss(y_true, y_pred, margin=1.0):
    r"""Contrastive loss of pairs (Hadsell, Chopra and LeCun, 2006; TFA semantics).

    Per pair with distance d and label y (1 similar, 0 dissimilar):
    $y d^2 + (1 - y) \max(m - d, 0)^2$.

    Args:
      y_true: 1 for a similar pair, 0 otherwise; shape (B,) or (B, 1).
      y_pred: the pair distances, shape (B,) or (B, 1).
      margin: the margin m, a finite number >= 0.

    Returns:
      Per-pair losses, shape (B,); all NaN if a distance is not finite.

    >>> import numpy as np
    >>> loss = contrastive_loss(np.array([1, 0]), np.array([0.5, 0.25]))
    >>> np.round(keras.ops.convert_to_numpy(loss), 4).tolist()
    [0.25, 0.5625]
    """
    d = check_nonempty(_as_vector(y_pred, "y_pred"), "y_pred")
    if "float64" not in str(d.dtype):  # float32, or float64 where the backend keeps it
        d = ops.cast(d, "float32")
    y = _as_vector(y_true, "y_true")
    if y.shape[0] is not None and d.shape[0] is not None and y.shape[0] != d.shape[0]:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same length. Received: "
            f"y_true.shape={tuple(y.shape)}, y_pred.shape={tuple(d.shape)}"
        )
    y = ops.cast(y, d.dtype)
    margin = _MARGIN.checked(margin)
    return nonfinite_to_nan(y * ops.square(d) + (1.0 - y) * ops.square(ops.relu(margin - d)), d)


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
        self.margin = _MARGIN.checked(margin)

    def call(self, y_true, y_pred):
        return contrastive_loss(y_true, y_pred, self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def _lifted_row_stats(d, negatives, margin):
    """Per row i: `L_i = log sum_k exp(margin - d(i, k))` over its negatives k, and whether
    it has any (a row without negatives gets the finite stand-in `-LARGE`)."""
    has_negatives = ops.any(negatives, axis=1)
    lse = masked_logsumexp(margin - d, negatives)
    return ops.where(has_negatives, lse, -LARGE), has_negatives


def _lifted_pairs(d, positives, row_lse, row_has, all_lse, all_has):
    """Per anchor i of a block, half the sum of max(J_ij, 0)^2 over its positives j.

    `J_ij = log(sum_k e^{m - d_ik} + sum_l e^{m - d_jl}) + d_ij = logaddexp(L_i, L_j) + d_ij`
    from the two rows' log-sum-exps: one transcendental per pair, O(B) memory per row
    instead of TFA's tiled O(B^2). Pairs where neither row has a negative have no term.
    """
    has = ops.logical_or(ops.expand_dims(row_has, 1), ops.expand_dims(all_has, 0))
    valid = ops.logical_and(positives, has)
    j = ops.logaddexp(ops.expand_dims(row_lse, 1), ops.expand_dims(all_lse, 0)) + d
    return 0.5 * ops.sum(ops.where(valid, ops.square(ops.relu(j)), 0.0), axis=1)


def _lifted_terms(labels, embeddings, margin):
    distance = distances_lib.EuclideanDistance()

    def block(index, anchors, anchor_labels, embeddings, labels):
        positives, negatives = mining.label_masks(anchor_labels, labels, anchor_index=index)
        return distance.matrix(anchors, embeddings, self_index=index), positives, negatives

    _, (per_anchor, num_positives) = _blocks.two_pass_rows(
        block,
        lambda d, positives, negatives: _lifted_row_stats(d, negatives, margin),
        lambda d, positives, negatives, own, every: (
            _lifted_pairs(d, positives, *own, *every),
            ops.sum(ops.cast(positives, d.dtype), axis=1),
        ),
        (embeddings, labels),
    )
    return per_anchor, ops.sum(num_positives)


@export
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
      margin: the margin m, a finite number >= 0.

    Returns:
      Scalar loss; NaN if an embedding is not finite.
    """
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    per_anchor, num_positives = _lifted_terms(labels, embeddings, _MARGIN.checked(margin))
    return nonfinite_to_nan(ops.divide_no_nan(ops.sum(per_anchor), num_positives), embeddings)


def _lifted_shares(labels, embeddings, *, margin=1.0):
    """Per-anchor shares of `lifted_struct_loss` (their mean is the loss)."""
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    margin = _MARGIN.checked(margin)
    return per_anchor_share(*_lifted_terms(labels, embeddings, margin))


@export
class LiftedStructLoss(MetricLoss):
    """Lifted structured loss; see `lifted_struct_loss`. Replaces `tfa.losses.LiftedStructLoss`."""

    function = staticmethod(_lifted_shares)
    default_name = "lifted_struct_loss"
    options = (_MARGIN,)
    takes_reference = False


@export
def online_contrastive_loss(
    labels,
    embeddings,
    *,
    pos_margin=0.0,
    neg_margin=1.0,
    distance="lp",
    miner=None,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Contrastive loss over all pairs of the batch, per anchor (Hadsell et al., 2006).

    On Euclidean distances $d_{ij}$ of the L2-normalised embeddings, over the ordered pairs
    ((i, j) and (j, i) both count):

    $$L = \operatorname{mean}_{\ell^+ > 0}\,[d_{ip} - m_+]_+
        + \operatorname{mean}_{\ell^- > 0}\,[m_- - d_{in}]_+$$

    each mean taken over the pairs whose loss is non-zero (0 if there is none): a batch without
    positive pairs keeps the negative-pair mean, a single-class batch the positive-pair mean.
    The hinge is not squared (unlike the TFA-compatible `contrastive_loss`, which takes
    precomputed pair distances). Same value and gradient as
    `pytorch_metric_learning.losses.ContrastiveLoss()`, except that squared distances below 1e-6
    (float32 rounding noise for unit vectors) count as 0. Paper:
    "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      pos_margin: positive pairs closer than this are not penalised (a finite number >= 0).
      neg_margin: negative pairs farther than this are not penalised (a finite number >= 0).
      distance: a `deepmetric.distances` name or `Distance` (default "lp", PML's
        `LpDistance()`); with a similarity the hinges turn around, as in PML:
        $[m_+ - s_{ip}]_+$ and $[s_{in} - m_-]_+$.
      miner: None, or a `deepmetric.miners` miner whose kept pairs replace all pairs (a
        triplet miner's pairs count as often as they occur in its triplets, as in PML).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss. All NaN if an embedding or a
      reference embedding is not finite.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = online_contrastive_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    1.131
    """
    pos_margin = _POS_MARGIN.checked(pos_margin)
    neg_margin = _NEG_MARGIN.checked(neg_margin)
    distance = distances_lib.get(distance, "distance")
    default = distance == distances_lib.LpDistance()
    margin = _margin(distance)

    def rows(d, positives, negatives, mined=None):
        pos_loss = ops.where(positives, ops.relu(margin(d, pos_margin)), 0.0)
        neg_loss = ops.where(negatives, ops.relu(margin(neg_margin, d)), 0.0)
        if mined is None or mined.positive_counts is None:
            return (
                ops.sum(pos_loss, axis=1),
                count_positive(pos_loss, axis=1),
                ops.sum(neg_loss, axis=1),
                count_positive(neg_loss, axis=1),
            )
        # A triplet miner's pairs repeat: each counts as often as it occurs.
        pos_times, neg_times = mined.pair_counts()
        return (
            ops.sum(pos_times * pos_loss, axis=1),
            ops.sum(
                pos_times * ops.cast(ops.greater(ops.stop_gradient(pos_loss), 0.0), d.dtype), axis=1
            ),
            ops.sum(neg_times * neg_loss, axis=1),
            ops.sum(
                neg_times * ops.cast(ops.greater(ops.stop_gradient(neg_loss), 0.0), d.dtype), axis=1
            ),
        )

    pos_sum, pos_count, neg_sum, neg_count = normalized_rows(
        rows,
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        distance=_UnitEuclidean() if default else distance,
        normalize=default,
        miner=miner,
        pass_mined=True,
    )
    loss = per_anchor_share(pos_sum, ops.sum(pos_count)) + per_anchor_share(
        neg_sum, ops.sum(neg_count)
    )
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


@export
class OnlineContrastiveLoss(MetricLoss):
    """Contrastive loss over all pairs of the batch; see `online_contrastive_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.OnlineContrastiveLoss())
    ```
    """

    function = staticmethod(online_contrastive_loss)
    options = (
        _POS_MARGIN,
        _NEG_MARGIN,
        distance_option("distance", "lp"),
        miner_option(),
    )
