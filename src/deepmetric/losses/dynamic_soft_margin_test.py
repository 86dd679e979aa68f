"""The dynamic soft margin loss against pytorch-metric-learning, call after call, a numpy loop
over triplets, and its histogram state under `fit` and `jit` on each backend.

The invariants that compare two calls of one loss object run here on the pure function with a
fixed histogram (the class advances its state at each call); the others run in
`deepmetric/testing/conformance_test.py`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, _blocks, losses
from deepmetric.losses import dynamic_soft_margin as dsm
from deepmetric.losses.pair_test import _assert_close, _numeric_grad, _unit, batch, torch_only

OPTIONS = {"min_val": -1.5, "num_bins": 7, "momentum": 0.3}


def _batches(seed, steps=4, b=10, d=16):
    """Batches whose triplets lie inside PML's range (x < 1.6: PML fails beyond)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 3, b), rng.normal(size=(b, d)).astype("float32")) for _ in range(steps)
    ]


def ref_dynamic_soft_margin(labels, x, histogram, min_val=-2.0, num_bins=10, momentum=0.01):
    """PML's rule over every triplet (a, p, n): the histogram of x = d_ap - d_an by linear
    interpolation between bins, mixed with the previous one, normalised; the loss is the mean
    of CDF(bin of x) * x. Positions outside [0, num_bins - 1] are clipped (PML fails there)."""
    u = _unit(np.asarray(x, np.float64))
    d = np.sqrt(np.maximum(((u[:, None] - u[None]) ** 2).sum(-1), 0.0))
    n = len(labels)
    values = [
        d[a, p] - d[a, q]
        for a in range(n)
        for p in range(n)
        for q in range(n)
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]
    ]
    histogram = np.asarray(histogram, np.float64)
    if not values:
        return 0.0, histogram
    delta = 2 * abs(min_val) / num_bins
    positions = [min(max((v - min_val) / delta, 0.0), num_bins - 1.0) for v in values]
    counts = np.zeros(num_bins)
    for t in positions:
        k = int(np.floor(t))
        counts[k] += 1 - (t - k)
        if k + 1 < num_bins:
            counts[k + 1] += t - k
    weight = momentum if histogram.sum() != 0 else 1.0
    new = (1 - weight) * histogram + weight * counts
    new = new / new.sum()
    cdf = np.cumsum(new)
    loss = np.mean([cdf[int(np.floor(t))] * v for t, v in zip(positions, values, strict=True)])
    return float(loss), new


# --- pytorch-metric-learning 2.9, call after call (torch backend only). ---


@torch_only
@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["defaults", "options"])
def test_equals_pytorch_metric_learning_call_after_call(options):
    """Four successive calls: the value, the gradient and the histogram after each call equal
    PML's. PML's `hist_` keeps the autograd graph of the call that made it, so a second
    `backward` fails in PML; the test detaches it after each call (the state carries no
    gradient, as here)."""
    import torch
    from pytorch_metric_learning.losses import DynamicSoftMarginLoss as PMLLoss

    theirs = PMLLoss(**options)
    ours = losses.DynamicSoftMarginLoss(**options)
    for labels, x in _batches(0):
        xt = torch.tensor(x, requires_grad=True)
        expected = theirs(xt, torch.tensor(labels))
        expected.backward()
        theirs.hist_ = theirs.hist_.detach()
        xo = torch.tensor(x, requires_grad=True)
        got = ours(labels, xo)
        got.backward()
        assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            ops.convert_to_numpy(ours.hist_), theirs.hist_.numpy(), rtol=1e-5, atol=1e-7
        )


@torch_only
def test_defaults_are_pytorch_metric_learning_defaults():
    from pytorch_metric_learning.losses import DynamicSoftMarginLoss as PMLLoss

    theirs, ours = PMLLoss(), losses.DynamicSoftMarginLoss()
    assert (ours.min_val, ours.num_bins, ours.momentum) == (
        theirs.min_val,
        theirs.num_bins,
        theirs.momentum,
    )


# --- The numpy loop, on every backend. ---


def test_matches_the_loop_call_after_call():
    """The value and the next histogram of the pure function, four calls in a row, each from
    the histogram of the one before; the class's state follows the same path."""
    histogram = np.zeros(OPTIONS["num_bins"])
    loss = losses.DynamicSoftMarginLoss(**OPTIONS)
    for labels, x in _batches(1):
        expected, expected_histogram = ref_dynamic_soft_margin(labels, x, histogram, **OPTIONS)
        values, histogram = dsm.dynamic_soft_margin_loss(labels, x, histogram, **OPTIONS)
        histogram = ops.convert_to_numpy(histogram)
        assert float(ops.mean(values)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(histogram, expected_histogram, rtol=1e-5, atol=1e-7)
        assert float(loss(labels, x)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
        np.testing.assert_allclose(ops.convert_to_numpy(loss.hist_), histogram, atol=1e-7)


@pytest.mark.parametrize("previous", ["empty", "given"])
def test_gradient_matches_the_loop(previous):
    """The gradient flows through x and through this batch's share of the histogram (PML)."""
    labels, x = batch(5, b=8, d=4)
    x = x * 0.3 + 1.0  # a clustered batch: triplets well inside the histogram's range
    histogram = np.zeros(10) if previous == "empty" else np.linspace(0.0, 1.0, 10) / 4.5

    def ref(lab, v, **options):
        return ref_dynamic_soft_margin(lab, v, histogram, **options)[0]

    ours = _backend.value_and_grad(
        lambda v, lab: ops.mean(dsm.dynamic_soft_margin_loss(lab, v, histogram)[0]), x, labels
    )
    _assert_close(ours, _numeric_grad(ref, labels, x))


def test_triplets_outside_the_range_count_in_the_end_bins():
    """x = d_ap - d_an >= 1.6 (PML: an index error) and a range that starts above -2 (x below
    `min_val`: PML again fails): clipped positions, as the loop."""
    labels = np.array([0, 0, 1, 1])
    x = np.array([[1.0, 0.0], [-1.0, 0.05], [-1.0, 0.0], [1.0, 0.05]], "float32")
    for options in [{}, {"min_val": -0.5, "num_bins": 4}]:
        expected, expected_histogram = ref_dynamic_soft_margin(labels, x, np.zeros(
            options.get("num_bins", 10)), **options)  # fmt: skip
        values, histogram = dsm.dynamic_soft_margin_loss(labels, x, **options)
        assert float(ops.mean(values)) == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(ops.convert_to_numpy(histogram), expected_histogram, atol=1e-6)


# --- Invariants of the pure function at a fixed histogram. ---


HISTOGRAM = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.25, 0.2, 0.1, 0.06, 0.02])


def _function_grad(labels, x, compiled=False):
    return _backend.value_and_grad(
        lambda v, lab: ops.mean(dsm.dynamic_soft_margin_loss(lab, v, HISTOGRAM)[0]),
        x,
        labels,
        compiled=compiled,
    )


def test_function_invariants_at_a_fixed_histogram():
    """Eager equals compiled, a permutation of the batch, renamed and large labels."""
    labels, x = batch(3, b=12, d=6)
    value, grad = _function_grad(labels, x)
    compiled_value, compiled_grad = _function_grad(labels, x, compiled=True)
    assert float(compiled_value) == pytest.approx(float(value), rel=1e-5)
    np.testing.assert_allclose(compiled_grad, grad, rtol=1e-4, atol=1e-7)
    order = np.random.default_rng(1).permutation(len(labels))
    permuted = _function_grad(labels[order], x[order])
    assert float(permuted[0]) == pytest.approx(float(value), rel=1e-5)
    np.testing.assert_allclose(permuted[1], grad[order], rtol=1e-4, atol=1e-7)
    renamed = _function_grad(labels.astype("int64") * 1009 + (1 << 24), x)
    assert float(renamed[0]) == pytest.approx(float(value), rel=1e-5)
    np.testing.assert_allclose(renamed[1], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("compiled", [False, True])
def test_blocks_equal_one_block(compiled, monkeypatch):
    """26 anchors in blocks of 2 (the last block padded): the value, the gradient and the
    next histogram of one block."""
    labels, x = batch(1, b=26, classes=4)

    def run():
        fn = lambda v, lab: ops.mean(dsm.dynamic_soft_margin_loss(lab, v, HISTOGRAM)[0])  # noqa: E731
        value, grad = _backend.value_and_grad(fn, x, labels, compiled=compiled)
        return value, grad, ops.convert_to_numpy(dsm.dynamic_soft_margin_loss(labels, x)[1])

    expected = run()
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 2 * 26)
    assert _blocks.block_size(26, 26) == 2
    got = run()
    assert float(got[0]) == pytest.approx(float(expected[0]), rel=1e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-5, atol=1e-7)
    assert float(expected[0]) != 0.0


# --- The state. ---


def test_state_is_a_non_trainable_variable_in_the_config():
    labels, x = _batches(2, steps=1)[0]
    loss = losses.DynamicSoftMarginLoss(**OPTIONS)
    assert isinstance(loss.hist_, keras.Variable) and not loss.hist_.trainable
    assert loss.get_config()["histogram"] == [0.0] * OPTIONS["num_bins"]
    loss(labels, x)
    config = loss.get_config()
    assert config["histogram"] == pytest.approx(ops.convert_to_numpy(loss.hist_).tolist())
    assert sum(config["histogram"]) == pytest.approx(1.0, rel=1e-5)
    restored = losses.DynamicSoftMarginLoss.from_config(config)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(restored.hist_), ops.convert_to_numpy(loss.hist_)
    )
    labels, x = _batches(3, steps=1)[0]
    assert float(restored(labels, x)) == pytest.approx(float(loss(labels, x)), rel=1e-6)


def test_state_unchanged_without_triplets_or_with_non_finite_embeddings():
    labels, x = _batches(4, steps=1)[0]
    loss = losses.DynamicSoftMarginLoss()
    loss(labels, x)
    before = ops.convert_to_numpy(loss.hist_).copy()
    assert float(loss(np.arange(len(labels)), x)) == 0.0  # no positive pair: no triplet
    assert float(loss(np.zeros(len(labels), "int64"), x)) == 0.0  # no negative: no triplet
    bad = x.copy()
    bad[2, 0] = np.nan
    assert np.isnan(float(loss(labels, bad)))
    np.testing.assert_array_equal(ops.convert_to_numpy(loss.hist_), before)


def _fit(loss, attach=False):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    if attach:
        model.dsm_histogram = loss.hist_
    model.compile(optimizer="sgd", loss=loss)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    return model


def test_state_under_fit():
    """TensorFlow and PyTorch advance the histogram in `fit`; JAX's trainer drops a loss's
    variable unless it is attached to the model, which then carries and saves it."""
    loss = losses.DynamicSoftMarginLoss(momentum=0.5)
    _fit(loss)
    advanced = np.any(ops.convert_to_numpy(loss.hist_) != 0.0)
    assert advanced == (_backend.name() != "jax")
    attached = losses.DynamicSoftMarginLoss(momentum=0.5)
    model = _fit(attached, attach=True)
    histogram = ops.convert_to_numpy(attached.hist_)
    assert sum(histogram) == pytest.approx(1.0, rel=1e-5)
    assert any(v is attached.hist_ for v in model.non_trainable_variables)


def test_state_under_compiled_calls():
    """Under `tf.function` the variable advances; under a bare `jax.jit` it is read but not
    advanced (no traced value escapes); torch runs eagerly."""
    labels, x = _batches(5, steps=1)[0]
    loss = losses.DynamicSoftMarginLoss()
    fn = _backend.compiled(lambda lab, emb: loss(lab, emb), labels, x)
    value = float(ops.convert_to_numpy(fn(labels, x)))
    assert value == pytest.approx(float(ops.mean(dsm.dynamic_soft_margin_loss(labels, x)[0])))
    advanced = np.any(ops.convert_to_numpy(loss.hist_) != 0.0)
    assert advanced == (_backend.name() != "jax")
    assert float(loss(labels, x)) == pytest.approx(value, rel=1e-6)  # usable afterwards


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"num_bins": 0}, ValueError, "`num_bins` must be an integer >= 1"),
        ({"num_bins": 4.5}, ValueError, "`num_bins` must be an integer >= 1"),
        ({"num_bins": float("nan")}, ValueError, "`num_bins` must be an integer >= 1"),
        ({"num_bins": "10"}, TypeError, "`num_bins` must be an integer"),
        ({"min_val": 0.0}, ValueError, "`min_val` must be a finite number < 0"),
        ({"momentum": 1.5}, ValueError, r"`momentum` must be a finite number in \[0, 1\]"),
        ({"histogram": [0.5, 0.5]}, ValueError, r"`histogram` must have shape \(num_bins,\)"),
    ],
)
def test_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        losses.DynamicSoftMarginLoss(**options)
    labels, x = np.array([0, 0, 1]), np.eye(3, dtype="float32")
    with pytest.raises(error, match=message):
        dsm.dynamic_soft_margin_loss(labels, x, **options)


def test_integral_float_bins():
    assert losses.DynamicSoftMarginLoss(num_bins=4.0).num_bins == 4


def test_global_batch_on_two_replicas():
    """`momentum=1.0`: every call weighs by its own batch's histogram (the replicas' calls and
    the reference call do not depend on the order in which they advance the state)."""
    from deepmetric.distributed_test import assert_global_batch_on_two_replicas

    assert_global_batch_on_two_replicas(losses.DynamicSoftMarginLoss(momentum=1.0))
