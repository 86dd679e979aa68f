"""The PNP loss against pytorch-metric-learning and a loop over (anchor, positive, negative).

The invariants (permutation, relabelling, config, `.keras` save/load, degenerate batches,
compiled == eager) run in `deepmetric/testing/conformance_test.py`.
"""

import functools
import inspect

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, _blocks, losses
from deepmetric.losses import pnp
from deepmetric.losses.pair_test import (
    _assert_close,
    _numeric_grad,
    _unit,
    _value_and_grad,
    batch,
    check_equals_pytorch_metric_learning,
    torch_only,
)

VARIANTS = list(pnp.PNP_VARIANTS)
PNP_OPTIONS = {"b": 3.0, "alpha": 2.0, "anneal": 0.05}


def _entry(variant):
    """The table entry of `pair_test`, for one variant (PML's class gets it too)."""
    return (
        functools.partial(pnp.pnp_loss, variant=variant),
        losses.PNPLoss,
        "PNPLoss",
        PNP_OPTIONS,
    )


@torch_only
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "case", ["random", "duplicates", "options", "many", "distinct", "one-class"]
)
def test_pnp_equals_pytorch_metric_learning(variant, case, monkeypatch):
    """Every variant, at PML's defaults (`variant` set) and with other b, alpha, anneal."""
    import pytorch_metric_learning.losses as pml

    original = pml.PNPLoss
    monkeypatch.setattr(pml, "PNPLoss", lambda **kw: original(**{"variant": variant, **kw}))
    check_equals_pytorch_metric_learning(_entry(variant), "pnp", case)


@torch_only
def test_pnp_defaults_are_pytorch_metric_learning_defaults():
    from pytorch_metric_learning.losses import PNPLoss as PMLPNPLoss

    theirs = PMLPNPLoss()
    ours = losses.PNPLoss()
    assert (ours.b, ours.alpha, ours.anneal, ours.variant) == (
        theirs.b,
        theirs.alpha,
        theirs.anneal,
        theirs.variant,
    )
    assert set(pnp.PNP_VARIANTS) == set(PMLPNPLoss.VARIANTS)


def ref_pnp(labels, x, b=2.0, alpha=1.0, anneal=0.01, variant="O"):
    """The paper's per-positive count of the negatives ranked before it, smoothed by a sigmoid,
    with PML's choices: the anchor is one of its own positives, the sigmoid's exponent is
    clipped to [-50, 50], the mean over the anchors that have a positive (1 minus it for Dq)."""
    u = _unit(x)
    s = u @ u.T
    n = len(labels)
    f = {
        "O": lambda r: r,
        "Ds": lambda r: np.log(1 + r),
        "Dq": lambda r: (1 + r) ** -alpha,
        "Iu": lambda r: (1 + r) * np.log(1 + r),
        "Ib": lambda r: (b * r - np.log(1 + b * r)) / b**2,
    }[variant]
    per_anchor = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        terms = []
        for j in [i, *positives]:
            r = sum(
                1 / (1 + np.exp(np.clip(-(s[i, k] - s[i, j]) / anneal, -50, 50)))
                for k in range(n)
                if labels[k] != labels[i]
            )
            terms.append(f(r))
        per_anchor.append(np.mean(terms))
    if not per_anchor:
        return 0.0
    mean = float(np.mean(per_anchor))
    return 1.0 - mean if variant == "Dq" else mean


@pytest.mark.parametrize("variant", VARIANTS)
def test_pnp_matches_the_loop(variant):
    """A temperature at which the sigmoid is not saturated, so the numeric gradient is
    meaningful (at 0.01 most terms are clipped)."""
    labels, x = batch(5, b=8, d=4)
    options = {**PNP_OPTIONS, "anneal": 0.2, "variant": variant}
    ours = _value_and_grad(pnp.pnp_loss, labels, x, options)
    _assert_close(ours, _numeric_grad(ref_pnp, labels, x, **options))


def test_pnp_matches_the_loop_at_the_default_temperature():
    labels, x = batch(6)
    ours = float(ops.mean(pnp.pnp_loss(labels, x)))
    assert ours == pytest.approx(ref_pnp(labels, x), rel=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_pnp_blocks_equal_one_block(compiled, monkeypatch):
    """26 anchors in blocks of 2 rows (the last block padded) give the value and gradient of
    one block."""
    labels, x = batch(1, b=26, classes=4)
    options = {"variant": "Ds", "anneal": 0.1}
    expected = _value_and_grad(pnp.pnp_loss, labels, x, options, compiled=compiled)
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 2 * 26)
    assert _blocks.block_size(26, 26) == 2
    got = _value_and_grad(pnp.pnp_loss, labels, x, options, compiled=compiled)
    assert float(got[0]) == pytest.approx(float(expected[0]), rel=1e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-6)
    assert float(expected[0]) > 0.0


def test_pnp_class_and_signature():
    labels, x = batch(10)
    options = {**PNP_OPTIONS, "variant": "Ib"}
    loss = losses.PNPLoss(**options)
    expected = float(ops.mean(pnp.pnp_loss(labels, x, **options)))
    assert float(ops.convert_to_numpy(loss(labels, x))) == pytest.approx(expected, rel=1e-6)
    parameters = list(inspect.signature(losses.PNPLoss.__init__).parameters)
    assert parameters[1:5] == ["b", "alpha", "anneal", "variant"]
    assert loss.call_with_reference is None
    assert losses.get("pnp").get_config()["variant"] == "O"


def test_pnp_without_positive_pairs_is_zero_with_zero_gradient():
    labels, x = np.arange(6), np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    value, grad = _backend.value_and_grad(
        lambda v, lab: ops.mean(pnp.pnp_loss(lab, v, variant="Dq")), x, labels
    )
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"variant": "PNP-O"}, ValueError, r"`variant` must be one of 'Ds', 'Dq', 'Iu', 'Ib', 'O'"),
        ({"b": 0.0}, ValueError, "`b` must be a finite number > 0"),
        ({"alpha": float("inf")}, ValueError, "`alpha` must be a finite number > 0"),
        ({"anneal": float("nan")}, ValueError, "`anneal` must be a finite number > 0"),
        ({"anneal": "0.1"}, TypeError, "`anneal` must be a number"),
    ],
)
def test_pnp_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        losses.PNPLoss(**options)
    with pytest.raises(error, match=message):
        pnp.pnp_loss(np.array([0, 0]), np.eye(2, dtype="float32"), **options)


def test_pnp_global_batch_on_two_replicas():
    from deepmetric.distributed_test import assert_global_batch_on_two_replicas

    loss = losses.PNPLoss(anneal=0.1)
    assert loss.call_with_reference is None
    assert_global_batch_on_two_replicas(loss)
