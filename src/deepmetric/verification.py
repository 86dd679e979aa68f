"""Verification metrics of pair distances: ROC AUC, EER, TAR@FAR, best accuracy, k-fold.

Verification asks of a pair of items "same identity or not?" and answers "same"
when the pair's distance is at most a threshold t. Over all thresholds this
traces the ROC curve: for each t, the true accept rate TAR(t) (the fraction of
same pairs with distance <= t) against the false accept rate FAR(t) (the
fraction of different pairs with distance <= t). The functions here compute the
figures of face-verification papers from that curve:

- `verification_metrics(distances, same)`: ROC AUC, equal error rate and its
  threshold, TAR at given FARs, and the best accuracy with its threshold;
- `verification_roc(distances, same)`: the ROC points themselves (for a plot);
- `verification_pairs(labels, num_pairs, seed=...)`: balanced positive and
  negative pairs drawn from labelled items, and `pair_distances` for them;
- `verification_kfold(distances, same, folds=10)`: the LFW protocol, the
  threshold chosen on k - 1 folds and the accuracy measured on the held-out fold.

Everything is numpy, in float64; tensors of any backend are converted first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "pair_distances",
    "verification_kfold",
    "verification_metrics",
    "verification_pairs",
    "verification_roc",
]

PAIR_METRICS = ("euclidean", "squared_euclidean", "cosine", "inner_product")


def _numpy(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except (TypeError, ValueError, RuntimeError):  # e.g. a torch tensor with grad
        import keras

        return np.asarray(keras.ops.convert_to_numpy(x))


def _check_pairs(distances, same) -> tuple[np.ndarray, np.ndarray]:
    d = _numpy(distances, "distances")
    s = _numpy(same, "same")
    if d.shape != s.shape or d.ndim != 1:
        raise ValueError(
            "`distances` and `same` must be 1-D arrays of the same length, one entry per pair. "
            f"Received: distances.shape={d.shape}, same.shape={s.shape}"
        )
    if d.dtype.kind not in "fiu":
        raise TypeError(f"`distances` must hold numbers. Received: dtype={d.dtype}")
    d = d.astype(np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError("`distances` must be finite; it contains NaN or inf.")
    if s.dtype.kind not in "biuf" or not np.all((s == 0) | (s == 1)):
        raise ValueError("`same` must hold booleans (or 0 / 1): True for a same-identity pair.")
    s = s.astype(bool)
    positives = int(s.sum())
    if positives == 0 or positives == len(s):
        raise ValueError(
            "`same` must contain both same (True) and different (False) pairs. Received "
            f"{positives} same and {len(s) - positives} different pairs"
        )
    return d, s


def _curve(d: np.ndarray, s: np.ndarray):
    """ROC points for thresholds t_0 < t_1 < ...: (far, tar, thresholds, accepted).

    Point 0 accepts nothing (threshold just below the smallest distance); point i
    >= 1 accepts the pairs with distance <= the i-th distinct distance.
    """
    order = np.argsort(d, kind="stable")
    d, s = d[order], s[order]
    last = np.flatnonzero(np.r_[d[1:] != d[:-1], True])  # last pair of each distinct distance
    tp = np.r_[0, np.cumsum(s)[last]]
    fp = np.r_[0, (last + 1) - tp[1:]]
    thresholds = np.r_[np.nextafter(d[0], -np.inf), d[last]]
    return fp / fp[-1], tp / tp[-1], thresholds, (tp, fp)


def verification_roc(distances, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of pair distances: `(far, tar, thresholds)`, FAR ascending.

    Point i accepts the pairs with distance <= `thresholds[i]`; the thresholds
    are the distinct distances, ascending, after a first point (0, 0) whose
    threshold is the float just below the smallest distance. These are the points
    of scikit-learn's `roc_curve(same, -distances, drop_intermediate=False)`.
    """
    far, tar, thresholds, _ = _curve(*_check_pairs(distances, same))
    return far, tar, thresholds


def verification_metrics(distances, same, far: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> dict:
    """ROC AUC, EER, TAR@FAR and the best accuracy of pairs judged by their distance.

    A pair is accepted as "same" when its distance is at most the threshold; the
    candidate thresholds are the distinct distances (and one below them all,
    which accepts nothing). With TAR (true accept rate) and FAR (false accept
    rate) as in `verification_roc`, and FRR = 1 - TAR:

    - `roc_auc`: the area under the ROC curve, trapezoids between its points,
      which is the probability that a random same pair is closer than a random
      different pair, ties counted one half (scikit-learn's `roc_auc_score` of
      `same` against `-distances`).
    - `eer`: the equal error rate, where FAR = FRR. FAR rises and FRR falls with
      the threshold; between the last ROC point where FRR > FAR and the first
      where FRR <= FAR, both are interpolated linearly along the ROC segment
      (the error rates of randomising between the two thresholds), and `eer` is
      their common value at the crossing.
    - `eer_threshold`: the threshold of the first ROC point where FRR <= FAR,
      the smallest distance threshold whose FRR does not exceed its FAR.
    - `tar_at_far`: for each requested FAR f (a dict keyed by `float(f)`), the
      largest TAR among the ROC points with FAR <= f (0 when even the first
      different pair is closer than any same pair, or f < 1 / number of
      different pairs).
    - `best_accuracy`, `best_threshold`: the highest fraction of pairs judged
      correctly, (accepted same + rejected different) / all pairs, and its
      threshold, the smallest on ties.

    Args:
      distances: (n,) distances of n pairs; smaller means more alike.
      same: (n,) booleans (or 0 / 1), True for a pair of the same identity. Both
        kinds must occur.
      far: the false accept rates of `tar_at_far`, each in [0, 1].

    Returns:
      A dict of Python floats (and `tar_at_far`, a dict of floats).

    Three pairs: same pairs at distances 0.1 and 0.4, a different pair at 0.3.
    Thresholds 0.1 and 0.3 give (FAR, TAR) = (0, 0.5) and (1, 0.5): the AUC is
    0.5; FRR = 0.5 > FAR = 0 at 0.1 and FRR = 0.5 <= FAR = 1 at 0.3, so the
    crossing is at 0.5 on that segment, with threshold 0.3; accepting only the
    pair at 0.1 judges 2 of 3 pairs correctly.

    >>> m = verification_metrics([0.1, 0.3, 0.4], [True, False, True], far=(0.5,))
    >>> m["roc_auc"], m["eer"], m["eer_threshold"], m["tar_at_far"], round(m["best_accuracy"], 4)
    (0.5, 0.5, 0.3, {0.5: 0.5}, 0.6667)
    """
    d, s = _check_pairs(distances, same)
    fars = (far,) if isinstance(far, (int, float, np.floating)) else tuple(far)
    for f in fars:
        if isinstance(f, bool) or not isinstance(f, (int, float, np.number)) or not 0 <= f <= 1:
            raise ValueError(f"`far` must be a sequence of rates in [0, 1]. Received: {far!r}")
    fpr, tpr, thresholds, (tp, fp) = _curve(d, s)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    frr = 1.0 - tpr
    i = int(np.argmax(frr <= fpr))  # exists: the last point has FRR = 0 <= FAR = 1
    if i == 0:  # unreachable: point 0 has FRR = 1 > FAR = 0
        eer = 0.0
    else:
        gap0, gap1 = frr[i - 1] - fpr[i - 1], frr[i] - fpr[i]  # > 0 and <= 0
        a = gap0 / (gap0 - gap1)
        eer = float(fpr[i - 1] + a * (fpr[i] - fpr[i - 1]))
    tar = {float(f): float(tpr[np.searchsorted(fpr, f, side="right") - 1]) for f in fars}
    positives, negatives = tp[-1], fp[-1]
    correct = tp + (negatives - fp)
    best = int(np.argmax(correct))  # first maximum: the smallest threshold
    return {
        "roc_auc": auc,
        "eer": eer,
        "eer_threshold": float(thresholds[i]),
        "tar_at_far": tar,
        "best_accuracy": float(correct[best] / (positives + negatives)),
        "best_threshold": float(thresholds[best]),
    }


def _best_threshold(d: np.ndarray, s: np.ndarray) -> float:
    _, _, thresholds, (tp, fp) = _curve(d, s)
    return float(thresholds[int(np.argmax(tp + (fp[-1] - fp)))])


def verification_kfold(distances, same, *, folds=10, seed: int = 0) -> dict:
    """The LFW protocol: accuracy at a threshold chosen on the other folds.

    The pairs are split into k folds; for each fold, the threshold of best
    accuracy on the other k - 1 folds (as `best_threshold` of
    `verification_metrics`) judges the pairs of that fold. With an int `folds`,
    the same and the different pairs are each shuffled (seeded) and dealt
    round-robin into the k folds, so every fold holds both kinds in the overall
    proportion; an array gives the fold of each pair instead (LFW's `pairs.txt`
    fixes 10 folds of 300 same and 300 different pairs).

    Returns:
      A dict: `accuracy_mean` and `accuracy_std` (the mean and the population
      standard deviation, ddof=0, of the k held-out accuracies, as LFW results
      are reported), `accuracies` and `thresholds` (lists, one per fold).

    Two folds given as an array: fold 1's pairs (0.1 same, 0.9 different) choose
    the threshold 0.1, which rejects fold 0's same pair at 0.2 (accuracy 1/2);
    fold 0's pairs choose 0.2, right for both pairs of fold 1.

    >>> r = verification_kfold([0.2, 0.1, 0.8, 0.9], [True, True, False, False],
    ...                        folds=[0, 1, 0, 1])
    >>> r["thresholds"], r["accuracies"], r["accuracy_mean"], r["accuracy_std"]
    ([0.1, 0.2], [0.5, 1.0], 0.75, 0.25)
    """
    d, s = _check_pairs(distances, same)
    if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool):
        k = int(folds)
        if not 2 <= k <= min(s.sum(), (~s).sum()):
            raise ValueError(
                "`folds` must be an integer from 2 to the number of same pairs and of different "
                f"pairs ({int(min(s.sum(), (~s).sum()))}). Received: folds={folds}"
            )
        rng = np.random.default_rng(seed)
        fold = np.empty(len(d), np.int64)
        for kind in (s, ~s):
            members = rng.permutation(np.flatnonzero(kind))
            fold[members] = np.arange(len(members)) % k
    else:
        fold = _numpy(folds, "folds")
        if fold.shape != d.shape or fold.dtype.kind not in "iu":
            raise ValueError(
                "`folds` must be an int or an integer array with the fold of each pair. "
                f"Received: shape {fold.shape}, dtype {fold.dtype}"
            )
    accuracies, thresholds = [], []
    for f in np.unique(fold):
        test = fold == f
        train = ~test
        if s[train].all() or not s[train].any():
            raise ValueError(f"the folds other than fold {f} lack same or different pairs")
        t = _best_threshold(d[train], s[train])
        accuracies.append(float(np.mean((d[test] <= t) == s[test])))
        thresholds.append(t)
    if len(accuracies) < 2:
        raise ValueError("`folds` must name at least 2 folds.")
    return {
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        "accuracies": accuracies,
        "thresholds": thresholds,
    }


def _sample_unique(draw, count: int, n: int, rng) -> np.ndarray:
    """`count` distinct pair codes i * n + j (i < j) from `draw(size, rng) -> (i, j)`."""
    found = np.empty(0, np.int64)
    while len(found) < count:
        i, j = draw(2 * (count - len(found)) + 16, rng)
        keep = i != j
        lo, hi = np.minimum(i, j)[keep], np.maximum(i, j)[keep]
        codes = lo.astype(np.int64) * n + hi
        _, first = np.unique(np.r_[found, codes], return_index=True)
        # Keep the order of drawing, so the result depends only on the seed.
        merged = np.r_[found, codes][np.sort(first)]
        found = merged[:count]
    return found


def verification_pairs(labels, num_pairs: int = 3000, *, seed: int = 0):
    """Balanced verification pairs from labelled items: `(first, second, same)`.

    Draws `num_pairs` distinct same-class pairs, uniformly among all same-class
    pairs of distinct items, and `num_pairs` distinct different-class pairs,
    uniformly among those, and returns them shuffled together: index arrays
    `first` and `second` (int64, first < second) and the boolean `same`, each of
    length 2 * num_pairs. The result depends only on the labels and `seed`.
    `pair_distances(embeddings, first, second)` gives their distances.

    Raises:
      ValueError: `num_pairs` exceeds the same-class or the different-class
        pairs that exist (the message gives both numbers).
    """
    from deepmetric.datasets import class_labels

    y = class_labels(labels, "labels")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)):
        raise TypeError(f"`num_pairs` must be an int. Received: {num_pairs!r}")
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    n = len(y)
    same_total = int(np.sum(counts * (counts - 1) // 2))
    diff_total = n * (n - 1) // 2 - same_total
    if not 1 <= num_pairs <= min(same_total, diff_total):
        raise ValueError(
            f"`num_pairs` must be from 1 to the number of same-class pairs ({same_total}) and of "
            f"different-class pairs ({diff_total}). Received: num_pairs={num_pairs}"
        )
    rng = np.random.default_rng(seed)
    by_class = np.argsort(codes, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    weights = counts * (counts - 1) / 2.0

    def draw_same(size, rng):
        c = rng.choice(len(counts), size=size, p=weights / weights.sum())
        a = rng.integers(0, counts[c])
        b = rng.integers(0, counts[c] - 1)
        b = b + (b >= a)  # a second, distinct member
        return by_class[starts[c] + a], by_class[starts[c] + b]

    def draw_diff(size, rng):
        i, j = rng.integers(0, n, size), rng.integers(0, n, size)
        keep = codes[i] != codes[j]
        return i[keep], j[keep]

    def pick(kind_same: bool, draw, total: int) -> np.ndarray:
        if 2 * num_pairs <= total:  # drawing with rejection of repeats is quick
            return _sample_unique(draw, num_pairs, n, rng)
        # Most pairs are wanted: choose among all of them.
        if kind_same:
            parts = []
            for c in np.flatnonzero(counts > 1):
                members = by_class[starts[c] : starts[c] + counts[c]]
                a, b = np.triu_indices(len(members), 1)
                lo, hi = np.minimum(members[a], members[b]), np.maximum(members[a], members[b])
                parts.append(lo.astype(np.int64) * n + hi)
            every = np.sort(np.concatenate(parts))
        else:
            i, j = np.triu_indices(n, 1)
            keep = codes[i] != codes[j]
            every = i[keep].astype(np.int64) * n + j[keep]
        return rng.choice(every, num_pairs, replace=False)

    pairs = np.r_[pick(True, draw_same, same_total), pick(False, draw_diff, diff_total)]
    is_same = np.r_[np.ones(num_pairs, bool), np.zeros(num_pairs, bool)]
    order = rng.permutation(len(pairs))
    pairs, is_same = pairs[order], is_same[order]
    return pairs // n, pairs % n, is_same


def pair_distances(embeddings, first, second, *, metric: str = "euclidean") -> np.ndarray:
    """Distances of the pairs (embeddings[first[i]], embeddings[second[i]]), float64.

    `metric` is "euclidean", "squared_euclidean", "cosine" (1 - cosine
    similarity) or "inner_product" (minus the inner product): smaller is closer,
    as in `deepmetric.index`.
    """
    if metric not in PAIR_METRICS:
        raise ValueError(f"`metric` must be one of {PAIR_METRICS}. Received: metric={metric!r}")
    x = _numpy(embeddings, "embeddings")
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ValueError(
            f"`embeddings` must be a 2-D array of numbers. Received: shape {x.shape}, "
            f"dtype {x.dtype}"
        )
    x = x.astype(np.float64)
    i, j = np.asarray(first, np.int64), np.asarray(second, np.int64)
    if i.shape != j.shape or i.ndim != 1:
        raise ValueError(
            f"`first` and `second` must be 1-D of one length. Received: {i.shape}, {j.shape}"
        )
    a, b = x[i], x[j]
    if metric in ("euclidean", "squared_euclidean"):
        sq = np.sum((a - b) ** 2, axis=1)
        return sq if metric == "squared_euclidean" else np.sqrt(sq)
    dot = np.sum(a * b, axis=1)
    if metric == "inner_product":
        return -dot
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - dot / np.maximum(norms, np.finfo(np.float64).tiny)
