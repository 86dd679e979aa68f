"""Average-precision and histogram losses of pytorch-metric-learning on the batch's rows.

Three losses that score the ranking or the distribution of each batch's pair similarities
rather than single pairs or triplets: `FastAPLoss` (a histogram approximation of average
precision), `HistogramLoss` (the probability that a negative pair is more similar than a
positive pair, from two histograms) and `SmoothAPLoss` (average precision with a sigmoid in
place of the rank's step function). A function `name_loss(labels, embeddings, *, ...)` returns
one value per anchor whose mean (Keras' default reduction) is the batch loss of
pytorch-metric-learning (PML) 2.9, and a thin `MetricLoss` class has PML's class name, keywords
and defaults. None of them takes a reference set (PML's do not either).

Everything is built from blocks of anchor rows (`deepmetric._blocks`): the histograms are
linear-interpolation histograms of each row, accumulated with one scatter-add per row block
(O(B^2) time and memory whatever the number of bins), and Smooth-AP's ranks, which compare
every pair of an anchor's class with its whole row, are computed one member of each row's
class at a time (`mining.member_rank_terms`: O(B^2 K) time for classes of K examples, where
the paper and PML take O(B^3), in O(B^2) memory).
"""

from __future__ import annotations

import math
import numbers

from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric.losses.base import (
    POSITIVE,
    Bounds,
    MetricLoss,
    Option,
    check_number,
    loss_inputs,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)

# The entries of one block of FastAP and the histogram loss (b anchors x R pairs): 2^23, so
# that one float temporary is 32 MB. Half of `_blocks.BLOCK_ENTRIES`, since each pair keeps
# more temporaries there (its node, its shares, the scatter's indices): they run in blocks from
# B > 2896. Not smaller: on torch, glibc's malloc serves the freed tensors below 32 MB (its
# largest mmap threshold) from its heap, which then grows with the number of blocks instead of
# returning them (FastAP at B = 8192: 1.3 GB with 2^22, 0.8 GB with 2^23), for about twice
# the time of smaller blocks on torch (the pages of every block are fresh).
HISTOGRAM_BLOCK_ENTRIES = 1 << 23


def _count(name, value, none_allowed=False):
    """An integer >= 1 (an integral float is accepted: 10.0 is 10), or None where allowed."""
    if value is None and none_allowed:
        return None
    allowed = "None or an integer >= 1" if none_allowed else "an integer >= 1"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return int(value)


def _count_option(name, default, none_allowed=False):
    return Option(name, default, lambda key, value: _count(key, value, none_allowed))


def _row_histograms(positions, masks, num_nodes):
    """Per row, the linear-interpolation histograms of `positions` (b, R) on nodes 0..n-1.

    A value at position u between nodes r and r + 1 adds `r + 1 - u` to node r and `u - r` to
    node r + 1 (PML's triangular pulses of FastAP, its density of the histogram loss), in the
    histogram of the (b, R) boolean mask of `masks` that holds its entry (the masks are
    disjoint); positions outside [0, n - 1] use the first or last interval (a NaN position the
    first: the loss is NaN anyway). Two scatter-adds (`ops.segment_sum`) for all the masks, so
    time and memory are O(b R) whatever the number of nodes. Returns a list of (b, n)
    histograms, one per mask.
    """
    not_nan = ops.equal(positions, positions)
    lower = ops.where(not_nan, ops.floor(ops.where(not_nan, positions, 0.0)), 0.0)
    lower = ops.stop_gradient(ops.clip(lower, 0.0, float(num_nodes - 2)))
    upper_share = positions - lower
    rows = ops.shape(positions)[0]
    per_mask = rows * num_nodes
    ids = ops.cast(lower, "int32") + ops.expand_dims(ops.arange(rows, dtype="int32") * num_nodes, 1)
    selected = masks[0]
    for t, mask in enumerate(masks[1:], start=1):
        ids = ops.where(mask, ids + t * per_mask, ids)
        selected = ops.logical_or(selected, mask)
    ids = ops.reshape(ids, (-1,))
    low = ops.reshape(ops.where(selected, 1.0 - upper_share, 0.0), (-1,))
    high = ops.reshape(ops.where(selected, upper_share, 0.0), (-1,))
    total = ops.segment_sum(low, ids, num_segments=len(masks) * per_mask)
    total = total + ops.segment_sum(high, ids + 1, num_segments=len(masks) * per_mask)
    total = ops.reshape(total, (len(masks), rows, num_nodes))
    return [total[t] for t in range(len(masks))]


def _prepare(labels, embeddings):
    """(labels, embeddings) checked, and the L2-normalised embeddings (PML's default
    distances normalise)."""
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    return labels, embeddings, distances_lib._l2_normalize(embeddings)


# ---------------------------------------------------------------------------------- FastAP

_NUM_BINS = _count_option("num_bins", 10)


@export
def fast_ap_loss(labels, embeddings, *, num_bins=10):
    r"""FastAP loss, per anchor (Cakir, He, Xia, Kulis and Sclaroff, 2019).

    Average precision of each anchor's ranking of the batch, with the ranking replaced by
    histograms of the squared Euclidean distances $d$ of the L2-normalised embeddings (in
    [0, 4]). With $L$ = `num_bins` bins of width $\Delta = 4 / L$, nodes $c_k = k \Delta$,
    $k = 0..L$, and the triangular pulse $\delta(d, c_k) = [1 - |d - c_k| / \Delta]_+$, the
    anchor i's positive and negative histograms are
    $h^+_{ik} = \sum_{p} \delta(d_{ip}, c_k)$, $h^-_{ik} = \sum_{n} \delta(d_{in}, c_k)$,
    their cumulative sums $H^+_{ik}$, $H_{ik} = \sum_{k' \le k} (h^+_{ik'} + h^-_{ik'})$, and

    $$\mathrm{FastAP}_i = \frac{1}{N^+_i} \sum_k \frac{h^+_{ik} H^+_{ik}}{H_{ik}}, \qquad
      \ell_i = 1 - \mathrm{FastAP}_i$$

    ($N^+_i$: the anchor's positives; a term with $h^+_{ik} H^+_{ik} = 0$ is 0). The batch
    loss is the mean over the anchors with a positive (0 when there is none). An anchor without
    negatives has FastAP 1 (loss exactly 0; PML's histograms give 1 up to rounding). Same value
    and gradient as `pytorch_metric_learning.losses.FastAPLoss(num_bins)` (its default distance
    `LpDistance(power=2)`, MeanReducer); PML's code and the paper agree. Paper: "Deep Metric
    Learning to Rank", CVPR 2019.

    Each distance lies between two nodes and adds to those two only, so the histograms are
    accumulated with a scatter-add per block of anchor rows: O(B^2) time and memory whatever
    `num_bins` (PML builds a (num_bins + 1) x B x B tensor), plus a (B, num_bins + 1) histogram.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      num_bins: the number of bins L, an integer >= 1 (PML truncates a float with `int`; here
        a float must be integral: 10.0 is 10).

    Returns:
      (B,) per-anchor losses; their mean is the batch loss.

    Each positive first in its anchor's ranking: AP 1. Each positive at distance 2 behind one
    negative (anchors 0 and 3: AP 1/2) or two (anchors 1 and 2: AP 1/3):

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(fast_ap_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.0
    >>> round(float(ops.mean(fast_ap_loss(np.array([0, 1, 0, 1]), x))), 4)  # 1 - 5/12
    0.5833
    """
    num_bins = _NUM_BINS.checked(num_bins)
    labels, embeddings, x = _prepare(labels, embeddings)
    width = 4.0 / num_bins
    distance = distances_lib.LpDistance(normalize_embeddings=False, power=2)

    def block(index, query, query_labels, reference, reference_labels):
        positives, negatives = mining.label_masks(query_labels, reference_labels, index)
        d = distance.matrix(query, reference, self_index=index)
        h_pos, h_neg = _row_histograms(d / width, [positives, negatives], num_bins + 1)
        cum_pos = ops.cumsum(h_pos, axis=1)
        cum_all = ops.cumsum(h_pos + h_neg, axis=1)
        product = h_pos * cum_pos
        safe = ops.logical_and(ops.greater(product, 0.0), ops.greater(cum_all, 0.0))
        ap = ops.sum(ops.where(safe, product / ops.where(safe, cum_all, 1.0), 0.0), axis=1)
        num_pos = ops.sum(ops.cast(positives, ap.dtype), axis=1)
        has_pos = ops.greater(num_pos, 0.0)
        scored = ops.logical_and(has_pos, ops.any(negatives, axis=1))
        loss = ops.where(scored, 1.0 - ap / ops.where(scored, num_pos, 1.0), 0.0)
        return loss, ops.cast(has_pos, ap.dtype)

    loss, has_pos = _blocks.map_rows(
        block, [x, labels], [x, labels], max_entries=HISTOGRAM_BLOCK_ENTRIES
    )
    return nonfinite_to_nan(per_anchor_share(loss, ops.sum(has_pos)), embeddings)


# ------------------------------------------------------------------------------- Histogram


def _optional_delta():
    bounds = Bounds(0.0, 2.0, exclusive_minimum=True)

    def check(key, value):
        return None if value is None else check_number(key, value, bounds)

    return Option("delta", None, check, bounds=bounds)


_N_BINS = _count_option("n_bins", None, none_allowed=True)
_DELTA = _optional_delta()


def _histogram_nodes(n_bins, delta):
    """(delta, number of nodes) from PML's `n_bins` / `delta` (both None: 100 bins).

    Nodes at -1 + k delta for k = 0..K, K = 2 / delta rounded up (to cover [-1, 1]); where
    2 / delta is an integer (PML's case) that is PML's `round(1 + 2 / delta)` nodes.
    """
    n_bins = _N_BINS.checked(n_bins)
    delta = _DELTA.checked(delta)
    if n_bins is not None and delta is not None and not math.isclose(delta, 2.0 / n_bins):
        raise ValueError(
            "`delta` and `n_bins` must satisfy delta = 2 / n_bins (or give one of them). "
            f"Received: n_bins={n_bins!r}, delta={delta!r}"
        )
    if delta is None:
        delta = 2.0 / (100 if n_bins is None else n_bins)
    steps = 2.0 / delta
    intervals = round(steps) if math.isclose(steps, round(steps)) else math.ceil(steps)
    return delta, max(int(intervals), 1) + 1


@export
def histogram_loss(labels, embeddings, *, n_bins=None, delta=None):
    r"""Histogram loss (Ustinova and Lempitsky, 2016), spread over the anchors.

    On the cosine similarities $s$ of the L2-normalised embeddings, the positive pairs' and the
    negative pairs' similarities are estimated as two histograms on the nodes
    $t_r = -1 + r \Delta$ with linear interpolation (a pair between $t_r$ and $t_{r+1}$ adds
    $(t_{r+1} - s)/\Delta$ to node r and $(s - t_r)/\Delta$ to node r + 1), each normalised by
    its number of pairs: $p^+_r$ and $p^-_r$. The loss is the estimated probability that a
    random negative pair is more similar than a random positive pair:

    $$L = \sum_r p^-_r \, \Phi^+_r, \qquad \Phi^+_r = \sum_{q \le r} p^+_q$$

    Pairs are unordered (each once). As in PML's code, a positive pair counts when its anchor
    has a negative in the batch and a negative pair when one of its two examples has a positive
    (the pairs of PML's triplets), and a batch without any triplet gives 0; the paper takes
    every pair, which differs where two classes of one example each form a negative pair
    (deepmetric follows PML; `ap_test.py` checks both against a loop). The per-anchor values
    are $B c_i / N^-$, with $c_i$ the anchor's negative pairs' share of $\sum_r p^-_r
    \Phi^+_r N^-$, so that their mean is L; since $\Phi^+$ is a batch-wide statistic with a
    gradient, the rows are not separable across devices. Same value and gradient as
    `pytorch_metric_learning.losses.HistogramLoss(n_bins, delta)` (its default distance
    `CosineSimilarity()`). Paper: "Learning Deep Embeddings
    with Histogram Loss", NIPS 2016, arXiv:1611.00822.

    PML indexes nodes `floor((s + 1) / delta)` and `+1` without a bound, so it fails on a
    similarity of exactly 1 (two equal directions); deepmetric puts such a pair on the last
    node. A `delta` with 2 / delta not an integer gets K = ceil(2 / delta) intervals (PML's
    `round(1 + 2 / delta)` nodes then fail on the similarities above the last node); where PML
    runs, the two agree. Memory O(B^2) plus a (B, n_bins + 1) histogram, time O(B^2) whatever
    the number of bins (PML builds the lists of all triplets).

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      n_bins: the number of bins, None or an integer >= 1 (None with `delta` None: 100).
      delta: the bin width $\Delta$, None (2 / n_bins) or in (0, 2]; given with `n_bins` it
        must equal 2 / n_bins (PML asserts this).

    Returns:
      (B,) per-anchor values; their mean is the batch loss.

    Positive pairs more similar than every negative pair: 0. Both positive pairs at s = 0, and
    three of the four negative pairs above (0.8, 0.6, 0.8), one below (-0.6): 3/4.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(histogram_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.0
    >>> round(float(ops.mean(histogram_loss(np.array([0, 1, 0, 1]), x))), 4)
    0.75
    """
    delta, num_nodes = _histogram_nodes(n_bins, delta)
    labels, embeddings, x = _prepare(labels, embeddings)

    def has_positive(index, query_labels, reference_labels):
        positives, _ = mining.label_masks(query_labels, reference_labels, index)
        return (ops.any(positives, axis=1),)

    (has_pos,) = _blocks.map_rows(has_positive, [labels], [labels])

    def block(index, query, query_labels, reference, reference_labels, reference_has_pos):
        positives, negatives = mining.label_masks(query_labels, reference_labels, index)
        columns = ops.arange(ops.shape(reference)[0], dtype="int32")
        later = ops.greater(ops.expand_dims(columns, 0), ops.expand_dims(index, 1))
        row_has_pos = ops.any(positives, axis=1, keepdims=True)
        row_has_neg = ops.any(negatives, axis=1, keepdims=True)
        pos_pairs = ops.logical_and(ops.logical_and(positives, later), row_has_neg)
        either = ops.logical_or(row_has_pos, ops.expand_dims(reference_has_pos, 0))
        neg_pairs = ops.logical_and(ops.logical_and(negatives, later), either)
        s = ops.matmul(query, ops.transpose(reference))
        h_pos, h_neg = _row_histograms((s + 1.0) / delta, [pos_pairs, neg_pairs], num_nodes)
        count = ops.sum(ops.cast(pos_pairs, s.dtype), axis=1)
        return h_pos, h_neg, count, ops.sum(ops.cast(neg_pairs, s.dtype), axis=1)

    h_pos, h_neg, num_pos, num_neg = _blocks.map_rows(
        block, [x, labels], [x, labels, has_pos], max_entries=HISTOGRAM_BLOCK_ENTRIES
    )
    cdf_pos = ops.cumsum(ops.divide_no_nan(ops.sum(h_pos, axis=0), ops.sum(num_pos)))
    contributions = ops.sum(h_neg * ops.expand_dims(cdf_pos, 0), axis=1)
    return nonfinite_to_nan(per_anchor_share(contributions, ops.sum(num_neg)), embeddings)


# ------------------------------------------------------------------------------- Smooth-AP

_TEMPERATURE = number_option("temperature", 0.01, POSITIVE)


@export
def smooth_ap_loss(labels, embeddings, *, temperature=0.01):
    r"""Smooth-AP loss, per anchor (Brown, Xie, Kalogeiton and Zisserman, 2020).

    Average precision of each anchor's ranking of the batch by cosine similarity $s$ of the
    L2-normalised embeddings, with the rank's step function replaced by a sigmoid
    $G(x) = \sigma(x / \tau)$: for anchor a with the set $P_a$ of examples of its class,

    $$R_a(j) = 1 + \sum_{k \ne j} G(s_{ak} - s_{aj}), \quad
      R^+_a(j) = 1 + \sum_{k \in P_a, k \ne j} G(s_{ak} - s_{aj}), \quad
      \ell_a = 1 - \frac{1}{|P_a|} \sum_{j \in P_a} \frac{R^+_a(j)}{R_a(j)}$$

    and the batch loss is the mean over the anchors. PML's code (like the authors' code) ranks
    the whole batch, so the anchor is in its own retrieval set and in $P_a$ (with $s_{aa} = 1$
    it ranks first); the paper's retrieval set leaves the query out. deepmetric follows PML's
    numbers: on the batches PML accepts (below) the value and gradient equal
    `pytorch_metric_learning.losses.SmoothAPLoss(temperature)`. An anchor alone in its class
    therefore scores $1 / R_a(a)$, not 0 (its loss is close to 0 unless another example is as
    similar as itself). Paper: "Smooth-AP: Smoothing the Path Towards Large-Scale Image
    Retrieval", ECCV 2020, arXiv:2007.12163.

    Other batches: PML raises a ValueError unless every class of the batch has the same number
    of examples, and it takes the positives of an anchor from the batch's layout, not from the
    labels: consecutive chunks of size B / K, K the examples per class, where the classes are
    chunks of K; the two agree only on batches sorted by class with as many classes as
    examples per class (3 classes x 3, 4 x 4, ...), the batches its tests use. deepmetric
    takes $P_a$ from the labels, for any batch (any order, any class sizes; the formula above
    is defined for each anchor), so it raises no error for other batches (the check would
    read label values, which a compiled step cannot). On a batch sorted by class it equals the
    authors' code with their `num_id` = the number of classes, for any class size.

    Only the ranks of an anchor's class members enter the loss, so they are computed one
    member of each row at a time (the k-th at step k, with the gradient written out:
    `mining.member_rank_terms`), over blocks of anchor rows: O(B^2 K) time for classes of K
    examples and O(B^2) memory, where PML and the authors compare every pair of every row,
    O(B^3) time, and PML builds several B x B x B tensors.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      temperature: the sigmoid's temperature $\tau$ (> 0; the paper's 0.01).

    Returns:
      (B,) per-anchor losses; their mean is the batch loss.

    With $\tau = 0.01$ the sigmoids are steps here. Each anchor first, its positive second:
    AP 1. Anchor 0 ranks itself first and its positive third (AP (1 + 2/3) / 2), anchors 1
    and 2 their positive fourth (AP (1 + 2/4) / 2), anchor 3 third: the mean loss is
    (1/6 + 1/4 + 1/4 + 1/6) / 4.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    >>> round(float(ops.mean(smooth_ap_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.0
    >>> round(float(ops.mean(smooth_ap_loss(np.array([0, 1, 0, 1]), x))), 4)
    0.2083
    """
    temperature = _TEMPERATURE.checked(temperature)
    labels, embeddings, x = _prepare(labels, embeddings)

    def ratio(in_class, everything):
        # R+ / R with R+ = 1/2 + r_in, R = 1/2 + r_all (the k = j term is sigma(0) = 1/2).
        top, bottom = 0.5 + in_class, 0.5 + everything
        return top / bottom, [1.0 / bottom, -top / (bottom * bottom)]

    def block(index, query, query_labels, reference, reference_labels, ranks):
        positives, _ = mining.label_masks(query_labels, reference_labels, index)
        own = distances_lib.is_self(index, ops.shape(reference)[0])
        in_class = ops.logical_or(positives, own)  # P_a: the anchor's class, itself included
        s = ops.matmul(query, ops.transpose(reference))
        # One member j of every row per step (the k-th of its class), its counts over the
        # row: O(b * R) a step, |P_a| steps.
        total, weights = mining.member_rank_terms(
            s,
            in_class,
            [in_class, None],
            ratio,
            mining.PositiveOrder(ranks),
            temperature=temperature,
        )
        size = ops.sum(ops.cast(in_class, s.dtype), axis=1)
        moving = ops.sum(weights * (s - ops.stop_gradient(s)), axis=1)
        return (1.0 - (total + moving) / size,)

    ranks = mining.column_ranks(labels)
    (loss,) = _blocks.map_rows(block, [x, labels], [x, labels, ranks])
    return nonfinite_to_nan(loss, embeddings)


# ------------------------------------------------------------------------------- classes


@export
class FastAPLoss(MetricLoss):
    """FastAP loss; see `fast_ap_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.FastAPLoss(num_bins=10))
    ```
    """

    function = staticmethod(fast_ap_loss)
    takes_reference = False
    options = (_NUM_BINS,)


@export
class HistogramLoss(MetricLoss):
    """Histogram loss; see `histogram_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.HistogramLoss(n_bins=100))
    ```
    """

    function = staticmethod(histogram_loss)
    takes_reference = False
    # The positive pairs' histogram is a batch-wide statistic with a gradient.
    separable_rows = False
    options = (_N_BINS, _DELTA)


_histogram_init = HistogramLoss.__init__


def _checked_histogram_init(self, *args, **kwargs):
    _histogram_init(self, *args, **kwargs)
    _histogram_nodes(self.n_bins, self.delta)  # n_bins and delta together: delta = 2 / n_bins


_checked_histogram_init.__signature__ = _histogram_init.__signature__  # type: ignore[attr-defined]
_checked_histogram_init.__doc__ = _histogram_init.__doc__
HistogramLoss.__init__ = _checked_histogram_init  # type: ignore[method-assign]


@export
class SmoothAPLoss(MetricLoss):
    """Smooth-AP loss; see `smooth_ap_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.SmoothAPLoss(temperature=0.01))
    ```
    """

    function = staticmethod(smooth_ap_loss)
    takes_reference = False
    options = (_TEMPERATURE,)
