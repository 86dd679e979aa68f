"""A triplet loss with composable mining: any distance, any positive and negative selection.

`TripletLoss` combines a distance (or similarity), a positive selection and a negative
selection, all written once for distances and similarities through `larger_is_closer`. Every
selection is a fixed-shape operation of `deepmetric.mining` on the (B, R) matrix; the
"all positives x all negatives" case sums over the triplets without enumerating them, so memory
is O(B * R) whatever the combination.
"""

from __future__ import annotations

from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric import miners as miners_lib
from deepmetric._api import export
from deepmetric.losses.base import (
    NON_NEGATIVE,
    MetricLoss,
    check_choice,
    check_reference_mask,
    choice_option,
    count_positive,
    distance_option,
    flag_option,
    loss_inputs,
    miner_option,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)

_MARGIN = number_option("margin", 0.1, NON_NEGATIVE)
POSITIVE_MINING = ("all", "hard", "easy")
NEGATIVE_MINING = ("all", "semi-hard", "hard", "easy")


def _gather(matrix, index):
    """(B,) entries `matrix[a, index[a]]`."""
    return ops.squeeze(ops.take_along_axis(matrix, ops.expand_dims(index, 1), axis=1), axis=1)


@export
def triplet_loss(
    labels,
    embeddings,
    *,
    margin=0.1,
    distance="L2",
    positive_mining="all",
    negative_mining="all",
    soft_margin=False,
    average_nonzero=False,
    swap=False,
    smooth_loss=False,
    miner=None,
    reference_embeddings=None,
    reference_labels=None,
    reference_mask=None,
):
    r"""Triplet loss with a chosen distance and composable positive / negative mining.

    With $D$ the distance (or the negated similarity, so that larger is farther), each selected
    triplet (a, p, n) costs

    $$\ell_{apn} = [D_{ap} - D_{an} + m]_+, \quad\text{with smooth\_loss}\quad
      \log(1 + e^{D_{ap} - D_{an} + m}), \quad\text{with soft\_margin}\quad
      \log(1 + e^{D_{ap} - D_{an}})$$

    and with `swap` (Balntas et al., BMVC 2016) $D_{an}$ is replaced by
    $\min(D_{an}, D_{pn})$, the positive-negative distance when it is smaller,

    and the loss is the mean over the selected triplets (over those with $\ell > 0$ with
    `average_nonzero`). Selections: positives of anchor a are "all" of them, the "hard"
    (farthest) one or the "easy" (closest) one; for each selected (a, p), negatives are
    "all" of them, the "semi-hard" one (the closest negative farther than p, else the farthest
    negative: FaceNet's rule as TensorFlow Addons implements it), the "hard" (closest) or the
    "easy" (farthest) one. An anchor without positive or without negative has no triplet.

    With a `miner` (`deepmetric.miners`), the triplets are the miner's: every kept positive
    with every kept negative of the anchor, or the triplets of its rule
    (`TripletMarginMiner`); the mining options must then stay "all". On L2-normalised
    embeddings, `triplet_loss(..., margin=m, average_nonzero=True, swap=s, smooth_loss=t,
    miner=M)` equals pytorch-metric-learning's `TripletMarginLoss(margin=m, swap=s,
    smooth_loss=t)(embeddings, labels, M(embeddings, labels))` (its default distance,
    `LpDistance()`, normalises the embeddings; "L2" here does not).

    Presets: ("all", "semi-hard") with "L2" is `triplet_semihard_loss`; ("hard", "hard") is
    `triplet_hard_loss` (Hermans et al., 2017) on batches where every anchor has a positive;
    ("all", "all") with `average_nonzero` is `triplet_batch_all_loss`. Papers: Schroff et al.,
    "FaceNet", CVPR 2015, arXiv:1503.03832; Hermans et al., "In Defense of the Triplet Loss for
    Person Re-Identification", arXiv:1703.07737.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D).
      margin: the margin m, a finite number >= 0 (unused with `soft_margin`).
      distance: a `deepmetric.distances` name ("L2", "squared-L2", "angular", "cosine",
        "dot"), a `Distance`, or a callable returning the (B, B) distance matrix.
      positive_mining: "all", "hard" or "easy".
      negative_mining: "all", "semi-hard", "hard" or "easy".
      soft_margin: use `softplus(D_ap - D_an)` (no margin) instead of the hinge.
      average_nonzero: average over the triplets with a positive loss only.
      swap: use `min(D_an, D_pn)` for the negative distance; only with "all" / "all" mining
        (or a miner) and without a reference set (the whole (B, B) matrix is then computed
        at once).
      smooth_loss: use `softplus(D_ap - D_an + m)` (PML's `smooth_loss`) instead of the hinge.
      miner: None or a `deepmetric.miners` miner that selects the triplets.
      reference_embeddings, reference_labels: take positives and negatives from this set
        instead of the rest of the batch.
      reference_mask: optional booleans, (R,) per reference row or (B, R) per pair; a pair
        whose entry is False is neither positive nor negative (for example the unfilled slots
        of a `deepmetric.xbm.CrossBatchMemory`). Needs the reference set.

    Returns:
      (B,) per-anchor shares; their mean is the batch loss. All NaN if an embedding or a
      reference embedding is not finite.

    >>> import numpy as np
    >>> x = np.array([[0.0, 0.0], [0.0, 1.0], [0.5, 0.0], [2.0, 0.0]])
    >>> loss = triplet_loss(np.array([0, 0, 1, 1]), x, margin=1.0, negative_mining="hard")
    >>> round(float(ops.mean(loss)), 4)
    1.2205
    """
    margin = _MARGIN.checked(margin)
    positive_mining = check_choice("positive_mining", positive_mining, POSITIVE_MINING)
    negative_mining = check_choice("negative_mining", negative_mining, NEGATIVE_MINING)
    distance = distances_lib.get(distance, "distance")
    miner = miners_lib.get(miner)
    if soft_margin and smooth_loss:
        raise ValueError(
            "`soft_margin` and `smooth_loss` cannot both be True (soft_margin is softplus "
            "without the margin, smooth_loss softplus with it). Received: soft_margin=True, "
            "smooth_loss=True"
        )
    all_triplets = positive_mining == "all" and negative_mining == "all"
    if (swap or miner is not None) and not all_triplets:
        raise ValueError(
            "`swap` and `miner` need positive_mining='all' and negative_mining='all' (a miner "
            f"selects the triplets itself). Received: positive_mining={positive_mining!r}, "
            f"negative_mining={negative_mining!r}, swap={swap!r}, miner={miner!r}"
        )
    labels, embeddings, ref_labels, reference = loss_inputs(
        labels, embeddings, reference_embeddings, reference_labels
    )
    if swap and reference is not None:
        raise ValueError(
            "`swap` compares positives with negatives inside the batch and cannot be used "
            "with a reference set (reference_embeddings)."
        )
    mask = check_reference_mask(reference_mask, embeddings, reference)

    def cost(gap):
        if soft_margin:
            return ops.softplus(gap)
        if smooth_loss:
            return ops.softplus(gap + margin)
        return ops.relu(gap + margin)

    def rows(d, positives, negatives, order, mined=None):
        """Per anchor: its contribution, its triplets with a positive loss, its triplets."""
        valid = ops.logical_and(ops.any(positives, axis=1), ops.any(negatives, axis=1))
        valid_f = ops.cast(valid, d.dtype)
        rule = None if mined is None else mined.rule
        if all_triplets and (swap or smooth_loss or rule is not None):
            values, w, num_nonzero = mining.triplet_terms(
                d,
                positives,
                negatives,
                margin=0.0 if soft_margin else margin,
                smooth=soft_margin or smooth_loss,
                swap=swap,
                rule=rule,
                order=order,
            )
            # Not masked by `valid`: with `swap`, row p of `w` holds the weights of the
            # (p, n) distances of other anchors' triplets.
            contributions = values + ops.sum(w * (d - ops.stop_gradient(d)), axis=1)
            if rule is None:
                num_pos = ops.sum(ops.cast(positives, d.dtype), axis=1)
                num_triplets = num_pos * ops.sum(ops.cast(negatives, d.dtype), axis=1)
            else:
                num_triplets = ops.sum(ops.cast(mined.positive_counts, d.dtype), axis=1)
            return contributions, num_nonzero, num_triplets
        elif all_triplets:
            if soft_margin:
                values, w_pos, w_neg, num_nonzero = mining.batch_all_soft_terms(
                    d, positives, negatives, order
                )
                moving = d - ops.stop_gradient(d)
                contributions = (
                    values + ops.sum(w_pos * moving, axis=1) - ops.sum(w_neg * moving, axis=1)
                )
            else:
                w = mining.batch_all_signed_counts(d, positives, negatives, margin, order)
                contributions = ops.sum(w * d + margin * ops.relu(w), axis=1)
                num_nonzero = ops.sum(ops.relu(w), axis=1)
            num_pos = ops.sum(ops.cast(positives, d.dtype), axis=1)
            num_triplets = num_pos * ops.sum(ops.cast(negatives, d.dtype), axis=1)
        elif positive_mining == "all":
            if negative_mining == "semi-hard":
                index, outside = mining.semihard_negatives(d, positives, negatives, order)
                farthest = mining.masked_maximum(d, negatives)
                d_neg = ops.where(outside, ops.take_along_axis(d, index, axis=1), farthest)
            else:
                pick = mining.masked_argmin if negative_mining == "hard" else mining.masked_argmax
                d_neg = ops.expand_dims(_gather(d, pick(d, negatives)[0]), 1)
            use = ops.logical_and(positives, ops.expand_dims(valid, 1))
            per_pair = ops.where(use, cost(d - d_neg), 0.0)
            contributions = ops.sum(per_pair, axis=1)
            num_nonzero = count_positive(per_pair, axis=1)
            num_triplets = ops.sum(ops.cast(use, d.dtype), axis=1)
        else:
            pick = mining.masked_argmax if positive_mining == "hard" else mining.masked_argmin
            d_pos = _gather(d, pick(d, positives)[0])
            if negative_mining == "all":
                use = ops.logical_and(negatives, ops.expand_dims(valid, 1))
                per_triplet = ops.where(use, cost(ops.expand_dims(d_pos, 1) - d), 0.0)
                contributions = ops.sum(per_triplet, axis=1)
                num_nonzero = count_positive(per_triplet, axis=1)
                num_triplets = ops.sum(ops.cast(use, d.dtype), axis=1)
            else:
                if negative_mining == "semi-hard":
                    n_index = mining.semihard_negative_per_row(d, d_pos, negatives)
                elif negative_mining == "hard":
                    n_index = mining.masked_argmin(d, negatives)[0]
                else:
                    n_index = mining.masked_argmax(d, negatives)[0]
                contributions = ops.where(valid, cost(d_pos - _gather(d, n_index)), 0.0)
                num_nonzero = ops.cast(ops.greater(ops.stop_gradient(contributions), 0.0), d.dtype)
                num_triplets = valid_f
        return contributions * valid_f, num_nonzero, num_triplets

    contributions, num_nonzero, num_triplets = _blocks.anchor_rows(
        rows,
        distance,
        labels,
        embeddings,
        ref_labels,
        reference,
        mask,
        farther_is_larger=True,
        with_order=True,
        miner=miner,
        whole=swap,
    )
    loss = per_anchor_share(
        contributions, ops.sum(num_nonzero) if average_nonzero else ops.sum(num_triplets)
    )
    return nonfinite_to_nan(loss, embeddings, reference)


@export
class TripletLoss(MetricLoss):
    """Triplet loss with a chosen distance and composable mining; see `triplet_loss`.

    ```python
    # Batch-hard on cosine similarity, soft margin (Hermans et al.):
    loss = deepmetric.losses.TripletLoss(
        distance="cosine", positive_mining="hard", negative_mining="hard", soft_margin=True
    )
    model.compile(optimizer="adam", loss=loss)
    ```
    """

    function = staticmethod(triplet_loss)
    options = (
        _MARGIN,
        distance_option("distance", "L2"),
        choice_option("positive_mining", "all", POSITIVE_MINING),
        choice_option("negative_mining", "all", NEGATIVE_MINING),
        flag_option("soft_margin", False),
        flag_option("average_nonzero", False),
        flag_option("swap", False),
        flag_option("smooth_loss", False),
        miner_option(),
    )
