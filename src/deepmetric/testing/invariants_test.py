"""The invariant checker fails where a loss breaks an invariant, naming the invariant.

Each loss below breaks one invariant on purpose (and keeps the others where it can); a correct
loss passes every check (`conformance_test.py`).
"""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import testing
from deepmetric._labels import check_nonempty
from deepmetric.losses.base import NON_NEGATIVE, MetricLoss, nonfinite_to_nan, number_option
from deepmetric.testing import invariants


def _masks(labels, x):
    """Squared distances and the positive (i, j != i) and negative pair masks, as floats."""
    labels = ops.reshape(labels, (-1,))
    sq = ops.sum((ops.expand_dims(x, 1) - ops.expand_dims(x, 0)) ** 2, axis=-1)
    same = ops.equal(ops.expand_dims(labels, 1), ops.expand_dims(labels, 0))
    not_self = ops.logical_not(ops.eye(ops.shape(x)[0], dtype="bool"))
    pos = ops.cast(ops.logical_and(same, not_self), x.dtype)
    return sq, pos, ops.cast(ops.logical_not(same), x.dtype)


def _pair_loss(labels, x):
    """(mean positive distance, number of positive pairs), 0 without a negative pair."""
    sq, pos, neg = _masks(labels, x)
    has_negatives = ops.cast(ops.sum(neg) > 0, x.dtype)
    return ops.sum(sq * pos) * has_negatives, ops.sum(pos)


@keras.saving.register_keras_serializable(package="deepmetric_invariants_test")
class FloatLabels(keras.losses.Loss):
    """Keras' `Loss.__call__` casts the labels to float32: 2^24 and 2^24 + 1 merge."""

    def call(self, y_true, y_pred):
        total, count = _pair_loss(y_true, y_pred)
        return ops.divide_no_nan(total, count)


@keras.saving.register_keras_serializable(package="deepmetric_invariants_test")
class IntegerLabels(keras.losses.Loss):
    """The same loss with integer labels; `flaw` breaks one invariant."""

    def __init__(self, flaw=None, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.flaw, self.scale = flaw, scale

    def __call__(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(ops.convert_to_tensor(y_true), "int32")
        x = ops.convert_to_tensor(y_pred, "float32")
        if self.flaw != "accepts an empty batch":
            check_nonempty(x, "y_pred")
        total, count = _pair_loss(labels, x)
        value = self.scale * ops.divide_no_nan(total, count)
        if self.flaw != "hides a NaN":
            value = nonfinite_to_nan(value, x)
        else:
            value = ops.where(ops.isfinite(value), value, 0.0)
        if self.flaw == "order":
            value = value + ops.sum(x[0])
        if self.flaw == "label values":
            value = value + ops.mean(ops.cast(labels, "float32")) * ops.sum(x) * 1e-3
        if self.flaw == "nan without pairs":
            value = self.scale * total / count
        return value

    def get_config(self):
        config = {"name": self.name, "reduction": self.reduction, "flaw": self.flaw}
        if self.flaw != "forgets an option":
            config["scale"] = self.scale
        return config


def test_a_correct_loss_passes_every_check():
    testing.check_loss(
        IntegerLabels(), checks=[c for c in testing.LOSS_CHECKS if c != "bfloat16_labels"]
    )


def _pair_shares(labels, embeddings, margin=1.0):
    total, count = _pair_loss(labels, embeddings)
    return ops.ones_like(embeddings[:, 0]) * ops.divide_no_nan(total, count) * margin


class Unbounded(MetricLoss):
    """A numeric option without a declared range."""

    function = staticmethod(_pair_shares)
    options = (number_option("margin", 1.0),)
    takes_reference = False


def _shares_without_check(labels, embeddings, margin=1.0):
    return _pair_shares(labels, embeddings, margin)


class WrongRange(MetricLoss):
    """The class checks margin >= 0, its function accepts anything."""

    function = staticmethod(_shares_without_check)
    options = (number_option("margin", 1.0, NON_NEGATIVE),)
    takes_reference = False


@pytest.mark.parametrize(
    "loss, check",
    [
        (FloatLabels(), "large_labels"),
        (IntegerLabels("order"), "permutation"),
        (IntegerLabels("label values"), "relabelling"),
        (IntegerLabels("forgets an option", scale=2.0), "config_round_trip"),
        (IntegerLabels("forgets an option", scale=2.0), "keras_save_load"),
        (IntegerLabels("nan without pairs"), "degenerate"),
        (IntegerLabels("hides a NaN"), "nonfinite"),
        (IntegerLabels("accepts an empty batch"), "empty_batch"),
        (Unbounded(), "option_ranges"),
        (WrongRange(), "option_ranges"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_a_broken_invariant_fails_its_check(loss, check):
    with pytest.raises(AssertionError, match=check):
        testing.check_loss(loss, checks=[check])


class NegativesOnly(keras.losses.Loss):
    """A loss of the negative pairs alone: 0 for one class, not 0 for distinct labels."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(ops.convert_to_tensor(y_true), "int32")
        sq, _, neg = _masks(labels, ops.convert_to_tensor(y_pred, "float32"))
        return ops.divide_no_nan(ops.sum(ops.exp(-sq) * neg), ops.sum(neg))


def test_one_sided_losses_may_keep_terms_without_pairs_of_one_kind():
    with pytest.raises(AssertionError, match="degenerate: distinct"):
        testing.check_loss(NegativesOnly(), checks=["degenerate"])
    testing.check_loss(NegativesOnly(), checks=["degenerate"], one_sided=True)


def test_the_batch_has_every_class_twice():
    labels, x = invariants.batch(seed=3, size=12, classes=4)
    assert np.bincount(labels).min() >= 2 and x.dtype == np.float32 and x.shape == (12, 5)
