"""The backend kernels against the rules they implement, on every backend.

`mining.semihard_signed_weights` and `mining.batch_all_signed_counts` run PyTorch kernels on
torch and their `keras.ops` forms elsewhere; both must give the weights of the rules written
out pair by pair or triplet by triplet below, including the edge cases the kernels handle by
other means (ties, rows without positives or negatives, distances below zero, a reference set,
pairs removed by a mask).
"""

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, _kernels, mining


def _np(x):
    return ops.convert_to_numpy(x)


def reference_signed_weights(d, pos, neg, margin):
    """`pos_w - neg_w` of the semi-hard rule, one (anchor, positive) pair at a time.

    For the pair (a, p): the closest negative farther than p, else the farthest negative; the
    pair is active when `margin + d[a, p] - d[a, n*] > 0`. An active pair puts 1 on (a, p) and
    -1 on n*, split equally among the negatives tied at d[a, n*]. An anchor without negatives
    compares with `-(max(d) + 1)` (the `keras.ops` form's sentinel) and puts no negative weight.
    """
    w = np.zeros(d.shape, np.float64)
    sentinel = -(d.max() + 1.0)
    for a, p in zip(*np.nonzero(pos), strict=True):
        negatives = np.flatnonzero(neg[a])
        farther = negatives[d[a, negatives] > d[a, p]]
        candidates = farther if farther.size else negatives
        value = d[a, candidates].min() if farther.size else d[a, negatives].max(initial=sentinel)
        if not np.float32(margin) + d[a, p] - value > 0:
            continue
        w[a, p] = 1.0
        tied = candidates[d[a, candidates] == value]
        if tied.size:
            w[a, tied] -= 1.0 / tied.size
    return w


def reference_signed_counts(d, pos, neg, margin):
    """`per_positive - per_negative` of batch-all mining, from the list of all triplets:
    (a, p, n) is active when `d[a, n] < d[a, p] + margin`."""
    active = (
        pos[:, :, None] & neg[:, None, :] & (d[:, None, :] < d[:, :, None] + np.float32(margin))
    )
    return active.sum(axis=2) - active.sum(axis=1)


def problem(seed, rows, cols, classes, ties, low=0.0, high=2.0, removed=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    ref_labels = labels if cols is None else rng.integers(0, classes, cols)
    cols = rows if cols is None else cols
    d = rng.uniform(low, high, (rows, cols)).astype("float32")
    if ties:
        d = np.round(d * 4) / 4  # many equal distances
    if cols == rows and ref_labels is labels:
        pos, neg = (_np(m) for m in mining.label_masks(labels))
    else:
        pos, neg = (_np(m) for m in mining.label_masks(labels, ref_labels))
    if removed:
        keep = rng.random(d.shape) >= removed
        pos, neg = pos & keep, neg & keep
    return d, pos, neg


CASES = {
    "batch": dict(rows=12, cols=None, classes=3, ties=False),
    "batch with ties": dict(rows=12, cols=None, classes=3, ties=True),
    "negated similarities": dict(rows=10, cols=None, classes=3, ties=False, low=-2.0),
    "ties below zero": dict(rows=10, cols=None, classes=2, ties=True, low=-2.0),
    "reference set": dict(rows=5, cols=13, classes=3, ties=False),
    "reference set with ties": dict(rows=5, cols=13, classes=3, ties=True),
    "pairs removed": dict(rows=11, cols=None, classes=3, ties=True, removed=0.4),
    "one class": dict(rows=6, cols=None, classes=1, ties=False),
    "one class, all below zero": dict(rows=6, cols=None, classes=1, ties=False, low=-2, high=-1),
    "no positive pair": dict(rows=5, cols=None, classes=50, ties=False),
    "one reference": dict(rows=4, cols=1, classes=2, ties=False),
}


@pytest.mark.parametrize("margin", [0.0, 0.3, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_semihard_signed_weights_follow_the_rule(case, seed, margin):
    d, pos, neg = problem(seed, **CASES[case])
    got = _np(mining.semihard_signed_weights(d, pos, neg, margin))
    np.testing.assert_allclose(got, reference_signed_weights(d, pos, neg, margin), atol=1e-6)


@pytest.mark.parametrize("margin", [0.0, 0.3, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_batch_all_signed_counts_follow_the_rule(case, seed, margin):
    d, pos, neg = problem(seed, **CASES[case])
    got = _np(mining.batch_all_signed_counts(d, pos, neg, margin))
    np.testing.assert_array_equal(got, reference_signed_counts(d, pos, neg, margin))


def test_rows_without_negatives_among_others():
    """A mask that leaves one anchor without negatives (possible with a reference mask):
    its active positives keep their weight, and no negative weight appears in its row."""
    d, pos, neg = problem(5, rows=8, cols=None, classes=2, ties=False)
    neg[0] = False
    got = _np(mining.semihard_signed_weights(d, pos, neg, 0.5))
    np.testing.assert_allclose(got, reference_signed_weights(d, pos, neg, 0.5), atol=1e-6)
    assert got[0].min() >= 0.0 and got[0].max() == 1.0


@pytest.mark.parametrize("ties", [False, True])
def test_kernels_equal_the_keras_ops_forms_on_a_p_by_k_batch(ties):
    """A 64-example batch of 16 classes x 4: the weights the backend runs equal the
    `keras.ops` form's (on torch the kernel; elsewhere the same function)."""
    rng = np.random.default_rng(7)
    labels = rng.permutation(np.repeat(np.arange(16), 4))
    d = rng.uniform(0.0, 2.0, (64, 64)).astype("float32")
    d = (d + d.T) / 2
    if ties:
        d = np.round(d * 8) / 8
    pos, neg = (_np(m) for m in mining.label_masks(labels))
    ranks = mining.column_ranks(labels)
    expected = _np(
        mining.semihard_signed_weights_ops(d, pos, neg, 0.2, mining.PositiveOrder(ranks, ranks))
    )
    np.testing.assert_allclose(_np(mining.semihard_signed_weights(d, pos, neg, 0.2)), expected)
    np.testing.assert_allclose(expected, reference_signed_weights(d, pos, neg, 0.2), atol=1e-6)
    counts = _np(mining.batch_all_signed_counts(d, pos, neg, 0.2))
    np.testing.assert_array_equal(
        counts,
        _np(
            mining.batch_all_signed_counts_ops(d, pos, neg, 0.2, mining.PositiveOrder(ranks, ranks))
        ),
    )
    np.testing.assert_array_equal(counts, reference_signed_counts(d, pos, neg, 0.2))


def test_mining_runs_the_torch_kernels_on_torch_and_the_keras_ops_forms_elsewhere(monkeypatch):
    """The dispatch of `mining`: each call reaches the kernel on torch, the `keras.ops` form
    on the other backends, and never both."""
    calls = []
    for module, name in [
        (_kernels, "torch_semihard_signed_weights"),
        (_kernels, "torch_batch_all_signed_counts"),
        (mining, "semihard_signed_weights_ops"),
        (mining, "batch_all_signed_counts_ops"),
    ]:
        original = getattr(module, name)

        def spy(*args, _fn=original, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    d, pos, neg = problem(0, **CASES["batch"])
    mining.semihard_signed_weights(d, pos, neg, 0.3)
    mining.batch_all_signed_counts(d, pos, neg, 0.3)
    if _backend.name() == "torch":
        assert calls == ["torch_semihard_signed_weights", "torch_batch_all_signed_counts"]
    else:
        assert calls == ["semihard_signed_weights_ops", "batch_all_signed_counts_ops"]


@pytest.mark.parametrize("loss_name", ["TripletSemiHardLoss", "TripletBatchAllLoss"])
def test_losses_using_the_kernels_run_under_jit_compile(loss_name):
    """`compile(jit_compile=True)`: torch.compile on torch (the kernels' Python numbers are
    graph breaks), XLA on JAX and TensorFlow. The compiled loss equals the eager one before
    and after a compiled training step, and the step changes the weights."""
    import keras

    from deepmetric import losses

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = rng.permutation(np.repeat(np.arange(16), 4))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4), keras.layers.UnitNormalization()]
    )
    loss = getattr(losses, loss_name)(margin=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=True)
    before = _np(model.layers[0].kernel).copy()
    for _ in range(2):
        compiled_value = model.evaluate(x, y, batch_size=64, verbose=0)
        np.testing.assert_allclose(compiled_value, float(_np(loss(y, model(x)))), rtol=1e-5)
        history = model.fit(x, y, batch_size=64, epochs=1, verbose=0).history["loss"]
        assert np.isfinite(history[0]) and history[0] > 0.0
    assert not np.allclose(_np(model.layers[0].kernel), before)
