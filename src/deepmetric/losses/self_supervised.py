"""Two-view losses for self-supervised training: VICReg and the `SelfSupervisedLoss` wrapper.

Their classes take `y_pred` of shape (B, 2, D): the embeddings of two augmented views of the
same B inputs (as `TripletMarginLoss` takes (B, 3, D)); `y_true` is not used (pass any array
of B rows, for example zeros). The per-example values' mean is the batch loss of
pytorch-metric-learning (PML) 2.9's `VICRegLoss()(view1, ref_emb=view2)` and
`SelfSupervisedLoss(loss, symmetric)(view1, view2)`.
"""

from __future__ import annotations

import keras
from keras import ops

from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_nonempty
from deepmetric.losses.base import (
    NON_NEGATIVE,
    POSITIVE,
    MetricLoss,
    nonfinite_to_nan,
    number_option,
    options_config,
    reduce_losses,
    store_options,
)
from deepmetric.losses.softmax import NTXentLoss

# VICReg's options, shared by `vicreg_loss` and `VICRegLoss`: the weights of the three terms
# >= 0 (0 drops a term), the epsilon inside the square root > 0.
_INVARIANCE_LAMBDA = number_option("invariance_lambda", 25.0, NON_NEGATIVE)
_VARIANCE_MU = number_option("variance_mu", 25.0, NON_NEGATIVE)
_COVARIANCE_V = number_option("covariance_v", 1.0, NON_NEGATIVE)
_EPS = number_option("eps", 1e-4, POSITIVE)


def _views(y_pred):
    """The two (B, D) views of a (B, 2, D) `y_pred`, float32 (float64 stays on TensorFlow)."""
    y_pred = ops.convert_to_tensor(y_pred)
    shape = tuple(y_pred.shape)
    if len(shape) != 3 or shape[1] != 2:
        raise ValueError(
            "`y_pred` must have shape (batch_size, 2, embedding_dim): the embeddings of two "
            f"views of each input. Received: y_pred.shape={shape}"
        )
    check_nonempty(y_pred, "y_pred")
    return check_embeddings(y_pred[:, 0, :], "y_pred"), check_embeddings(y_pred[:, 1, :], "y_pred")


def _two_view_call(loss, y_true, y_pred, sample_weight):
    with keras.name_scope(loss.name):
        first, second = _views(y_pred)
        return reduce_losses(loss.call(first, second), sample_weight, loss.reduction)


@export
def vicreg_loss(
    embeddings,
    reference_embeddings,
    *,
    invariance_lambda=25.0,
    variance_mu=25.0,
    covariance_v=1.0,
    eps=1e-4,
):
    r"""VICReg loss of two views, per example (Bardes, Ponce & LeCun, 2022).

    For the views $Z$, $Z'$ (B x D, not normalised):

    $$L = \lambda\,\frac{1}{B}\sum_i \frac{\lVert z_i - z'_i\rVert^2}{D}
        + \mu\,[v(Z) + v(Z')] + \nu\,[c(Z) + c(Z')]$$

    with the variance term $v(Z) = \frac{1}{2D}\sum_k [1 - \sqrt{\operatorname{Var}(z_{\cdot
    k}) + \epsilon}]_+$ (unbiased variance over the batch) and the covariance term $c(Z) =
    \frac{1}{D}\sum_{k \ne l} C(Z)_{kl}^2$, $C$ the unbiased covariance matrix. The per-example
    value is the example's invariance term plus the batch's variance and covariance terms, so
    their mean is the loss. Memory is O(B D + D^2). Same value and gradient as
    `pytorch_metric_learning.losses.VICRegLoss()(embeddings, ref_emb=reference_embeddings)`
    (the variance term of PML's code halves each view's mean, as here). A batch of one example
    has no variance: its variance and covariance terms are taken as those of zero variance
    (PML divides by 0). A non-finite entry in either view makes every value NaN; an empty batch
    is a ValueError naming `embeddings`. Paper: "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning", ICLR 2022, arXiv:2105.04906.

    Args:
      embeddings: the first view, (B, D).
      reference_embeddings: the second view, (B, D).
      invariance_lambda: the weight $\lambda$ of the invariance term (>= 0).
      variance_mu: the weight $\mu$ of the variance terms (>= 0).
      covariance_v: the weight $\nu$ of the covariance terms (>= 0).
      eps: the $\epsilon$ inside the square root (> 0).

    Returns:
      (B,) per-example values; their mean is the batch loss.

    >>> import numpy as np
    >>> z = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> round(float(ops.mean(vicreg_loss(z, z[::-1]))), 4)
    18.953
    """
    invariance_lambda = _INVARIANCE_LAMBDA.checked(invariance_lambda)
    variance_mu = _VARIANCE_MU.checked(variance_mu)
    covariance_v = _COVARIANCE_V.checked(covariance_v)
    eps = _EPS.checked(eps)
    first = check_nonempty(check_embeddings(embeddings, "embeddings"), "embeddings")
    second = check_nonempty(
        check_embeddings(reference_embeddings, "reference_embeddings"), "reference_embeddings"
    )
    if tuple(first.shape) != tuple(second.shape):
        raise ValueError(
            "`embeddings` and `reference_embeddings` must have the same shape. Received: "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    if second.dtype != first.dtype:
        second = ops.cast(second, first.dtype)
    size = ops.cast(ops.shape(first)[0], first.dtype)
    dim = ops.cast(ops.shape(first)[1], first.dtype)
    invariance = ops.mean(ops.square(first - second), axis=1)

    def regularisers(z):
        centred = z - ops.mean(z, axis=0, keepdims=True)
        covariance = ops.divide_no_nan(ops.matmul(ops.transpose(centred), centred), size - 1.0)
        variance = ops.diagonal(covariance)
        std = ops.sqrt(variance + eps)
        off_diagonal = ops.sum(ops.square(covariance)) - ops.sum(ops.square(variance))
        return ops.mean(ops.relu(1.0 - std)) / 2.0, off_diagonal / dim

    var1, cov1 = regularisers(first)
    var2, cov2 = regularisers(second)
    batch_terms = variance_mu * (var1 + var2) + covariance_v * (cov1 + cov2)
    return nonfinite_to_nan(invariance_lambda * invariance + batch_terms, first, second)


@export
class VICRegLoss(keras.losses.Loss):
    """VICReg loss on `y_pred` of shape (B, 2, D); see `vicreg_loss`. `y_true` is not used.

    ```python
    # a model mapping a pair of views (B, 2, ...) to their embeddings (B, 2, D)
    model.compile(optimizer="adam", loss=deepmetric.losses.VICRegLoss())
    model.fit(pairs_of_views, np.zeros(len(pairs_of_views)))
    ```
    """

    options = (_INVARIANCE_LAMBDA, _VARIANCE_MU, _COVARIANCE_V, _EPS)

    def __init__(
        self,
        invariance_lambda=25.0,
        variance_mu=25.0,
        covariance_v=1.0,
        eps=1e-4,
        name="vicreg_loss",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        store_options(
            self,
            self.options,
            {
                "invariance_lambda": invariance_lambda,
                "variance_mu": variance_mu,
                "covariance_v": covariance_v,
                "eps": eps,
            },
        )

    def __call__(self, y_true, y_pred, sample_weight=None):
        return _two_view_call(self, y_true, y_pred, sample_weight)

    def call(self, embeddings, reference_embeddings):
        values = options_config(self, self.options)
        return vicreg_loss(embeddings, reference_embeddings, **values)

    def get_config(self):
        return {
            "name": self.name,
            "reduction": self.reduction,
            **options_config(self, self.options),
        }


@export
class SelfSupervisedLoss(keras.losses.Loss):
    """A labels-and-embeddings loss on two views (B, 2, D), with the labels made from them.

    Example i's two views are the positive pair of class i (PML's `SelfSupervisedLoss`). With
    `symmetric=True` the 2B embeddings of both views form one batch with labels
    `[0..B-1, 0..B-1]` and the value of example i is the mean of its two views' shares; with
    `symmetric=False` the first views are the anchors and the second views their reference set
    (the wrapped loss must take one: `loss.call_with_reference`). Equal to PML's
    `SelfSupervisedLoss(loss, symmetric)(view1, view2)` for the equivalent PML loss, for
    example `SelfSupervisedLoss(deepmetric.losses.NTXentLoss())` (SimCLR) for
    `SelfSupervisedLoss(NTXentLoss())`. `y_true` is not used.

    Args:
      loss: a `deepmetric.losses` loss that takes labels and embeddings (a `MetricLoss`);
        None (PML requires one): `NTXentLoss()`, SimCLR's loss.
      symmetric: one batch of both views (True), or the first view against the second.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.SelfSupervisedLoss(
        deepmetric.losses.NTXentLoss(temperature=0.1)))
    ```
    """

    def __init__(self, loss=None, symmetric=True, name="self_supervised_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if loss is None:
            loss = NTXentLoss()
        if isinstance(loss, dict):
            loss = keras.saving.deserialize_keras_object(loss)
        if not isinstance(loss, MetricLoss):
            raise TypeError(
                "`loss` must be a deepmetric loss on labels and embeddings (a MetricLoss, "
                f"for example deepmetric.losses.NTXentLoss()). Received: loss={loss!r}"
            )
        symmetric = bool(symmetric)
        if not symmetric and loss.call_with_reference is None:
            raise ValueError(
                f"`symmetric=False` compares the views as a reference set, which "
                f"{type(loss).__name__} does not take. Received: symmetric=False"
            )
        self.loss = loss
        self.symmetric = symmetric

    def __call__(self, y_true, y_pred, sample_weight=None):
        return _two_view_call(self, y_true, y_pred, sample_weight)

    def call(self, first, second):
        labels = ops.arange(ops.shape(first)[0], dtype="int32")
        if not self.symmetric:
            return self.loss.call_with_reference(labels, first, second, labels)
        both = ops.concatenate([first, second], axis=0)
        values = self.loss.call(ops.concatenate([labels, labels], axis=0), both)
        return (values[: ops.shape(first)[0]] + values[ops.shape(first)[0] :]) / 2.0

    def get_config(self):
        return {
            "name": self.name,
            "reduction": self.reduction,
            "loss": keras.saving.serialize_keras_object(self.loss),
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("loss") is not None:  # None or absent: the default (NT-Xent)
            config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)
