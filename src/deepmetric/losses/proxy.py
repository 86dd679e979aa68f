"""Proxy losses: Proxy-Anchor and Proxy-NCA, against a (num_classes, D) matrix of class proxies.

The functions take the proxies as an argument; `deepmetric.heads.ProxyAnchor` and
`deepmetric.heads.ProxyNCA` hold them as a trainable weight and add these losses with `add_loss`.
"""

from __future__ import annotations

from keras import ops

from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels, check_nonempty
from deepmetric.distances import _l2_normalize
from deepmetric.losses.base import (
    NON_NEGATIVE,
    POSITIVE,
    check_number,
    masked_logsumexp,
    nonfinite_to_nan,
    reduce_losses,
)


def _checked(embeddings, proxies):
    """The checked embeddings (float32, float64 kept; not empty) and proxies, in one dtype."""
    x = check_nonempty(check_embeddings(embeddings, "embeddings"), "embeddings")
    return x, ops.cast(check_embeddings(proxies, "proxies"), x.dtype)


def _normalized(x, proxies):
    """The L2-normalised checked embeddings and proxies."""
    return _l2_normalize(x), _l2_normalize(proxies)


def _one_hot(labels, num_classes):
    """(B, num_classes) boolean one-hot of integer labels."""
    return ops.cast(ops.one_hot(ops.cast(labels, "int32"), num_classes), "bool")


@export
def proxy_anchor_loss(labels, embeddings, proxies, *, margin=0.1, alpha=32.0):
    r"""Proxy-Anchor loss (Kim et al., CVPR 2020, arXiv:2003.13911).

    With cosine similarities $s(x, p)$ of the normalised embeddings and proxies, $P^+$ the
    proxies of the classes present in the batch, $X_p^+$ / $X_p^-$ the embeddings of / not of
    class p:

    $$L = \frac{1}{|P^+|}\sum_{p \in P^+}
            \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha(s(x,p) - \delta)}\Big)
        + \frac{1}{|P|}\sum_{p \in P}
            \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha(s(x,p) + \delta)}\Big)$$

    Same value and gradient as `pytorch_metric_learning.losses.ProxyAnchorLoss` with the same
    proxies.

    Args:
      labels: integer labels in [0, num_classes), shape (B,) or (B, 1).
      embeddings: (B, D) embeddings.
      proxies: (num_classes, D) proxies.
      margin: the margin delta, a cosine margin >= 0.
      alpha: the scale alpha (> 0).

    Returns:
      The scalar loss; NaN if an embedding or a proxy is not finite.

    >>> import numpy as np
    >>> loss = proxy_anchor_loss(np.array([0, 1]), np.eye(2), np.eye(2))
    >>> round(float(loss), 4)  # log(1 + e^(32 * 0.1)) from the negatives
    3.24
    """
    margin = check_number("margin", margin, NON_NEGATIVE)
    alpha = check_number("alpha", alpha, POSITIVE)
    raw, raw_proxies = _checked(embeddings, proxies)
    x, proxies = _normalized(raw, raw_proxies)
    labels = check_labels(labels, x.shape[0], "labels")
    num_classes = proxies.shape[0]
    # (C, B): one row per proxy.
    cos = ops.matmul(proxies, ops.transpose(x))
    positive = ops.transpose(_one_hot(labels, num_classes))
    pos_term = masked_logsumexp(-alpha * (cos - margin), positive, add_one=True)
    neg_term = masked_logsumexp(alpha * (cos + margin), ops.logical_not(positive), add_one=True)
    with_positives = ops.sum(ops.cast(ops.any(positive, axis=1), cos.dtype))
    loss = ops.divide_no_nan(ops.sum(pos_term), with_positives) + ops.sum(neg_term) / num_classes
    return nonfinite_to_nan(loss, raw, raw_proxies)


def _nca_logits(x, proxies, softmax_scale):
    """-scale * squared Euclidean distances between already normalised rows, (B, C)."""
    squared = (
        ops.sum(ops.square(x), axis=1, keepdims=True)
        + ops.sum(ops.square(proxies), axis=1)[None, :]
        - 2.0 * ops.matmul(x, ops.transpose(proxies))
    )
    return -softmax_scale * ops.maximum(squared, 0.0)


def proxy_nca_logits(embeddings, proxies, *, softmax_scale=1.0):
    r"""The Proxy-NCA logits $-s\,\|\hat x_i - \hat p_c\|^2$, shape (B, num_classes).

    $\hat x$ and $\hat p$ are the L2-normalised embeddings and proxies and s the softmax scale;
    the softmax of a row is the class posterior, and `proxy_nca_loss` is the cross-entropy of
    these logits with the labels.

    Args:
      embeddings: (B, D) embeddings.
      proxies: (num_classes, D) proxies.
      softmax_scale: the scale s (> 0).

    >>> import numpy as np
    >>> logits = proxy_nca_logits(np.eye(2), np.eye(2))  # -||e_i - e_c||^2
    >>> np.allclose(ops.convert_to_numpy(logits), [[0.0, -2.0], [-2.0, 0.0]])
    True
    """
    softmax_scale = check_number("softmax_scale", softmax_scale, POSITIVE)
    x = check_embeddings(embeddings, "embeddings")
    return _nca_logits(
        *_normalized(x, ops.cast(check_embeddings(proxies, "proxies"), x.dtype)), softmax_scale
    )


@export
def proxy_nca_loss(labels, embeddings, proxies, *, softmax_scale=1.0):
    r"""Proxy-NCA loss (Movshovitz-Attias et al., ICCV 2017, arXiv:1703.07464), as PML has it.

    With $d(x, p) = \|\hat x - \hat p\|^2$ the squared Euclidean distance between the
    L2-normalised embedding and proxy, s the softmax scale and $p_c$ the proxy of class c:

    $$L = \frac{1}{B}\sum_i -\log
        \frac{e^{-s\,d(x_i, p_{y_i})}}{\sum_{c} e^{-s\,d(x_i, p_c)}}$$

    The same value and gradient as `pytorch_metric_learning.losses.ProxyNCALoss` with the same
    proxies (PML drops a sample whose softmax underflows to 0; here it keeps its large finite
    loss).

    Args:
      labels: integer labels in [0, num_classes), shape (B,) or (B, 1).
      embeddings: (B, D) embeddings.
      proxies: (num_classes, D) proxies.
      softmax_scale: the scale s (> 0).

    Returns:
      The scalar loss, the mean over the batch; NaN if an embedding or a proxy is not finite.

    >>> import numpy as np
    >>> loss = proxy_nca_loss(np.array([0, 1]), np.eye(2), np.eye(2))
    >>> round(float(loss), 4)  # -log(e^0 / (e^0 + e^-2)) = log(1 + e^-2)
    0.1269
    """
    softmax_scale = check_number("softmax_scale", softmax_scale, POSITIVE)
    raw, raw_proxies = _checked(embeddings, proxies)
    x, proxies = _normalized(raw, raw_proxies)
    labels = check_labels(labels, x.shape[0], "labels")
    logits = _nca_logits(x, proxies, softmax_scale)
    target_logit = ops.sum(ops.where(_one_hot(labels, proxies.shape[0]), logits, 0.0), axis=1)
    loss = reduce_losses(ops.logsumexp(logits, axis=1) - target_logit)  # 0 if empty
    return nonfinite_to_nan(loss, raw, raw_proxies)
