"""Fixed-shape mining over a B x B distance matrix: masks, masked extrema, selections.

Every function here works on (B, B) matrices or per-row vectors: nothing builds
a B x B x B tensor or a list of triplets, everything traces under `jax.jit` and
`tf.function` with an unknown batch size. Selections that depend on each
(anchor, positive) pair (the semi-hard negative, the batch-all counts) loop over
"the k-th positive of every anchor" with `keras.ops.while_loop`: one (B, B) pass
per step and as many steps as the largest number of positives of one anchor
(K - 1 in a P x K batch). The loop computes only indices and counts, with no
gradient; the loss then gathers the chosen distances, so gradients flow through
ordinary differentiable ops.
"""

from __future__ import annotations

from keras import ops


def label_masks(labels, reference_labels=None):
    """Boolean (B, R) masks of positive and negative pairs.

    Without `reference_labels` the batch is compared with itself and the
    diagonal (an example with itself) is neither positive nor negative.
    """
    labels = ops.convert_to_tensor(labels)
    ref = labels if reference_labels is None else ops.convert_to_tensor(reference_labels)
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(ref, 0))
    if reference_labels is None:
        n = ops.shape(labels)[0]
        not_self = ops.logical_not(ops.cast(ops.eye(n), "bool"))
        return ops.logical_and(same, not_self), ops.logical_not(same)
    return same, ops.logical_not(same)


def masked_maximum(data, mask, axis=1):
    """Row-wise maximum over `mask`, TFA's formulation (row minimum if the mask is empty)."""
    data = ops.convert_to_tensor(data)
    mask = ops.cast(mask, data.dtype)
    lowest = ops.min(data, axis=axis, keepdims=True)
    return ops.max((data - lowest) * mask, axis=axis, keepdims=True) + lowest


def masked_minimum(data, mask, axis=1):
    """Row-wise minimum over `mask`, TFA's formulation (row maximum if the mask is empty)."""
    data = ops.convert_to_tensor(data)
    mask = ops.cast(mask, data.dtype)
    highest = ops.max(data, axis=axis, keepdims=True)
    return ops.min((data - highest) * mask, axis=axis, keepdims=True) + highest


def _kth_positive_loop(positive_mask, body, state):
    """Runs `body(k_index, valid, state)` once per positive rank k of every anchor.

    `k_index` (B,) holds, for every anchor, the column of its k-th positive
    (in column order); `valid` (B,) says whether the anchor has a k-th positive.
    """
    n_cols = ops.shape(positive_mask)[1]
    cols = ops.expand_dims(ops.arange(n_cols, dtype="int32"), 0)
    max_positives = ops.max(ops.sum(ops.cast(positive_mask, "int32"), axis=1))
    n_rows = ops.shape(positive_mask)[0]
    previous = ops.full((n_rows,), -1, dtype="int32")

    def cond(k, previous, *state):
        return ops.less(k, max_positives)

    def step(k, previous, *state):
        later = ops.logical_and(positive_mask, ops.greater(cols, ops.expand_dims(previous, 1)))
        index = ops.min(ops.where(later, cols, n_cols), axis=1)
        valid = ops.less(index, n_cols)
        state = body(ops.minimum(index, n_cols - 1), valid, tuple(state))
        return (k + 1, index, *state)

    out = ops.while_loop(cond, step, (ops.convert_to_tensor(0, "int32"), previous, *state))
    return out[2:]


def _column_of(index, n_cols):
    """(B, R) boolean: column j of row a is `index[a]`."""
    cols = ops.expand_dims(ops.arange(n_cols, dtype="int32"), 0)
    return ops.equal(cols, ops.expand_dims(index, 1))


def semihard_negatives(distances, positive_mask, negative_mask):
    """Index of the semi-hard negative for every (anchor, positive) pair.

    The rule of FaceNet as TensorFlow Addons implements it: for anchor a and
    positive p, the negative n with the smallest d(a, n) among those with
    d(a, n) > d(a, p); if there is none, the negative with the largest d(a, n).

    Args:
      distances: (B, R) float distances (larger is farther).
      positive_mask, negative_mask: (B, R) booleans.

    Returns:
      (index, outside): int32 (B, R) column of the chosen negative for each
      positive pair, and a boolean (B, R) that is True where a negative farther
      than the positive exists. Entries for non-positive pairs are 0 / False.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    positive_mask = ops.convert_to_tensor(positive_mask)
    negative_mask = ops.convert_to_tensor(negative_mask)
    n_cols = ops.shape(d)[1]
    big = ops.max(d) + 1.0
    shape = ops.shape(d)

    def body(p_index, valid, state):
        index, outside = state
        threshold = ops.take_along_axis(d, ops.expand_dims(p_index, 1), axis=1)
        farther = ops.logical_and(negative_mask, ops.greater(d, threshold))
        chosen = ops.cast(ops.argmin(ops.where(farther, d, big), axis=1), "int32")
        exists = ops.any(farther, axis=1)
        write = ops.logical_and(_column_of(p_index, n_cols), ops.expand_dims(valid, 1))
        index = ops.where(write, ops.expand_dims(chosen, 1), index)
        outside = ops.where(write, ops.expand_dims(exists, 1), outside)
        return index, outside

    index, outside = _kth_positive_loop(
        positive_mask,
        body,
        (ops.zeros(shape, dtype="int32"), ops.zeros(shape, dtype="bool")),
    )
    return index, outside


def batch_all_counts(distances, positive_mask, negative_mask, margin):
    """Counts of the active triplets of batch-all mining, without enumerating them.

    A triplet (a, p, n) is active when `d(a, p) - d(a, n) + margin > 0`.

    Returns:
      (per_positive, per_negative): float32 (B, R) matrices;
      `per_positive[a, p]` = number of negatives n of a with an active (a, p, n),
      `per_negative[a, n]` = number of positives p of a with an active (a, p, n).
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    positive_mask = ops.convert_to_tensor(positive_mask)
    negative_mask = ops.convert_to_tensor(negative_mask)
    n_cols = ops.shape(d)[1]
    shape = ops.shape(d)
    negatives = ops.cast(negative_mask, d.dtype)

    def body(p_index, valid, state):
        per_positive, per_negative = state
        threshold = ops.take_along_axis(d, ops.expand_dims(p_index, 1), axis=1) + margin
        active = negatives * ops.cast(ops.less(d, threshold), d.dtype)
        active = active * ops.cast(ops.expand_dims(valid, 1), d.dtype)
        write = ops.logical_and(_column_of(p_index, n_cols), ops.expand_dims(valid, 1))
        count = ops.sum(active, axis=1, keepdims=True)
        per_positive = ops.where(write, count, per_positive)
        return per_positive, per_negative + active

    return _kth_positive_loop(
        positive_mask, body, (ops.zeros(shape, d.dtype), ops.zeros(shape, d.dtype))
    )


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


def batch_all_soft_terms(distances, positive_mask, negative_mask):
    """Soft-margin batch-all sums over all triplets, without enumerating them.

    For the triplets (a, p, n) with `z = d(a, p) - d(a, n)`: per anchor the sum of
    `softplus(z)`, the derivative weights of the distances, and the number of triplets with a
    positive loss. A loss rebuilds value and gradient from them as
    `value + sum(weight_p * (d - stop_gradient(d))) - sum(weight_n * (d - stop_gradient(d)))`.

    Returns:
      (values, positive_weights, negative_weights, count): float (B,), (B, R), (B, R) and a
      scalar; `positive_weights[a, p]` = sum_n sigmoid(z), `negative_weights[a, n]` =
      sum_p sigmoid(z). No gradient.
    """
    d = ops.stop_gradient(ops.convert_to_tensor(distances))
    positive_mask = ops.convert_to_tensor(positive_mask)
    n_cols = ops.shape(d)[1]
    shape = ops.shape(d)
    negatives = ops.cast(negative_mask, d.dtype)

    def body(p_index, valid, state):
        values, positive_weights, negative_weights, count = state
        positive = ops.take_along_axis(d, ops.expand_dims(p_index, 1), axis=1)
        use = negatives * ops.cast(ops.expand_dims(valid, 1), d.dtype)
        gap = positive - d
        loss = ops.softplus(gap) * use
        weight = ops.sigmoid(gap) * use
        write = ops.logical_and(_column_of(p_index, n_cols), ops.expand_dims(valid, 1))
        positive_weights = ops.where(
            write, ops.sum(weight, axis=1, keepdims=True), positive_weights
        )
        count = count + ops.sum(ops.cast(ops.greater(loss, 0.0), d.dtype))
        return values + ops.sum(loss, axis=1), positive_weights, negative_weights + weight, count

    return _kth_positive_loop(
        positive_mask,
        body,
        (
            ops.zeros(shape[:1], d.dtype),
            ops.zeros(shape, d.dtype),
            ops.zeros(shape, d.dtype),
            ops.convert_to_tensor(0.0, d.dtype),
        ),
    )
