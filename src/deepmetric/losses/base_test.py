"""The shared layer of the losses (`deepmetric.losses.base`): checked inputs and reference
masks, through every loss that takes a reference set."""

import inspect
import re

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses
from deepmetric.losses import base
from deepmetric.losses.base import MetricLoss
from deepmetric.losses.softmax_test import (
    LOSSES,
    NAMES,
    _assert_grad_close,
    _value_and_grad,
    batch,
    with_duplicates,
)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    fn = LOSSES[name][0]
    labels, x = batch(0)
    with pytest.raises(ValueError, match="given together"):
        fn(labels, x, reference_embeddings=x)
    with pytest.raises(ValueError, match=r"embedding size.*\(12, 5\).*\(12, 3\)"):
        fn(labels, x, reference_embeddings=x[:, :3], reference_labels=labels)
    with pytest.raises(ValueError, match=r"expected 12 labels.*\(11,\)"):
        fn(labels, x, reference_embeddings=x, reference_labels=labels[:11])
    with pytest.raises(ValueError, match=r"labels.shape=\(12, 2\)"):
        fn(np.stack([labels, labels], 1), x)
    with pytest.raises(ValueError, match=r"rank-2.*\(12,\)"):
        fn(labels, x[:, 0])
    with pytest.raises(TypeError, match="integer class labels"):
        LOSSES[name][1]()(np.array(["a"] * 12), x)


# --- reference_mask: rows or pairs of the reference set taken out of every pair. ---


def _with_reference(name, labels, x, ref_labels, ref_x, mask=None, compiled=False):
    fn = LOSSES[name][0]
    args = (labels, ref_x, ref_labels) + (() if mask is None else (mask,))
    return _backend.value_and_grad(
        lambda v, lab, rv, rl, *m: ops.mean(
            fn(
                lab,
                v,
                reference_embeddings=rv,
                reference_labels=rl,
                reference_mask=m[0] if m else None,
            )
        ),
        x,
        *args,
        compiled=compiled,
    )


@pytest.mark.parametrize("name", NAMES)
# Compiled: jax.jit and tf.function; torch runs eagerly, the same as eager.
@pytest.mark.parametrize(
    "compiled",
    [False, True] if _backend.name() != "torch" else [False],
    ids=["eager", "compiled"] if _backend.name() != "torch" else ["eager"],
)
def test_reference_row_mask_equals_dropping_the_rows(name, compiled):
    """Masked-out reference rows (zeros, or labels equal to the anchors') count as neither
    positives nor negatives: the loss equals the loss against the kept rows only."""
    labels, x = batch(14, b=8)
    ref_labels, ref_x = batch(15, b=10)
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    ref_x[~keep] = 0.0
    ref_x[1] = 50.0  # garbage in a masked row
    ref_labels[~keep] = labels[:3]
    value, grad = _with_reference(name, labels, x, ref_labels, ref_x, keep, compiled=compiled)
    expected = _with_reference(name, labels, x, ref_labels[keep], ref_x[keep])
    assert value == pytest.approx(float(expected[0]), rel=1e-5, abs=1e-6)
    _assert_grad_close(grad, expected[1])


@pytest.mark.parametrize("name", NAMES)
def test_reference_pair_mask_without_diagonal_equals_the_batch_alone(name):
    """The batch as its own reference set with a (B, B) mask that removes each example's pair
    with itself is the loss without a reference set, in value and gradient."""
    labels, x = with_duplicates(16)
    options = {"pos_margin": 0.05} if name == "online_contrastive" else {}
    fn = LOSSES[name][0]
    not_self = ~np.eye(len(labels), dtype=bool)
    value, grad = _backend.value_and_grad(
        lambda v, lab, m: ops.mean(
            fn(lab, v, reference_embeddings=v, reference_labels=lab, reference_mask=m, **options)
        ),
        x,
        labels,
        not_self,
    )
    expected = _value_and_grad(name, labels, x, options)
    assert value == pytest.approx(float(expected[0]), rel=1e-5, abs=1e-6)
    _assert_grad_close(grad, expected[1])


@pytest.mark.parametrize("name", NAMES)
def test_reference_mask_all_true_changes_nothing_and_all_false_gives_zero(name):
    labels, x = batch(17, b=8)
    ref_labels, ref_x = batch(18, b=6)
    plain = _with_reference(name, labels, x, ref_labels, ref_x)
    ones = _with_reference(name, labels, x, ref_labels, ref_x, np.ones(6, bool))
    assert ones[0] == pytest.approx(float(plain[0]), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(ones[1], plain[1], rtol=1e-5, atol=1e-7)
    value, grad = _with_reference(name, labels, x, ref_labels, ref_x, np.zeros((8, 6), bool))
    assert value == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_reference_mask(name):
    fn = LOSSES[name][0]
    labels, x = batch(0)
    with pytest.raises(ValueError, match="`reference_mask` needs `reference_embeddings`"):
        fn(labels, x, reference_mask=np.ones(12, bool))
    with pytest.raises(ValueError, match=r"shape \(R,\) or \(B, R\).*\(12, 7\).*\(12, 5\)"):
        fn(
            labels,
            x,
            reference_embeddings=x,
            reference_labels=labels,
            reference_mask=np.ones((12, 7), bool),
        )
    with pytest.raises(ValueError, match=r"reference_mask.shape=\(2, 12, 12\)"):
        fn(
            labels,
            x,
            reference_embeddings=x,
            reference_labels=labels,
            reference_mask=np.ones((2, 12, 12), bool),
        )


# --- The option table of MetricLoss. ---

METRIC_LOSSES = [
    getattr(losses, name)
    for name in losses.__all__
    if isinstance(getattr(losses, name), type) and issubclass(getattr(losses, name), MetricLoss)
]


@pytest.mark.parametrize("cls", METRIC_LOSSES, ids=lambda c: c.__name__)
def test_the_option_table_gives_signature_config_and_checks(cls):
    """The constructor's parameters are the table's options (in order, with their defaults),
    then `name`; `get_config` holds each option; positional arguments follow the table."""
    parameters = inspect.signature(cls).parameters
    assert list(parameters)[: len(cls.options)] == [o.name for o in cls.options]
    assert all(parameters[o.name].default == o.default for o in cls.options)
    assert parameters["name"].default == cls().name
    config = cls().get_config()
    assert {o.name for o in cls.options} <= set(config)
    first = cls.options[0]
    if isinstance(first.default, float):
        # Another value inside the range of a bounded option.
        candidates = (first.default + 1.0, first.default - 0.1, first.default / 2)
        bounds = first.bounds
        inside = [v for v in candidates if bounds is None or v in bounds]
        value = next(v for v in inside if v != first.default)
        assert getattr(cls(value), first.name) == value
        with pytest.raises(TypeError, match=f"`{first.name}` must be a number"):
            cls(**{first.name: "x"})
    with pytest.raises(TypeError):
        cls(**{o.name: o.default for o in cls.options}, unknown_option=1)


# --- Bad input: ranges of the options, non-finite embeddings. ---


@pytest.mark.parametrize(
    "bounds, text, inside, outside",
    [
        (base.NON_NEGATIVE, ">= 0", [0.0, 3.0], [-1e-9, -1.0]),
        (base.POSITIVE, "> 0", [1e-9, 5.0], [0.0, -2.0]),
        (base.Bounds(-1.0, 1.0), "in [-1, 1]", [-1.0, 1.0, 0.0], [-1.5, 1.0 + 1e-9]),
        (base.Bounds(0.0, 2.0, exclusive_maximum=True), "in [0, 2)", [0.0, 1.9], [2.0, -0.1]),
    ],
)
def test_check_number_states_the_range(bounds, text, inside, outside):
    assert str(bounds) == text
    for value in inside:
        assert base.check_number("opt", value, bounds) == value
    for value in [*outside, float("nan"), float("inf"), float("-inf")]:
        with pytest.raises(
            ValueError, match=rf"^`opt` must be a finite number {re.escape(text)}\. "
        ):
            base.check_number("opt", value, bounds)
    with pytest.raises(TypeError, match="`opt` must be a number"):
        base.check_number("opt", True, bounds)


@pytest.mark.parametrize(
    "compiled",
    [False, True] if _backend.name() != "torch" else [False],
    ids=["eager", "compiled"] if _backend.name() != "torch" else ["eager"],
)
def test_nonfinite_to_nan_keeps_finite_values_and_gradients(compiled):
    """For finite input the value and gradient are those of the guarded function; one NaN or
    infinity anywhere makes every entry NaN."""
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")

    def guarded(v):
        return ops.sum(base.nonfinite_to_nan(ops.square(v[:, 0]), v))

    value, grad = _backend.value_and_grad(guarded, x, compiled=compiled)
    assert float(value) == pytest.approx(float(np.sum(x[:, 0] ** 2)), rel=1e-6)
    expected = np.zeros_like(x)
    expected[:, 0] = 2 * x[:, 0]
    np.testing.assert_allclose(grad, expected, rtol=1e-6)
    for bad in [np.nan, np.inf, -np.inf]:
        y = x.copy()
        y[4, 2] = bad  # a column the values do not even depend on
        values = ops.convert_to_numpy(base.nonfinite_to_nan(ops.square(y[:, 0]), y))
        assert np.all(np.isnan(values))


def test_an_empty_batch_names_the_argument():
    x = np.zeros((0, 4), "float32")
    with pytest.raises(ValueError, match=r"`y_pred` must hold at least one example.*\(0, 4\)"):
        losses.CircleLoss()(np.zeros(0, "int32"), x)
    with pytest.raises(ValueError, match=r"`embeddings` must hold at least one example"):
        losses.circle_loss(np.zeros(0, "int32"), x)
    with pytest.raises(ValueError, match=r"`y_pred` must hold at least one example"):
        losses.triplet_semihard_loss(np.zeros(0, "int32"), x)


@pytest.mark.parametrize("name", NAMES)
def test_a_nonfinite_reference_row_makes_the_loss_nan(name):
    labels, x = batch(0)
    reference = x.copy()
    reference[5, 0] = np.nan
    mask = np.ones(12, bool)
    mask[5] = False  # even a masked-out row: the input holds a NaN
    values = LOSSES[name][1]().call_with_reference(labels, x, reference, labels, mask)
    assert np.all(np.isnan(ops.convert_to_numpy(values)))
    values = LOSSES[name][0](labels, x, reference_embeddings=reference, reference_labels=labels)
    assert np.all(np.isnan(ops.convert_to_numpy(values)))
