"""Classification heads with trainable class proxies: ArcFace, CosFace, normalised softmax,
sub-centre ArcFace, Proxy-NCA, Proxy-Anchor, large-margin softmax, SphereFace, SoftTriple,
P2SGrad.

A head sits on top of an embedding model during training only. It holds a (num_classes, D)
matrix of proxies ((num_classes * K, D) for sub-centre ArcFace; trainable, saved with the model)
and compares the L2-normalised embeddings with the L2-normalised proxies by cosine similarity
(Proxy-NCA by the squared Euclidean distance between them, 2 - 2 cos). The margins of ArcFace,
sub-centre ArcFace and CosFace, and the Proxy-NCA and Proxy-Anchor losses, need the labels in
the forward pass; the one pattern for all heads is to feed them as a second model input:

```python
images = keras.Input((28, 28, 1))
labels = keras.Input((), dtype="int32")
embeddings = embedder(images)                       # the model kept after training
logits = deepmetric.heads.ArcFace(num_classes=10)([embeddings, labels])
trainer = keras.Model([images, labels], logits)
trainer.compile(
    optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
)
trainer.fit((x, y), y)
```

`NormalizedSoftmax`, `SubCenterArcFace`, `LargeMarginSoftmax`, `SphereFace` and `SoftTriple`
are trained the same way. `ProxyNCA`, `ProxyAnchor` and `P2SGrad` add their loss with
`add_loss` and return logits for monitoring: compile the trainer with `loss=None` and fit it
on `(x, y)` alone. Called on embeddings only (no labels),
each head returns its logits without margin (the scaled cosine similarities; for `ProxyNCA`
minus the scaled squared distances; for `LargeMarginSoftmax` and `SphereFace` scaled by the
norms as well).

`MarginBeta` is not a proxy head: it holds the learned boundaries of the margin loss (PML's
`MarginLoss(learn_beta=True)`), adds that loss and returns the embeddings.
"""

from __future__ import annotations

import inspect
import math

import keras
from keras import ops

from deepmetric import distributed
from deepmetric._api import export, lookup
from deepmetric._labels import check_embeddings, check_labels, check_nonempty, split_inputs
from deepmetric.distances import _l2_normalize
from deepmetric.losses.base import (
    NON_NEGATIVE,
    POSITIVE,
    Bounds,
    Option,
    nonfinite_to_nan,
    number_option,
    options_config,
    options_signature,
    store_options,
)
from deepmetric.losses.pair import _MARGIN_BETA, _MARGIN_MARGIN, _MARGIN_NU, margin_loss
from deepmetric.losses.proxy import (
    proxy_anchor_loss,
    proxy_nca_logits,
    proxy_nca_loss,
)

__all__ = [
    "ArcFace",
    "CosFace",
    "LargeMarginSoftmax",
    "MarginBeta",
    "NormalizedSoftmax",
    "P2SGrad",
    "ProxyAnchor",
    "ProxyNCA",
    "SoftTriple",
    "SphereFace",
    "SubCenterArcFace",
    "get",
    "proxy_anchor_loss",
    "proxy_nca_loss",
]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def _angular_multiplier(name, value):
    """A positive integer, or a float equal to one (as the command line's --margin gives)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be a positive integer (the angular multiplier m). "
            f"Received: {name}={value!r}"
        )
    return int(value)


def _initializer(name, value):
    return keras.initializers.get(value)


_PROXY_INITIALIZER = Option(
    "proxy_initializer", "glorot_uniform", _initializer, keras.initializers.serialize
)
# The numeric options and their ranges: scales and temperatures > 0; cosine margins >= 0;
# angular margins in [0, pi/2) radians.
_SCALE = number_option("scale", 64.0, POSITIVE)  # of the margin heads
_ANGULAR_MARGIN = number_option(
    "margin", 0.5, Bounds(0.0, math.pi / 2, exclusive_maximum=True, text="in [0, pi/2) radians")
)


def _embedding_shape(input_shape):
    """The embeddings' shape of `embeddings` or `[embeddings, labels]`."""
    if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
        return input_shape[0]
    return input_shape


class _ProxyHead(keras.layers.Layer):
    """Base of the heads: a trainable proxy matrix, the options, the inputs and the config.

    A head declares its `options` (an `Option` table: name, check, default), taken after
    `num_classes` by position or by name, checked, kept as attributes and written to
    `get_config`; and implements `logits(embeddings, labels)` (labels None when the head is
    called on embeddings alone). `adds_loss` says how to train a head: False, compile the
    trainer with `SparseCategoricalCrossentropy(from_logits=True)` on the labels; True, the
    head adds its `loss(labels, embeddings)` with `add_loss` (compile with `loss=None`).
    """

    adds_loss = False
    options: tuple[Option, ...] = (_PROXY_INITIALIZER,)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The constructor's signature, for `inspect.signature` and `help`, from the options.
        num_classes = inspect.Parameter("num_classes", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        cls.__signature__ = options_signature(cls.options, before=[num_classes])

    def __init__(self, num_classes, *args, **kwargs):
        try:
            given = inspect.signature(type(self)).bind(num_classes, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}{inspect.signature(type(self))}: {e}") from None
        given.apply_defaults()
        values = given.arguments
        super().__init__(**values.pop("kwargs"))
        self.num_classes = _positive_int("num_classes", num_classes)
        store_options(self, self.options, values)

    def build(self, input_shape):
        input_shape = _embedding_shape(input_shape)
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(f"The embedding size must be known. Received: shape={input_shape}")
        self.proxies = self.add_weight(
            shape=(self._num_proxies(), dim),
            initializer=self.proxy_initializer,
            trainable=True,
            name="proxies",
        )

    def _num_proxies(self):
        return self.num_classes

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "A head")
        embeddings = check_embeddings(embeddings, "embeddings")
        if labels is None:
            return self.logits(embeddings, None)
        # Training: an empty batch is an error, and a non-finite embedding or proxy makes
        # the loss and every logit NaN (so that the objective is NaN, whatever it is).
        check_nonempty(embeddings, "embeddings")
        labels = check_labels(labels, embeddings.shape[0], "labels")
        if self.adds_loss:
            replicas = distributed.replicas()
            if replicas is None:
                self.add_loss(self.loss(labels, embeddings))
            else:
                # Several replicas: the loss of the global batch (deepmetric.distributed).
                self.add_loss(
                    self.loss(*distributed.gather_batch(replicas, labels, embeddings)[:2])
                )
        return nonfinite_to_nan(self.logits(embeddings, labels), embeddings, self.proxies)

    def logits(self, embeddings, labels):
        """(B, num_classes) logits; `labels` (checked integers) or None, then without margin."""
        raise NotImplementedError

    def loss(self, labels, embeddings):
        """The scalar loss a head with `adds_loss` adds."""
        raise NotImplementedError

    def cosine(self, embeddings):
        """(B, num_classes) cosine similarities, float32."""
        x = _l2_normalize(check_embeddings(embeddings, "embeddings"))
        proxies = _l2_normalize(ops.cast(self.proxies, x.dtype))
        return ops.matmul(x, ops.transpose(proxies))

    def compute_output_shape(self, input_shape):
        return (_embedding_shape(input_shape)[0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            **options_config(self, self.options),
        }


class _MarginHead(_ProxyHead):
    """Base of CosFace, ArcFace and sub-centre ArcFace: logits s cos, the target's with margin.

    A subclass implements `margin_cosine(cos)`, the target logit over s (the cosine with its
    margin), and has the options `scale` (`_SCALE`) and `margin`.
    """

    def logits(self, embeddings, labels):
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        target = ops.cast(ops.one_hot(ops.cast(labels, "int32"), self.num_classes), "bool")
        return self.scale * ops.where(target, self.margin_cosine(cos), cos)

    def margin_cosine(self, cos):
        raise NotImplementedError


@export
class CosFace(_MarginHead):
    r"""CosFace / large-margin cosine head (Wang et al., CVPR 2018, arXiv:1801.09414).

    Logits $z_{ic} = s\,(\cos\theta_{ic} - m\,[c = y_i])$, where $\theta_{ic}$ is the angle
    between the embedding and the proxy of class c; train with
    `SparseCategoricalCrossentropy(from_logits=True)` (see the module docstring).

    Args:
      num_classes: number of classes (proxies).
      scale: the scale s (> 0).
      margin: the cosine margin m (>= 0).
      proxy_initializer: initializer of the (num_classes, D) proxies.

    >>> import numpy as np
    >>> head = CosFace(num_classes=3, scale=10.0, margin=0.5)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape)
    (2, 3)
    """

    options = (_SCALE, number_option("margin", 0.35, NON_NEGATIVE), _PROXY_INITIALIZER)

    def margin_cosine(self, cos):
        return cos - self.margin


@export
class ArcFace(_MarginHead):
    r"""ArcFace / additive angular margin head (Deng et al., CVPR 2019, arXiv:1801.07698).

    Logits $z_{ic} = s \cos(\theta_{ic} + m\,[c = y_i])$. As in the reference implementation
    (insightface), where $\theta + m > \pi$ the target logit is $s(\cos\theta - m \sin m)$
    instead, so that it keeps decreasing with $\theta$. The sine is computed from a clamped
    $1 - \cos^2$, so the gradient stays finite at $\cos\theta = \pm 1$.

    Args:
      num_classes: number of classes (proxies).
      scale: the scale s (> 0).
      margin: the angular margin m in radians, in [0, pi/2).
      proxy_initializer: initializer of the (num_classes, D) proxies.

    >>> import numpy as np
    >>> head = ArcFace(num_classes=3, scale=10.0, margin=0.5)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape)
    (2, 3)
    """

    options: tuple[Option, ...] = (_SCALE, _ANGULAR_MARGIN, _PROXY_INITIALIZER)

    def margin_cosine(self, cos):
        m = self.margin
        sin = ops.sqrt(ops.maximum(1.0 - ops.square(cos), 1e-7))
        shifted = cos * math.cos(m) - sin * math.sin(m)
        return ops.where(cos > math.cos(math.pi - m), shifted, cos - m * math.sin(m))


@export
class SubCenterArcFace(ArcFace):
    r"""Sub-centre ArcFace head (Deng et al., ECCV 2020, "Sub-center ArcFace").

    Each class has K sub-centre proxies; the cosine to class c is the largest cosine to its
    sub-centres, $\cos\theta_{ic} = \max_k \cos(x_i, p_{ck})$, and the logits are ArcFace's
    on it: $z_{ic} = s \cos(\theta_{ic} + m\,[c = y_i])$ (with the same fallback where
    $\theta + m > \pi$). A noisy example can sit near a non-dominant sub-centre without pulling
    the dominant one. The proxies are a (num_classes * K, D) weight whose rows c * K .. c * K +
    K - 1 belong to class c (the layout of insightface and of PML's `SubCenterArcFaceLoss`).
    Train with `SparseCategoricalCrossentropy(from_logits=True)` (see the module docstring). The
    paper's second stage (dropping non-dominant sub-centres and noisy examples) is left to the
    user.

    Args:
      num_classes: number of classes.
      sub_centers: the number K of sub-centres per class (>= 1).
      scale: the scale s (> 0).
      margin: the angular margin m in radians, in [0, pi/2).
      proxy_initializer: initializer of the (num_classes * K, D) proxies.

    >>> import numpy as np
    >>> head = SubCenterArcFace(num_classes=3, sub_centers=2, scale=10.0)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape), tuple(head.proxies.shape)
    ((2, 3), (6, 4))
    """

    options = (Option("sub_centers", 3, _positive_int), *ArcFace.options)

    def _num_proxies(self):
        return self.num_classes * self.sub_centers

    def cosine(self, embeddings):
        """(B, num_classes) largest cosine similarity to each class's sub-centres, float32."""
        cos = super().cosine(embeddings)
        return ops.max(ops.reshape(cos, (-1, self.num_classes, self.sub_centers)), axis=2)


@export
class NormalizedSoftmax(_ProxyHead):
    r"""Normalised softmax head (Zhai & Wu, BMVC 2019, arXiv:1811.12649).

    "Classification is a Strong Baseline for Deep Metric Learning": logits
    $z_{ic} = \cos\theta_{ic} / T$, the cosine between the embedding and the proxy of class c
    divided by a temperature T, trained with `SparseCategoricalCrossentropy(from_logits=True)`
    (see the module docstring). No margin: the labels, when given, are only checked.

    Args:
      num_classes: number of classes (proxies).
      temperature: the temperature T (> 0); the paper uses 0.05.
      proxy_initializer: initializer of the (num_classes, D) proxies.

    >>> import numpy as np
    >>> head = NormalizedSoftmax(num_classes=3, temperature=0.5)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape)
    (2, 3)
    """

    options = (number_option("temperature", 0.05, POSITIVE), _PROXY_INITIALIZER)

    def logits(self, embeddings, labels):
        return self.cosine(embeddings) / self.temperature


@export
class ProxyAnchor(_ProxyHead):
    """Proxy-Anchor head: adds `proxy_anchor_loss` with its trainable proxies.

    Called on `[embeddings, labels]`, it adds the loss with `add_loss` and returns
    `alpha * cosine` to the proxies (usable as logits for monitoring); compile the trainer with
    `loss=None`:

    ```python
    scores = deepmetric.heads.ProxyAnchor(num_classes=100)([embedder(images), labels])
    trainer = keras.Model([images, labels], scores)
    trainer.compile(optimizer="adam")   # the loss comes from the head
    trainer.fit((x, y), epochs=10)
    ```

    Args:
      num_classes: number of classes (proxies).
      margin: the margin delta, a cosine margin >= 0.
      alpha: the scale alpha (> 0).
      proxy_initializer: initializer of the proxies ("he_normal", as the paper's
        kaiming-normal initialisation, by default).
    """

    adds_loss = True
    options = (
        number_option("margin", 0.1, NON_NEGATIVE),
        number_option("alpha", 32.0, POSITIVE),
        _PROXY_INITIALIZER._replace(default="he_normal"),
    )

    def logits(self, embeddings, labels):
        return self.alpha * self.cosine(embeddings)

    def loss(self, labels, embeddings):
        return proxy_anchor_loss(
            labels, embeddings, self.proxies, margin=self.margin, alpha=self.alpha
        )


@export
class ProxyNCA(_ProxyHead):
    """Proxy-NCA head: adds `proxy_nca_loss` with its trainable proxies.

    Called on `[embeddings, labels]`, it adds the loss with `add_loss` and returns the NCA
    logits, minus `softmax_scale` times the squared distances to the normalised proxies (their
    softmax is the class posterior); compile the trainer with `loss=None`:

    ```python
    logits = deepmetric.heads.ProxyNCA(num_classes=100)([embedder(images), labels])
    trainer = keras.Model([images, labels], logits)
    trainer.compile(optimizer="adam")   # the loss comes from the head
    trainer.fit((x, y), epochs=10)
    ```

    Args:
      num_classes: number of classes (proxies).
      softmax_scale: the scale s of the softmax (> 0).
      proxy_initializer: initializer of the (num_classes, D) proxies.
    """

    adds_loss = True
    options = (number_option("softmax_scale", 1.0, POSITIVE), _PROXY_INITIALIZER)

    def logits(self, embeddings, labels):
        return proxy_nca_logits(embeddings, self.proxies, softmax_scale=self.softmax_scale)

    def loss(self, labels, embeddings):
        return proxy_nca_loss(labels, embeddings, self.proxies, softmax_scale=self.softmax_scale)


def _multiple_angle_cosine(cos, m):
    """cos(m theta) from cos theta: the Chebyshev polynomial T_m (the paper's equation 7, a
    polynomial, so its gradient stays finite at cos theta = +-1)."""
    previous, current = ops.ones_like(cos), cos
    for _ in range(m - 1):
        previous, current = current, 2.0 * cos * current - previous
    return current


class _LargeMarginBase(_ProxyHead):
    r"""Base of `LargeMarginSoftmax` and `SphereFace`: the target cosine becomes
    $\psi(\theta) = (-1)^k \cos(m\theta) - 2k$ for $\theta \in [k\pi/m, (k+1)\pi/m]$ and
    every logit is multiplied by `magnitude(embeddings)` (a (B, 1) or (B, C) tensor) and s."""

    # PML's default initialisation of the class weights: normal, standard deviation 1.
    options: tuple[Option, ...] = (
        Option("margin", 4, _angular_multiplier),
        number_option("scale", 1.0, POSITIVE),
        _PROXY_INITIALIZER._replace(
            default={"class_name": "RandomNormal", "config": {"mean": 0.0, "stddev": 1.0}}
        ),
    )

    def logits(self, embeddings, labels):
        cos = self.cosine(embeddings)
        if labels is not None:
            m = self.margin
            theta = ops.arccos(ops.clip(ops.stop_gradient(cos), -1.0, 1.0))
            k = ops.floor(theta / (math.pi / m))
            sign = 1.0 - 2.0 * ops.mod(k, 2.0)  # (-1)^k
            psi = sign * _multiple_angle_cosine(cos, m) - 2.0 * k
            target = ops.cast(ops.one_hot(ops.cast(labels, "int32"), self.num_classes), "bool")
            cos = ops.where(target, psi, cos)
        return self.scale * self.magnitude(embeddings) * cos

    def magnitude(self, embeddings):
        raise NotImplementedError


def _norm(x, axis):
    return ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32")), axis=axis, keepdims=True))


@export
class LargeMarginSoftmax(_LargeMarginBase):
    r"""Large-margin softmax (L-Softmax) head (Liu et al., ICML 2016, arXiv:1612.02295).

    Logits $z_{ic} = s\,\|x_i\|\,\|w_c\|\,\psi_{ic}$ with $\psi_{ic} = \cos\theta_{ic}$
    for $c \ne y_i$ and, for the target, $\psi(\theta) = (-1)^k \cos(m\theta) - 2k$ where
    $\theta \in [k\pi/m, (k+1)\pi/m]$ (equation 6; $\cos(m\theta)$ by the multiple-angle
    formula, equation 7). The class weights $w_c$ are not normalised: their norms are part of
    the logits. Train with `SparseCategoricalCrossentropy(from_logits=True)` (see the module
    docstring); the mean cross-entropy equals PML's `LargeMarginSoftmaxLoss(num_classes,
    embedding_size, margin, scale)` with the same (transposed) weights, value and gradient.

    Args:
      num_classes: number of classes.
      margin: the integer angular multiplier m (>= 1; 1 is the plain softmax). PML truncates a
        float with `int`; here a float must be integral (4.0 is 4, 4.5 a ValueError).
      scale: the scale s (> 0).
      proxy_initializer: initializer of the (num_classes, D) class weights (normal with
        standard deviation 1, PML's, by default).

    >>> import numpy as np
    >>> head = LargeMarginSoftmax(num_classes=3, margin=2)
    >>> tuple(head([np.ones((2, 4)), np.array([0, 2])]).shape)
    (2, 3)
    """

    def magnitude(self, embeddings):
        return _norm(embeddings, 1) * ops.transpose(_norm(self.proxies, 1))


@export
class SphereFace(_LargeMarginBase):
    r"""SphereFace / angular softmax (A-Softmax) head (Liu et al., CVPR 2017, arXiv:1704.08063).

    `LargeMarginSoftmax` with normalised class weights: logits
    $z_{ic} = s\,\|x_i\|\,\psi_{ic}$, with $\psi$ the large-margin target cosine
    $(-1)^k \cos(m\theta) - 2k$ on $[k\pi/m, (k+1)\pi/m]$ and $\cos\theta_{ic}$ elsewhere.
    Train with `SparseCategoricalCrossentropy(from_logits=True)`; the mean cross-entropy
    equals PML's `SphereFaceLoss(num_classes, embedding_size, margin, scale)` with the same
    weights, value and gradient.

    Args:
      num_classes: number of classes.
      margin: the integer angular multiplier m (>= 1).
      scale: the scale s (> 0).
      proxy_initializer: initializer of the (num_classes, D) class weights.

    >>> import numpy as np
    >>> head = SphereFace(num_classes=3)
    >>> tuple(head([np.ones((2, 4)), np.array([0, 2])]).shape)
    (2, 3)
    """

    def magnitude(self, embeddings):
        return _norm(embeddings, 1)


@export
class SoftTriple(_ProxyHead):
    r"""SoftTriple head (Qian et al., ICCV 2019, arXiv:1909.05235).

    Each class has K centres; the similarity to class c is the softmax-weighted cosine to its
    centres, $S_{ic} = \sum_k \frac{\exp(\cos_{ick}/\gamma)}{\sum_{k'} \exp(\cos_{ick'}/
    \gamma)} \cos_{ick}$, and the logits are $z_{ic} = \lambda\,(S_{ic} - \delta\,[c = y_i])$.
    Train with `SparseCategoricalCrossentropy(from_logits=True)`; the mean cross-entropy equals
    PML's `SoftTripleLoss(num_classes, embedding_size, centers_per_class, la, gamma, margin)`
    with the same weights (PML's `fc` is the transpose of `proxies`), value and gradient. The
    paper's regulariser that merges centres is not part of it (PML's default neither).

    Args:
      num_classes: number of classes.
      centers_per_class: the number K of centres per class (>= 1); rows c * K .. c * K + K - 1
        of the (num_classes * K, D) proxies belong to class c.
      la: the scale $\lambda$ (> 0).
      gamma: the temperature $\gamma$ of the softmax over the centres (> 0).
      margin: the margin $\delta$ (>= 0, on similarities).
      proxy_initializer: initializer of the proxies.

    >>> import numpy as np
    >>> head = SoftTriple(num_classes=3, centers_per_class=2)
    >>> tuple(head([np.ones((2, 4)), np.array([0, 2])]).shape), tuple(head.proxies.shape)
    ((2, 3), (6, 4))
    """

    options = (
        Option("centers_per_class", 10, _positive_int),
        number_option("la", 20.0, POSITIVE),
        number_option("gamma", 0.1, POSITIVE),
        number_option("margin", 0.01, NON_NEGATIVE),
        _PROXY_INITIALIZER,
    )

    def _num_proxies(self):
        return self.num_classes * self.centers_per_class

    def logits(self, embeddings, labels):
        cos = ops.reshape(
            super().cosine(embeddings), (-1, self.num_classes, self.centers_per_class)
        )
        similarity = ops.sum(ops.softmax(cos / self.gamma, axis=2) * cos, axis=2)
        if labels is not None:
            target = ops.one_hot(ops.cast(labels, "int32"), self.num_classes)
            similarity = similarity - self.margin * target
        return self.la * similarity


@export
class P2SGrad(_ProxyHead):
    r"""P2SGrad head (Zhang et al., CVPR 2019, arXiv:1905.02479).

    The loss is the mean squared error between the cosines and the one-hot labels,
    $\frac{1}{BC}\sum_{i,c} (\cos\theta_{ic} - [c = y_i])^2$, whose gradient is the
    paper's equation 11. Called on `[embeddings, labels]`, it adds that loss with `add_loss`
    and returns the cosines (logits for monitoring); compile the trainer with `loss=None`. The
    value and the gradient in the embeddings equal PML's `P2SGradLoss(descriptors_dim,
    num_classes)` with the same weights; PML renormalises its weights in place before each
    call, outside the gradient, whereas here the proxies are normalised in the forward pass,
    so the gradient in the proxies is PML's projected on the tangent of the unit sphere.

    Args:
      num_classes: number of classes (proxies).
      proxy_initializer: initializer of the (num_classes, D) proxies.

    >>> import numpy as np
    >>> head = P2SGrad(num_classes=3)
    >>> out = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(out.shape), len(head.losses)
    ((2, 3), 1)
    """

    adds_loss = True

    def logits(self, embeddings, labels):
        return ops.clip(self.cosine(embeddings), -1.0, 1.0)

    def loss(self, labels, embeddings):
        cos = self.logits(embeddings, None)
        target = ops.one_hot(ops.cast(labels, "int32"), self.num_classes)
        # The mean over B x C; 0 for an empty batch of unknown size (compiled).
        count = ops.cast(ops.shape(cos)[0], "float32") * float(self.num_classes)
        value = ops.sum(ops.square(cos - target)) / ops.maximum(count, 1.0)
        return nonfinite_to_nan(value, embeddings, self.proxies)


@export
class MarginBeta(keras.layers.Layer):
    r"""The learned boundaries $\beta$ of the margin loss (PML's `MarginLoss(learn_beta=True)`).

    A Keras loss holds no trainable weight, so the margin loss with a learned $\beta$ (Wu et
    al., "Sampling Matters in Deep Embedding Learning", ICCV 2017, arXiv:1706.07567) is this
    layer: it holds $\beta$ (one value, or one per class with `num_classes`), adds
    `deepmetric.losses.margin_loss(labels, embeddings, beta=self.beta, learn_beta=True, ...)`
    with `add_loss`, and returns the embeddings unchanged. The loss equals PML's
    `MarginLoss(margin, nu, beta, learn_beta=True, num_classes=num_classes)` with the same
    betas, value and gradient (in the embeddings and in $\beta$). Labels must be in
    [0, num_classes) with `num_classes`. Compile the trainer with `loss=None`:

    ```python
    labels = keras.Input((), dtype="int32")
    out = deepmetric.heads.MarginBeta(num_classes=100, nu=0.1)([embedder(images), labels])
    trainer = keras.Model([images, labels], out)
    trainer.compile(optimizer="adam")   # the loss comes from the layer
    trainer.fit((x, y), epochs=10)
    ```

    Args:
      num_classes: None for one $\beta$ shared by every class, else the number of classes.
      margin: the margin m (>= 0, on distances).
      nu: the weight $\nu$ of the regulariser $\nu\beta$ (>= 0).
      beta: the initial value of $\beta$ (>= 0, a distance).

    The options have the ranges of `deepmetric.losses.MarginLoss` (the same checks). Called
    with labels, an empty batch is a ValueError naming `embeddings`, and a non-finite
    embedding or $\beta$ makes the added loss NaN (the rule of the heads).

    >>> import numpy as np
    >>> layer = MarginBeta(num_classes=3)
    >>> out = layer([np.eye(4)[:, :3] + 0.1, np.array([0, 0, 1, 1])])
    >>> tuple(layer.beta.shape), len(layer.losses)
    ((3,), 1)
    """

    def __init__(self, num_classes=None, margin=0.2, nu=0.0, beta=1.2, **kwargs):
        super().__init__(**kwargs)
        if num_classes is not None:
            num_classes = _positive_int("num_classes", num_classes)
        self.num_classes = num_classes
        self.margin = _MARGIN_MARGIN.checked(margin)
        self.nu = _MARGIN_NU.checked(nu)
        self.initial_beta = _MARGIN_BETA.checked(beta)

    def build(self, input_shape):
        self.beta = self.add_weight(
            shape=(self.num_classes or 1,),
            initializer=keras.initializers.Constant(self.initial_beta),
            trainable=True,
            name="beta",
        )

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "MarginBeta")
        embeddings = check_embeddings(embeddings, "embeddings")
        if labels is None:
            return embeddings
        # Training: an empty batch is an error; a non-finite embedding or beta makes the loss
        # NaN (`margin_loss` guards both).
        check_nonempty(embeddings, "embeddings")
        labels = check_labels(labels, embeddings.shape[0], "labels")
        losses = margin_loss(
            labels,
            embeddings,
            margin=self.margin,
            nu=self.nu,
            beta=self.beta,
            learn_beta=True,
        )
        self.add_loss(ops.mean(losses))
        return embeddings

    def compute_output_shape(self, input_shape):
        return _embedding_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "margin": self.margin,
            "nu": self.nu,
            "beta": self.initial_beta,
        }


def get(identifier):
    """A head class from its name, or a head from a Keras config dict or an instance.

    A name (`"arcface"`, `"sub_center_arcface"`, `"ProxyNCA"`, with or without `deepmetric>`)
    gives the class, since every head needs `num_classes`: `get("arcface")(num_classes=10)`.
    A config `{"class_name": "ArcFace", "config": {"num_classes": 10, "margin": 0.3}}` gives the
    head itself. Unknown names raise a ValueError that lists the valid ones.

    >>> get("arcface").__name__
    'ArcFace'
    """
    classes = [
        obj
        for name, obj in globals().items()
        if isinstance(obj, type) and issubclass(obj, _ProxyHead) and not name.startswith("_")
    ]
    return lookup(identifier, classes, "head", instantiate=False)
