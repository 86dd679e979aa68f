"""The base class of deepmetric's losses: labels kept as integers, Keras reduction."""

from __future__ import annotations

import keras
from keras import ops

from deepmetric._labels import check_embeddings, check_labels

_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


def reduce_losses(values, sample_weight=None, reduction="sum_over_batch_size"):
    """Keras' reduction of per-example values, with optional (B,) sample weights."""
    values = ops.convert_to_tensor(values)
    if sample_weight is not None:
        sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), values.dtype)
        if len(sample_weight.shape) == len(values.shape) + 1:
            sample_weight = ops.squeeze(sample_weight, axis=-1)
        values = values * sample_weight
    if reduction in (None, "none"):
        return values
    total = ops.sum(values)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        return ops.divide_no_nan(total, ops.sum(sample_weight * ops.ones_like(values)))
    size = ops.cast(ops.size(values), values.dtype)
    return ops.divide_no_nan(total, size)


def per_anchor_share(contributions, normalizer):
    """Spreads a normalised sum over the anchors for Keras' mean reduction.

    A batch loss `sum_a c_a / normalizer` (a mean over pairs or triplets) is
    returned per anchor as `B * c_a / normalizer`, so that Keras' default
    reduction (the mean over the batch) gives exactly the batch loss, and a
    sample weight scales that anchor's share.
    """
    batch = ops.cast(ops.shape(contributions)[0], contributions.dtype)
    return ops.divide_no_nan(contributions * batch, normalizer)


class MetricLoss(keras.losses.Loss):
    """Base of the losses that take class labels and a batch of embeddings.

    Keras' `Loss.__call__` casts `y_true` to the loss dtype, which merges labels
    16777216 and 16777217 in float32 (and 256 and 257 in bfloat16). This class
    keeps the labels integers: they are checked and compared as integers only.
    Embeddings are computed in float32, also under a mixed-precision policy.

    Subclasses implement `call(labels, embeddings)` returning per-anchor values.
    """

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            embeddings = check_embeddings(y_pred, "y_pred")
            labels = check_labels(y_true, embeddings.shape[0], "y_true")
            losses = self.call(labels, embeddings)
            return reduce_losses(losses, sample_weight, self.reduction)

    def get_config(self):
        return {"name": self.name, "reduction": self.reduction}
