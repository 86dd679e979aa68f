"""TFA's contrastive and lifted-structure losses against numpy references."""

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses
from deepmetric.testing import references as ref


def _np(x):
    return ops.convert_to_numpy(x)


def test_contrastive_analytic():
    """Similar pair at d=0.5: 0.5^2 = 0.25; dissimilar at 0.25, margin 1: 0.75^2 = 0.5625;
    dissimilar beyond the margin: 0."""
    got = _np(losses.contrastive_loss(np.array([1, 0, 0]), np.array([0.5, 0.25, 1.5])))
    np.testing.assert_allclose(got, [0.25, 0.5625, 0.0], rtol=1e-6)


@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0])
def test_contrastive_value_and_grad(margin):
    rng = np.random.default_rng(int(margin * 10))
    y = rng.integers(0, 2, 16)
    dist = rng.uniform(0.01, 2.5, 16).astype("float32")
    value, grad = _backend.value_and_grad(
        lambda d, yy: ops.sum(losses.contrastive_loss(yy, d, margin=margin)), dist, y
    )
    assert value == pytest.approx(ref.contrastive(y, dist, margin).sum(), rel=1e-5)
    numeric = ref.numeric_grad(lambda d: ref.contrastive(y, d, margin).sum(), dist)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)
    loss = losses.ContrastiveLoss(margin=margin)
    assert float(loss(y[:, None], dist[:, None])) == pytest.approx(
        ref.contrastive(y, dist, margin).mean(), rel=1e-5
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_lifted_value_and_grad(seed, margin):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 12)
    x = rng.normal(size=(12, 4)).astype("float32")
    value, grad = _backend.value_and_grad(
        lambda v, lab: losses.lifted_struct_loss(lab, v, margin=margin), x, labels
    )
    assert value == pytest.approx(ref.lifted(labels, x, margin), rel=1e-5)
    numeric = ref.numeric_grad(lambda v: ref.lifted(labels, v, margin), x)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)
    assert float(losses.LiftedStructLoss(margin=margin)(labels, x)) == pytest.approx(
        value, rel=1e-5
    )


def test_lifted_far_apart_points_stay_finite():
    """Distances of 1e3 make exp(margin - d) underflow without TFA's max shift.

    Pair (0, 1000): J = log(e^(1-2000) + e^(1-3000) + e^(1-1000) + e^(1-2000)) + 1000 ~ 1,
    and likewise for (2000, 3000); the loss is (1^2 + 1^2) / (2 * 2 pairs) = 0.5.
    """
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0], [1000.0], [2000.0], [3000.0]], "float32")
    value, grad = _backend.value_and_grad(
        lambda v, lab: losses.lifted_struct_loss(lab, v), x, labels
    )
    assert value == pytest.approx(ref.lifted(labels, x), rel=1e-5)
    assert value == pytest.approx(0.5, rel=1e-3)
    assert np.all(np.isfinite(grad))


def test_contrastive_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        losses.contrastive_loss(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
