"""Ranking losses of pytorch-metric-learning on the batch's B x B distance matrix.

`RankedListLoss` ranks each anchor's list of the batch: positives beyond a boundary and
negatives inside another are pulled and pushed with weights. A function `name_loss(labels,
embeddings, *, ...)` returns one value per anchor whose mean (Keras' default reduction) is the
batch loss of pytorch-metric-learning (PML) 2.9, and a thin `MetricLoss` class has PML's class
name and keywords. Everything is built from (B, B) rows (`deepmetric._blocks`).
"""

from __future__ import annotations

from keras import ops

from deepmetric._api import export
from deepmetric.losses.base import (
    NON_NEGATIVE,
    Bounds,
    MetricLoss,
    Option,
    check_number,
    nonfinite_to_nan,
    number_option,
)
from deepmetric.losses.contrastive import _UnitEuclidean
from deepmetric.losses.softmax import normalized_rows


def _optional_number_option(name, bounds):
    """An option that is None (its default, computed from the others) or a finite number in
    `bounds`; the bounds are declared, so the conformance suite tries values outside them."""

    def check(key, value):
        return None if value is None else check_number(key, value, bounds)

    return Option(name, None, check, bounds=bounds)


# The option table, shared by the function and the class: the margin and the negative boundary
# are distances (>= 0), the temperatures >= 0 (PML; 0 gives equal weights), the imbalance a
# weight in [0, 1].
_MARGIN = number_option("margin", 0.4, NON_NEGATIVE)
_TN = number_option("Tn", 10.0, NON_NEGATIVE)
_IMBALANCE = number_option("imbalance", 0.5, Bounds(0.0, 1.0))
_ALPHA = _optional_number_option("alpha", NON_NEGATIVE)
_TP = number_option("Tp", 0.0, NON_NEGATIVE)


@export
def ranked_list_loss(labels, embeddings, *, margin=0.4, Tn=10.0, imbalance=0.5, alpha=None, Tp=0.0):
    r"""Ranked list loss, per anchor (Wang et al., 2019).

    On Euclidean distances $d$ of the L2-normalised embeddings, for anchor i with the positives
    beyond the boundary, $P^*_i = \{p: d_{ip} > \alpha - m\}$, and the negatives inside it,
    $N^*_i = \{n: 0 < d_{in} < \alpha\}$:

    $$\ell_i = (1 - \lambda)\frac{\sum_{P^*_i} w_{ip}(d_{ip} - (\alpha - m))}
                                 {\sum_{j \ne i}(w_{ij} + \epsilon)}
             + \lambda\frac{\sum_{N^*_i} w_{in}(\alpha - d_{in})}{\sum_{j}(w_{ij} + \epsilon)}$$

    with $w_{ip} = e^{T_p (d_{ip} - (\alpha - m))}$ on $P^*_i$, $w_{in} = e^{T_n (\alpha -
    d_{in})}$ on $N^*_i$ (0 elsewhere), $\epsilon = 10^{-5}$ added for each of the B columns
    (as PML), and $\alpha = 1 + m/2$ by default; the batch loss is the mean over the anchors. The
    weights carry gradient, as in PML. A batch without positive pairs keeps the negative terms
    and a single-class batch the positive terms. Same value and gradient as
    `pytorch_metric_learning.losses.RankedListLoss(margin, Tn, imbalance, alpha, Tp)`; PML has
    no defaults for `margin` and `Tn`, deepmetric takes the paper's $m = 0.4$, $T_n = 10$.
    Paper: "Ranked List Loss for Deep Metric Learning", CVPR 2019, arXiv:1903.03238.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      margin: the margin m between the positive and the negative boundary (>= 0).
      Tn: the temperature $T_n$ of the negatives' weights (>= 0).
      imbalance: the weight $\lambda$ of the negative term, in [0, 1].
      alpha: the negative boundary $\alpha$ (None: $1 + m/2$; else >= 0, a distance).
      Tp: the temperature $T_p$ of the positives' weights (>= 0; 0: the paper's RLL-Simpler).

    Returns:
      (B,) per-anchor losses; their mean is the batch loss.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]])
    >>> round(float(ops.mean(ranked_list_loss(np.array([0, 0, 1, 1]), x))), 4)
    0.1891
    """
    margin = _MARGIN.checked(margin)
    Tn = _TN.checked(Tn)
    Tp = _TP.checked(Tp)
    imbalance = _IMBALANCE.checked(imbalance)
    alpha = _ALPHA.checked(alpha)
    alpha = 1.0 + margin / 2.0 if alpha is None else alpha
    boundary = alpha - margin

    def rows(d, positives, negatives):
        num_columns = ops.cast(ops.shape(d)[1], d.dtype)
        far = ops.logical_and(positives, ops.greater(d, boundary))
        near = ops.logical_and(negatives, ops.logical_and(ops.less(d, alpha), ops.greater(d, 0.0)))
        w_p = ops.where(far, ops.exp(Tp * ops.where(far, d - boundary, 0.0)), 0.0)
        w_n = ops.where(near, ops.exp(Tn * ops.where(near, alpha - d, 0.0)), 0.0)
        loss_p = ops.sum(ops.where(far, w_p * (d - boundary), 0.0), axis=1) / (
            ops.sum(w_p, axis=1) + 1e-5 * num_columns
        )
        loss_n = ops.sum(ops.where(near, w_n * (alpha - d), 0.0), axis=1) / (
            ops.sum(w_n, axis=1) + 1e-5 * num_columns
        )
        return ((1.0 - imbalance) * loss_p + imbalance * loss_n,)

    (loss,) = normalized_rows(rows, labels, embeddings, distance=_UnitEuclidean())
    return nonfinite_to_nan(loss, embeddings)


@export
class RankedListLoss(MetricLoss):
    """Ranked list loss; see `ranked_list_loss`.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.RankedListLoss(margin=0.4, Tn=10))
    ```
    """

    function = staticmethod(ranked_list_loss)
    takes_reference = False
    options = (_MARGIN, _TN, _IMBALANCE, _ALPHA, _TP)
