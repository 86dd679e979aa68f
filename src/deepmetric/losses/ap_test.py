"""The average-precision and histogram losses against pytorch-metric-learning and loops of
the papers' definitions.

The invariants run in `deepmetric/testing/conformance_test.py`.
"""

import inspect
import math

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, _blocks, losses
from deepmetric.distributed_test import assert_global_batch_on_two_replicas
from deepmetric.losses import ap
from deepmetric.losses.pair_test import (
    _assert_close,
    _numeric_grad,
    _unit,
    _value_and_grad,
    batch,
    check_class_equals_function_and_sample_weight,
    check_equals_pytorch_metric_learning,
    torch_only,
)

# name: (function, class, PML class name, non-default options)
LOSSES = {
    "fast_ap": (losses.fast_ap_loss, losses.FastAPLoss, "FastAPLoss", {"num_bins": 5}),
    "histogram": (losses.histogram_loss, losses.HistogramLoss, "HistogramLoss", {"n_bins": 10}),
    "smooth_ap": (losses.smooth_ap_loss, losses.SmoothAPLoss, "SmoothAPLoss", {"temperature": 0.1}),
}
# PML compares these with the batch only; "reference" is not a case.
CASES = ["random", "duplicates", "options", "many", "distinct", "one-class"]
PML_FAILS = ("histogram", "duplicates")  # see test_histogram_of_a_duplicate_...


# --- pytorch-metric-learning 2.9, value and gradient (torch backend only). ---


@torch_only
@pytest.mark.parametrize(
    "name, case",
    [(n, c) for n in ("fast_ap", "histogram") for c in CASES if (n, c) != PML_FAILS],
)
def test_equals_pytorch_metric_learning(name, case):
    check_equals_pytorch_metric_learning(LOSSES[name], name, case)


@torch_only
def test_histogram_of_a_duplicate_where_pytorch_metric_learning_fails():
    """Two equal embeddings have similarity 1, the last node; PML indexes one node past it."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(11)
    x[1], labels[1] = x[0], labels[0]
    with pytest.raises((RuntimeError, IndexError)):
        _backend.value_and_grad(lambda v, lab: pml.HistogramLoss()(v, lab), x, labels)
    value = float(ops.mean(losses.histogram_loss(labels, x)))
    assert value == pytest.approx(ref_histogram(labels, x), rel=1e-5)


@torch_only
@pytest.mark.parametrize("delta", [0.3, 2.0])
def test_histogram_delta_alone_equals_pytorch_metric_learning(delta):
    """A width with 2 / delta not an integer (0.3: PML's round(1 + 2 / 0.3) = 8 nodes, ours
    ceil(2 / 0.3) + 1 = 8) and the widest bin."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(4)
    ours = _value_and_grad(losses.histogram_loss, labels, x, {"delta": delta})
    theirs = _backend.value_and_grad(
        lambda v, lab: pml.HistogramLoss(delta=delta)(v, lab), x, labels
    )
    _assert_close(ours, theirs)


def _sorted_classes(classes, per_class, seed, d=5):
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(classes), per_class), rng.normal(size=(classes * per_class, d))


@torch_only
@pytest.mark.parametrize(
    "classes, options, duplicate",
    [(3, {}, False), (4, {}, False), (3, {"temperature": 0.1}, False), (3, {}, True)],
)
def test_smooth_ap_equals_pytorch_metric_learning(classes, options, duplicate):
    """On the batches PML reads as intended: sorted by class, as many classes as examples
    per class (its chunks are then the classes)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = _sorted_classes(classes, classes, seed=classes)
    x = x.astype("float32")
    labels = labels[::-1].copy()  # class order does not matter, only the sorting
    if duplicate:
        x[1] = x[0]
    ours = _value_and_grad(losses.smooth_ap_loss, labels, x, options)
    theirs = _backend.value_and_grad(lambda v, lab: pml.SmoothAPLoss(**options)(v, lab), x, labels)
    _assert_close(ours, theirs)


@torch_only
def test_smooth_ap_differs_from_pytorch_metric_learning_where_pml_ignores_labels():
    """2 classes x 4 sorted: PML's positives are consecutive chunks of 2 (the number of
    classes), not the classes; deepmetric follows the labels (and the authors' code)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = _sorted_classes(2, 4, seed=1)
    x = x.astype("float32")
    ours = float(ops.mean(losses.smooth_ap_loss(labels, x)))
    theirs = float(_backend.value_and_grad(lambda v, lab: pml.SmoothAPLoss()(v, lab), x, labels)[0])
    assert abs(ours - theirs) > 1e-3
    assert ours == pytest.approx(ref_smooth_ap_authors(x, num_id=2), rel=1e-5)


# --- Loops of the papers' definitions, value and gradient, on every backend. ---


def ref_fast_ap(labels, x, num_bins=10):
    """Cakir et al. 2019, Eq. 9 with the triangular soft binning of Sec. 4.2, per query."""
    u = _unit(x)
    n, width = len(labels), 4.0 / num_bins
    centers = [k * width for k in range(num_bins + 1)]
    per_query = []
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(n) if labels[j] != labels[i]]
        if not pos:
            continue
        d = {j: float(np.sum((u[i] - u[j]) ** 2)) for j in range(n)}

        def pulse(dist, c):
            return max(1.0 - abs(dist - c) / width, 0.0)

        h_pos = [sum(pulse(d[j], c) for j in pos) for c in centers]
        h_neg = [sum(pulse(d[j], c) for j in neg) for c in centers]
        ap_i, cum_pos, cum_all = 0.0, 0.0, 0.0
        for hp, hn in zip(h_pos, h_neg, strict=True):
            cum_pos, cum_all = cum_pos + hp, cum_all + hp + hn
            ap_i += hp * cum_pos / cum_all if hp * cum_pos > 0 else 0.0
        per_query.append(1.0 - ap_i / len(pos))
    return float(np.mean(per_query)) if per_query else 0.0


def ref_histogram(labels, x, n_bins=100, pml_pairs=True):
    """Ustinova & Lempitsky 2016, Eq. 1-4: linear-interpolation histograms of the unordered
    positive and negative pairs' cosine similarities, L = sum_r h-_r sum_{q<=r} h+_q. With
    `pml_pairs`, only the pairs of PML's triplets: a positive pair whose anchor has a negative
    and a negative pair one of whose examples has a positive (the paper takes every pair)."""
    u = _unit(x)
    n, delta = len(labels), 2.0 / n_bins
    nodes = [-1.0 + r * delta for r in range(n_bins + 1)]
    has_pos = [any(labels[j] == labels[i] for j in range(n) if j != i) for i in range(n)]
    has_neg = [any(labels[j] != labels[i] for j in range(n)) for i in range(n)]
    pos, neg = [], []
    for i in range(n):
        for j in range(i + 1, n):
            s = float(u[i] @ u[j])
            if labels[i] == labels[j] and (has_neg[i] or not pml_pairs):
                pos.append(s)
            if labels[i] != labels[j] and (has_pos[i] or has_pos[j] or not pml_pairs):
                neg.append(s)
    if not pos or not neg:
        return 0.0

    def histogram(values):
        h = np.zeros(len(nodes))
        for s in values:
            for r, t in enumerate(nodes):
                if r > 0 and nodes[r - 1] <= s <= t:
                    h[r] += (s - nodes[r - 1]) / delta
                elif r < n_bins and t <= s < nodes[r + 1]:
                    h[r] += (nodes[r + 1] - s) / delta
        return h / len(values)

    return float(np.sum(histogram(neg) * np.cumsum(histogram(pos))))


def ref_smooth_ap(labels, x, temperature=0.01, query_in_set=True):
    """Brown et al. 2020, Eq. 7 per query, averaged: 1 - mean_q AP_q. The paper's retrieval
    set leaves the query out (`query_in_set=False`); PML's and the authors' code rank the
    whole batch, so the query is in its own positive set (`query_in_set=True`)."""
    u = _unit(x)
    n = len(labels)
    sim = u @ u.T

    def g(v):
        return 1.0 / (1.0 + math.exp(-v / temperature))

    total = 0.0
    for q in range(n):
        retrieval = [j for j in range(n) if query_in_set or j != q]
        positives = [j for j in retrieval if labels[j] == labels[q]]
        if not positives:
            continue
        ap_q = 0.0
        for i in positives:
            above_pos = sum(g(sim[q, j] - sim[q, i]) for j in positives if j != i)
            above_all = sum(g(sim[q, j] - sim[q, i]) for j in retrieval if j != i)
            ap_q += (1.0 + above_pos) / (1.0 + above_all)
        total += 1.0 - ap_q / len(positives)
    return total / n


def ref_smooth_ap_authors(x, num_id, temperature=0.01):
    """The authors' `SmoothAP.forward` (Smooth_AP_loss.py) with NumPy: a batch of `num_id`
    classes sorted by class, ranking the whole batch, on normalised embeddings."""
    u = _unit(np.asarray(x, np.float64))
    b = len(u)
    group = b // num_id

    def sigmoid(t):
        return 1.0 / (1.0 + np.exp(-np.clip(t / temperature, -50, 50)))

    sim = u @ u.T
    diff = sim[:, None, :] - sim[:, :, None]
    ranks = np.sum(sigmoid(diff) * (1.0 - np.eye(b))[None], axis=-1) + 1.0
    ap = 0.0
    for c in range(num_id):
        block = slice(c * group, (c + 1) * group)
        sp = sim[block, block]
        dp = sp[:, None, :] - sp[:, :, None]
        pos_ranks = np.sum(sigmoid(dp) * (1.0 - np.eye(group))[None], axis=-1) + 1.0
        ap += np.sum(pos_ranks / ranks[block, block]) / group / b
    return 1.0 - ap


@pytest.mark.parametrize(
    "name, reference, options",
    [
        ("fast_ap", ref_fast_ap, {}),
        ("fast_ap", ref_fast_ap, {"num_bins": 4}),
        ("histogram", ref_histogram, {"n_bins": 10}),
        ("histogram", ref_histogram, {"n_bins": 25}),
        ("smooth_ap", ref_smooth_ap, {"temperature": 0.1}),
        ("smooth_ap", ref_smooth_ap, {}),
    ],
)
def test_matches_the_paper_loop(name, reference, options):
    """Value and a central-difference gradient of the loop (float64), on a batch with a
    singleton class (an anchor without positives)."""
    labels, x = batch(5, b=8, d=4)
    labels[0] = 7
    ours = _value_and_grad(LOSSES[name][0], labels, x, options)
    _assert_close(ours, _numeric_grad(reference, labels, x, **options))


def test_histogram_pairs_follow_pml_not_the_paper():
    """With two singleton classes, their negative pair is in the paper's histogram, not in
    PML's (no triplet holds it); deepmetric follows PML. Without singletons the two agree."""
    labels, x = batch(6, b=8, d=4)
    labels[0], labels[1] = 7, 8
    value = float(ops.mean(losses.histogram_loss(labels, x, n_bins=10)))
    assert value == pytest.approx(ref_histogram(labels, x, 10), rel=1e-5)
    assert abs(value - ref_histogram(labels, x, 10, pml_pairs=False)) > 1e-3
    labels = np.arange(8) % 3
    value = float(ops.mean(losses.histogram_loss(labels, x, n_bins=10)))
    assert value == pytest.approx(ref_histogram(labels, x, 10, pml_pairs=False), rel=1e-5)


def test_smooth_ap_is_pml_s_ranking_not_the_paper_s():
    """The query ranks itself (PML, the authors' code); the paper's retrieval set leaves it
    out, which gives another value."""
    labels, x = batch(7, b=8, d=4)
    value = float(ops.mean(losses.smooth_ap_loss(labels, x, temperature=0.1)))
    assert value == pytest.approx(ref_smooth_ap(labels, x, 0.1), rel=1e-5)
    assert abs(value - ref_smooth_ap(labels, x, 0.1, query_in_set=False)) > 1e-3


@pytest.mark.parametrize("classes, per_class", [(2, 4), (4, 2), (3, 3)])
def test_smooth_ap_equals_the_authors_code_on_sorted_batches(classes, per_class):
    """Any number of classes and examples per class, sorted by class (the authors' layout)."""
    labels, x = _sorted_classes(classes, per_class, seed=classes * 10 + per_class)
    value = float(ops.mean(losses.smooth_ap_loss(labels, x.astype("float32"))))
    assert value == pytest.approx(ref_smooth_ap_authors(x, num_id=classes), rel=1e-5)


def test_smooth_ap_takes_any_batch():
    """Unequal classes, unsorted: no error (PML raises), the value of the per-anchor loop."""
    labels = np.array([0, 1, 0, 2, 1, 0, 0, 2, 3])
    x = np.random.default_rng(8).normal(size=(9, 4)).astype("float32")
    value = float(ops.mean(losses.smooth_ap_loss(labels, x, temperature=0.05)))
    assert value == pytest.approx(ref_smooth_ap(labels, x, 0.05), rel=1e-5)


# --- Blocks of rows, across devices. ---


@pytest.mark.parametrize("name", list(LOSSES))
def test_blocks_equal_one_block(name, monkeypatch):
    """26 anchors in blocks of 5 rows (the last one padded) give the one-block value and
    gradient; compiled as `fit` compiles (`jax.jit`, `tf.function`), torch eagerly."""
    compiled = _backend.name() != "torch"
    _, cls, _, options = LOSSES[name]
    labels = np.concatenate([np.repeat(np.arange(6), 4), [6, 7]]).astype("int32")
    rng = np.random.default_rng(1)
    rng.shuffle(labels)
    x = rng.normal(size=(26, 5)).astype("float32")
    loss = cls(**options)

    def objective(v, lab):
        return loss(lab, v)

    expected = _backend.value_and_grad(objective, x, labels, compiled=compiled)
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 5 * 26)
    monkeypatch.setattr(ap, "HISTOGRAM_BLOCK_ENTRIES", 5 * 26)
    assert _blocks.block_size(26, 26) == 5
    got = _backend.value_and_grad(objective, x, labels, compiled=compiled)
    assert float(expected[0]) > 0.0
    _assert_close(got, expected, rtol=1e-5)


def test_replicas_shares_sum_to_the_global_loss():
    """Two replicas of 7 and 9 rows, each computing the histogram loss of the gathered batch
    and keeping its rows (its rows are not separable; FastAP and Smooth-AP take the same path,
    having no reference set): their shares add up to the loss of the global batch, which
    differs from the local losses."""
    loss = losses.HistogramLoss()
    assert not loss.separable_rows and losses.FastAPLoss().separable_rows
    # `MetricLoss.__call__` passes no reference set: no loss here takes one.
    assert all(cls().call_with_reference is None for _, cls, _, _ in LOSSES.values())
    assert_global_batch_on_two_replicas(loss)


# --- Classes and options. ---


@pytest.mark.parametrize("name", list(LOSSES))
def test_class_equals_function_and_sample_weight(name):
    check_class_equals_function_and_sample_weight(LOSSES[name])
    assert LOSSES[name][1]().call_with_reference is None


@pytest.mark.parametrize("name", list(LOSSES))
def test_signature_follows_pytorch_metric_learning(name):
    """PML 2.9's keywords in its order, with its defaults."""
    expected = {
        "fast_ap": {"num_bins": 10},
        "histogram": {"n_bins": None, "delta": None},
        "smooth_ap": {"temperature": 0.01},
    }[name]
    parameters = inspect.signature(LOSSES[name][1].__init__).parameters
    assert list(parameters)[1 : 1 + len(expected)] == list(expected)
    assert {k: parameters[k].default for k in expected} == expected


def test_histogram_bins_from_n_bins_or_delta():
    """None and None is 100 bins; `delta` alone is 2 / n_bins; both agree or are refused."""
    labels, x = batch(3)
    default = float(ops.mean(losses.histogram_loss(labels, x)))
    assert default == pytest.approx(ref_histogram(labels, x, 100), rel=1e-5)
    by_delta = float(ops.mean(losses.histogram_loss(labels, x, delta=0.02)))
    both = float(ops.mean(losses.histogram_loss(labels, x, n_bins=100, delta=0.02)))
    assert by_delta == pytest.approx(default, rel=1e-6) and both == pytest.approx(default, rel=1e-6)
    assert losses.HistogramLoss(n_bins=8.0).n_bins == 8
    restored = losses.HistogramLoss.from_config(losses.HistogramLoss(delta=0.25).get_config())
    assert (restored.n_bins, restored.delta) == (None, 0.25)


@pytest.mark.parametrize(
    "cls, options, error, message",
    [
        (losses.FastAPLoss, {"num_bins": 0}, ValueError, "`num_bins` must be an integer >= 1"),
        (losses.FastAPLoss, {"num_bins": 2.5}, ValueError, "`num_bins` must be an integer >= 1"),
        (losses.FastAPLoss, {"num_bins": float("inf")}, ValueError, "`num_bins` must be an"),
        (losses.FastAPLoss, {"num_bins": "10"}, TypeError, "`num_bins` must be an integer"),
        (losses.FastAPLoss, {"num_bins": True}, TypeError, "`num_bins` must be an integer"),
        (losses.HistogramLoss, {"n_bins": 0}, ValueError, "`n_bins` must be None or an integer"),
        (losses.HistogramLoss, {"n_bins": float("nan")}, ValueError, "`n_bins` must be None"),
        (
            losses.HistogramLoss,
            {"delta": 2.5},
            ValueError,
            r"`delta` must be a finite number in \(0, 2\]",
        ),
        (
            losses.HistogramLoss,
            {"n_bins": 10, "delta": 0.1},
            ValueError,
            r"`delta` and `n_bins` must satisfy delta = 2 / n_bins.*n_bins=10, delta=0.1",
        ),
        (
            losses.SmoothAPLoss,
            {"temperature": 0.0},
            ValueError,
            "`temperature` must be a finite number > 0",
        ),
    ],
)
def test_bad_options(cls, options, error, message):
    with pytest.raises(error, match=message):
        cls(**options)
    with pytest.raises(error, match=message):
        cls.function(*batch(0), **options)
