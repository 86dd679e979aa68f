"""Modern batch losses on class labels: multi-similarity, circle, SupCon, NT-Xent, contrastive.

Each loss is a function `name_loss(labels, embeddings, *, ..., reference_embeddings=None,
reference_labels=None, reference_mask=None)` that returns one value per anchor (the row of
`embeddings`) and a thin `MetricLoss` class over it. The per-anchor values are scaled so that
their mean, Keras' default reduction, is the batch loss of pytorch-metric-learning 2.9 with its
default distance and reducer (see docs/losses.md). Everything is built from (B, R) matrices:
memory grows as B * R. An optional `reference_mask` removes reference rows (or single pairs) from
both the positives and the negatives.

Numerics: masks enter log-sum-exp as `where(mask, x, -large)` with a finite `large`, the row
maximum is a stopped-gradient shift, and empty rows are replaced before any `log(0)`, so no inf
or NaN reaches a gradient. A batch without any positive pair or without any negative pair gives 0
with zero gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keras import ops

from deepmetric import _blocks
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels
from deepmetric.losses._base import MetricLoss, per_anchor_share
from deepmetric.mining import any_pairs, rows_with_pairs

# Finite stand-in for -inf in masked reductions (exp(-_LARGE - x) is exactly 0 in float32).
_LARGE = 1e30
# Squared Euclidean distances of unit vectors below this are rounding noise of
# |x|^2 + |y|^2 - 2 x.y in float32 (about 1e-7 per term): they are taken as 0.
_SQUARED_DISTANCE_FLOOR = 1e-6


def check_number(name, value, *, positive=False):
    """`value` as a float, or a TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value!r}")
    if positive and value <= 0.0:
        raise ValueError(f"`{name}` must be positive. Received: {name}={value!r}")
    return value


def loss_inputs(labels, embeddings, reference_embeddings=None, reference_labels=None):
    """Checked (labels, embeddings, reference_labels, reference_embeddings).

    The references are None when not given (the batch is compared with itself
    and each example with itself is excluded). Embeddings are float32 (float64
    stays float64); labels stay integers.
    """
    embeddings = check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels")
    if (reference_embeddings is None) != (reference_labels is None):
        raise ValueError(
            "`reference_embeddings` and `reference_labels` must be given together. Received: "
            f"reference_embeddings={'None' if reference_embeddings is None else 'a tensor'}, "
            f"reference_labels={'None' if reference_labels is None else 'a tensor'}"
        )
    if reference_embeddings is None:
        return labels, embeddings, None, None
    reference = check_embeddings(reference_embeddings, "reference_embeddings")
    dim, ref_dim = embeddings.shape[1], reference.shape[1]
    if dim is not None and ref_dim is not None and dim != ref_dim:
        raise ValueError(
            "`reference_embeddings` must have the embedding size of `embeddings`. Received: "
            f"embeddings.shape={tuple(embeddings.shape)}, "
            f"reference_embeddings.shape={tuple(reference.shape)}"
        )
    if reference.dtype != embeddings.dtype:
        reference = ops.cast(reference, embeddings.dtype)
    reference_labels = check_labels(reference_labels, reference.shape[0], "reference_labels")
    return labels, embeddings, reference_labels, reference


def check_reference_mask(reference_mask, embeddings, reference):
    """`reference_mask` as a bool tensor of shape (R,) or (B, R), or None.

    A ValueError when it is given without a reference set or has another shape.
    """
    if reference_mask is None:
        return None
    if reference is None:
        raise ValueError(
            "`reference_mask` needs `reference_embeddings` and `reference_labels`. Received: "
            "reference_mask without a reference set"
        )
    mask = ops.convert_to_tensor(reference_mask)
    if mask.dtype != "bool":
        mask = ops.cast(mask, "bool")
    expected = {1: (reference.shape[0],), 2: (embeddings.shape[0], reference.shape[0])}
    shape = tuple(mask.shape)
    wanted = expected.get(len(shape))
    if wanted is None or any(
        w is not None and m is not None and w != m for w, m in zip(wanted, shape, strict=True)
    ):
        raise ValueError(
            "`reference_mask` must have shape (R,) or (B, R) for B embeddings and R references. "
            f"Received: reference_mask.shape={shape}, embeddings.shape="
            f"{tuple(embeddings.shape)}, reference_embeddings.shape={tuple(reference.shape)}"
        )
    return mask


def masked_logsumexp(x, mask, add_one=False):
    """Row-wise `log(sum_{j in mask} exp(x_ij))` of a (B, R) matrix, shape (B,).

    With `add_one`, a term exp(0) joins each row: `log(1 + sum exp(x_ij))`. Rows with an
    empty mask give 0 (pytorch-metric-learning's `logsumexp`). Masked entries enter as a finite
    `-large`, and the shift by the row maximum has no gradient, so gradients stay finite.
    """
    masked = ops.where(mask, x, -_LARGE)
    top = ops.stop_gradient(ops.max(masked, axis=1, keepdims=True))
    if add_one:
        top = ops.maximum(top, 0.0)
    total = ops.sum(ops.where(mask, ops.exp(masked - top), 0.0), axis=1)
    top = ops.squeeze(top, axis=1)
    nonempty = ops.any(mask, axis=1)
    if add_one:
        return top + ops.log(total + ops.exp(-top))
    return ops.where(nonempty, top + ops.log(ops.where(nonempty, total, 1.0)), 0.0)


def _cosine_rows(query, reference):
    """Cosine similarities of already L2-normalised rows."""
    return ops.matmul(query, ops.transpose(reference))


def _euclidean_rows(query, reference):
    """Euclidean distances of L2-normalised rows; squared values below the noise floor are 0."""
    squared = distances_lib._squared_euclidean(query, reference)
    squared = ops.where(ops.greater(squared, _SQUARED_DISTANCE_FLOOR), squared, 0.0)
    return distances_lib._safe_sqrt(squared)


def anchor_rows(
    row_terms,
    labels,
    embeddings,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
    *,
    matrix=_cosine_rows,
):
    """The preamble every loss here shares, then `row_terms` per anchor, block by block.

    Checks the inputs and the reference set, L2-normalises the embeddings, and calls
    `row_terms(m, positives, negatives)` on (b, R) blocks of the matrix `matrix(query,
    reference)` (cosine similarities by default) with their label masks (`reference_mask`
    applied; an example with itself in neither when there is no reference set). `row_terms`
    returns a tuple of per-row float tensors; they come back for all B anchors. See
    `deepmetric._blocks` for when the batch is split.
    """
    labels, embeddings, ref_labels, reference = loss_inputs(
        labels, embeddings, reference_embeddings, reference_labels
    )
    mask = check_reference_mask(reference_mask, embeddings, reference)
    query = distances_lib._l2_normalize(embeddings)
    if reference is not None:
        reference = distances_lib._l2_normalize(reference)
    return _blocks.anchor_rows(
        row_terms, lambda q, r, _: matrix(q, r), labels, query, ref_labels, reference, mask
    )


def _count_positive(values, axis=None):
    positive = ops.greater(ops.stop_gradient(values), 0.0)
    return ops.sum(ops.cast(positive, values.dtype), axis=axis)


def multi_similarity_loss(
    labels,
    embeddings,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Multi-similarity loss, per anchor (Wang et al., 2019).

    On cosine similarities $s_{ij}$ of the L2-normalised embeddings, for anchor $i$ with
    positives $P_i$ and negatives $N_i$:

    $$\ell_i = \frac{1}{\alpha}\log\Big(1 + \sum_{p \in P_i} e^{-\alpha (s_{ip} - \lambda)}\Big)
             + \frac{1}{\beta}\log\Big(1 + \sum_{n \in N_i} e^{\beta (s_{in} - \lambda)}\Big)$$

    with $\lambda$ = `base`; the batch loss is the mean over anchors. Same value and gradient as
    `pytorch_metric_learning.losses.MultiSimilarityLoss()` (no miner), except that a batch
    without any positive pair or any negative pair gives 0. Paper: "Multi-Similarity Loss with
    General Pair Weighting for Deep Metric Learning", CVPR 2019, arXiv:1904.06627.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      alpha: weight of the positive pairs (> 0).
      beta: weight of the negative pairs (> 0).
      base: the similarity margin $\lambda$.
      reference_embeddings, reference_labels: compare each anchor with this set (R, D) / (R,)
        instead of the rest of the batch; no pair is excluded then.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor losses; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = multi_similarity_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.4089
    """
    alpha = check_number("alpha", alpha, positive=True)
    beta = check_number("beta", beta, positive=True)
    base = check_number("base", base)

    def rows(s, positives, negatives):
        pos_term = masked_logsumexp(alpha * (base - s), positives, add_one=True) / alpha
        neg_term = masked_logsumexp(beta * (s - base), negatives, add_one=True) / beta
        return (pos_term + neg_term, *rows_with_pairs(positives, negatives))

    loss, has_positive, has_negative = anchor_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    return ops.where(any_pairs(has_positive, has_negative), loss, 0.0)


def circle_loss(
    labels,
    embeddings,
    *,
    margin=0.4,
    gamma=80.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Circle loss for class labels, per anchor (Sun et al., 2020).

    On cosine similarities of the L2-normalised embeddings, with $O_p = 1 + m$, $O_n = -m$,
    $\Delta_p = 1 - m$, $\Delta_n = m$ and the weights $\alpha$ treated as constants
    (no gradient), for anchor $i$:

    $$\ell_i = \operatorname{softplus}\Big(
        \log\sum_{p} e^{-\gamma [O_p - s_{ip}]_+ (s_{ip} - \Delta_p)}
      + \log\sum_{n} e^{\gamma [s_{in} - O_n]_+ (s_{in} - \Delta_n)}\Big)$$

    and 0 for an anchor without positive or without negative; the batch loss is the mean over
    the anchors whose loss is non-zero. Same value and gradient as
    `pytorch_metric_learning.losses.CircleLoss()` (AvgNonZeroReducer); same value as
    `keras.losses.Circle()` on L2-normalised embeddings (Keras does not stop the gradient
    through the weights, so its gradient differs). Paper: "Circle Loss: A Unified Perspective
    of Pair Similarity Optimization", CVPR 2020, arXiv:2002.10857.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      margin: the relaxation m.
      gamma: the scale (> 0).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = circle_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    16.9733
    """
    margin = check_number("margin", margin)
    gamma = check_number("gamma", gamma, positive=True)

    def rows(s, positives, negatives):
        fixed = ops.stop_gradient(s)
        pos_logits = -gamma * ops.relu(1.0 + margin - fixed) * (s - (1.0 - margin))
        neg_logits = gamma * ops.relu(fixed + margin) * (s - margin)
        loss = ops.softplus(
            masked_logsumexp(pos_logits, positives) + masked_logsumexp(neg_logits, negatives)
        )
        valid = ops.logical_and(ops.any(positives, axis=1), ops.any(negatives, axis=1))
        return (ops.where(valid, loss, 0.0),)

    (loss,) = anchor_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    return per_anchor_share(loss, _count_positive(loss))


def sup_con_loss(
    labels,
    embeddings,
    *,
    temperature=0.1,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Supervised contrastive loss, per anchor (Khosla et al., 2020).

    On cosine similarities of the L2-normalised embeddings, with temperature $\tau$, for
    anchor $i$ with positives $P_i$ and all other examples $A_i$:

    $$\ell_i = -\frac{1}{|P_i|}\sum_{p \in P_i}
        \log\frac{e^{s_{ip}/\tau}}{\sum_{a \in A_i} e^{s_{ia}/\tau}}$$

    (0 without positives); the batch loss is the mean over the anchors whose loss is non-zero
    (the "L_out" form). Same value and gradient as `pytorch_metric_learning.losses.SupConLoss()`.
    Paper: "Supervised Contrastive Learning", NeurIPS 2020, arXiv:2004.11362.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      temperature: the temperature $\tau$ (> 0).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = sup_con_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.7083
    """
    temperature = check_number("temperature", temperature, positive=True)

    def rows(s, positives, negatives):
        logits = s / temperature
        log_prob = logits - ops.expand_dims(
            masked_logsumexp(logits, ops.logical_or(positives, negatives)), 1
        )
        num_positives = ops.sum(ops.cast(positives, logits.dtype), axis=1)
        loss = -ops.divide_no_nan(
            ops.sum(ops.where(positives, log_prob, 0.0), axis=1), num_positives
        )
        return (loss, *rows_with_pairs(positives, negatives))

    loss, has_positive, has_negative = anchor_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    loss = ops.where(any_pairs(has_positive, has_negative), loss, 0.0)
    return per_anchor_share(loss, _count_positive(loss))


def nt_xent_loss(
    labels,
    embeddings,
    *,
    temperature=0.07,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""NT-Xent (normalised temperature-scaled cross entropy) loss, per anchor.

    On cosine similarities of the L2-normalised embeddings, for every positive pair (a, p)
    (both orders), with negatives $N_a$ of the anchor:

    $$\ell_{ap} = -\log\frac{e^{s_{ap}/\tau}}{e^{s_{ap}/\tau} + \sum_{n \in N_a} e^{s_{an}/\tau}}
               = \operatorname{softplus}\Big(\log\sum_{n \in N_a} e^{s_{an}/\tau}
                 - s_{ap}/\tau\Big)$$

    The batch loss is the mean over all positive pairs. The log-sum-exp over the negatives is
    computed once per anchor, so memory is O(B^2), where pytorch-metric-learning builds a
    (positive pairs x negative pairs) matrix. Same value and gradient as
    `pytorch_metric_learning.losses.NTXentLoss()`. Papers: SimCLR, "A Simple Framework for
    Contrastive Learning of Visual Representations", ICML 2020, arXiv:2002.05709; Sohn, "Improved
    Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016.

    Args:
      labels: integer class labels, shape (B,) or (B, 1); for SimCLR, the index of the image
        both augmented views come from.
      embeddings: float embeddings, shape (B, D); normalised inside.
      temperature: the temperature $\tau$ (> 0).
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = nt_xent_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.9019
    """
    temperature = check_number("temperature", temperature, positive=True)

    def rows(s, positives, negatives):
        logits = s / temperature
        negative_lse = ops.expand_dims(masked_logsumexp(logits, negatives), 1)
        active = ops.logical_and(positives, ops.any(negatives, axis=1, keepdims=True))
        per_pair = ops.where(active, ops.softplus(negative_lse - logits), 0.0)
        num_positives = ops.sum(ops.cast(positives, logits.dtype), axis=1)
        return (ops.sum(per_pair, axis=1), num_positives, *rows_with_pairs(positives, negatives))

    contributions, num_positives, has_positive, has_negative = anchor_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    contributions = ops.where(any_pairs(has_positive, has_negative), contributions, 0.0)
    return per_anchor_share(contributions, ops.sum(num_positives))


def online_contrastive_loss(
    labels,
    embeddings,
    *,
    pos_margin=0.0,
    neg_margin=1.0,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Contrastive loss over all pairs of the batch, per anchor (Hadsell et al., 2006).

    On Euclidean distances $d_{ij}$ of the L2-normalised embeddings, over the ordered pairs
    ((i, j) and (j, i) both count):

    $$L = \operatorname{mean}_{\ell^+ > 0}\,[d_{ip} - m_+]_+
        + \operatorname{mean}_{\ell^- > 0}\,[m_- - d_{in}]_+$$

    each mean taken over the pairs whose loss is non-zero (0 if there is none). The hinge is not
    squared (unlike the TFA-compatible `contrastive_loss`, which takes precomputed pair
    distances). Same value and gradient as `pytorch_metric_learning.losses.ContrastiveLoss()`
    except that a batch without any positive pair or any negative pair gives 0, and that squared
    distances below 1e-6 (float32 rounding noise for unit vectors) count as 0. Paper:
    "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      pos_margin: positive pairs closer than this are not penalised.
      neg_margin: negative pairs farther than this are not penalised.
      reference_embeddings, reference_labels: compare each anchor with this set instead of
        the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = online_contrastive_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    1.131
    """
    pos_margin = check_number("pos_margin", pos_margin)
    neg_margin = check_number("neg_margin", neg_margin)

    def rows(d, positives, negatives):
        pos_loss = ops.where(positives, ops.relu(d - pos_margin), 0.0)
        neg_loss = ops.where(negatives, ops.relu(neg_margin - d), 0.0)
        return (
            ops.sum(pos_loss, axis=1),
            _count_positive(pos_loss, axis=1),
            ops.sum(neg_loss, axis=1),
            _count_positive(neg_loss, axis=1),
            *rows_with_pairs(positives, negatives),
        )

    pos_sum, pos_count, neg_sum, neg_count, has_positive, has_negative = anchor_rows(
        rows,
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        matrix=_euclidean_rows,
    )
    per_anchor = per_anchor_share(pos_sum, ops.sum(pos_count)) + per_anchor_share(
        neg_sum, ops.sum(neg_count)
    )
    return ops.where(any_pairs(has_positive, has_negative), per_anchor, 0.0)


class _ModernLoss(MetricLoss):
    """A `MetricLoss` that passes its float options to a per-anchor loss function.

    `_options` maps each option to whether it must be positive.
    """

    _fn: Callable[..., Any]
    _options: dict[str, bool] = {}

    def __init__(self, name=None, **kwargs):
        options = {key: kwargs.pop(key) for key in self._options}
        super().__init__(name=name, **kwargs)
        for key, positive in self._options.items():
            setattr(self, key, check_number(key, options[key], positive=positive))

    def call(self, labels, embeddings):
        options = {key: getattr(self, key) for key in self._options}
        return type(self)._fn(labels, embeddings, **options)

    def call_with_reference(
        self, labels, embeddings, reference_embeddings, reference_labels, reference_mask=None
    ):
        """Per-anchor losses of `embeddings` against a reference set (not reduced).

        The hook `deepmetric.xbm.CrossBatchMemory` calls: a loss that has it accepts a
        reference set and a `reference_mask`.
        """
        options = {key: getattr(self, key) for key in self._options}
        return type(self)._fn(
            labels,
            embeddings,
            reference_embeddings=reference_embeddings,
            reference_labels=reference_labels,
            reference_mask=reference_mask,
            **options,
        )

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in self._options})
        return config


@export
class MultiSimilarityLoss(_ModernLoss):
    """Multi-similarity loss; see `multi_similarity_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.MultiSimilarityLoss())
    ```
    """

    _fn = staticmethod(multi_similarity_loss)
    _options = {"alpha": True, "beta": True, "base": False}

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, name="multi_similarity_loss", **kwargs):
        super().__init__(name=name, alpha=alpha, beta=beta, base=base, **kwargs)


@export
class CircleLoss(_ModernLoss):
    """Circle loss for class labels; see `circle_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.CircleLoss(margin=0.25, gamma=256))
    ```
    """

    _fn = staticmethod(circle_loss)
    _options = {"margin": False, "gamma": True}

    def __init__(self, margin=0.4, gamma=80.0, name="circle_loss", **kwargs):
        super().__init__(name=name, margin=margin, gamma=gamma, **kwargs)


@export
class SupConLoss(_ModernLoss):
    """Supervised contrastive loss; see `sup_con_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.SupConLoss(temperature=0.1))
    ```
    """

    _fn = staticmethod(sup_con_loss)
    _options = {"temperature": True}

    def __init__(self, temperature=0.1, name="sup_con_loss", **kwargs):
        super().__init__(name=name, temperature=temperature, **kwargs)


@export
class NTXentLoss(_ModernLoss):
    """NT-Xent loss; see `nt_xent_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.NTXentLoss(temperature=0.07))
    ```
    """

    _fn = staticmethod(nt_xent_loss)
    _options = {"temperature": True}

    def __init__(self, temperature=0.07, name="nt_xent_loss", **kwargs):
        super().__init__(name=name, temperature=temperature, **kwargs)


@export
class OnlineContrastiveLoss(_ModernLoss):
    """Contrastive loss over all pairs of the batch; see `online_contrastive_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.OnlineContrastiveLoss())
    ```
    """

    _fn = staticmethod(online_contrastive_loss)
    _options = {"pos_margin": False, "neg_margin": False}

    def __init__(self, pos_margin=0.0, neg_margin=1.0, name="online_contrastive_loss", **kwargs):
        super().__init__(name=name, pos_margin=pos_margin, neg_margin=neg_margin, **kwargs)
