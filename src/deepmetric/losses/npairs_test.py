"""N-pairs losses against numpy references."""

import numpy as np
import pytest

from deepmetric import _backend, losses
from deepmetric.testing import references as ref


def test_npairs_matches_reference_and_grad():
    rng = np.random.default_rng(4)
    labels = np.array([0, 1, 2, 0, 1, 2, 3, 3])
    sim = rng.normal(size=(8, 8)).astype("float32") * 3
    value, grad = _backend.value_and_grad(lambda s, lab: losses.npairs_loss(lab, s), sim, labels)
    assert value == pytest.approx(ref.npairs(labels, sim), rel=1e-5)
    np.testing.assert_allclose(
        grad, ref.numeric_grad(lambda s: ref.npairs(labels, s), sim), rtol=1e-3, atol=1e-5
    )
    assert float(losses.NpairsLoss()(labels, sim)) == pytest.approx(value, rel=1e-6)


def test_npairs_large_labels_stay_distinct():
    """TFA casts labels to the logits' dtype: 16777216 and 16777217 merge in float32."""
    sim = np.eye(2, dtype="float32") * 5
    apart = float(losses.npairs_loss(np.array([16777216, 16777217]), sim))
    assert apart == pytest.approx(ref.npairs([0, 1], sim), rel=1e-6)
    assert apart != pytest.approx(ref.npairs([0, 0], sim))


def test_npairs_multilabel():
    rng = np.random.default_rng(5)
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    sim = rng.normal(size=(4, 4)).astype("float32")
    got = float(losses.npairs_multilabel_loss(y, sim))
    assert got == pytest.approx(ref.npairs_multilabel(y, sim), rel=1e-5)
    assert float(losses.NpairsMultilabelLoss()(y, sim)) == pytest.approx(got, rel=1e-6)


def test_npairs_rejects_non_square_similarity():
    with pytest.raises(ValueError, match=r"similarity matrix.*y_pred.shape=\(3, 4\)"):
        losses.npairs_loss(np.array([0, 1, 2]), np.zeros((3, 4), "float32"))
