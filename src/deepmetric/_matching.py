"""Label votes over neighbours and the threshold table of `deepmetric.index.Index`."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

VOTES = ("nearest", "majority", "weighted")


class Calibration(NamedTuple):
    """The threshold `Index.calibrate` chose, with its figures on the calibration queries."""

    threshold: float
    precision: float
    recall: float
    f1: float
    accuracy: float


def vote_labels(distances, labels, valid, vote: str):
    """Each row's label by `vote` over its neighbours, and the deciding distance.

    `distances`, `labels`, `valid` are (n, k), the neighbours in ascending distance
    (`valid` False where a structure found no neighbour). "nearest" takes the first;
    "majority" the label most frequent among the valid neighbours; "weighted" the
    label of the largest sum of 1 / distance. Ties between labels go to the one
    whose nearest neighbour is nearest; the deciding distance is that neighbour's
    (+inf where the row has no valid neighbour).
    """
    d = np.asarray(distances)
    if vote == "nearest":
        pos = np.zeros(len(d), np.int64)
    else:
        weight = 1.0 / np.maximum(d, 1e-12) if vote == "weighted" else np.ones(d.shape)
        weight[~valid] = 0.0
        same = labels[:, :, None] == labels[:, None, :]
        score = np.einsum("nij,nj->ni", same, weight)
        score[~valid] = -1.0
        pos = score.argmax(axis=1)  # the first position of the best label: its nearest row
    rows = np.arange(len(d))
    return labels[rows, pos], np.where(valid[rows, pos], d[rows, pos], np.inf)


def calibration_table(deciding, correct, known):
    """(thresholds, precision, recall, F1, accuracy) at every distinct finite deciding distance.

    `deciding` (n,) distances, `correct` (n,) whether the query's label would be
    right, `known` (n,) whether its label is in the index. The thresholds ascend.
    """
    deciding = np.asarray(deciding, np.float64)
    n_known = int(np.count_nonzero(known))
    if n_known == 0:
        raise ValueError(
            "`labels`: no calibration query has a label that is in the index, so no "
            "threshold can match any of them."
        )
    finite = np.isfinite(deciding)
    if not finite.any():
        raise ValueError("No calibration query found a neighbour: nothing to calibrate.")
    order = np.argsort(deciding, kind="stable")
    order = order[finite[order]]
    d = deciding[order]
    last = np.flatnonzero(np.r_[d[1:] != d[:-1], True])  # the end of each run of equal d
    accepted = last + 1.0
    tp = np.cumsum(correct[order])[last]
    unknown_accepted = np.cumsum(~known[order])[last]
    precision = tp / accepted
    recall = tp / n_known
    f1 = 2.0 * tp / (accepted + n_known)
    accuracy = (tp + (len(known) - n_known - unknown_accepted)) / len(known)
    return d[last], precision, recall, f1, accuracy
