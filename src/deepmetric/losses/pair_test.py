"""The pair and triplet losses of `pair` against pytorch-metric-learning and triplet loops.

The invariants (permutation, relabelling, config, `.keras` save/load, degenerate batches,
compiled == eager) run in `deepmetric/testing/conformance_test.py`.
"""

import itertools
import math

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses

BACKEND = keras.backend.backend()
torch_only = pytest.mark.skipif(
    BACKEND != "torch", reason="pytorch-metric-learning runs on the torch backend only"
)

# name: (function, class, PML class name, non-default options)
LOSSES = {
    "nca": (losses.nca_loss, losses.NCALoss, "NCALoss", {"softmax_scale": 3.0}),
    "snr": (
        losses.signal_to_noise_ratio_contrastive_loss,
        losses.SignalToNoiseRatioContrastiveLoss,
        "SignalToNoiseRatioContrastiveLoss",
        {"pos_margin": 0.2, "neg_margin": 0.8},
    ),
    "generalized_lifted": (
        losses.generalized_lifted_structure_loss,
        losses.GeneralizedLiftedStructureLoss,
        "GeneralizedLiftedStructureLoss",
        {"neg_margin": 0.7, "pos_margin": 0.1},
    ),
    "lifted_structure": (
        losses.lifted_structure_loss,
        losses.LiftedStructureLoss,
        "LiftedStructureLoss",
        {"neg_margin": 0.7, "pos_margin": 0.1},
    ),
    "intra_pair_variance": (
        losses.intra_pair_variance_loss,
        losses.IntraPairVarianceLoss,
        "IntraPairVarianceLoss",
        {"pos_eps": 0.05, "neg_eps": 0.1},
    ),
    "tuplet_margin": (
        losses.tuplet_margin_loss,
        losses.TupletMarginLoss,
        "TupletMarginLoss",
        {"margin": 10.0, "scale": 16.0},
    ),
    "angular": (losses.angular_loss, losses.AngularLoss, "AngularLoss", {"alpha": 30.0}),
    "margin": (
        losses.margin_loss,
        losses.MarginLoss,
        "MarginLoss",
        {"margin": 0.1, "beta": 0.9, "num_classes": 3},
    ),
    "threshold_consistent_margin": (
        losses.threshold_consistent_margin_loss,
        losses.ThresholdConsistentMarginLoss,
        "ThresholdConsistentMarginLoss",
        {"lambda_plus": 0.5, "margin_plus": 0.2, "margin_minus": -0.2},
    ),
}
NAMES = list(LOSSES)
# PML compares these with the batch only (no reference set).
NO_REFERENCE = {"threshold_consistent_margin", "ranked_list", "lifted_structure"}


def batch(seed, b=12, d=5, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype("float32")


def _value_and_grad(fn, labels, x, options=None, compiled=False):
    return _backend.value_and_grad(
        lambda v, lab: ops.mean(fn(lab, v, **(options or {}))), x, labels, compiled=compiled
    )


def _assert_close(ours, theirs, rtol=1e-4):
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=rtol, abs=1e-6)
    scale = max(float(np.max(np.abs(theirs[1]))), 1e-3)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=2e-3, atol=2e-3 * scale)


# --- pytorch-metric-learning 2.9, value and gradient (torch backend only). ---


@torch_only
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "case", ["random", "duplicates", "options", "reference", "many", "distinct", "one-class"]
)
def test_equals_pytorch_metric_learning(name, case):
    check_equals_pytorch_metric_learning(LOSSES[name], name, case)


def check_equals_pytorch_metric_learning(entry, name, case):
    """One loss of a `LOSSES` table against PML on the batch of `case`."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    if case == "reference" and name in NO_REFERENCE:
        pytest.skip("PML compares this loss with the batch only")
    fn, _, class_name, options = entry
    options = options if case == "options" else {}
    pml_loss = getattr(pml, class_name)(**options)
    labels, x = batch(11)
    if case == "duplicates":
        x[1], labels[1] = x[0], labels[0]  # a duplicate positive
        x[3], labels[3] = x[2], labels[2] + 1  # one point under two labels
    if case == "many":  # more classes, some anchors without positives
        labels, x = batch(12, b=20, classes=9)
    if case in ("distinct", "one-class"):
        labels = np.arange(12) if case == "distinct" else np.zeros(12, "int64")
    if case == "reference":
        ref_labels, ref_x = batch(13, b=9)
        ours = _backend.value_and_grad(
            lambda v, lab, rv, rl: ops.mean(
                fn(lab, v, reference_embeddings=rv, reference_labels=rl)
            ),
            x, labels, ref_x, ref_labels,
        )  # fmt: skip
        theirs = _backend.value_and_grad(
            lambda v, lab, rv, rl: pml_loss(v, lab, ref_emb=rv, ref_labels=rl),
            x, labels, ref_x, ref_labels,
        )  # fmt: skip
    else:
        ours = _value_and_grad(fn, labels, x, options)
        theirs = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab), x, labels)
    if name == "nca" and case == "distinct":  # PML: the mean of no anchor, NaN
        assert float(ours[0]) == 0.0 and np.all(ours[1] == 0.0)
        return
    _assert_close(ours, theirs)


@torch_only
def test_margin_loss_per_class_beta_equals_pytorch_metric_learning():
    """A (num_classes,) beta tensor with the regulariser: PML's `learn_beta=True,
    num_classes=C` with the same betas, value and gradient in the embeddings and in beta."""
    import torch
    from pytorch_metric_learning.losses import MarginLoss as PMLMarginLoss

    labels, x = batch(3, classes=4)
    betas = np.array([0.9, 1.1, 1.3, 0.7], "float32")
    pml_loss = PMLMarginLoss(nu=0.3, learn_beta=True, num_classes=4)
    with torch.no_grad():
        pml_loss.beta.copy_(torch.tensor(betas))
    xt = torch.tensor(x, requires_grad=True)
    expected = pml_loss(xt, torch.tensor(labels))
    expected.backward()
    bt = torch.tensor(betas, requires_grad=True)
    xo = torch.tensor(x, requires_grad=True)
    ours = ops.mean(losses.margin_loss(labels, xo, nu=0.3, beta=bt, learn_beta=True))
    ours.backward()
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bt.grad.numpy(), pml_loss.beta.grad.numpy(), rtol=1e-4, atol=1e-6)


# --- Triplet loops on all backends: the O(B^2) rewrites of the triplet losses. ---


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _triplets(labels):
    n = len(labels)
    return [
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]
    ]


def ref_angular(labels, x, alpha=40.0, normalize_negatives=False):
    """Per positive pair, log(1 + sum over its triplets' exp(f_apn)) (the paper's N-pair form);
    the paper normalises the negatives too, PML's code does not."""
    t = math.tan(math.radians(alpha)) ** 2
    u = _unit(x)
    y = u if normalize_negatives else x
    sums = {}
    for a, p, n in _triplets(labels):
        f = 4 * t * (u[a] + u[p]) @ y[n] - 2 * (1 + t) * u[a] @ u[p]
        sums[(a, p)] = sums.get((a, p), 0.0) + np.exp(f)
    return float(np.mean([np.log1p(v) for v in sums.values()])) if sums else 0.0


def ref_margin(labels, x, margin=0.2, beta=1.2):
    """The sum over triplets divided by the number of non-zero positive and negative terms."""
    u = _unit(x)
    total, count = 0.0, 0
    for a, p, n in _triplets(labels):
        pos = max(np.linalg.norm(u[a] - u[p]) - beta + margin, 0.0)
        neg = max(beta - np.linalg.norm(u[a] - u[n]) + margin, 0.0)
        total, count = total + pos + neg, count + (pos > 0) + (neg > 0)
    return total / count if count else 0.0


def _numeric_grad(reference, labels, x, h=1e-6, **options):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = h
        upper, lower = (
            reference(labels, x + step, **options),
            reference(labels, x - step, **options),
        )
        grad[index] = (upper - lower) / (2 * h)
    return reference(labels, x, **options), grad


def ref_lifted_structure(labels, x, neg_margin=1.0, pos_margin=0.0):
    """Song et al. (2016), eq. 4, on the normalised embeddings (PML's distance): for each
    unordered positive pair, J = log(sum of exp(m - d) over the negatives of both examples) +
    d - m_pos; the loss is the sum of [J]_+^2 over those pairs over twice their number."""
    u = _unit(np.asarray(x, np.float64))
    d = np.linalg.norm(u[:, None] - u[None], axis=-1)
    n = len(labels)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
    total = 0.0
    for i, j in pairs:
        negatives = [np.exp(neg_margin - d[a, k]) for a in (i, j) for k in range(n)
                     if labels[k] != labels[a]]  # fmt: skip
        if negatives:
            total += max(np.log(np.sum(negatives)) + d[i, j] - pos_margin, 0.0) ** 2
    return total / (2 * len(pairs)) if pairs else 0.0


@pytest.mark.parametrize(
    "name, reference, options",
    [
        ("lifted_structure", ref_lifted_structure, {}),
        ("lifted_structure", ref_lifted_structure, {"neg_margin": 0.4, "pos_margin": 0.2}),
        ("angular", ref_angular, {}),
        ("angular", ref_angular, {"alpha": 30.0}),
        ("margin", ref_margin, {}),
        ("margin", ref_margin, {"margin": 0.3, "beta": 0.9}),
    ],
)
def test_triplet_losses_match_triplet_loops(name, reference, options):
    labels, x = batch(5, b=8, d=4)
    x[0] *= 3.0  # the angular loss does not normalise the negatives (PML's code)
    ours = _value_and_grad(LOSSES[name][0], labels, x, options)
    _assert_close(ours, _numeric_grad(reference, labels, x, **options))


def test_angular_loss_equals_the_paper_on_unit_embeddings():
    """The paper normalises the negatives too: on unit embeddings both forms agree."""
    labels, x = batch(6, b=8, d=4)
    x = _unit(x).astype("float32")
    value = float(ops.mean(losses.angular_loss(labels, x)))
    assert value == pytest.approx(ref_angular(labels, x, normalize_negatives=True), rel=1e-5)
    raw = float(ops.mean(losses.angular_loss(labels, 2.0 * x)))
    assert raw != pytest.approx(value, rel=1e-3)  # PML's form: the negatives' norm counts


def test_lifted_structure_global_batch_on_two_replicas():
    """A pair's term reads its second example's row: every replica computes the global loss
    (`separable_rows=False`), and the replicas' shares add up to it."""
    from deepmetric.distributed_test import assert_global_batch_on_two_replicas

    loss = losses.LiftedStructureLoss()
    assert not loss.separable_rows and loss.call_with_reference is None
    assert_global_batch_on_two_replicas(loss)


def test_margin_loss_per_class_beta_equals_scalar_when_equal():
    labels, x = batch(7)
    scalar = _value_and_grad(losses.margin_loss, labels, x, {"beta": 1.1})
    per_class = _value_and_grad(losses.margin_loss, labels, x, {"beta": np.full(3, 1.1, "float32")})
    _assert_close(per_class, scalar, rtol=1e-6)


# --- Classes and options. ---


@pytest.mark.parametrize("name", NAMES)
def test_class_equals_function_and_sample_weight(name):
    check_class_equals_function_and_sample_weight(LOSSES[name])


def check_class_equals_function_and_sample_weight(entry):
    """The class's value is the mean of the function's, and a sample weight scales each
    anchor's share. Shared with `ap_test.py`."""
    fn, cls, _, options = entry
    labels, x = batch(10)
    loss = cls(**options)
    per_anchor = ops.convert_to_numpy(fn(labels, x, **options))
    assert float(ops.convert_to_numpy(loss(labels, x))) == pytest.approx(
        float(np.mean(per_anchor)), rel=1e-5
    )
    weights = np.linspace(0.0, 2.0, len(labels))
    weighted = float(ops.convert_to_numpy(loss(labels, x, sample_weight=weights)))
    assert weighted == pytest.approx(float(np.mean(per_anchor * weights)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_signature_follows_pytorch_metric_learning(name):
    """PML 2.9's keywords in its order, with its defaults."""
    import inspect

    cls = LOSSES[name][1]
    expected = {
        "nca": {"softmax_scale": 1.0},
        "snr": {"pos_margin": 0.0, "neg_margin": 1.0},
        "generalized_lifted": {"neg_margin": 1.0, "pos_margin": 0.0},
        "lifted_structure": {"neg_margin": 1.0, "pos_margin": 0.0},
        "intra_pair_variance": {"pos_eps": 0.01, "neg_eps": 0.01},
        "tuplet_margin": {"margin": 5.73, "scale": 64.0},
        "angular": {"alpha": 40.0},
        "threshold_consistent_margin": {
            "lambda_plus": 1.0,
            "lambda_minus": 1.0,
            "margin_plus": 0.9,
            "margin_minus": 0.5,
        },
        "margin": {
            "margin": 0.2,
            "nu": 0.0,
            "beta": 1.2,
            "triplets_per_anchor": "all",
            "learn_beta": False,
            "num_classes": None,
        },
    }[name]
    parameters = inspect.signature(cls.__init__).parameters
    got = {k: p.default for k, p in parameters.items() if k in expected}
    assert list(got) == list(expected) and got == expected


@pytest.mark.parametrize(
    "cls, options, error, message",
    [
        (
            losses.NCALoss,
            {"softmax_scale": 0.0},
            ValueError,
            "`softmax_scale` must be a finite number > 0",
        ),
        (losses.TupletMarginLoss, {"scale": "64"}, TypeError, "`scale` must be a number"),
        (
            losses.AngularLoss,
            {"alpha": 90.0},
            ValueError,
            r"`alpha` must be a finite number in \(0, 90\) degrees",
        ),
        (
            losses.TupletMarginLoss,
            {"margin": -1.0},
            ValueError,
            r"`margin` must be a finite number in \[0, 90\) degrees",
        ),
        (
            losses.IntraPairVarianceLoss,
            {"neg_eps": 1.5},
            ValueError,
            r"`neg_eps` must be a finite number in \[0, 1\]",
        ),
        (
            losses.ThresholdConsistentMarginLoss,
            {"margin_plus": 1.5},
            ValueError,
            r"`margin_plus` must be a finite number in \[-1, 1\]",
        ),
        (losses.MarginLoss, {"nu": -0.1}, ValueError, "`nu` must be a finite number >= 0"),
        (losses.IntraPairVarianceLoss, {"pos_eps": None}, TypeError, "`pos_eps` must be"),
        (losses.MarginLoss, {"triplets_per_anchor": 5}, ValueError, "must be 'all'"),
        (losses.MarginLoss, {"learn_beta": True}, ValueError, "heads.MarginBeta"),
        (losses.MarginLoss, {"num_classes": 0}, ValueError, "`num_classes` must be None"),
        (
            losses.GeneralizedLiftedStructureLoss,
            {"neg_margin": float("inf")},
            ValueError,
            "`neg_margin` must be a finite number >= 0",
        ),
    ],
)
def test_bad_options(cls, options, error, message):
    with pytest.raises(error, match=message):
        cls(**options)
