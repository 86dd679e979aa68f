"""Ranking losses of pytorch-metric-learning that count over triplets: PNP.

`PNPLoss` (Li et al. 2022) penalises, for each anchor and each of its positives, the (smoothed)
number of negatives ranked before that positive. A function `name_loss(labels, embeddings, *,
...)` returns one value per anchor whose mean (Keras' default reduction) is the batch loss of
pytorch-metric-learning (PML) 2.9, and a thin `MetricLoss` class has PML's class name, keywords
and defaults.

Memory. PML builds the (B, B, B) tensor of similarity differences. Only the ranks of an
anchor's positives enter the loss, so here they are computed one positive of every row at a
time (the k-th at step k, the gradient written out: `deepmetric.mining.member_rank_terms`),
over blocks of anchor rows (`deepmetric._blocks.map_rows`, recomputed in the backward pass
under `keras.remat`): memory grows as B^2, the work as B^2 K for classes of K examples (PML's
is B^3). A batch size unknown while tracing runs as one block.
"""

from __future__ import annotations

from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric.losses.base import (
    POSITIVE,
    MetricLoss,
    Option,
    check_choice,
    loss_inputs,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)

PNP_VARIANTS = ("Ds", "Dq", "Iu", "Ib", "O")

# The option table, shared by the function and the class: b and alpha are the exponents /
# scales of the variants (> 0), anneal is the sigmoid's temperature (> 0).
_PNP_B = number_option("b", 2.0, POSITIVE)
_PNP_ALPHA = number_option("alpha", 1.0, POSITIVE)
_PNP_ANNEAL = number_option("anneal", 0.01, POSITIVE)
_PNP_VARIANT = Option("variant", "O", lambda key, value: check_choice(key, value, PNP_VARIANTS))


def _pnp_rank_transform(rank, variant, b, alpha):
    """The variant's function of the smoothed number r of negatives before a positive."""
    if variant == "Ds":
        return ops.log(1.0 + rank)
    if variant == "Dq":
        return 1.0 / ops.power(1.0 + rank, alpha)
    if variant == "Iu":
        return (1.0 + rank) * ops.log(1.0 + rank)
    if variant == "Ib":
        return (b * rank - ops.log(1.0 + b * rank)) / b**2
    return rank


def _pnp_rank_slope(rank, variant, b, alpha):
    """The derivative of `_pnp_rank_transform` with respect to the rank."""
    if variant == "Ds":
        return 1.0 / (1.0 + rank)
    if variant == "Dq":
        return -alpha * ops.power(1.0 + rank, -alpha - 1.0)
    if variant == "Iu":
        return ops.log(1.0 + rank) + 1.0
    if variant == "Ib":
        return rank / (1.0 + b * rank)
    return ops.ones_like(rank)


@export
def pnp_loss(labels, embeddings, *, b=2.0, alpha=1.0, anneal=0.01, variant="O"):
    r"""PNP loss, per anchor (Li et al., 2022): penalise only the negatives ranked before a
    positive.

    On the cosine similarities $s$ of the L2-normalised embeddings, for anchor i and each j in
    $P_i \cup \{i\}$ (its positives and itself), the smoothed number of negatives before j is

    $$r_{ij} = \sum_{k \in N_i} \sigma\Big(\frac{s_{ik} - s_{ij}}{\tau}\Big),\qquad
      \sigma(x) = \frac{1}{1 + e^{\operatorname{clip}(-x, -50, 50)}}$$

    and the anchor's loss is $\ell_i = \frac{1}{|P_i| + 1}\sum_{j \in P_i \cup \{i\}} f(r_{ij})$
    with the variant's $f$: `"O"` (PNP-O) $f(r) = r$; `"Ds"` (PNP-D$_s$) $\log(1 + r)$;
    `"Dq"` (PNP-D$_q$) $(1 + r)^{-\alpha}$, and the anchor's loss is then $1 - \ell_i$;
    `"Iu"` (PNP-I$_u$) $(1 + r)\log(1 + r)$; `"Ib"` (PNP-I$_b$)
    $\frac{1}{b^2}(br - \log(1 + br))$. The batch loss is the mean over the anchors that have
    a positive; a batch without a positive pair gives 0.

    Same value and gradient as `pytorch_metric_learning.losses.PNPLoss(b, alpha, anneal,
    variant)` (PML 2.9; its `variant` values are these five strings). Where PML's code and the
    paper differ, deepmetric follows PML: the anchor itself counts as one of its positives (the
    term $j = i$, with $s_{ii}$ the computed self-similarity, and the divisor $|P_i| + 1$), and
    the sigmoid's exponent is clipped to [-50, 50] (its gradient is 0 beyond). Paper:
    "Rethinking the Optimization of Average Precision: Only Penalizing Negative Instances before
    Positive Ones is Enough", AAAI 2022, arXiv:2102.04640.

    The loss counts over triplets (anchor, positive, negative): memory grows as B^2 (blocks of
    anchors, see the module), work as B^2 K for classes of K examples.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      b: the scale b of `"Ib"` (> 0).
      alpha: the exponent $\alpha$ of `"Dq"` (> 0).
      anneal: the sigmoid's temperature $\tau$ (> 0).
      variant: one of `"Ds"`, `"Dq"`, `"Iu"`, `"Ib"`, `"O"`.

    Returns:
      (B,) per-anchor losses; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]])
    >>> round(float(ops.mean(pnp_loss(np.array([0, 1, 0, 1]), x, anneal=0.1))), 4)
    0.7876
    """
    b = _PNP_B.checked(b)
    alpha = _PNP_ALPHA.checked(alpha)
    anneal = _PNP_ANNEAL.checked(anneal)
    variant = _PNP_VARIANT.checked(variant)
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    unit = distances_lib._l2_normalize(embeddings)

    def transform(rank):
        """f(r) of the variant and its derivative."""
        return _pnp_rank_transform(rank, variant, b, alpha), [
            _pnp_rank_slope(rank, variant, b, alpha)
        ]

    def block(index, query, query_labels, reference, reference_labels, ranks):
        s = ops.matmul(query, ops.transpose(reference))  # (b, B)
        positives, negatives = mining.label_masks(
            query_labels, reference_labels, anchor_index=index
        )
        has_positive = ops.any(positives, axis=1)
        terms = ops.logical_or(positives, distances_lib.is_self(index, ops.shape(s)[1]))
        # One j of every row per step (the k-th of its class, itself included): its
        # negatives before it, through PML's clipped sigmoid; O(b * B) a step.
        total, weights = mining.member_rank_terms(
            s,
            terms,
            [negatives],
            transform,
            mining.PositiveOrder(ranks),
            temperature=anneal,
            clip=50.0,
        )
        count = ops.sum(ops.cast(terms, s.dtype), axis=1)
        value = (total + ops.sum(weights * (s - ops.stop_gradient(s)), axis=1)) / count
        if variant == "Dq":
            value = 1.0 - value
        return (ops.where(has_positive, value, 0.0), ops.cast(has_positive, s.dtype))

    values, has_positive = _blocks.map_rows(
        block, [unit, labels], [unit, labels, mining.column_ranks(labels)]
    )
    loss = per_anchor_share(values, ops.sum(has_positive))
    return nonfinite_to_nan(loss, embeddings)


@export
class PNPLoss(MetricLoss):
    """PNP loss; see `pnp_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.PNPLoss(variant="Dq"))
    ```
    """

    function = staticmethod(pnp_loss)
    takes_reference = False
    options = (_PNP_B, _PNP_ALPHA, _PNP_ANNEAL, _PNP_VARIANT)
