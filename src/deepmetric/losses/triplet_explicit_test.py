"""The explicit-triplet loss against torch's definition, written in numpy."""

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, distances, losses
from deepmetric.testing import references as ref


def triplets(seed, b=8, d=5):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, d)).astype("float32") for _ in range(3)]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_default_distance_value_and_grad(reduction, swap, margin):
    a, p, n = triplets(int(margin * 10) + swap)
    got = ops.convert_to_numpy(
        losses.triplet_margin_with_distance_loss(
            a, p, n, margin=margin, swap=swap, reduction=reduction
        )
    )
    np.testing.assert_allclose(
        got, ref.torch_triplet(a, p, n, margin, swap, reduction), rtol=1e-5, atol=1e-6
    )

    def fn(anchor, positive, negative):
        return losses.triplet_margin_with_distance_loss(
            anchor, positive, negative, margin=margin, swap=swap, reduction="sum"
        )

    value, grad = _backend.value_and_grad(fn, a, p, n)
    numeric = ref.numeric_grad(lambda v: ref.torch_triplet(v, p, n, margin, swap, "sum"), a)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


def test_custom_callable_and_named_distances():
    a, p, n = triplets(3)

    def cosine_distance(x, y):
        x = x / ops.norm(x, axis=-1, keepdims=True)
        y = y / ops.norm(y, axis=-1, keepdims=True)
        return 1.0 - ops.sum(x * y, axis=-1)

    def np_cos(x, y):
        return 1 - np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)

    expected = np.maximum(1.0 + np_cos(a, p) - np_cos(a, n), 0).mean()
    got = losses.triplet_margin_with_distance_loss(a, p, n, distance_function=cosine_distance)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    got = losses.triplet_margin_with_distance_loss(a, p, n, distance_function="angular")
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # A similarity is negated: margin + s_an - s_ap.
    got = losses.triplet_margin_with_distance_loss(
        a, p, n, distance_function=distances.CosineSimilarity()
    )
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_unbatched_inputs():
    a, p, n = (t[0] for t in triplets(4))
    got = losses.triplet_margin_with_distance_loss(a, p, n, reduction="none")
    assert float(got) == pytest.approx(
        float(ref.torch_triplet(a, p, n, reduction="none")), rel=1e-5
    )


def test_class_on_stacked_triplets():
    a, p, n = triplets(5)
    stacked = np.stack([a, p, n], axis=1)
    loss = losses.TripletMarginLoss(margin=0.5, swap=True)
    assert float(loss(np.zeros(8), stacked)) == pytest.approx(
        ref.torch_triplet(a, p, n, 0.5, True), rel=1e-5
    )
    with pytest.raises(ValueError, match=r"\(batch_size, 3, embedding_dim\)"):
        loss(np.zeros(8), np.stack([a, p], axis=1))


def test_errors_name_the_argument():
    a, p, n = triplets(6)
    with pytest.raises(ValueError, match=r"`reduction` must be one of 'none', 'mean', 'sum'"):
        losses.triplet_margin_with_distance_loss(a, p, n, reduction="max")
    with pytest.raises(ValueError, match="same number of dimensions"):
        losses.triplet_margin_with_distance_loss(a, p, n[0])
    with pytest.raises(ValueError, match=r"`margin` must be a finite number > 0"):
        losses.triplet_margin_with_distance_loss(a, p, n, margin=0.0)
    with pytest.raises(ValueError, match="Unknown `distance_function`: 'manhattan'"):
        losses.triplet_margin_with_distance_loss(a, p, n, distance_function="manhattan")


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_swap_splits_the_gradient_of_a_tie(reduction):
    """d(a, n) == d(p, n) exactly (a = (0, 0), p = (2, 0), n = (1, 3): both sqrt(10)).

    torch's `minimum` splits the gradient of a tie, so the loss moves like
    d(a, p) - (d(a, n) + d(p, n)) / 2 + m: half of each negative distance's gradient.
    """
    a = np.array([[0.0, 0.0]], "float32")
    p = np.array([[2.0, 0.0]], "float32")
    n = np.array([[1.0, 3.0]], "float32")

    def loss(anchor, positive, negative):
        return losses.triplet_margin_with_distance_loss(
            anchor, positive, negative, distance_function="L2", margin=2.0, swap=True,
            reduction=reduction,
        )  # fmt: skip

    unit = lambda v: v / np.linalg.norm(v)  # the gradient of ||v|| in v
    cases = [
        (lambda v: loss(v, p, n), a, unit(a - p) - 0.5 * unit(a - n)),
        (lambda v: loss(a, v, n), p, unit(p - a) - 0.5 * unit(p - n)),
        (lambda v: loss(a, p, v), n, -0.5 * unit(n - a) - 0.5 * unit(n - p)),
    ]
    for fn, x, expected in cases:
        value, grad = _backend.value_and_grad(fn, x)
        assert float(value) == pytest.approx(2.0 - np.sqrt(10.0) + 2.0, rel=1e-6)
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_mismatched_shapes_name_the_arguments_and_shapes():
    """Issue 12: anchors (8, 4) and positives (7, 4) raised a backend broadcasting error."""
    a, p, n = triplets(0, b=8, d=4)
    message = r"anchor.shape=\(8, 4\), positive.shape=\(7, 4\), negative.shape=\(8, 4\)"
    with pytest.raises(ValueError, match=r"must have the same shape.*" + message):
        losses.triplet_margin_with_distance_loss(a, p[:7], n)
    with pytest.raises(ValueError, match=r"positive.shape=\(8, 3\)"):
        losses.triplet_margin_with_distance_loss(a, p[:, :3], n)
    with pytest.raises(ValueError, match=r"`anchor` must hold at least one triplet"):
        losses.triplet_margin_with_distance_loss(a[:0], p[:0], n[:0])
    with pytest.raises(ValueError, match=r"`y_pred` must hold at least one example"):
        losses.TripletMarginLoss()(np.zeros(0), np.zeros((0, 3, 4), "float32"))


def test_shapes_that_broadcast_are_accepted_as_in_torch():
    """One positive (1, D) for all anchors equals that positive repeated."""
    a, p, n = triplets(1)
    one = p[:1]
    got = losses.triplet_margin_with_distance_loss(a, one, n, reduction="none")
    expected = losses.triplet_margin_with_distance_loss(
        a, np.repeat(one, 8, 0), n, reduction="none"
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(got), ops.convert_to_numpy(expected))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_nonfinite_entry_makes_every_triplet_nan(bad, which):
    tensors = list(triplets(6))
    tensors[which][2, 1] = bad
    values = ops.convert_to_numpy(
        losses.triplet_margin_with_distance_loss(*tensors, reduction="none")
    )
    assert np.all(np.isnan(values))
    loss = losses.TripletMarginLoss()(np.zeros(6), np.stack(tensors, axis=1))
    assert np.isnan(float(ops.convert_to_numpy(loss)))
