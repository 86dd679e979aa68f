"""Triplet losses against brute-force references, TFA's own algorithm, and invariants."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from deepmetric import _backend, losses
from deepmetric.testing import references as ref

RNG_SEEDS = [0, 1, 2]


def batch(seed, b=12, d=4, classes=3, dtype="float32"):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype(dtype)


def _value(fn, labels, x, **kwargs):
    return float(ops.convert_to_numpy(fn(labels, x, **kwargs)))


# --- TensorFlow Addons' algorithms, ported line by line to numpy (the O(B^3) form). ---


def _tfa_masked_max(data, mask):
    low = data.min(1, keepdims=True)
    return ((data - low) * mask).max(1, keepdims=True) + low


def _tfa_masked_min(data, mask):
    high = data.max(1, keepdims=True)
    return ((data - high) * mask).min(1, keepdims=True) + high


def tfa_semihard(labels, x, margin=1.0):
    pdist = ref.distance_matrix(x)
    labels = labels.reshape(-1, 1)
    adjacency = labels == labels.T
    adjacency_not = ~adjacency
    b = labels.size
    pdist_tile = np.tile(pdist, [b, 1])
    mask = np.tile(adjacency_not, [b, 1]) & (pdist_tile > pdist.T.reshape(-1, 1))
    mask_final = (mask.astype(float).sum(1, keepdims=True) > 0).reshape(b, b).T
    negatives_outside = _tfa_masked_min(pdist_tile, mask.astype(float)).reshape(b, b).T
    negatives_inside = np.tile(_tfa_masked_max(pdist, adjacency_not.astype(float)), [1, b])
    semi = np.where(mask_final, negatives_outside, negatives_inside)
    loss_mat = margin + pdist - semi
    mask_positives = adjacency.astype(float) - np.eye(b)
    return np.maximum(loss_mat * mask_positives, 0.0).sum() / mask_positives.sum()


def tfa_hard(labels, x, margin=1.0):
    pdist = ref.distance_matrix(x)
    labels = labels.reshape(-1, 1)
    adjacency = labels == labels.T
    hard_negatives = _tfa_masked_min(pdist, (~adjacency).astype(float))
    mask_positives = adjacency.astype(float) - np.eye(labels.size)
    hard_positives = _tfa_masked_max(pdist, mask_positives)
    return np.maximum(hard_positives - hard_negatives + margin, 0.0).mean()


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_references_are_tfa_algorithms(seed):
    """The brute-force references equal TFA's tiled algorithms on ordinary batches."""
    labels, x = batch(seed)
    assert ref.semihard(labels, x) == pytest.approx(tfa_semihard(labels, x), rel=1e-12)
    assert ref.hard(labels, x) == pytest.approx(tfa_hard(labels, x), rel=1e-12)


def test_semihard_analytic_case():
    """Labels [0, 0, 1, 1] at (0,0), (1,0), (0,0.5), (0,-2).

    (0,1): d=1, negatives of 0 at 0.5 and 2; closest farther than 1 is 2: 1+1-2 -> 0.
    (1,0): d=1, negatives of 1 at sqrt(1.25) and sqrt(5); semi-hard sqrt(1.25):
           2 - sqrt(1.25).
    (2,3): d=2.5, negatives of 2 at 0.5 and sqrt(1.25), none farther: the farthest,
           3.5 - sqrt(1.25).
    (3,2): d=2.5, negatives of 3 at 2 and sqrt(5), none farther: 3.5 - sqrt(5).
    Mean over the 4 positive pairs: (9 - 2 sqrt(1.25) - sqrt(5)) / 4.
    """
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5], [0.0, -2.0]], "float32")
    expected = (9.0 - 2 * np.sqrt(1.25) - np.sqrt(5.0)) / 4
    assert _value(losses.triplet_semihard_loss, labels, x) == pytest.approx(expected, rel=1e-6)
    assert ref.semihard(labels, x) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular"])
@pytest.mark.parametrize("seed", RNG_SEEDS)
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_semihard_value_and_grad(metric, seed, margin):
    labels, x = batch(seed)

    def fn(v, lab):
        return losses.triplet_semihard_loss(lab, v, margin=margin, distance_metric=metric)

    value, grad = _backend.value_and_grad(fn, x, labels)
    expected = ref.semihard(labels, x, margin, metric)
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-6)
    numeric = ref.numeric_grad(lambda v: ref.semihard(labels, v, margin, metric), x)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("metric", ["L2", "squared-L2", "angular"])
@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_hard_value_and_grad(soft, metric, seed):
    labels, x = batch(seed, classes=5)  # some anchors may lack a positive: TFA's fallback

    def fn(v, lab):
        return losses.triplet_hard_loss(lab, v, margin=0.5, soft=soft, distance_metric=metric)

    value, grad = _backend.value_and_grad(fn, x, labels)
    assert value == pytest.approx(ref.hard(labels, x, 0.5, soft, metric), rel=1e-5, abs=1e-6)
    numeric = ref.numeric_grad(lambda v: ref.hard(labels, v, 0.5, soft, metric), x)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_batch_all_value_grad_and_fraction(squared, seed):
    labels, x = batch(seed)

    def fn(v, lab):
        return losses.triplet_batch_all_loss(lab, v, margin=0.7, squared=squared)

    value, grad = _backend.value_and_grad(fn, x, labels)
    expected, fraction = ref.batch_all(labels, x, 0.7, squared)
    assert value == pytest.approx(expected, rel=1e-5)
    numeric = ref.numeric_grad(lambda v: ref.batch_all(labels, v, 0.7, squared)[0], x)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)
    _, got_fraction = losses.triplet_batch_all_loss(
        labels, x, margin=0.7, squared=squared, return_fraction=True
    )
    assert float(got_fraction) == pytest.approx(fraction, rel=1e-6)


def test_callable_distance_metric_matches_tfa_docstring():
    """TFA's docstring: a dot-product "distance" on [[0,1],[1,0]] with labels [0, 0]
    gives 1.0 for semi-hard (no negative: deepmetric returns 0 instead) ; with a
    second class the callable is used as the distance matrix."""
    labels = np.array([0, 0, 1, 1])
    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.0]], "float32")
    metric = lambda e: ops.matmul(e, ops.transpose(e))  # noqa: E731
    d = x.astype(np.float64) @ x.T.astype(np.float64)
    got = _value(losses.triplet_semihard_loss, labels, x, distance_metric=metric)
    assert got == pytest.approx(ref.semihard(labels, x, d=d), rel=1e-6)
    got = _value(losses.triplet_hard_loss, labels, x, distance_metric=metric)
    assert got == pytest.approx(ref.hard(labels, x, d=d), rel=1e-6)


def test_duplicates_have_finite_gradients():
    labels = np.array([0, 0, 1, 1, 2, 2])
    x = np.random.default_rng(3).normal(size=(6, 3)).astype("float32")
    x[1] = x[0]
    x[3] = x[2]
    for fn in (
        losses.triplet_semihard_loss,
        losses.triplet_hard_loss,
        losses.triplet_batch_all_loss,
    ):
        value, grad = _backend.value_and_grad(lambda v, lab, f=fn: f(lab, v), x, labels)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
    value = _value(losses.triplet_semihard_loss, labels, x)
    assert value == pytest.approx(ref.semihard(labels, x), rel=1e-5)


def test_soft_margin_does_not_overflow():
    """TFA's log1p(exp(x)) is inf for x > 88; the stable softplus is x."""
    labels = np.array([0, 0, 1])
    x = np.array([[0.0], [200.0], [1.0]], "float32")
    value, grad = _backend.value_and_grad(
        lambda v, lab: losses.triplet_hard_loss(lab, v, soft=True), x, labels
    )
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert value == pytest.approx(ref.hard(labels, x, soft=True), rel=1e-6)
    assert value > 199.0 / 3


@pytest.mark.skipif(_backend.name() == "torch", reason="torch runs eagerly when compiled")
@pytest.mark.parametrize(
    "fn", [losses.triplet_semihard_loss, losses.triplet_hard_loss, losses.triplet_batch_all_loss]
)
def test_compiled_equals_eager(fn):
    labels, x = batch(5, b=16, classes=4)
    eager = _backend.value_and_grad(lambda v, lab: fn(lab, v), x, labels)
    compiled = _backend.value_and_grad(lambda v, lab: fn(lab, v), x, labels, compiled=True)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-6)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-5, atol=1e-7)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), offset=st.integers(-1000, 1000))
def test_permutation_and_relabeling_invariance(seed, offset):
    labels, x = batch(seed, b=10, classes=3)
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(len(labels))
    mapping = rng.permutation(3) * 7 + offset
    for fn in (
        losses.triplet_semihard_loss,
        losses.triplet_hard_loss,
        losses.triplet_batch_all_loss,
        losses.lifted_struct_loss,
    ):
        base = _value(fn, labels, x)
        assert _value(fn, labels[perm], x[perm]) == pytest.approx(base, rel=1e-5, abs=1e-6)
        assert _value(fn, mapping[labels], x) == pytest.approx(base, rel=1e-5, abs=1e-6)


def test_class_reduces_to_function_value():
    labels, x = batch(7)
    for cls, fn in [
        (losses.TripletSemiHardLoss(margin=0.3), losses.triplet_semihard_loss),
        (losses.TripletHardLoss(margin=0.3), losses.triplet_hard_loss),
        (losses.TripletBatchAllLoss(margin=0.3), losses.triplet_batch_all_loss),
    ]:
        assert float(cls(labels, x)) == pytest.approx(_value(fn, labels, x, margin=0.3), rel=1e-6)
        assert float(cls(labels[:, None], x)) == pytest.approx(float(cls(labels, x)), rel=1e-7)


def test_sample_weight_scales_anchor_shares():
    labels, x = batch(8)
    loss = losses.TripletSemiHardLoss()
    full = float(loss(labels, x))
    assert float(loss(labels, x, sample_weight=np.full(12, 2.0))) == pytest.approx(2 * full)
    assert float(loss(labels, x, sample_weight=np.zeros(12))) == 0.0
