"""Fixed-shape mining against per-pair loops, including ties and rectangular matrices."""

import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, mining


def _np(x):
    return ops.convert_to_numpy(x)


def problem(seed, rows=9, cols=9, classes=3, ties=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    ref_labels = labels if rows == cols else rng.integers(0, classes, cols)
    d = rng.uniform(0, 2, (rows, cols)).astype("float32")
    if ties:
        d = np.round(d * 4) / 4  # many equal distances
    return labels, ref_labels, d


def reference_semihard(d, pos, neg):
    value = np.zeros_like(d)
    for a, p in zip(*np.nonzero(pos), strict=True):
        negatives = d[a][neg[a]]
        if negatives.size == 0:
            continue
        farther = negatives[negatives > d[a, p]]
        value[a, p] = farther.min() if farther.size else negatives.max()
    return value


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_semihard_negatives_pick_the_rule(ties, seed):
    labels, _, d = problem(seed, ties=ties)
    pos, neg = (_np(m) for m in mining.label_masks(labels))
    index, outside = (_np(t) for t in mining.semihard_negatives(d, pos, neg))
    chosen = np.where(
        outside, np.take_along_axis(d, index, axis=1), _np(mining.masked_maximum(d, neg))
    )
    expected = reference_semihard(d, pos, neg)
    np.testing.assert_array_equal(np.where(pos, chosen, 0.0), expected)
    # The chosen column is a negative of the anchor wherever one farther exists.
    assert np.all(neg[np.nonzero(outside)[0], index[outside]])


@pytest.mark.parametrize("seed", [0, 1])
def test_semihard_against_a_reference_set(seed):
    labels, ref_labels, d = problem(seed, rows=5, cols=11)
    pos, neg = (_np(m) for m in mining.label_masks(labels, ref_labels))
    index, outside = (_np(t) for t in mining.semihard_negatives(d, pos, neg))
    chosen = np.where(
        outside, np.take_along_axis(d, index, axis=1), _np(mining.masked_maximum(d, neg))
    )
    np.testing.assert_array_equal(np.where(pos, chosen, 0.0), reference_semihard(d, pos, neg))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_all_counts(ties, seed):
    labels, _, d = problem(seed, ties=ties)
    pos, neg = (_np(m) for m in mining.label_masks(labels))
    per_positive, per_negative = (_np(t) for t in mining.batch_all_counts(d, pos, neg, 0.25))
    active = pos[:, :, None] & neg[:, None, :] & (d[:, :, None] - d[:, None, :] + 0.25 > 0)
    np.testing.assert_array_equal(per_positive, active.sum(axis=2))
    np.testing.assert_array_equal(per_negative, active.sum(axis=1))


def test_label_masks_exclude_self_only_without_reference():
    pos, neg = (_np(m) for m in mining.label_masks(np.array([0, 0, 1])))
    np.testing.assert_array_equal(pos, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(neg, [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    pos, _ = (_np(m) for m in mining.label_masks(np.array([0, 1]), np.array([0, 1])))
    np.testing.assert_array_equal(pos, np.eye(2))


def test_masked_extrema_follow_tfa_on_empty_rows():
    data = np.array([[1.0, 5.0, 3.0], [2.0, 4.0, 6.0]], "float32")
    mask = np.array([[0, 1, 1], [0, 0, 0]], bool)
    np.testing.assert_allclose(_np(mining.masked_maximum(data, mask)), [[5.0], [2.0]])
    np.testing.assert_allclose(_np(mining.masked_minimum(data, mask)), [[3.0], [6.0]])


def test_mining_traces_with_unknown_batch():
    labels, _, d = problem(4)

    def semihard_values(dist, lab):
        pos, neg = mining.label_masks(lab)
        index, outside = mining.semihard_negatives(dist, pos, neg)
        return ops.where(outside, ops.take_along_axis(dist, index, axis=1), 0.0)

    fn = _backend.compiled(semihard_values, d, labels)
    np.testing.assert_array_equal(_np(fn(d, labels)), _np(semihard_values(d, labels)))
    np.testing.assert_array_equal(
        _np(fn(d[:5, :5], labels[:5])), _np(semihard_values(d[:5, :5], labels[:5]))
    )


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_weights_split_ties(ties, seed):
    """Weights of the linear form: 1 per active pair, the chosen negative's share split
    equally among negatives tied at the chosen distance (TF's reduce_min gradient)."""
    labels, _, d = problem(seed, ties=ties)
    margin = 0.5
    pos, neg = (_np(m) for m in mining.label_masks(labels))
    pos_w, neg_w = (_np(t) for t in mining.semihard_weights(d, pos, neg, margin))
    expected_pos, expected_neg = np.zeros_like(d), np.zeros_like(d)
    for a, p in zip(*np.nonzero(pos), strict=True):
        negatives = np.flatnonzero(neg[a])
        farther = negatives[d[a, negatives] > d[a, p]]
        value = d[a, farther].min() if farther.size else d[a, negatives].max()
        chosen = (farther if farther.size else negatives)[
            d[a, farther if farther.size else negatives] == value
        ]
        if margin + d[a, p] - value > 0:
            expected_pos[a, p] = 1.0
            expected_neg[a, chosen] += 1.0 / chosen.size
    np.testing.assert_array_equal(pos_w, expected_pos)
    np.testing.assert_allclose(neg_w, expected_neg, rtol=1e-6)


def test_column_ranks_number_each_class():
    labels = np.array([5, 2, 5, 5, 9, 2, 5, 7], "int32")
    ranks = _np(mining.column_ranks(labels))
    for label in np.unique(labels):
        assert sorted(ranks[labels == label]) == list(range(np.sum(labels == label)))


@pytest.mark.parametrize("reference", ["self", "other", "masked"])
@pytest.mark.parametrize("ties", [False, True])
def test_positive_order_gives_the_same_mining(reference, ties):
    """The positives ranked from the labels (`PositiveOrder`) or by a cumulative sum of the
    mask: the same weights and counts, also with a reference set and a mask removing pairs."""
    rows, cols = (9, 9) if reference == "self" else (7, 11)
    labels, ref_labels, d = problem(3, rows=rows, cols=cols, classes=3, ties=ties)
    ranks = mining.column_ranks(ref_labels)
    if reference == "self":
        pos, neg = mining.label_masks(labels)
        order = mining.PositiveOrder(ranks, ranks)
    else:
        pos, neg = mining.label_masks(labels, ref_labels)
        order = mining.PositiveOrder(ranks)
    if reference == "masked":
        keep = np.random.default_rng(4).random((rows, cols)) > 0.3
        pos, neg = np.logical_and(_np(pos), keep), np.logical_and(_np(neg), keep)
    for fn in (mining.semihard_signed_weights, mining.batch_all_signed_counts):
        np.testing.assert_allclose(
            _np(fn(d, pos, neg, 0.4, order)), _np(fn(d, pos, neg, 0.4)), rtol=1e-6
        )
    soft_ordered = mining.batch_all_soft_terms(d, pos, neg, order)
    for ours, cumsum in zip(soft_ordered, mining.batch_all_soft_terms(d, pos, neg), strict=True):
        np.testing.assert_allclose(_np(ours), _np(cumsum), rtol=1e-5)
    index, outside = mining.semihard_negatives(d, pos, neg, order)
    expected_index, expected_outside = mining.semihard_negatives(d, pos, neg)
    np.testing.assert_array_equal(_np(outside), _np(expected_outside))
    np.testing.assert_array_equal(_np(index)[_np(outside)], _np(expected_index)[_np(outside)])


# --- The per-row selections of the composable triplet loss. ---


def test_masked_argmax_and_argmin():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7)).astype("float32")
    mask = rng.random((6, 7)) < 0.4
    mask[2] = False
    index, nonempty = mining.masked_argmax(data, mask)
    low_index, _ = mining.masked_argmin(data, mask)
    for row in range(6):
        assert bool(_np(nonempty)[row]) == mask[row].any()
        if mask[row].any():
            cols = np.flatnonzero(mask[row])
            assert _np(index)[row] == cols[np.argmax(data[row, cols])]
            assert _np(low_index)[row] == cols[np.argmin(data[row, cols])]


def test_semihard_negative_per_row():
    rng = np.random.default_rng(1)
    d = rng.random((8, 8)).astype("float32")
    negatives = rng.random((8, 8)) < 0.5
    negatives[:, 0] = True
    threshold = rng.random(8).astype("float32")
    threshold[3] = 2.0  # no negative farther: the farthest negative
    index = _np(mining.semihard_negative_per_row(d, threshold, negatives))
    for row in range(8):
        cols = np.flatnonzero(negatives[row])
        farther = [c for c in cols if d[row, c] > threshold[row]]
        expected = (
            min(farther, key=lambda c: d[row, c]) if farther else cols[np.argmax(d[row, cols])]
        )
        assert index[row] == expected


def test_batch_all_soft_terms():
    rng = np.random.default_rng(6)
    labels, x = rng.integers(0, 3, 12), rng.normal(size=(12, 5)).astype("float32")
    x = x.astype(np.float64)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)).astype("float32")
    positives, negatives = mining.label_masks(ops.convert_to_tensor(labels))
    values, w_pos, w_neg, count = (
        _np(t) for t in mining.batch_all_soft_terms(ops.convert_to_tensor(d), positives, negatives)
    )
    sigmoid = lambda z: 1 / (1 + np.exp(-z))
    expected = np.zeros(len(labels))
    expected_pos, expected_neg = np.zeros_like(d), np.zeros_like(d)
    n_triplets = 0
    for a in range(len(labels)):
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            for n in np.flatnonzero(labels != labels[a]):
                z = float(d[a, p]) - float(d[a, n])
                expected[a] += np.logaddexp(0.0, z)
                expected_pos[a, p] += sigmoid(z)
                expected_neg[a, n] += sigmoid(z)
                n_triplets += 1
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    np.testing.assert_allclose(w_pos, expected_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w_neg, expected_neg, rtol=1e-5, atol=1e-6)
    assert float(np.sum(count)) == n_triplets
