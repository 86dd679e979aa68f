"""Tests of deepmetric.verification against scikit-learn and brute-force loops."""

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from deepmetric import evaluation
from deepmetric.verification import (
    pair_distances,
    verification_kfold,
    verification_metrics,
    verification_pairs,
    verification_roc,
)


def _random_pairs(seed, n=300, ties=False):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.4
    same[:2] = [True, False]
    d = rng.normal(1.0, 0.5, n) - 0.6 * same
    if ties:
        d = np.round(d, 1)
    return d, same


def _brute_force(d, same, far):
    """The figures from their definitions, one threshold at a time."""
    thresholds = [np.nextafter(d.min(), -np.inf)] + sorted(set(d.tolist()))
    rows = []
    for t in thresholds:
        accept = d <= t
        rows.append((t, np.mean(accept[~same]), np.mean(accept[same]), np.mean(accept == same)))
    tar = {f: max(r[2] for r in rows if r[1] <= f) for f in far}
    best = max(r[3] for r in rows)
    best_t = min(r[0] for r in rows if r[3] == best)
    # EER: walk the ROC segments finely and take the point where FAR and FRR meet.
    pts = np.array([(r[1], 1 - r[2]) for r in rows])
    a = np.linspace(0, 1, 2001)[:, None]
    dense = (pts[:-1, None, :] * (1 - a) + pts[1:, None, :] * a).reshape(-1, 2)
    eer = dense[np.argmin(np.abs(dense[:, 0] - dense[:, 1]))].mean()
    return tar, best, best_t, eer


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn_and_brute_force(seed, ties):
    d, same = _random_pairs(seed, ties=ties)
    far = (0.0, 1e-2, 0.1, 0.5, 1.0)
    m = verification_metrics(d, same, far=far)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(same, -d), abs=1e-12)
    fpr, tpr, _ = roc_curve(same, -d, drop_intermediate=False)
    our_far, our_tar, thresholds = verification_roc(d, same)
    np.testing.assert_allclose(our_far, fpr, atol=1e-12)
    np.testing.assert_allclose(our_tar, tpr, atol=1e-12)
    assert np.all(np.diff(thresholds) > 0)
    tar, best, best_t, eer = _brute_force(d, same, far)
    assert m["tar_at_far"] == pytest.approx(tar, abs=1e-12)
    assert list(m["tar_at_far"]) == [float(f) for f in far]
    assert m["best_accuracy"] == pytest.approx(best, abs=1e-12)
    assert m["best_threshold"] == best_t
    assert m["eer"] == pytest.approx(eer, abs=2e-3)
    # eer_threshold: the first ROC point where FRR <= FAR.
    accept = d[:, None] <= thresholds[None, :]
    frr, far_t = 1 - accept[same].mean(0), accept[~same].mean(0)
    assert m["eer_threshold"] == thresholds[np.argmax(frr <= far_t)]


def test_hand_made_cases():
    """Separable pairs: AUC 1, EER 0, every TAR 1, accuracy 1 at the largest same distance."""
    m = verification_metrics([0.1, 0.2, 0.5, 0.6], [1, 1, 0, 0])
    assert m == {
        "roc_auc": 1.0,
        "eer": 0.0,
        "eer_threshold": 0.2,
        "tar_at_far": {0.001: 1.0, 0.01: 1.0, 0.1: 1.0},
        "best_accuracy": 1.0,
        "best_threshold": 0.2,
    }
    # Reversed: every different pair is closer. AUC 0; FAR and FRR cross at 1 only
    # after all different pairs, at (FAR, FRR) = (1, 1) -> (1, 0): EER 1; accepting
    # nothing is right for half the pairs, at the float below the smallest distance.
    m = verification_metrics([0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1])
    assert (m["roc_auc"], m["eer"], m["best_accuracy"]) == (0.0, 1.0, 0.5)
    assert m["best_threshold"] == np.nextafter(0.1, 0)
    assert m["tar_at_far"][0.1] == 0.0
    # One distance for all: a single ROC segment from (0, 0) to (1, 1), EER 1/2.
    m = verification_metrics([0.3] * 4, [1, 0, 1, 0])
    assert (m["roc_auc"], m["eer"], m["eer_threshold"]) == (0.5, 0.5, 0.3)
    # (FAR, TAR): (0, 0), (0, 1/2), (1/2, 1/2), (1/2, 1), (1, 1); FRR <= FAR first at
    # (1/2, 1/2): crossing from (0, FRR 1/2) to (1/2, FRR 1/2) at FAR = 1/2.
    m = verification_metrics([1, 2, 3, 4], [1, 0, 1, 0])
    assert (m["roc_auc"], m["eer"], m["eer_threshold"]) == (0.75, 0.5, 2.0)


def test_inputs_from_any_backend_and_reexport():
    d, same = _random_pairs(3, n=50)
    d = d.astype("float32")  # as a backend holds it
    m = evaluation.verification_metrics(keras.ops.convert_to_tensor(d), keras.ops.array(same))
    assert m == verification_metrics(d, same)
    assert evaluation.verification_kfold is verification_kfold


@pytest.mark.parametrize(
    "distances, same, far, message",
    [
        ([0.1, 0.2], [True], (0.1,), "same length"),
        ([[0.1, 0.2]], [[True, False]], (0.1,), "1-D"),
        ([0.1, np.nan], [True, False], (0.1,), "finite"),
        ([0.1, 0.2], [True, True], (0.1,), "both same"),
        ([0.1, 0.2], [1, 2], (0.1,), "booleans"),
        ([0.1, 0.2], [True, False], (1.5,), "in \\[0, 1\\]"),
    ],
)
def test_errors(distances, same, far, message):
    with pytest.raises(ValueError, match=message):
        verification_metrics(distances, same, far=far)


def test_kfold_against_brute_force():
    d, same = _random_pairs(4, n=200, ties=True)
    r = verification_kfold(d, same, folds=5, seed=1)
    assert r == verification_kfold(d, same, folds=5, seed=1)
    assert len(r["accuracies"]) == 5
    folds = np.arange(len(d)) % 4
    r = verification_kfold(d, same, folds=folds)
    accuracies = []
    for f in range(4):
        test = folds == f
        t = verification_metrics(d[~test], same[~test])["best_threshold"]
        assert r["thresholds"][f] == t
        accuracies.append(np.mean((d[test] <= t) == same[test]))
    assert r["accuracies"] == pytest.approx(accuracies)
    assert r["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert r["accuracy_std"] == pytest.approx(np.std(accuracies))


def test_kfold_folds_are_stratified_and_errors():
    d, same = _random_pairs(5, n=103)
    # Each fold held out once: with 1 same pair per fold the training side keeps both kinds.
    r = verification_kfold(d, same, folds=int(same.sum()))
    assert len(r["accuracies"]) == int(same.sum())
    with pytest.raises(ValueError, match="`folds` must be an integer from 2"):
        verification_kfold(d, same, folds=1)
    with pytest.raises(ValueError, match="fold of each pair"):
        verification_kfold(d, same, folds=np.zeros(3, int))


def test_pairs_are_balanced_distinct_and_seeded():
    y = np.repeat(np.arange(6), [2, 3, 4, 5, 6, 30])
    first, second, same = verification_pairs(y, 40, seed=3)
    assert len(same) == 80 and same.sum() == 40
    assert np.all(first < second)
    assert np.array_equal(y[first] == y[second], same)
    assert len(set(zip(first.tolist(), second.tolist(), strict=True))) == 80
    again = verification_pairs(y, 40, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (first, second, same), strict=True))
    other = verification_pairs(y, 40, seed=4)
    assert not np.array_equal(other[0], first)
    # All same-class pairs: exactly the pairs an exhaustive loop finds.
    total = sum(c * (c - 1) // 2 for c in np.bincount(y))
    f, s, m = verification_pairs(y, total, seed=0)
    expected = {(i, j) for i in range(len(y)) for j in range(i + 1, len(y)) if y[i] == y[j]}
    assert set(zip(f[m].tolist(), s[m].tolist(), strict=True)) == expected
    with pytest.raises(ValueError, match=f"same-class pairs \\({total}\\)"):
        verification_pairs(y, total + 1)
    strings = verification_pairs(np.array(["a", "b"]).repeat(3), 2, seed=0)
    assert strings[2].sum() == 2


@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine", "inner_product"])
def test_pair_distances(metric):
    x = np.random.default_rng(0).normal(size=(6, 3))
    i, j = np.array([0, 1, 5]), np.array([2, 1, 3])
    expected = []
    for a, b in zip(x[i], x[j], strict=True):
        expected.append(
            {
                "euclidean": np.sqrt(np.sum((a - b) ** 2)),
                "squared_euclidean": np.sum((a - b) ** 2),
                "cosine": 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                "inner_product": -(a @ b),
            }[metric]
        )
    np.testing.assert_allclose(pair_distances(x, i, j, metric=metric), expected, atol=1e-12)
    with pytest.raises(ValueError, match="`metric` must be one of"):
        pair_distances(x, i, j, metric="l3")
