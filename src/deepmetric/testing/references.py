"""Brute-force numpy references, written from each loss's definition, for tests.

Each loops over all pairs or triplets in float64. They are slow (O(B^3)) on
purpose: they are the specification the fast losses are checked against.
Degenerate batches follow deepmetric's documented choice (loss 0).
"""

from __future__ import annotations

import numpy as np


def distance_matrix(x, metric="L2"):
    x = np.asarray(x, np.float64)
    diff = x[:, None, :] - x[None, :, :]
    sq = np.sum(diff**2, axis=-1)
    if metric == "L2":
        return np.sqrt(sq)
    if metric == "squared-L2":
        return sq
    if metric == "angular":
        n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
        return np.maximum(1.0 - n @ n.T, 0.0)
    raise ValueError(metric)


def _pairs(labels):
    labels = np.asarray(labels).reshape(-1)
    b = len(labels)
    pos = [(a, p) for a in range(b) for p in range(b) if a != p and labels[a] == labels[p]]
    neg = {a: [n for n in range(b) if labels[n] != labels[a]] for a in range(b)}
    return labels, pos, neg


def semihard(labels, x, margin=1.0, metric="L2", d=None):
    d = distance_matrix(x, metric) if d is None else d
    labels, pos, neg = _pairs(labels)
    if not pos or not any(neg.values()):
        return 0.0
    total = 0.0
    for a, p in pos:
        negatives = [d[a, n] for n in neg[a]]
        farther = [v for v in negatives if v > d[a, p]]
        chosen = min(farther) if farther else max(negatives)
        total += max(margin + d[a, p] - chosen, 0.0)
    return total / len(pos)


def hard(labels, x, margin=1.0, soft=False, metric="L2", d=None):
    d = distance_matrix(x, metric) if d is None else d
    labels, pos, neg = _pairs(labels)
    if not pos or not any(neg.values()):
        return 0.0
    losses = []
    for a in range(len(labels)):
        positives = [d[a, p] for (aa, p) in pos if aa == a]
        # TFA: an anchor without positive takes the row minimum as its hardest positive.
        hp = max(positives) if positives else d[a].min()
        hn = min(d[a, n] for n in neg[a])
        gap = hp - hn
        losses.append(np.logaddexp(0.0, gap) if soft else max(gap + margin, 0.0))
    return float(np.mean(losses))


def batch_all(labels, x, margin=1.0, squared=False):
    d = distance_matrix(x, "squared-L2" if squared else "L2")
    labels, pos, neg = _pairs(labels)
    total, active, valid = 0.0, 0, 0
    for a, p in pos:
        for n in neg[a]:
            v = d[a, p] - d[a, n] + margin
            valid += 1
            if v > 0:
                total += v
                active += 1
    loss = total / active if active else 0.0
    return loss, (active / valid if valid else 0.0)


def lifted(labels, x, margin=1.0):
    d = distance_matrix(x, "L2")
    labels, pos, neg = _pairs(labels)
    unordered = [(i, j) for i, j in pos if i < j]
    if not unordered or not any(neg.values()):
        return 0.0
    total = 0.0
    for i, j in unordered:
        exponents = [margin - d[i, k] for k in neg[i]] + [margin - d[j, k] for k in neg[j]]
        total += max(np.logaddexp.reduce(exponents) + d[i, j], 0.0) ** 2
    return total / (2 * len(unordered))


def contrastive(y, dist, margin=1.0):
    y = np.asarray(y, np.float64).reshape(-1)
    dist = np.asarray(dist, np.float64).reshape(-1)
    return y * dist**2 + (1 - y) * np.maximum(margin - dist, 0.0) ** 2


def npairs(labels, sim):
    labels = np.asarray(labels).reshape(-1)
    sim = np.asarray(sim, np.float64)
    rows = []
    for i in range(len(labels)):
        same = labels == labels[i]
        target = same / same.sum()
        logits = sim[i] - sim[i].max()
        log_softmax = logits - np.log(np.exp(logits).sum())
        rows.append(-(target * log_softmax).sum())
    return float(np.mean(rows))


def npairs_multilabel(y, sim):
    y = np.asarray(y, np.float64)
    sim = np.asarray(sim, np.float64)
    overlap = y @ y.T
    rows = []
    for i in range(len(y)):
        if overlap[i].sum() == 0:
            rows.append(0.0)
            continue
        target = overlap[i] / overlap[i].sum()
        logits = sim[i] - sim[i].max()
        rows.append(-(target * (logits - np.log(np.exp(logits).sum()))).sum())
    return float(np.mean(rows))


def torch_triplet(a, p, n, margin=1.0, swap=False, reduction="mean", eps=1e-6):
    a, p, n = (np.asarray(t, np.float64) for t in (a, p, n))

    def dist(u, v):
        return np.sqrt(np.sum((u - v + eps) ** 2, axis=-1))

    d_ap, d_an = dist(a, p), dist(a, n)
    if swap:
        d_an = np.minimum(d_an, dist(p, n))
    losses = np.maximum(margin + d_ap - d_an, 0.0)
    return {"none": losses, "mean": losses.mean(), "sum": losses.sum()}[reduction]


def numeric_grad(fn, x, eps=1e-6):
    """Central finite differences of a float64 scalar function."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (fn(up) - fn(down)) / (2 * eps)
    return grad
