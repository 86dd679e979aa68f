"""Pair and triplet losses of pytorch-metric-learning on the batch's B x B matrix.

NCA, signal-to-noise-ratio contrastive, lifted structure, generalized lifted structure,
intra-pair variance, tuplet margin, angular and margin losses. Each is a function
`name_loss(labels, embeddings, *, ..., reference_embeddings=None, reference_labels=None,
reference_mask=None)` (lifted structure: without a reference set, as in PML) that returns one
value per anchor whose mean (Keras' default reduction) is the batch loss of
pytorch-metric-learning (PML) 2.9 with its default distance and reducer, and a thin
`MetricLoss` class with PML's class name, keywords and defaults. Embeddings are L2-normalised
inside (PML's default distances normalise). Everything is built from (B, R) matrices: the
losses that PML writes over triplets (margin, angular) are rewritten as sums over pairs
weighted by counts, or as a product of a (B, R) and an (R, R) matrix made in blocks of rows
(`deepmetric._blocks`), so memory grows at most as B * R.
"""

from __future__ import annotations

import math

from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric.losses.base import (
    LARGE,
    NON_NEGATIVE,
    POSITIVE,
    Bounds,
    MetricLoss,
    Option,
    check_reference_mask,
    count_positive,
    loss_inputs,
    masked_logsumexp,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)
from deepmetric.losses.contrastive import _UnitEuclidean
from deepmetric.losses.softmax import normalized_rows
from deepmetric.mining import any_pairs, rows_with_pairs

# PML's `SNRDistance()` on rows that `normalized_rows` has already normalised.
_SNR = distances_lib.SNRDistance(normalize_embeddings=False)

# The option tables, shared by each function and its class (the function checks its options
# through them): margins on distances and weights >= 0, scales > 0, tolerances (fractions of
# a mean) in [0, 1], cosine thresholds in [-1, 1], angles in degrees in their valid interval.
_COSINE = Bounds(-1.0, 1.0)
_NCA_SCALE = number_option("softmax_scale", 1.0, POSITIVE)
_SNR_POS_MARGIN = number_option("pos_margin", 0.0, NON_NEGATIVE)
_SNR_NEG_MARGIN = number_option("neg_margin", 1.0, NON_NEGATIVE)
_LIFTED_NEG_MARGIN = number_option("neg_margin", 1.0, NON_NEGATIVE)
_LIFTED_POS_MARGIN = number_option("pos_margin", 0.0, NON_NEGATIVE)
_POS_EPS = number_option("pos_eps", 0.01, Bounds(0.0, 1.0))
_NEG_EPS = number_option("neg_eps", 0.01, Bounds(0.0, 1.0))
_TUPLET_MARGIN = number_option(
    "margin", 5.73, Bounds(0.0, 90.0, exclusive_maximum=True, text="in [0, 90) degrees")
)
_TUPLET_SCALE = number_option("scale", 64.0, POSITIVE)
_ANGULAR_ALPHA = number_option(
    "alpha",
    40.0,
    Bounds(0.0, 90.0, exclusive_minimum=True, exclusive_maximum=True, text="in (0, 90) degrees"),
)
_MARGIN_MARGIN = number_option("margin", 0.2, NON_NEGATIVE)
_MARGIN_NU = number_option("nu", 0.0, NON_NEGATIVE)
_MARGIN_BETA = number_option("beta", 1.2, NON_NEGATIVE)
_TCM_LAMBDA_PLUS = number_option("lambda_plus", 1.0, NON_NEGATIVE)
_TCM_LAMBDA_MINUS = number_option("lambda_minus", 1.0, NON_NEGATIVE)
_TCM_MARGIN_PLUS = number_option("margin_plus", 0.9, _COSINE)
_TCM_MARGIN_MINUS = number_option("margin_minus", 0.5, _COSINE)


def _safe_sqrt(x):
    """sqrt with a zero gradient where x <= 0."""
    positive = ops.greater(x, 0.0)
    return ops.where(positive, ops.sqrt(ops.where(positive, x, 1.0)), 0.0)


def _count(mask, like, axis=None):
    """How many entries of the boolean `mask` are True, in the dtype of `like`."""
    return ops.sum(ops.cast(mask, like.dtype), axis=axis)


# --------------------------------------------------------------------------------------- NCA


@export
def nca_loss(
    labels,
    embeddings,
    *,
    softmax_scale=1.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Neighbourhood components analysis loss, per anchor (Goldberger et al., 2004).

    On squared Euclidean distances $d_{ij}^2$ of the L2-normalised embeddings, with scale s, for
    anchor i with positives $P_i$ and all other examples $A_i$:

    $$\ell_i = -\log \sum_{p \in P_i} \frac{e^{-s d_{ip}^2}}{\sum_{j \in A_i} e^{-s d_{ij}^2}}$$

    the log-probability that the stochastic nearest neighbour of i has its class. The batch
    loss is the mean over the anchors that have a positive (0 if none has: PML returns NaN
    there). Same value and gradient as `pytorch_metric_learning.losses.NCALoss()`. Paper:
    "Neighbourhood Components Analysis", NeurIPS 2004.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      softmax_scale: the scale s (> 0).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(nca_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.6429
    """
    softmax_scale = _NCA_SCALE.checked(softmax_scale)

    def rows(d2, positives, negatives):
        logits = -softmax_scale * d2
        everyone = ops.logical_or(positives, negatives)
        loss = masked_logsumexp(logits, everyone) - masked_logsumexp(logits, positives)
        has_positive, has_negative = rows_with_pairs(positives, negatives)
        loss = ops.where(ops.logical_and(has_positive > 0, has_negative > 0), loss, 0.0)
        return loss, has_positive

    loss, has_positive = normalized_rows(
        rows,
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        distance=distances_lib.EuclideanDistance(squared=True),
    )
    loss = per_anchor_share(loss, ops.cast(ops.sum(has_positive), loss.dtype))
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


# ------------------------------------------------------------- signal-to-noise contrastive


def _contrastive_rows(pos_margin, neg_margin):
    def rows(d, positives, negatives):
        pos_loss = ops.where(positives, ops.relu(d - pos_margin), 0.0)
        neg_loss = ops.where(negatives, ops.relu(neg_margin - d), 0.0)
        return (
            ops.sum(pos_loss, axis=1),
            count_positive(pos_loss, axis=1),
            ops.sum(neg_loss, axis=1),
            count_positive(neg_loss, axis=1),
        )

    return rows


@export
def signal_to_noise_ratio_contrastive_loss(
    labels,
    embeddings,
    *,
    pos_margin=0.0,
    neg_margin=1.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Contrastive loss on the signal-to-noise-ratio distance, per anchor (Yuan et al., 2019).

    On the L2-normalised embeddings, the distance of anchor i to j is the ratio of the noise's
    variance to the signal's, $d_{ij} = \operatorname{var}(x_i - x_j) / \operatorname{var}(x_i)$
    (not symmetric), and over the ordered pairs:

    $$L = \operatorname{mean}_{\ell^+ > 0}\,[d_{ip} - m_+]_+
        + \operatorname{mean}_{\ell^- > 0}\,[m_- - d_{in}]_+$$

    each mean over the pairs whose loss is non-zero (0 if none). A batch without positive pairs
    keeps the negative-pair mean, a single-class batch the positive-pair mean. Same value and
    gradient as `pytorch_metric_learning.losses.SignalToNoiseRatioContrastiveLoss()`, except
    that distances below 1e-6 (float32 rounding noise) count as 0, and an embedding
    with zero variance gives finite values where PML divides by 0. Paper: "Signal-To-Noise
    Ratio: A Robust Distance Metric for Deep Metric Learning", CVPR 2019, arXiv:1904.02616.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      pos_margin: positive pairs closer than this are not penalised (>= 0, a distance).
      neg_margin: negative pairs farther than this are not penalised (>= 0, a distance).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0, 0.2], [0.6, 0.8, 0.1], [0.0, 1.0, 0.3], [-0.6, 0.8, 0.0]])
    >>> loss = signal_to_noise_ratio_contrastive_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    1.3058
    """
    pos_margin = _SNR_POS_MARGIN.checked(pos_margin)
    neg_margin = _SNR_NEG_MARGIN.checked(neg_margin)
    pos_sum, pos_count, neg_sum, neg_count = normalized_rows(
        _contrastive_rows(pos_margin, neg_margin),
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        distance=_SNR,
    )
    loss = per_anchor_share(pos_sum, ops.sum(pos_count)) + per_anchor_share(
        neg_sum, ops.sum(neg_count)
    )
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


# ------------------------------------------------------------ generalized lifted structure


@export
def generalized_lifted_structure_loss(
    labels,
    embeddings,
    *,
    neg_margin=1.0,
    pos_margin=0.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Generalized lifted structure loss, per anchor (Hermans et al., 2017).

    On Euclidean distances $d_{ij}$ of the L2-normalised embeddings, for anchor i with
    positives $P_i$ and negatives $N_i$:

    $$\ell_i = \Big[\log\sum_{p \in P_i} e^{d_{ip} - m_+}
                   + \log\sum_{n \in N_i} e^{m_- - d_{in}}\Big]_+$$

    (an empty sum gives a term 0); the batch loss is the mean over all anchors. A batch
    without positive pairs keeps the negative terms and a single-class batch the positive
    terms. Same value and gradient as
    `pytorch_metric_learning.losses.GeneralizedLiftedStructureLoss()`. Paper: "In Defense of
    the Triplet Loss for Person Re-Identification", arXiv:1703.07737 (page 4).

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      neg_margin: the negative margin $m_-$ (>= 0, on distances).
      pos_margin: the positive margin $m_+$ (>= 0, on distances).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor losses; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = generalized_lifted_structure_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    1.2413
    """
    neg_margin = _LIFTED_NEG_MARGIN.checked(neg_margin)
    pos_margin = _LIFTED_POS_MARGIN.checked(pos_margin)

    def rows(d, positives, negatives):
        pos_term = masked_logsumexp(d - pos_margin, positives)
        neg_term = masked_logsumexp(neg_margin - d, negatives)
        return (ops.relu(pos_term + neg_term),)

    (loss,) = normalized_rows(
        rows,
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        distance=_UnitEuclidean(),
    )
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


@export
def lifted_structure_loss(labels, embeddings, *, neg_margin=1.0, pos_margin=0.0):
    r"""Lifted structured loss over the positive pairs, per anchor (Song et al., 2016).

    On Euclidean distances $d_{ij}$ of the L2-normalised embeddings, each positive pair (i, j)
    meets the negatives of both its examples:

    $$J_{ij} = \log\Big(\sum_{k \in N_i} e^{m_- - d_{ik}} + \sum_{l \in N_j} e^{m_- - d_{jl}}\Big)
        + d_{ij} - m_+, \qquad L = \frac{1}{\lvert P\rvert}\sum_{(i, j) \in P}
        \tfrac{1}{2}\,[J_{ij}]_+^2$$

    over the ordered positive pairs P (each unordered pair twice, hence the 1/2: the paper's
    $\frac{1}{2\lvert \hat P\rvert}\sum_{\hat P} [J]_+^2$ over unordered pairs). A batch
    without a positive pair, or without a negative pair, gives 0. Same value and gradient as
    `pytorch_metric_learning.losses.LiftedStructureLoss()`, which normalises the embeddings (the
    paper does not). Paper: "Deep Metric Learning via Lifted Structured Feature Embedding",
    CVPR 2016, arXiv:1511.06452. (`lifted_struct_loss` is TensorFlow Addons' form: a mean over
    the unordered pairs, raw embeddings.)

    Each pair's term reads the negatives' sum of another row, so the loss makes two passes over
    blocks of rows (`deepmetric._blocks.map_rows`, above 2^24 entries): the first gives every
    row's $\log\sum_{k \in N_i} e^{m_- - d_{ik}}$ (a (B,) vector), the second each row's sum
    of $\tfrac{1}{2}[J_{ij}]_+^2$ over its positives and their count, reading that vector whole
    (gradients flow through it into the first pass). A batch of at most 2^24 pairs is one
    block, with the (B, B) matrix built once for both. No reference set: PML compares the
    batch with itself only.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      neg_margin: the negative margin $m_-$ (>= 0, on distances).
      pos_margin: the positive margin $m_+$ (>= 0, on distances).

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = lifted_structure_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    1.9703
    """
    neg_margin = _LIFTED_NEG_MARGIN.checked(neg_margin)
    pos_margin = _LIFTED_POS_MARGIN.checked(pos_margin)
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    unit = distances_lib._l2_normalize(embeddings)
    distance = _UnitEuclidean()

    def block(index, query, query_labels, ref, ref_labels):
        positives, negatives = mining.label_masks(query_labels, ref_labels, anchor_index=index)
        return distance.matrix(query, ref, self_index=index), positives, negatives

    def negative_terms(d, negatives):
        # log sum over row i's negatives; the union of rows i and j is one log-add-exp.
        return masked_logsumexp(neg_margin - d, negatives), ops.any(negatives, axis=1)

    def pair_terms(d, positives, row_terms, all_terms):
        joint = ops.logaddexp(ops.expand_dims(row_terms, 1), ops.expand_dims(all_terms, 0))
        hinge = 0.5 * ops.square(ops.relu(joint + d - pos_margin))
        return ops.sum(ops.where(positives, hinge, 0.0), axis=1), _count(positives, d, axis=1)

    (_, has_negative), (per_row, num_positives) = _blocks.two_pass_rows(
        block,
        lambda d, positives, negatives: negative_terms(d, negatives),
        lambda d, positives, negatives, own, every: pair_terms(d, positives, own[0], every[0]),
        (unit, labels),
    )
    per_row = ops.where(ops.any(has_negative), per_row, 0.0)
    loss = per_anchor_share(per_row, ops.sum(num_positives))
    return nonfinite_to_nan(loss, embeddings)


# ------------------------------------------------------------------- intra-pair variance


@export
def intra_pair_variance_loss(
    labels,
    embeddings,
    *,
    pos_eps=0.01,
    neg_eps=0.01,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Intra-pair variance loss, per anchor (Yu & Tao, 2019).

    On cosine similarities $s$ of the L2-normalised embeddings, with $\mu_+$ and $\mu_-$ the
    means of the similarities over all positive and all negative pairs of the batch:

    $$L = \operatorname{mean}_{(i,p)}\big[(1 - \epsilon_+)\mu_+ - s_{ip}\big]_+^2
        + \operatorname{mean}_{(i,n)}\big[s_{in} - (1 + \epsilon_-)\mu_-\big]_+^2$$

    over the ordered pairs (a mean over no pair is 0); the means $\mu$ carry gradient. A batch
    without positive pairs keeps the negative term, a single-class batch the positive term.
    Same value and gradient as `pytorch_metric_learning.losses.IntraPairVarianceLoss()`. Paper:
    "Deep Metric Learning with Tuplet Margin Loss", ICCV 2019.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      pos_eps: the relative tolerance $\epsilon_+$ below the mean positive similarity, in
        [0, 1] (a fraction of the mean).
      neg_eps: the relative tolerance $\epsilon_-$ above the mean negative similarity, in
        [0, 1].
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8], [0.9, 0.3]])
    >>> loss = intra_pair_variance_loss(np.array([0, 0, 1, 1, 0]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.1106
    """
    pos_eps = _POS_EPS.checked(pos_eps)
    neg_eps = _NEG_EPS.checked(neg_eps)
    inputs = (labels, embeddings, reference_embeddings, reference_labels, reference_mask)

    def sums(s, positives, negatives):
        return (
            ops.sum(ops.where(positives, s, 0.0), axis=1),
            _count(positives, s, axis=1),
            ops.sum(ops.where(negatives, s, 0.0), axis=1),
            _count(negatives, s, axis=1),
        )

    pos_sum, pos_count, neg_sum, neg_count = normalized_rows(sums, *inputs)
    num_pos, num_neg = ops.sum(pos_count), ops.sum(neg_count)
    pos_mean = ops.divide_no_nan(ops.sum(pos_sum), num_pos)
    neg_mean = ops.divide_no_nan(ops.sum(neg_sum), num_neg)

    # The second pass takes the thresholds as constants (a block of rows under `keras.remat`
    # gets no gradient through a captured tensor on every backend); their gradient is added
    # back through each row's slope: d/dc sum_p [c - s_ip]_+^2 = sum_p 2 [c - s_ip]_+.
    pos_threshold = (1.0 - pos_eps) * pos_mean
    neg_threshold = (1.0 + neg_eps) * neg_mean
    fixed_pos = ops.stop_gradient(pos_threshold)
    fixed_neg = ops.stop_gradient(neg_threshold)

    def rows(s, positives, negatives):
        pos_gap = ops.where(positives, ops.relu(fixed_pos - s), 0.0)
        neg_gap = ops.where(negatives, ops.relu(s - fixed_neg), 0.0)
        return (
            ops.sum(ops.square(pos_gap), axis=1),
            ops.sum(ops.square(neg_gap), axis=1),
            ops.stop_gradient(2.0 * ops.sum(pos_gap, axis=1)),
            ops.stop_gradient(2.0 * ops.sum(neg_gap, axis=1)),
        )

    pos_loss, neg_loss, pos_slope, neg_slope = normalized_rows(rows, *inputs)
    pos_loss = pos_loss + (pos_threshold - fixed_pos) * pos_slope
    neg_loss = neg_loss - (neg_threshold - fixed_neg) * neg_slope
    loss = per_anchor_share(pos_loss, num_pos) + per_anchor_share(neg_loss, num_neg)
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


# -------------------------------------------------------------------------- tuplet margin


@export
def tuplet_margin_loss(
    labels,
    embeddings,
    *,
    margin=5.73,
    scale=64.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Tuplet margin loss, per anchor (Yu & Tao, 2019).

    On cosine similarities $s_{ij} = \cos\theta_{ij}$ of the L2-normalised embeddings, with the
    margin m in degrees and the scale s, for every positive pair (a, p) (both orders), with the
    negatives $N_a$ of the anchor:

    $$\ell_{ap} = \log\Big(1 + \sum_{n \in N_a} e^{s(\cos\theta_{an} - \cos(\theta_{ap} - m))}
                  \Big)$$

    The batch loss is the mean over all positive pairs (0 in a batch without a positive or
    without a negative pair). The log-sum-exp over the negatives is computed once per anchor,
    and $\cos(\theta - m) = \cos\theta\cos m + \sin\theta \sin m$ with $\sin\theta$ from a
    clamped $1 - \cos^2\theta$, so the gradient stays finite at $\cos\theta = 1$ (where PML's
    `acos` has none). Same value and gradient as
    `pytorch_metric_learning.losses.TupletMarginLoss()` elsewhere. Paper: "Deep Metric
    Learning with Tuplet Margin Loss", ICCV 2019.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      margin: the angular margin m, in degrees (PML's unit), in [0, 90).
      scale: the scale s (> 0).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = tuplet_margin_loss(np.array([0, 0, 1, 1]), x, scale=8.0)
    >>> round(float(ops.mean(loss)), 4)
    0.4557
    """
    margin = math.radians(_TUPLET_MARGIN.checked(margin))
    scale = _TUPLET_SCALE.checked(scale)

    def rows(s, positives, negatives):
        sine = _safe_sqrt(1.0 - ops.square(s))
        shifted = s * math.cos(margin) + sine * math.sin(margin)
        negative_lse = ops.expand_dims(masked_logsumexp(scale * s, negatives), 1)
        active = ops.logical_and(positives, ops.any(negatives, axis=1, keepdims=True))
        per_pair = ops.where(active, ops.softplus(negative_lse - scale * shifted), 0.0)
        return (
            ops.sum(per_pair, axis=1),
            _count(positives, s, axis=1),
            *rows_with_pairs(positives, negatives),
        )

    total, num_positives, has_positive, has_negative = normalized_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    total = ops.where(any_pairs(has_positive, has_negative), total, 0.0)
    loss = per_anchor_share(total, ops.sum(num_positives))
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


# -------------------------------------------------------------------------------- angular


@export
def angular_loss(
    labels,
    embeddings,
    *,
    alpha=40.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Angular loss (N-pair form), per anchor (Wang et al., 2017).

    For every positive pair (a, p) (both orders) of L2-normalised embeddings $x_a, x_p$, over
    the negatives $n \in N_a$ of the anchor, with $t = \tan^2\alpha$:

    $$\ell_{ap} = \log\Big(1 + \sum_{n \in N_a}
        e^{4t\,(x_a + x_p)^\top y_n - 2(1 + t)\,x_a^\top x_p}\Big)$$

    The batch loss is the mean over the positive pairs (0 in a batch without a positive or
    without a negative pair). As in PML's code, $y_n$ is the negative's embedding as given, not
    normalised (the paper normalises every feature; on L2-normalised inputs the two agree).
    PML enumerates (positive pair x batch) entries; here the sum over the negatives of each
    pair is one product of two matrices, $\sum_n [n \in N_a] e^{4t x_a^\top y_n}
    e^{4t x_p^\top y_n}$, (B, R) by (R, R), with row maxima shifted out. Above 2^24 entries it
    runs in blocks (`deepmetric._blocks.map_rows`): blocks of b anchors, and inside each, blocks
    of b' positive rows that build only their (b', R) slice of the second matrix and their
    (b, b') part of the product; both levels are rematerialised, so the work stays B R^2 (the
    product) and the memory O(b R) instead of several (R, R) matrices. Same value and
    gradient as `pytorch_metric_learning.losses.AngularLoss()`. Paper: "Deep Metric Learning
    with Angular Loss", ICCV 2017, arXiv:1708.01682.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D).
      alpha: the angle $\alpha$ in degrees, in (0, 90).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch (positives and negatives are reference rows).
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(angular_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.847
    """
    alpha = _ANGULAR_ALPHA.checked(alpha)
    tan2 = math.tan(math.radians(alpha)) ** 2
    labels, embeddings, ref_labels, reference = loss_inputs(
        labels, embeddings, reference_embeddings, reference_labels
    )
    mask = check_reference_mask(reference_mask, embeddings, reference)
    same = reference is None
    raw = embeddings if same else reference
    ref_labels = labels if same else ref_labels
    query = distances_lib._l2_normalize(embeddings)
    ref = query if same else distances_lib._l2_normalize(reference)
    scale = 4.0 * tan2
    per_pair_mask = mask is not None and len(mask.shape) == 2
    rows = [query, labels] + ([mask] if per_pair_mask else [])
    shared = [ref, raw, ref_labels] + ([mask] if mask is not None and not per_pair_mask else [])

    def positive_rows(index, positive, negative, a_exp):
        # A block of rows of P[p, n] = 4t x_p.y_n (the reference rows as positives), its row
        # maxima shifted out; (b_p, b): the block's columns of the anchors' (b, R) product.
        p = scale * ops.matmul(positive, ops.transpose(negative))
        p_top = ops.stop_gradient(ops.max(p, axis=1, keepdims=True))
        total = ops.matmul(a_exp, ops.transpose(ops.exp(p - p_top)))
        return ops.transpose(total), ops.squeeze(p_top, axis=1)

    def block(index, anchors, anchor_labels, *rest):
        rest = list(rest)
        pair_mask = rest.pop(0) if per_pair_mask else None
        ref, raw, ref_labels = rest.pop(0), rest.pop(0), rest.pop(0)
        if mask is not None and not per_pair_mask:
            pair_mask = ops.expand_dims(rest.pop(0), 0)
        positives, negatives = mining.label_masks(
            anchor_labels, ref_labels, anchor_index=index if same else None
        )
        if pair_mask is not None:
            positives = ops.logical_and(positives, pair_mask)
            negatives = ops.logical_and(negatives, pair_mask)
        # A[a, n] = 4t x_a.y_n over the block's anchors a.
        a = scale * ops.matmul(anchors, ops.transpose(raw))
        a_top = ops.stop_gradient(ops.max(ops.where(negatives, a, -LARGE), axis=1, keepdims=True))
        a_top = ops.where(ops.any(negatives, axis=1, keepdims=True), a_top, 0.0)
        a_exp = ops.where(negatives, ops.exp(ops.where(negatives, a - a_top, -LARGE)), 0.0)
        # (b, R): anchor x positive, from blocks of the positive rows (no whole (R, R) matrix).
        total_t, p_top = _blocks.map_rows(positive_rows, [ref], [raw, a_exp])
        total = ops.transpose(total_t)
        nonzero = ops.greater(total, 0.0)
        log_total = ops.log(ops.where(nonzero, total, 1.0)) + a_top + ops.expand_dims(p_top, 0)
        s = ops.matmul(anchors, ops.transpose(ref))
        active = ops.logical_and(positives, nonzero)
        per_pair = ops.where(active, ops.softplus(log_total - 2.0 * (1.0 + tan2) * s), 0.0)
        has_positive, has_negative = rows_with_pairs(positives, negatives)
        return ops.sum(per_pair, 1), has_positive, has_negative, _count(positives, s, 1)

    per_row, has_positive, has_negative, num_positives = _blocks.map_rows(block, rows, shared)
    contributions = ops.where(any_pairs(has_positive, has_negative), per_row, 0.0)
    return nonfinite_to_nan(
        per_anchor_share(contributions, ops.sum(num_positives)), embeddings, reference
    )


# --------------------------------------------------------------------------------- margin


def _triplets_per_anchor(name, value):
    if value != "all":
        raise ValueError(
            f"`{name}` must be 'all' (every valid triplet; PML's random sampling of a number "
            f"of triplets per anchor is a miner's job). Received: {name}={value!r}"
        )
    return value


def _num_classes(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be None or a positive integer. Received: {name}={value!r}")
    return value


def margin_terms(d, positives, negatives, beta, margin):
    """Per anchor row: the sum of the margin loss over its triplets and their non-zero count.

    Over the triplets (a, p, n) the loss is $[d_{ap} - \\beta_a + m]_+ + [\\beta_a - d_{an} +
    m]_+$; each positive pair's term counts once per negative of the anchor and each negative
    pair's term once per positive, so the triplet sums are sums over pairs weighted by counts.
    `beta` is a scalar or a (b, 1) column.
    """
    num_pos = _count(positives, d, axis=1)
    num_neg = _count(negatives, d, axis=1)
    pos_loss = ops.where(positives, ops.relu(d - beta + margin), 0.0)
    neg_loss = ops.where(negatives, ops.relu(beta - d + margin), 0.0)
    total = num_neg * ops.sum(pos_loss, axis=1) + num_pos * ops.sum(neg_loss, axis=1)
    count = num_neg * count_positive(pos_loss, axis=1) + num_pos * count_positive(neg_loss, axis=1)
    return total, count, num_pos * num_neg


@export
def margin_loss(
    labels,
    embeddings,
    *,
    margin=0.2,
    nu=0.0,
    beta=1.2,
    triplets_per_anchor="all",
    learn_beta=False,
    num_classes=None,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Margin loss, per anchor (Wu et al., 2017).

    On Euclidean distances $d$ of the L2-normalised embeddings, over all valid triplets
    (a, p, n) of the batch, with the boundary $\beta$ and the margin m:

    $$L = \frac{\sum_{(a,p,n)} [d_{ap} - \beta + m]_+ + [\beta - d_{an} + m]_+}
               {\#\{[d_{ap} - \beta + m]_+ > 0\} + \#\{[\beta - d_{an} + m]_+ > 0\}}
          \;+\; \nu\beta\;[\text{learn\_beta}]$$

    the counts taken over the triplets (0 without any triplet). The sums over triplets are
    computed as sums over pairs weighted by how many triplets each pair is in, so memory is
    O(B R). `beta` may also be a (num_classes,) tensor of per-class boundaries $\beta_{y_a}$
    (then the regulariser is $\nu \sum_{(a,p,n)} \beta_{y_a}$ over the same divisor, and labels
    must be in [0, num_classes)): this is how `deepmetric.heads.MarginBeta` trains them. Same
    value and gradient as `pytorch_metric_learning.losses.MarginLoss()` (its
    `DivisorReducer`). Paper: "Sampling Matters in Deep Embedding Learning", ICCV 2017,
    arXiv:1706.07567.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      margin: the margin m (>= 0, on distances).
      nu: the weight $\nu$ of the regulariser of a learned $\beta$ (>= 0).
      beta: the boundary $\beta$ (a distance): a number (>= 0), a (num_classes,) tensor of
        per-class values, or a (1,) tensor (one learned value: then the regulariser is
        $\nu\beta$ itself); a non-finite tensor entry makes the loss NaN.
      triplets_per_anchor: only "all" (a miner selects fewer).
      learn_beta: add the regulariser $\nu\beta$ (PML adds it when $\beta$ is learned).
      num_classes: PML's keyword: with a number `beta`, per-class copies of it (the same
        value); kept for the configuration.
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative. Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(margin_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.4838
    """
    margin = _MARGIN_MARGIN.checked(margin)
    nu = _MARGIN_NU.checked(nu)
    _triplets_per_anchor("triplets_per_anchor", triplets_per_anchor)
    _num_classes("num_classes", num_classes)
    per_class = not isinstance(beta, (int, float))
    if not per_class:
        beta = _MARGIN_BETA.checked(beta)
        loss = _margin_scalar_beta(
            labels,
            embeddings,
            margin,
            nu if learn_beta else 0.0,
            beta,
            reference_embeddings,
            reference_labels,
            reference_mask,
        )
        return nonfinite_to_nan(loss, embeddings, reference_embeddings)
    labels, embeddings, ref_labels, reference = loss_inputs(
        labels, embeddings, reference_embeddings, reference_labels
    )
    mask = check_reference_mask(reference_mask, embeddings, reference)
    beta = ops.convert_to_tensor(beta)
    if len(beta.shape) != 1 or beta.shape[0] == 0:
        raise ValueError(
            "`beta` must be a number or a (num_classes,) tensor. Received: beta.shape="
            f"{tuple(beta.shape)}"
        )
    beta = ops.cast(beta, embeddings.dtype)
    single = beta.shape[0] == 1  # one learned beta for every class (PML without num_classes)
    index = ops.zeros_like(labels) if single else labels
    beta_column = ops.expand_dims(ops.take(beta, index), 1)
    query = distances_lib._l2_normalize(embeddings)
    ref = None if reference is None else distances_lib._l2_normalize(reference)
    positives, negatives = mining.label_masks(labels, ref_labels)
    if mask is not None:
        pair_mask = mask if len(mask.shape) == 2 else ops.expand_dims(mask, 0)
        positives = ops.logical_and(positives, pair_mask)
        negatives = ops.logical_and(negatives, pair_mask)
    d = _UnitEuclidean().matrix(query, ref)
    total, count, triplets = margin_terms(d, positives, negatives, beta_column, margin)
    if not learn_beta:
        loss = per_anchor_share(total, ops.sum(count))
    elif single:  # PML: nu * beta, added as it is ("already reduced") when there is a triplet
        any_triplet = ops.cast(ops.any(triplets > 0), total.dtype)
        loss = per_anchor_share(total, ops.sum(count)) + nu * beta[0] * any_triplet
    else:  # PML: nu * beta of each triplet's anchor, over the same divisor.
        loss = per_anchor_share(total + nu * triplets * beta_column[:, 0], ops.sum(count))
    # A learned beta is an input too: a non-finite one makes the loss NaN.
    return nonfinite_to_nan(loss, embeddings, reference, beta)


def _margin_scalar_beta(labels, x, margin, nu, beta, ref_x, ref_labels, ref_mask):
    def rows(d, positives, negatives):
        return margin_terms(d, positives, negatives, beta, margin)

    total, count, triplets = normalized_rows(
        rows, labels, x, ref_x, ref_labels, ref_mask, distance=_UnitEuclidean()
    )
    loss = per_anchor_share(total, ops.sum(count))
    if nu == 0.0:
        return loss
    any_triplet = ops.cast(ops.any(triplets > 0), loss.dtype)
    return loss + nu * beta * any_triplet


# ------------------------------------------------------------------------------- classes


@export
class NCALoss(MetricLoss):
    """Neighbourhood components analysis loss; see `nca_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.NCALoss(softmax_scale=1.0))
    ```
    """

    function = staticmethod(nca_loss)
    options = (_NCA_SCALE,)


@export
class SignalToNoiseRatioContrastiveLoss(MetricLoss):
    """Contrastive loss on the signal-to-noise-ratio distance; see
    `signal_to_noise_ratio_contrastive_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.SignalToNoiseRatioContrastiveLoss())
    ```
    """

    function = staticmethod(signal_to_noise_ratio_contrastive_loss)
    options = (_SNR_POS_MARGIN, _SNR_NEG_MARGIN)


@export
class GeneralizedLiftedStructureLoss(MetricLoss):
    """Generalized lifted structure loss; see `generalized_lifted_structure_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.GeneralizedLiftedStructureLoss())
    ```
    """

    function = staticmethod(generalized_lifted_structure_loss)
    options = (_LIFTED_NEG_MARGIN, _LIFTED_POS_MARGIN)


@export
class LiftedStructureLoss(MetricLoss):
    """pytorch-metric-learning's lifted structure loss; see `lifted_structure_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.LiftedStructureLoss(neg_margin=1.0))
    ```
    """

    function = staticmethod(lifted_structure_loss)
    takes_reference = False
    # A pair's term has the negatives' sum of its second example's row too.
    separable_rows = False
    options = (_LIFTED_NEG_MARGIN, _LIFTED_POS_MARGIN)


@export
class IntraPairVarianceLoss(MetricLoss):
    """Intra-pair variance loss; see `intra_pair_variance_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.IntraPairVarianceLoss())
    ```
    """

    function = staticmethod(intra_pair_variance_loss)
    # The thresholds are means over every pair of the batch, with a gradient.
    separable_rows = False
    options = (_POS_EPS, _NEG_EPS)


@export
class TupletMarginLoss(MetricLoss):
    """Tuplet margin loss (margin in degrees); see `tuplet_margin_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.TupletMarginLoss(scale=32.0))
    ```
    """

    function = staticmethod(tuplet_margin_loss)
    options = (_TUPLET_MARGIN, _TUPLET_SCALE)


@export
class AngularLoss(MetricLoss):
    """Angular loss (alpha in degrees); see `angular_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.AngularLoss(alpha=40.0))
    ```
    """

    function = staticmethod(angular_loss)
    options = (_ANGULAR_ALPHA,)


def _learn_beta(name, value):
    if value:
        raise ValueError(
            f"`{name}=True` needs trainable weights, which a Keras loss does not hold: use "
            "`deepmetric.heads.MarginBeta(num_classes=...)`, a layer that holds the learned "
            f"beta and adds this loss. Received: {name}={value!r}"
        )
    return False


@export
class MarginLoss(MetricLoss):
    """Margin loss with a fixed boundary beta; see `margin_loss`.

    A learned beta (PML's `learn_beta=True`) is a trainable weight: use the layer
    `deepmetric.heads.MarginBeta`, which holds it and adds this loss.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.MarginLoss(margin=0.2, beta=1.2))
    ```
    """

    function = staticmethod(margin_loss)
    options = (
        _MARGIN_MARGIN,
        _MARGIN_NU,
        _MARGIN_BETA,
        Option("triplets_per_anchor", "all", _triplets_per_anchor),
        Option("learn_beta", False, _learn_beta),
        Option("num_classes", None, _num_classes),
    )


# -------------------------------------------------------------- threshold-consistent margin


@export
def threshold_consistent_margin_loss(
    labels,
    embeddings,
    *,
    lambda_plus=1.0,
    lambda_minus=1.0,
    margin_plus=0.9,
    margin_minus=0.5,
):
    r"""Threshold-consistent margin (TCM) loss, per anchor (Zhang et al., 2023).

    On cosine similarities $s$ of the L2-normalised embeddings, over the ordered pairs, with
    $P' = \{(i, p): s_{ip} \le m_+\}$ and $N' = \{(i, n): s_{in} \ge m_-\}$:

    $$L = \lambda_+ \frac{\sum_{P'} (m_+ - s_{ip})}{|P'|}
        + \lambda_- \frac{\sum_{N'} (s_{in} - m_-)}{|N'|}$$

    (a term is 0 when its set is empty): a regulariser that pulls every positive pair above
    $m_+$ and pushes every negative pair below $m_-$, so that one threshold fits all classes.
    A batch without positive pairs keeps the negative term and a single-class batch the
    positive term. Same value and gradient as
    `pytorch_metric_learning.losses.ThresholdConsistentMarginLoss()` (which compares the batch
    with itself only: no reference set). Paper: "Threshold-Consistent Margin Loss for Open-World
    Deep Metric Learning", arXiv:2307.04047.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      lambda_plus: the weight $\lambda_+$ of the positive term (>= 0).
      lambda_minus: the weight $\lambda_-$ of the negative term (>= 0).
      margin_plus: the similarity $m_+$ every positive pair should exceed, in [-1, 1].
      margin_minus: the similarity $m_-$ every negative pair should stay below, in [-1, 1].

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(threshold_consistent_margin_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.5
    """
    lambda_plus = _TCM_LAMBDA_PLUS.checked(lambda_plus)
    lambda_minus = _TCM_LAMBDA_MINUS.checked(lambda_minus)
    margin_plus = _TCM_MARGIN_PLUS.checked(margin_plus)
    margin_minus = _TCM_MARGIN_MINUS.checked(margin_minus)

    def rows(s, positives, negatives):
        low = ops.logical_and(positives, ops.less_equal(s, margin_plus))
        high = ops.logical_and(negatives, ops.greater_equal(s, margin_minus))
        return (
            ops.sum(ops.where(low, margin_plus - s, 0.0), axis=1),
            _count(low, s, axis=1),
            ops.sum(ops.where(high, s - margin_minus, 0.0), axis=1),
            _count(high, s, axis=1),
        )

    pos_sum, pos_count, neg_sum, neg_count = normalized_rows(rows, labels, embeddings)
    loss = lambda_plus * per_anchor_share(pos_sum, ops.sum(pos_count)) + (
        lambda_minus * per_anchor_share(neg_sum, ops.sum(neg_count))
    )
    return nonfinite_to_nan(loss, embeddings)


@export
class ThresholdConsistentMarginLoss(MetricLoss):
    """Threshold-consistent margin loss; see `threshold_consistent_margin_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.ThresholdConsistentMarginLoss())
    ```
    """

    function = staticmethod(threshold_consistent_margin_loss)
    takes_reference = False
    options = (
        _TCM_LAMBDA_PLUS,
        _TCM_LAMBDA_MINUS,
        _TCM_MARGIN_PLUS,
        _TCM_MARGIN_MINUS,
    )
