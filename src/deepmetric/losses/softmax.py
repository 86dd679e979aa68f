"""Losses on the cosine similarities of a batch: multi-similarity, circle, SupCon, NT-Xent.

Each loss weighs the pairs of an anchor through a (masked) log-sum-exp or soft-max over its
row of cosine similarities. Each is a function `name_loss(labels, embeddings, *, ...,
reference_embeddings=None, reference_labels=None, reference_mask=None)` that returns one value
per anchor (the row of `embeddings`) and a thin `MetricLoss` class over it. The per-anchor values
are scaled so that their mean, Keras' default reduction, is the batch loss of
pytorch-metric-learning 2.9 with its default distance and reducer (see docs/losses.md).
Everything is built from (B, R) matrices: memory grows as B * R. An optional `reference_mask`
removes reference rows (or single pairs) from both the positives and the negatives.

Numerics: masks enter log-sum-exp as `where(mask, x, -large)` with a finite `large`, the row
maximum is a stopped-gradient shift, and empty rows are replaced before any `log(0)`, so no inf
or NaN reaches a gradient. Circle, SupCon and NT-Xent give 0 with zero gradients in a batch
without any positive pair or without any negative pair (they have no term there); the
multi-similarity loss keeps the terms it has.
"""

from __future__ import annotations

from keras import ops

from deepmetric import _blocks
from deepmetric import distances as distances_lib
from deepmetric import miners as miners_lib
from deepmetric._api import export
from deepmetric.losses.base import (
    POSITIVE,
    Bounds,
    MetricLoss,
    check_reference_mask,
    count_positive,
    distance_option,
    loss_inputs,
    masked_logsumexp,
    miner_option,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)
from deepmetric.mining import any_pairs, rows_with_pairs

# The options and their ranges: scales and temperatures > 0; the multi-similarity threshold
# is a cosine similarity, in [-1, 1]; the circle relaxation m shifts cosine similarities
# (optima 1 + m and -m, decision margins 1 - m and m), in [-1, 1].
_ALPHA = number_option("alpha", 2.0, POSITIVE)
_BETA = number_option("beta", 50.0, POSITIVE)
_BASE = number_option("base", 0.5, Bounds(-1.0, 1.0))
_CIRCLE_MARGIN = number_option("margin", 0.4, Bounds(-1.0, 1.0))
_GAMMA = number_option("gamma", 80.0, POSITIVE)
_SUP_CON_TEMPERATURE = number_option("temperature", 0.1, POSITIVE)
_NT_XENT_TEMPERATURE = number_option("temperature", 0.07, POSITIVE)

# Cosine similarity of rows that are L2-normalised before the blocks are built.
_INNER_PRODUCT = distances_lib.DotProductSimilarity()


def normalized_rows(
    row_terms,
    labels,
    embeddings,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
    *,
    distance=_INNER_PRODUCT,
    miner=None,
    pass_mined=False,
    normalize=True,
):
    """The preamble of the losses on L2-normalised embeddings, then the row driver.

    Checks the inputs and the reference set, L2-normalises the embeddings, and runs
    `_blocks.anchor_rows` with `distance` on the normalised rows (their inner product, the
    cosine similarity, by default); with `normalize=False` on the rows as given (a loss with a
    `distance=` of its own, which normalises or not).

    With a `miner` (`deepmetric.miners`), the positive and negative masks are the pairs it
    keeps (mined on the embeddings as given), `row_terms` gets the `Mined` as `mined` when
    `pass_mined`, and, as in pytorch-metric-learning's pair losses, every output is 0 when the
    miner keeps at most one positive and at most one negative pair (counted with repetition).
    """
    miner = miners_lib.get(miner)
    labels, embeddings, ref_labels, reference = loss_inputs(
        labels, embeddings, reference_embeddings, reference_labels
    )
    mask = check_reference_mask(reference_mask, embeddings, reference)
    raw = (embeddings, reference)
    query = distances_lib._l2_normalize(embeddings) if normalize else embeddings
    if reference is not None and normalize:
        reference = distances_lib._l2_normalize(reference)
    if miner is None:
        return _blocks.anchor_rows(row_terms, distance, labels, query, ref_labels, reference, mask)

    def mined_rows(m, positives, negatives, mined):
        terms = row_terms(m, positives, negatives, **({"mined": mined} if pass_mined else {}))
        pos_counts, neg_counts = mined.pair_counts()
        return (*terms, ops.sum(pos_counts, axis=1), ops.sum(neg_counts, axis=1))

    *terms, num_pos, num_neg = _blocks.anchor_rows(
        mined_rows,
        distance,
        labels,
        query,
        ref_labels,
        reference,
        mask,
        miner=miner,
        miner_inputs=raw,
    )
    enough = ops.logical_or(ops.greater(ops.sum(num_pos), 1.0), ops.greater(ops.sum(num_neg), 1.0))
    return tuple(ops.where(enough, t, ops.zeros_like(t)) for t in terms)


def _margin(distance):
    """PML's `distance.margin(x, y)`: how far x is inside y (`y - x` for a similarity)."""
    if distance.larger_is_closer:
        return lambda x, y: y - x
    return lambda x, y: x - y


@export
def multi_similarity_loss(
    labels,
    embeddings,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    distance="cosine",
    miner=None,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Multi-similarity loss, per anchor (Wang et al., 2019).

    On cosine similarities $s_{ij}$ of the L2-normalised embeddings, for anchor $i$ with
    positives $P_i$ and negatives $N_i$:

    $$\ell_i = \frac{1}{\alpha}\log\Big(1 + \sum_{p \in P_i} e^{-\alpha (s_{ip} - \lambda)}\Big)
             + \frac{1}{\beta}\log\Big(1 + \sum_{n \in N_i} e^{\beta (s_{in} - \lambda)}\Big)$$

    with $\lambda$ = `base` (an empty sum gives a term 0); the batch loss is the mean over
    anchors. A batch without positive pairs keeps the negative-pair terms and a single-class
    batch the positive-pair terms; only a batch without any pair gives 0. Same value and
    gradient as `pytorch_metric_learning.losses.MultiSimilarityLoss()` (no miner). Paper:
    "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", CVPR 2019,
    arXiv:1904.06627.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      alpha: weight of the positive pairs (> 0).
      beta: weight of the negative pairs (> 0).
      base: the similarity margin $\lambda$, a cosine similarity in [-1, 1].
      distance: a `deepmetric.distances` name or `Distance` (default: the cosine similarity);
        with a distance (smaller is closer) the signs turn around, as in PML:
        $e^{\alpha (d_{ip} - \lambda)}$ and $e^{-\beta (d_{in} - \lambda)}$.
      miner: None, or a `deepmetric.miners` miner whose kept pairs replace all pairs (PML's
        recommended pairing is `MultiSimilarityMiner()`); the loss then equals PML's
        `MultiSimilarityLoss()(embeddings, labels, miner(embeddings, labels))`.
      reference_embeddings, reference_labels: compare each anchor with this set (R, D) / (R,)
        instead of the rest of the batch; no pair is excluded then.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair;
        a pair whose entry is False is neither positive nor negative (for example the
        unfilled slots of a `CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor losses; their mean is the batch loss. All NaN if an embedding or a
      reference embedding is not finite.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = multi_similarity_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.4089
    """
    alpha, beta, base = _ALPHA.checked(alpha), _BETA.checked(beta), _BASE.checked(base)
    distance = distances_lib.get(distance, "distance")
    cosine = distance == distances_lib.CosineSimilarity()
    margin = _margin(distance)

    def rows(s, positives, negatives):
        pos_term = masked_logsumexp(alpha * margin(s, base), positives, add_one=True) / alpha
        neg_term = masked_logsumexp(beta * margin(base, s), negatives, add_one=True) / beta
        return (pos_term + neg_term,)

    (loss,) = normalized_rows(
        rows,
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        distance=_INNER_PRODUCT if cosine else distance,
        normalize=cosine,
        miner=miner,
    )
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


@export
def circle_loss(
    labels,
    embeddings,
    *,
    margin=0.4,
    gamma=80.0,
    miner=None,
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
      margin: the relaxation m, in [-1, 1] (the paper uses 0.25; below 0.5 the decision
        margins keep 1 - m > m).
      gamma: the scale (> 0).
      miner: None, or a `deepmetric.miners` miner whose kept pairs replace all pairs.
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
    >>> loss = circle_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    16.9733
    """
    margin, gamma = _CIRCLE_MARGIN.checked(margin), _GAMMA.checked(gamma)

    def rows(s, positives, negatives):
        fixed = ops.stop_gradient(s)
        pos_logits = -gamma * ops.relu(1.0 + margin - fixed) * (s - (1.0 - margin))
        neg_logits = gamma * ops.relu(fixed + margin) * (s - margin)
        loss = ops.softplus(
            masked_logsumexp(pos_logits, positives) + masked_logsumexp(neg_logits, negatives)
        )
        valid = ops.logical_and(ops.any(positives, axis=1), ops.any(negatives, axis=1))
        return (ops.where(valid, loss, 0.0),)

    (loss,) = normalized_rows(
        rows,
        labels,
        embeddings,
        reference_embeddings,
        reference_labels,
        reference_mask,
        miner=miner,
    )
    loss = per_anchor_share(loss, count_positive(loss))
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


@export
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
      (B,) per-anchor shares; their mean is the batch loss. All NaN if an embedding or a
      reference embedding is not finite.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = sup_con_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.7083
    """
    temperature = _SUP_CON_TEMPERATURE.checked(temperature)

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

    loss, has_positive, has_negative = normalized_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    loss = ops.where(any_pairs(has_positive, has_negative), loss, 0.0)
    loss = per_anchor_share(loss, count_positive(loss))
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


@export
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
      (B,) per-anchor shares; their mean is the batch loss. All NaN if an embedding or a
      reference embedding is not finite.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    >>> loss = nt_xent_loss(np.array([0, 0, 1, 1]), x)
    >>> round(float(ops.mean(loss)), 4)
    0.9019
    """
    temperature = _NT_XENT_TEMPERATURE.checked(temperature)

    def rows(s, positives, negatives):
        logits = s / temperature
        negative_lse = ops.expand_dims(masked_logsumexp(logits, negatives), 1)
        active = ops.logical_and(positives, ops.any(negatives, axis=1, keepdims=True))
        per_pair = ops.where(active, ops.softplus(negative_lse - logits), 0.0)
        num_positives = ops.sum(ops.cast(positives, logits.dtype), axis=1)
        return (ops.sum(per_pair, axis=1), num_positives, *rows_with_pairs(positives, negatives))

    contributions, num_positives, has_positive, has_negative = normalized_rows(
        rows, labels, embeddings, reference_embeddings, reference_labels, reference_mask
    )
    contributions = ops.where(any_pairs(has_positive, has_negative), contributions, 0.0)
    loss = per_anchor_share(contributions, ops.sum(num_positives))
    return nonfinite_to_nan(loss, embeddings, reference_embeddings)


@export
class MultiSimilarityLoss(MetricLoss):
    """Multi-similarity loss; see `multi_similarity_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.MultiSimilarityLoss())
    ```
    """

    function = staticmethod(multi_similarity_loss)
    options = (
        _ALPHA,
        _BETA,
        _BASE,
        distance_option("distance", "cosine"),
        miner_option(),
    )


@export
class CircleLoss(MetricLoss):
    """Circle loss for class labels; see `circle_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.CircleLoss(margin=0.25, gamma=256))
    ```
    """

    function = staticmethod(circle_loss)
    options = (_CIRCLE_MARGIN, _GAMMA, miner_option())


@export
class SupConLoss(MetricLoss):
    """Supervised contrastive loss; see `sup_con_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.SupConLoss(temperature=0.1))
    ```
    """

    function = staticmethod(sup_con_loss)
    options = (_SUP_CON_TEMPERATURE,)


@export
class NTXentLoss(MetricLoss):
    """NT-Xent loss; see `nt_xent_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.NTXentLoss(temperature=0.07))
    ```
    """

    function = staticmethod(nt_xent_loss)
    options = (_NT_XENT_TEMPERATURE,)
