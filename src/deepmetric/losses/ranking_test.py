"""The ranking losses against pytorch-metric-learning and a loop over each anchor's list.

The invariants run in `deepmetric/testing/conformance_test.py`.
"""

import inspect

import numpy as np
import pytest
from keras import ops

from deepmetric import losses
from deepmetric.losses.pair_test import (
    _assert_close,
    _numeric_grad,
    _unit,
    _value_and_grad,
    batch,
    check_equals_pytorch_metric_learning,
    torch_only,
)

RANKED_LIST_OPTIONS = {"margin": 0.6, "Tn": 3.0, "imbalance": 0.3, "alpha": 1.3, "Tp": 2.0}
ENTRY = (losses.ranked_list_loss, losses.RankedListLoss, "RankedListLoss", RANKED_LIST_OPTIONS)


@torch_only
@pytest.mark.parametrize(
    "case", ["random", "duplicates", "options", "many", "distinct", "one-class"]
)
def test_ranked_list_equals_pytorch_metric_learning(case, monkeypatch):
    """PML has no defaults for `margin` and `Tn`: its class gets deepmetric's."""
    import pytorch_metric_learning.losses as pml

    original = pml.RankedListLoss
    monkeypatch.setattr(
        pml,
        "RankedListLoss",
        lambda margin=0.4, Tn=10.0, **kwargs: original(margin=margin, Tn=Tn, **kwargs),
    )
    check_equals_pytorch_metric_learning(ENTRY, "ranked_list", case)


def ref_ranked_list(labels, x, margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0):
    """The paper's per-anchor weighted means over the violating pairs (and PML's 1e-5 per
    column in each denominator)."""
    alpha = 1 + margin / 2 if alpha is None else alpha
    u = _unit(x)
    n = len(labels)
    total = 0.0
    for i in range(n):
        d = [np.linalg.norm(u[i] - u[j]) for j in range(n)]
        pos = [j for j in range(n) if j != i and labels[j] == labels[i] and d[j] > alpha - margin]
        neg = [j for j in range(n) if labels[j] != labels[i] and 0 < d[j] < alpha]
        w_p = {j: np.exp(Tp * (d[j] - (alpha - margin))) for j in pos}
        w_n = {j: np.exp(Tn * (alpha - d[j])) for j in neg}
        loss_p = sum(w_p[j] * (d[j] - alpha + margin) for j in pos) / (sum(w_p.values()) + 1e-5 * n)
        loss_n = sum(w_n[j] * (alpha - d[j]) for j in neg) / (sum(w_n.values()) + 1e-5 * n)
        total += (1 - imbalance) * loss_p + imbalance * loss_n
    return total / n


@pytest.mark.parametrize("options", [{}, RANKED_LIST_OPTIONS])
def test_ranked_list_matches_the_loop(options):
    labels, x = batch(5, b=8, d=4)
    ours = _value_and_grad(losses.ranked_list_loss, labels, x, options)
    _assert_close(ours, _numeric_grad(ref_ranked_list, labels, x, **options))


def test_ranked_list_class_and_signature():
    labels, x = batch(10)
    loss = losses.RankedListLoss(**RANKED_LIST_OPTIONS)
    expected = float(ops.mean(losses.ranked_list_loss(labels, x, **RANKED_LIST_OPTIONS)))
    assert float(ops.convert_to_numpy(loss(labels, x))) == pytest.approx(expected, rel=1e-6)
    parameters = list(inspect.signature(losses.RankedListLoss.__init__).parameters)
    assert parameters[1:6] == ["margin", "Tn", "imbalance", "alpha", "Tp"]
    assert loss.call_with_reference is None


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"imbalance": 1.5}, ValueError, r"`imbalance` must be a finite number in \[0, 1\]"),
        ({"alpha": "1"}, TypeError, "`alpha` must be a number"),
        ({"alpha": -0.5}, ValueError, "`alpha` must be a finite number >= 0"),
        ({"Tn": float("nan")}, ValueError, "`Tn` must be a finite number >= 0"),
        ({"Tp": -1.0}, ValueError, "`Tp` must be a finite number >= 0"),
    ],
)
def test_ranked_list_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        losses.RankedListLoss(**options)
