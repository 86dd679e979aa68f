"""Fixed-shape mining over a B x B distance matrix: masks, masked extrema, selections.

Every function here works on (B, B) matrices or per-row vectors: nothing builds
a B x B x B tensor or a list of triplets, everything traces under `jax.jit` and
`tf.function` with an unknown batch size. Selections that depend on each
(anchor, positive) pair (the semi-hard negative, the batch-all counts) loop over
"the k-th positive of every anchor" with `keras.ops.while_loop`: a few (B, B)
passes per step and as many steps as the largest number of positives of one
anchor (K - 1 in a P x K batch); a `PositiveOrder` ranks the positives from the
labels. The loop computes only indices, counts or weights, with no gradient; the
loss is then a weighted sum of distances (or gathers them), so gradients flow
through ordinary differentiable ops. The functions also take a (b, R) block of
rows (`deepmetric._blocks`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops

from deepmetric import _kernels
from deepmetric.distances import is_self


def label_masks(labels, reference_labels=None, anchor_index=None):
    """Boolean (B, R) masks of positive and negative pairs.

    Without `reference_labels` the batch is compared with itself and the
    diagonal (an example with itself) is neither positive nor negative. With
    `anchor_index`, `labels` are the rows `anchor_index` of `reference_labels`
    (a block of the batch compared with the whole batch), and again an example
    with itself is neither.
    """
    labels = ops.convert_to_tensor(labels)
    ref = labels if reference_labels is None else ops.convert_to_tensor(reference_labels)
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(ref, 0))
    if reference_labels is None:
        anchor_index = ops.arange(ops.shape(labels)[0], dtype="int32")
    if anchor_index is None:
        return same, ops.logical_not(same)
    not_self = ops.logical_not(is_self(anchor_index, ops.shape(ref)[0]))
    return ops.logical_and(same, not_self), ops.logical_not(same)


def rows_with_pairs(positive_mask, negative_mask):
    """Per row, as float32 0 / 1: whether it has a positive, and whether it has a negative.

    Blocks of rows (`deepmetric._blocks`) return these; `any_pairs` combines them.
    """
    return (
        ops.cast(ops.any(positive_mask, axis=1), "float32"),
        ops.cast(ops.any(negative_mask, axis=1), "float32"),
    )


def any_pairs(has_positive, has_negative):
    """Scalar: the batch has a positive pair and a negative pair, from the per-row flags of
    `rows_with_pairs`."""
    return ops.logical_and(ops.any(has_positive > 0.0), ops.any(has_negative > 0.0))


def masked_maximum(data, mask, axis=1):
    """Row-wise maximum over `mask`; the row minimum where the mask is empty (as TFA).

    Written with `where` rather than TFA's `(data - min) * mask`, which keeps
    an extra float B x B product alive for the backward pass; the value is the
    same and the gradient goes to the same element.
    """
    data = ops.convert_to_tensor(data)
    mask = ops.cast(mask, "bool")
    lowest = ops.min(data, axis=axis, keepdims=True)
    return ops.max(ops.where(mask, data, lowest), axis=axis, keepdims=True)


def masked_minimum(data, mask, axis=1):
    """Row-wise minimum over `mask`; the row maximum where the mask is empty (as TFA)."""
    data = ops.convert_to_tensor(data)
    mask = ops.cast(mask, "bool")
    highest = ops.max(data, axis=axis, keepdims=True)
    return ops.min(ops.where(mask, data, highest), axis=axis, keepdims=True)


class PositiveOrder(NamedTuple):
    """An order of every anchor's positives, known from the labels alone.

    `column_rank[j]` numbers the entries of each class 0, 1, 2, ... (`column_ranks`);
    `anchor_rank` is the rank of each anchor row among the columns when the batch is
    compared with itself (None for a separate reference set). The positives of one
    anchor all share its label, so their ranks are distinct, and its k-th positive
    is the one with `column_rank[j] - [anchor_rank < column_rank[j]] = k - 1` (the
    subtraction skips the anchor itself).
    """

    column_rank: Any
    anchor_rank: Any = None


def column_ranks(labels):
    """(R,) int32: entry j's rank among the entries with its label (0, 1, 2, ...).

    From one sort of the labels and a binary search for where each class starts:
    O(R log R), with no (R, R) temporary. Which entry of a class gets which rank
    depends on the sort and is irrelevant: only distinctness is used.
    """
    labels = ops.convert_to_tensor(labels)
    permutation = ops.argsort(labels)
    sorted_labels = ops.take(labels, permutation)
    start = ops.searchsorted(sorted_labels, sorted_labels, side="left")
    position = ops.arange(ops.shape(labels)[0], dtype="int32")
    sorted_rank = position - ops.cast(start, "int32")
    return ops.take(sorted_rank, ops.argsort(permutation))


def _kth_positive_loop(positive_mask, body, state, order=None):
    """Runs `body(selected, state)` once per positive rank k = 1, 2, ... of the anchors.

    `selected` (B, R) is True at the k-th positive of each anchor (in column
    order, or in the order of `order`) and nowhere in the rows of anchors with
    fewer than k positives. The loop runs as many times as the largest number of
    positives of one anchor.
    With a `PositiveOrder` the ranks come from the labels, recomputed inside each
    step from two vectors; without, from one cumulative sum of the mask (which XLA
    on CPU computes as a slow windowed reduction, and which is kept as a (B, R)
    int32 matrix). Either way the step of each positive is kept in one (B, R) int32
    matrix, so a step selects its entries with one comparison. Both give the same
    steps where `positive_mask` is "same label";
    with the order and a mask that removes some positives (a reference mask), a
    step can select nothing in some rows, which changes nothing.
    """
    positive_mask = ops.convert_to_tensor(positive_mask)
    if order is None:
        layer = ops.where(
            positive_mask, ops.cumsum(ops.cast(positive_mask, "int32"), axis=1) - 1, -1
        )
        steps = ops.max(layer) + 1

        def select(k):
            return ops.equal(layer, k)

    else:
        column_rank = ops.expand_dims(ops.cast(order.column_rank, "int32"), 0)
        steps = ops.max(column_rank) + (0 if order.anchor_rank is not None else 1)

        def select(k):
            # Recomputed in each step from two vectors: XLA fuses it into the step's passes
            # instead of reading a (B, R) int32 matrix. Every comparison involves k, so no
            # (B, R) part of it is loop-invariant (XLA hoists such a part out of the loop as
            # a whole matrix): the layer c - [a < c] of column rank c and anchor rank a is k
            # where c == k and a >= k, or c == k + 1 and a <= k.
            if order.anchor_rank is None:
                return ops.logical_and(positive_mask, ops.equal(column_rank, k))
            anchor = ops.expand_dims(ops.cast(order.anchor_rank, "int32"), 1)
            layer_is_k = ops.logical_or(
                ops.logical_and(ops.equal(column_rank, k), ops.greater_equal(anchor, k)),
                ops.logical_and(ops.equal(column_rank, k + 1), ops.less_equal(anchor, k)),
            )
            return ops.logical_and(positive_mask, layer_is_k)

    def cond(k, *state):
        return ops.less(k, steps)

    def step(k, *state):
        return (k + 1, *body(select(k), tuple(state)))

    out = ops.while_loop(cond, step, (ops.convert_to_tensor(0, "int32"), *state))
    return out[1:]


def each_positive(positive_mask, body, state, order=None):
    """`body(selected, state)` once per positive rank k, over a loop (no gradient through
    it): `selected` (B, R) is True at the k-th positive of every row that has one (see
    `_kth_positive_loop`). Returns the final state (a tuple)."""
    return _kth_positive_loop(positive_mask, body, tuple(state), order)


def member_rank_terms(scores, members, masks, value, order, *, temperature, clip=None):
    r"""Sums over each anchor's members j of `value` of its smoothed ranks, with their gradient.

    For anchor a (a row of `scores`, the similarities s, larger closer) and each member j
    (a True entry of `members`), the smoothed count of the entries k of each mask m ranked
    above j is $r_m(j) = \sum_{k \in m} \sigma((s_{ak} - s_{aj}) / \tau)$ (k = j included:
    it adds sigma(0) = 1/2, with no gradient). The members are visited one per step, the k-th
    of every row at step k (`order`, a `PositiveOrder` whose ranks number them), so the work
    is O(b * R) per step and the memory O(b * R): no (b, R, R) tensor of every pair of a row.

    Args:
      scores: float (b, R) similarities; no gradient is taken through this function.
      members: bool (b, R), the j of each anchor.
      masks: a sequence of bool (b, R) masks of the k counted, or None for every column.
      value: `value(*r)` of the (b,) counts r_m of one member of every row, returns
        ((b,) values, [(b,) derivatives d value / d r_m for each m]).
      order: the `PositiveOrder` of the members (anchor_rank None: the anchor's own column,
        when a member, is visited like the others).
      temperature: tau > 0.
      clip: None, or the bound c of sigma's argument: sigma(clip(x, -c, c)), its slope 0
        beyond (pytorch-metric-learning's PNP).

    Returns:
      ((b,) sum over each anchor's members of `value`, (b, R) its gradient with respect to
      `scores`), both without gradient.
    """
    s = ops.stop_gradient(ops.convert_to_tensor(scores))
    masks = [None if m is None else ops.convert_to_tensor(m) for m in masks]

    def body(selected, state):
        total, weights = state
        has = ops.any(selected, axis=1)
        z = (s - _row_value(s, selected)) / temperature
        if clip is None:
            sig = ops.sigmoid(z)
            slope = sig * (1.0 - sig) / temperature
        else:
            sig = 1.0 / (1.0 + ops.exp(-ops.clip(z, -clip, clip)))
            inside = ops.less_equal(ops.abs(z), clip)
            slope = ops.where(inside, sig * (1.0 - sig), 0.0) / temperature
        counts = [ops.sum(sig if m is None else ops.where(m, sig, 0.0), axis=1) for m in masks]
        values, slopes = value(*counts)
        total = total + ops.where(has, values, 0.0)
        # d value / d s_k for the counted k, and minus their sum at j (s_aj is in every term).
        dk = 0.0
        for m, dv in zip(masks, slopes, strict=True):
            dk = dk + ops.expand_dims(dv, 1) * (slope if m is None else ops.where(m, slope, 0.0))
        dk = ops.where(ops.expand_dims(has, 1), dk, 0.0)
        weights = weights + dk - ops.where(selected, ops.sum(dk, axis=1, keepdims=True), 0.0)
        return total, weights

    shape = ops.shape(s)
    return _kth_positive_loop(
        members, body, (ops.zeros(shape[:1], s.dtype), ops.zeros(shape, s.dtype)), order
    )


def _row_value(d, selected):
    """(B, 1): the entry of each row of `d` where `selected` is True (0 if none)."""
    return ops.sum(ops.where(selected, d, 0.0), axis=1, keepdims=True)


def semihard_negatives(distances, positive_mask, negative_mask, order=None):
    """Index of the semi-hard negative for every (anchor, positive) pair.

    The rule of FaceNet as TensorFlow Addons implements it: for anchor a and
    positive p, the negative n with the smallest d(a, n) among those with
    d(a, n) > d(a, p); if there is none, the negative with the largest d(a, n).

    Args:
      distances: (B, R) float distances (larger is farther).
      positive_mask, negative_mask: (B, R) booleans.
      order: optional `PositiveOrder`; it takes the ranks of the positives from the
        labels instead of a cumulative sum of `positive_mask` (the same result, faster).
        `semihard_weights`, `batch_all_counts` and `batch_all_soft_terms` take it too.

    Returns:
      (index, outside): int32 (B, R) column of the chosen negative for each
      positive pair, and a boolean (B, R) that is True where a negative farther
      than the positive exists. Entries for non-positive pairs are 0 / False.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    negative_mask = ops.convert_to_tensor(negative_mask)
    big = ops.max(d) + 1.0
    shape = ops.shape(d)

    def body(selected, state):
        index, outside = state
        farther = ops.logical_and(negative_mask, ops.greater(d, _row_value(d, selected)))
        chosen = ops.cast(ops.argmin(ops.where(farther, d, big), axis=1), "int32")
        exists = ops.any(farther, axis=1)
        index = ops.where(selected, ops.expand_dims(chosen, 1), index)
        outside = ops.where(selected, ops.expand_dims(exists, 1), outside)
        return index, outside

    return _kth_positive_loop(
        positive_mask,
        body,
        (ops.zeros(shape, dtype="int32"), ops.zeros(shape, dtype="bool")),
        order,
    )


def _on_backend(torch_kernel, ops_form, distances, positive_mask, negative_mask, margin, order):
    """`torch_kernel` on PyTorch (it needs no `order`), else the `keras.ops` form."""
    if _kernels.has_torch_kernels():
        return torch_kernel(
            ops.convert_to_tensor(distances),
            ops.convert_to_tensor(positive_mask),
            ops.convert_to_tensor(negative_mask),
            margin,
        )
    return ops_form(distances, positive_mask, negative_mask, margin, order)


def semihard_signed_weights(distances, positive_mask, negative_mask, margin, order=None):
    """`semihard_weights` in one matrix: `pos_w - neg_w` (their supports are disjoint).

    The semi-hard loss sum is `sum(w * d + margin * relu(w))`. On PyTorch this runs
    `deepmetric._kernels.torch_semihard_signed_weights` (the same weights in fewer
    passes; it needs no `order`); elsewhere the `keras.ops` form,
    `semihard_signed_weights_ops`.
    """
    return _on_backend(
        _kernels.torch_semihard_signed_weights,
        semihard_signed_weights_ops,
        distances,
        positive_mask,
        negative_mask,
        margin,
        order,
    )


def semihard_signed_weights_ops(distances, positive_mask, negative_mask, margin, order=None):
    """`semihard_signed_weights` in `keras.ops`, on every backend.

    One (B, R) matrix is carried through the loop instead of two, and the chosen
    negative is found by its distance: the negatives at exactly the chosen distance
    share the weight (they are all farther than the positive when a farther negative
    exists, and all at the farthest distance otherwise), so one tie count serves both
    cases.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    negative_mask = ops.convert_to_tensor(negative_mask)
    big = ops.max(d) + 1.0
    # The farthest negative, used where no negative is farther than the positive.
    farthest = ops.max(ops.where(negative_mask, d, -big), axis=1, keepdims=True)

    def body(selected, state):
        (w,) = state
        threshold = _row_value(d, selected)
        farther = ops.logical_and(negative_mask, ops.greater(d, threshold))
        closest = ops.min(ops.where(farther, d, big), axis=1, keepdims=True)
        chosen = ops.where(ops.less(closest, big), closest, farthest)
        active = ops.logical_and(
            ops.any(selected, axis=1, keepdims=True), ops.greater(margin + threshold - chosen, 0.0)
        )
        at_chosen = ops.logical_and(negative_mask, ops.equal(d, chosen))
        ties = ops.maximum(ops.sum(ops.cast(at_chosen, d.dtype), axis=1, keepdims=True), 1.0)
        share = ops.where(ops.logical_and(active, at_chosen), 1.0 / ties, 0.0)
        return (ops.where(ops.logical_and(selected, active), 1.0, w - share),)

    (w,) = _kth_positive_loop(positive_mask, body, (ops.zeros(ops.shape(d), d.dtype),), order)
    return w


def semihard_weights(distances, positive_mask, negative_mask, margin, order=None):
    """Stop-gradient weights that make the semi-hard triplet loss linear in `distances`.

    With the semi-hard negative n*(a, p) of each positive pair (the rule of
    `semihard_negatives`) and the active pairs A = {(a, p): m + d_ap - d_an* > 0},
    the loss sum is `sum(pos_w * (m + d)) - sum(neg_w * d)` where
    `pos_w[a, p] = 1` for (a, p) in A and `neg_w[a, n]` counts the active pairs of
    anchor a whose semi-hard negative is n. Where several negatives tie at the
    chosen distance, the weight is split equally among them, as the gradient of
    TensorFlow's `reduce_min` / `reduce_max` splits it. Nothing is gathered, so
    the backward pass is an elementwise product (see `semihard_signed_weights`).

    Returns:
      (pos_w, neg_w): float (B, R) matrices without gradient.
    """
    w = semihard_signed_weights(distances, positive_mask, negative_mask, margin, order)
    return ops.relu(w), ops.relu(-w)


def batch_all_signed_counts(distances, positive_mask, negative_mask, margin, order=None):
    """`batch_all_counts` in one matrix: `per_positive - per_negative` (disjoint supports).

    The batch-all loss sum is `sum(w * d + margin * relu(w))` and the number of active
    triplets `sum(relu(w))`. On PyTorch this runs
    `deepmetric._kernels.torch_batch_all_signed_counts` (the same counts in fewer passes);
    elsewhere the `keras.ops` form, `batch_all_signed_counts_ops`.
    """
    return _on_backend(
        _kernels.torch_batch_all_signed_counts,
        batch_all_signed_counts_ops,
        distances,
        positive_mask,
        negative_mask,
        margin,
        order,
    )


def batch_all_signed_counts_ops(distances, positive_mask, negative_mask, margin, order=None):
    """`batch_all_signed_counts` in `keras.ops`, on every backend."""
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    negative_mask = ops.convert_to_tensor(negative_mask)

    low = ops.min(d) - 1.0

    def body(selected, state):
        (w,) = state
        # The positive's distance; `low` (and no positive) in rows without one.
        threshold = ops.max(ops.where(selected, d, low), axis=1, keepdims=True)
        active = ops.logical_and(
            ops.logical_and(negative_mask, ops.less(d, threshold + margin)),
            ops.greater(threshold, low),
        )
        count = ops.sum(ops.cast(active, d.dtype), axis=1, keepdims=True)
        return (ops.where(selected, count, ops.where(active, w - 1.0, w)),)

    (w,) = _kth_positive_loop(positive_mask, body, (ops.zeros(ops.shape(d), d.dtype),), order)
    return w


def batch_all_counts(distances, positive_mask, negative_mask, margin, order=None):
    """Counts of the active triplets of batch-all mining, without enumerating them.

    A triplet (a, p, n) is active when `d(a, p) - d(a, n) + margin > 0`.

    Returns:
      (per_positive, per_negative): float32 (B, R) matrices;
      `per_positive[a, p]` = number of negatives n of a with an active (a, p, n),
      `per_negative[a, n]` = number of positives p of a with an active (a, p, n).
    """
    w = batch_all_signed_counts(distances, positive_mask, negative_mask, margin, order)
    return ops.relu(w), ops.relu(-w)


def hardest_positive(distances, positive_mask):
    """(B, 1) largest positive distance of each row, TFA's masked maximum."""
    return masked_maximum(distances, positive_mask)


def hardest_negative(distances, negative_mask):
    """(B, 1) smallest negative distance of each row, TFA's masked minimum."""
    return masked_minimum(distances, negative_mask)


def masked_argmax(data, mask):
    """Column of the largest entry of each row within `mask`, and whether the row has any.

    Returns:
      (index, nonempty): int32 (B,) and bool (B,); `index` is 0 for an empty row. No gradient.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(data))
    mask = ops.convert_to_tensor(mask)
    lowest = ops.min(d) - 1.0
    index = ops.cast(ops.argmax(ops.where(mask, d, lowest), axis=1), "int32")
    return index, ops.any(mask, axis=1)


def masked_argmin(data, mask):
    """Column of the smallest entry of each row within `mask`, and whether the row has any.

    Returns:
      (index, nonempty): int32 (B,) and bool (B,); `index` is 0 for an empty row. No gradient.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(data))
    mask = ops.convert_to_tensor(mask)
    highest = ops.max(d) + 1.0
    index = ops.cast(ops.argmin(ops.where(mask, d, highest), axis=1), "int32")
    return index, ops.any(mask, axis=1)


def semihard_negative_per_row(distances, threshold, negative_mask):
    """Semi-hard negative of each row for one threshold per row (one positive per anchor).

    The TFA rule of `semihard_negatives` with the positive distance given per row: the
    negative with the smallest distance above `threshold[a]`, else the farthest negative.

    Args:
      distances: (B, R) float distances (larger is farther).
      threshold: (B,) or (B, 1) distance of each anchor's positive.
      negative_mask: (B, R) booleans.

    Returns:
      int32 (B,) column of the chosen negative (0 for a row without negatives). No gradient.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    negative_mask = ops.convert_to_tensor(negative_mask)
    threshold = ops.reshape(ops.stop_gradient(ops.convert_to_tensor(threshold)), (-1, 1))
    farther = ops.logical_and(negative_mask, ops.greater(d, threshold))
    closest_farther, exists = masked_argmin(d, farther)
    farthest, _ = masked_argmax(d, negative_mask)
    return ops.where(exists, closest_farther, farthest)


def batch_all_soft_terms(distances, positive_mask, negative_mask, order=None):
    """Soft-margin batch-all sums over all triplets, without enumerating them.

    For the triplets (a, p, n) with `z = d(a, p) - d(a, n)`: per anchor the sum of
    `softplus(z)`, the derivative weights of the distances, and the number of triplets with a
    positive loss. A loss rebuilds value and gradient from them as
    `value + sum(weight_p * (d - stop_gradient(d))) - sum(weight_n * (d - stop_gradient(d)))`.

    Returns:
      (values, positive_weights, negative_weights, count): float (B,), (B, R), (B, R) and
      (B,); `positive_weights[a, p]` = sum_n sigmoid(z), `negative_weights[a, n]` =
      sum_p sigmoid(z), `count[a]` the number of anchor a's triplets with a positive loss.
      No gradient.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    shape = ops.shape(d)
    negatives = ops.cast(negative_mask, d.dtype)

    def body(selected, state):
        values, positive_weights, negative_weights, count = state
        positive = _row_value(d, selected)
        use = ops.where(ops.any(selected, axis=1, keepdims=True), negatives, 0.0)
        gap = positive - d
        loss = ops.softplus(gap) * use
        weight = ops.sigmoid(gap) * use
        positive_weights = ops.where(
            selected, ops.sum(weight, axis=1, keepdims=True), positive_weights
        )
        count = count + ops.sum(ops.cast(ops.greater(loss, 0.0), d.dtype), axis=1)
        return values + ops.sum(loss, axis=1), positive_weights, negative_weights + weight, count

    return _kth_positive_loop(
        positive_mask,
        body,
        (
            ops.zeros(shape[:1], d.dtype),
            ops.zeros(shape, d.dtype),
            ops.zeros(shape, d.dtype),
            ops.zeros(shape[:1], d.dtype),
        ),
        order,
    )


class TripletRule(NamedTuple):
    """Which triplets of a batch a margin miner keeps, without listing them.

    A triplet (a, p, n) of positive pair (a, p) and negative pair (a, n) is kept when
    `low < gaps[a, n] - gaps[a, p] <= high`; `gaps` is the miner's (B, R) distance matrix with
    larger meaning farther (a similarity negated), without gradient. `low` / `high` are
    Python floats, possibly infinite. A rule's `keeps(selected, negatives)` is evaluated in a
    loop over the k-th positive of every anchor (`selected`, (B, R), one True per row at most).
    """

    gaps: Any
    low: float
    high: float

    def keeps(self, selected, negatives):
        """(B, R): the negatives n whose triplet with each anchor's selected positive is kept."""
        gaps = ops.stop_gradient(ops.convert_to_tensor(self.gaps))
        t = gaps - _row_value(gaps, selected)
        if self.low != float("-inf"):
            negatives = ops.logical_and(negatives, ops.greater(t, self.low))
        if self.high != float("inf"):
            negatives = ops.logical_and(negatives, ops.less_equal(t, self.high))
        return negatives


class AngleRule(NamedTuple):
    """The triplets of the angular miner: (a, p, n) is kept when
    `atan(||x_a - x_p|| / (2 ||x_n - (x_a + x_p) / 2||)) > angle` (radians).

    Distances as `torch.nn.functional.pairwise_distance` computes them (`||u - v + 1e-6||`), on
    the embeddings as given, like pytorch-metric-learning's `AngularMiner`. `query` (B, D) are
    the anchors, `reference` (R, D) the rows they are compared with.
    """

    query: Any
    reference: Any
    angle: float

    def keeps(self, selected, negatives):
        eps = 1e-6
        q = ops.stop_gradient(self.query)
        r = ops.stop_gradient(self.reference)
        positive = ops.take(r, ops.argmax(ops.cast(selected, "int32"), axis=1), axis=0)
        ap = ops.sqrt(ops.sum(ops.square(q - positive + eps), axis=1, keepdims=True))
        center = (q + positive) / 2.0
        sq = (
            ops.expand_dims(ops.sum(ops.square(r), axis=1), 0)
            + ops.sum(ops.square(center), axis=1, keepdims=True)
            - 2.0 * ops.matmul(center, ops.transpose(r))
        )
        # ||n - c + eps 1||^2 = ||n - c||^2 + 2 eps (sum n - sum c) + D eps^2
        dim = ops.cast(ops.shape(r)[1], r.dtype)
        sq = sq + 2.0 * eps * (
            ops.expand_dims(ops.sum(r, axis=1), 0) - ops.sum(center, axis=1, keepdims=True)
        )
        nc = ops.sqrt(ops.maximum(sq + dim * eps * eps, 0.0))
        angles = ops.arctan(ap / (2.0 * nc))
        return ops.logical_and(negatives, ops.greater(angles, self.angle))


def _rule_keeps(rule, selected, negatives):
    """(B, R): negatives n of each anchor whose triplet with the selected positive `rule` keeps."""
    return negatives if rule is None else rule.keeps(selected, negatives)


def rule_pair_counts(rule, positive_mask, negative_mask, order=None):
    """How often each pair occurs in the triplets a `TripletRule` keeps.

    Returns:
      (per_positive, per_negative): float32 (B, R); `per_positive[a, p]` is the number of
      kept triplets (a, p, n), `per_negative[a, n]` the number of kept triplets (a, p, n). No
      gradient. A loop over the positive ranks (`_kth_positive_loop`): O(B * R) memory.
    """
    negative_mask = ops.convert_to_tensor(negative_mask)
    shape = ops.shape(negative_mask)

    def body(selected, state):
        per_positive, per_negative = state
        has = ops.any(selected, axis=1, keepdims=True)
        kept = ops.logical_and(_rule_keeps(rule, selected, negative_mask), has)
        kept = ops.cast(kept, "float32")
        count = ops.sum(kept, axis=1, keepdims=True)
        return ops.where(selected, count, per_positive), per_negative + kept

    zeros = ops.zeros(shape, "float32")
    return _kth_positive_loop(positive_mask, body, (zeros, zeros), order)


def triplet_terms(
    distances,
    positive_mask,
    negative_mask,
    *,
    margin=0.0,
    smooth=False,
    swap=False,
    rule=None,
    order=None,
):
    """Sums over all triplets (a, p, n) of positives x negatives, with options, not enumerated.

    The triplet (a, p, n) costs `relu(d_ap - d'_an + margin)`, or `softplus(d_ap - d'_an +
    margin)` with `smooth`, where `d'_an = d_an`, or with `swap` `min(d_an, d_pn)` (the
    positive-negative distance when it is smaller: Balntas et al., 2016); with a `rule`
    (`TripletRule`) only the triplets it keeps count. `swap` needs the whole (B, B)
    self-comparison (`d[p, n]` is read from row p).

    Returns:
      (values, weights, count): float (B,) the sum of the costs of each anchor's triplets;
      (B, R) weights such that `sum(weights * d)` has the gradient of the sum of all costs
      (with `swap`, the weights of the `d_pn` entries are added at row p); (B,) the number of
      each anchor's triplets with a positive cost. No gradient.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    negative_mask = ops.convert_to_tensor(negative_mask)
    shape = ops.shape(d)
    num_columns = d.shape[1] if d.shape[1] is not None else shape[1]

    def body(selected, state):
        values, weights, swap_weights, count = state
        has = ops.any(selected, axis=1, keepdims=True)
        use = ops.logical_and(_rule_keeps(rule, selected, negative_mask), has)
        negative = d
        if swap:
            positive_index = ops.argmax(ops.cast(selected, "int32"), axis=1)
            pn = ops.take(d, positive_index, axis=0)
            by_pn = ops.less(pn, d)
            negative = ops.where(by_pn, pn, d)
        gap = _row_value(d, selected) - negative + margin
        if smooth:
            loss = ops.where(use, ops.softplus(gap), 0.0)
            weight = ops.where(use, ops.sigmoid(gap), 0.0)
        else:
            loss = ops.where(use, ops.relu(gap), 0.0)
            weight = ops.cast(ops.greater(loss, 0.0), d.dtype)
        weights = ops.where(selected, ops.sum(weight, axis=1, keepdims=True), weights)
        if swap:
            weights = weights - ops.where(by_pn, 0.0, weight)
            swap_weights = swap_weights - ops.segment_sum(
                ops.where(by_pn, weight, 0.0), positive_index, num_segments=num_columns
            )
        else:
            weights = weights - weight
        count = count + ops.sum(ops.cast(ops.greater(loss, 0.0), d.dtype), axis=1)
        return values + ops.sum(loss, axis=1), weights, swap_weights, count

    zeros = ops.zeros(shape, d.dtype)
    values, weights, swap_weights, count = _kth_positive_loop(
        positive_mask,
        body,
        (
            ops.zeros(shape[:1], d.dtype),
            zeros,
            zeros if swap else ops.zeros((), d.dtype),
            ops.zeros(shape[:1], d.dtype),
        ),
        order,
    )
    if swap:
        weights = weights + swap_weights
    return values, weights, count
