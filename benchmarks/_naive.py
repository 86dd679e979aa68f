"""Naive O(B^3) forms of the mined triplet losses, written as their sources wrote them.

These are the baselines of `benchmarks/losses.py`: the same rules as the library's
losses, computed by materialising B^2 x B (or B x B x B) tensors, in `keras.ops`
so that they run on every backend. `python benchmarks/losses.py --check` asserts
that they give the library's values and gradients.

- `semihard`: `tfa.losses.triplet_semihard_loss` (TFA 0.23), which tiles the
  B x B distance matrix B times into a (B^2, B) tensor.
- `batch_all`: Moindrot's "Triplet loss and online triplet mining in
  TensorFlow" (`batch_all_triplet_loss`), a (B, B, B) triplet tensor.
- `batch_hard`: the batch-hard rule (Hermans et al., 2017) taken as the hardest
  valid triplet of each anchor in the same (B, B, B) tensor, as a miner that
  enumerates all triplets finds it.
- `lifted`: `tfa.losses.lifted_struct_loss`, which tiles the B x B matrix into a
  (B^2, B) tensor for the log-sum-exp over negatives.

Only the distance matrix comes from the library (`pairwise_distance`, whose TFA
semantics are part of the public contract); all mining is written out here.
"""

from __future__ import annotations

from keras import ops

from deepmetric.distances import pairwise_distance

# Bytes per B^3 element held at the peak of one eager forward + backward step,
# counted from the operations below (float32 = 4 bytes, bool = 1 byte, plus the
# tensors autograd saves and the gradients of the B^3 intermediates). Used to
# decide, before running, whether a naive form fits; once a smaller batch has
# been measured the measured peak, scaled by B^3, is used instead.
BYTES_PER_B3 = {"semihard": 30, "batch_all": 30, "batch_hard": 22, "lifted": 30}


def _masked_maximum(data, mask, axis=1):
    """TFA's `_masked_maximum` (the row minimum where the mask is empty)."""
    lowest = ops.min(data, axis=axis, keepdims=True)
    return ops.max((data - lowest) * mask, axis=axis, keepdims=True) + lowest


def _masked_minimum(data, mask, axis=1):
    """TFA's `_masked_minimum` (the row maximum where the mask is empty)."""
    highest = ops.max(data, axis=axis, keepdims=True)
    return ops.min((data - highest) * mask, axis=axis, keepdims=True) + highest


def semihard(labels, embeddings, margin=1.0):
    """`tfa.losses.triplet_semihard_loss` with the L2 distance, step for step."""
    labels = ops.reshape(labels, (-1, 1))
    pdist = pairwise_distance(embeddings)
    adjacency = ops.equal(labels, ops.transpose(labels))
    adjacency_not = ops.logical_not(adjacency)
    b = ops.shape(labels)[0]
    # Row r = p * B + a holds the distances of anchor a; its threshold is d(a, p).
    pdist_tile = ops.tile(pdist, [b, 1])
    mask = ops.logical_and(
        ops.tile(adjacency_not, [b, 1]),
        ops.greater(pdist_tile, ops.reshape(ops.transpose(pdist), [-1, 1])),
    )
    mask_final = ops.reshape(
        ops.greater(ops.sum(ops.cast(mask, "float32"), axis=1, keepdims=True), 0.0), [b, b]
    )
    mask_final = ops.transpose(mask_final)
    adjacency_not = ops.cast(adjacency_not, "float32")
    mask = ops.cast(mask, "float32")
    negatives_outside = ops.reshape(_masked_minimum(pdist_tile, mask), [b, b])
    negatives_outside = ops.transpose(negatives_outside)
    negatives_inside = ops.tile(_masked_maximum(pdist, adjacency_not), [1, b])
    semi_hard_negatives = ops.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist - semi_hard_negatives
    mask_positives = ops.cast(adjacency, "float32") - ops.eye(b, dtype="float32")
    num_positives = ops.sum(mask_positives)
    return ops.sum(ops.maximum(loss_mat * mask_positives, 0.0)) / num_positives


def _triplet_mask(labels):
    """Moindrot's `_get_triplet_mask`: (B, B, B) booleans, valid (a, p, n)."""
    b = ops.shape(labels)[0]
    not_equal = ops.logical_not(ops.cast(ops.eye(b), "bool"))
    i_ne_j = ops.expand_dims(not_equal, 2)
    i_ne_k = ops.expand_dims(not_equal, 1)
    j_ne_k = ops.expand_dims(not_equal, 0)
    distinct = ops.logical_and(ops.logical_and(i_ne_j, i_ne_k), j_ne_k)
    label_equal = ops.equal(ops.expand_dims(labels, 0), ops.expand_dims(labels, 1))
    i_eq_j = ops.expand_dims(label_equal, 2)
    i_eq_k = ops.expand_dims(label_equal, 1)
    valid_labels = ops.logical_and(i_eq_j, ops.logical_not(i_eq_k))
    return ops.logical_and(distinct, valid_labels)


def batch_all(labels, embeddings, margin=1.0):
    """Moindrot's `batch_all_triplet_loss` (Euclidean, not squared)."""
    labels = ops.reshape(labels, (-1,))
    pdist = pairwise_distance(embeddings)
    anchor_positive = ops.expand_dims(pdist, 2)
    anchor_negative = ops.expand_dims(pdist, 1)
    triplet_loss = anchor_positive - anchor_negative + margin
    mask = ops.cast(_triplet_mask(labels), "float32")
    triplet_loss = ops.maximum(mask * triplet_loss, 0.0)
    positive = ops.cast(ops.greater(triplet_loss, 1e-16), "float32")
    num_positive = ops.sum(positive)
    return ops.sum(triplet_loss) / (num_positive + 1e-16)


def batch_hard(labels, embeddings, margin=1.0):
    """Batch-hard: per anchor, the valid triplet with the largest d_ap - d_an, mean hinge."""
    labels = ops.reshape(labels, (-1,))
    pdist = pairwise_distance(embeddings)
    gap = ops.expand_dims(pdist, 2) - ops.expand_dims(pdist, 1)
    b = ops.shape(labels)[0]
    masked = ops.where(_triplet_mask(labels), gap, -1e9)
    hardest = ops.max(ops.reshape(masked, [b, -1]), axis=1)
    return ops.mean(ops.relu(hardest + margin))


def lifted(labels, embeddings, margin=1.0):
    """`tfa.losses.lifted_struct_loss`, step for step."""
    labels = ops.reshape(labels, (-1, 1))
    pdist = pairwise_distance(embeddings)
    adjacency = ops.equal(labels, ops.transpose(labels))
    adjacency_not = ops.logical_not(adjacency)
    b = ops.shape(labels)[0]
    diff = margin - pdist
    mask = ops.cast(adjacency_not, "float32")
    row_minimums = ops.min(diff, axis=1, keepdims=True)
    row_negative_maximums = (
        ops.max((diff - row_minimums) * mask, axis=1, keepdims=True) + row_minimums
    )
    max_elements = ops.maximum(row_negative_maximums, ops.transpose(row_negative_maximums))
    diff_tiled = ops.tile(diff, [b, 1])
    mask_tiled = ops.tile(mask, [b, 1])
    max_elements_vect = ops.reshape(ops.transpose(max_elements), [-1, 1])
    loss_exp_left = ops.reshape(
        ops.sum(ops.exp(diff_tiled - max_elements_vect) * mask_tiled, axis=1, keepdims=True),
        [b, b],
    )
    loss_mat = max_elements + ops.log(loss_exp_left + ops.transpose(loss_exp_left))
    loss_mat = loss_mat + pdist
    mask_positives = ops.cast(adjacency, "float32") - ops.eye(b, dtype="float32")
    num_positives = ops.sum(mask_positives) / 2.0
    return 0.25 * ops.sum(ops.square(ops.maximum(loss_mat * mask_positives, 0.0))) / num_positives


# Library loss class name -> naive form of the same rule.
NAIVE = {
    "TripletSemiHardLoss": ("semihard", semihard),
    "TripletBatchAllLoss": ("batch_all", batch_all),
    "TripletHardLoss": ("batch_hard", batch_hard),
    "LiftedStructLoss": ("lifted", lifted),
}
