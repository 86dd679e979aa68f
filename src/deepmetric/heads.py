"""Classification heads with trainable class proxies: ArcFace, CosFace, normalised softmax,
sub-centre ArcFace, Proxy-NCA, Proxy-Anchor.

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

`NormalizedSoftmax` and `SubCenterArcFace` are trained the same way. `ProxyNCA` and
`ProxyAnchor` add their loss with `add_loss` and return logits for monitoring: compile the
trainer with `loss=None` and fit it on `(x, y)` alone. Called on embeddings only (no labels),
each head returns its logits without margin (the scaled cosine similarities; for `ProxyNCA`
minus the scaled squared distances).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from deepmetric._api import export, lookup
from deepmetric._labels import check_embeddings, check_labels, split_inputs
from deepmetric.distances import _l2_normalize
from deepmetric.losses.modern import check_number, masked_logsumexp


class _ProxyHead(keras.layers.Layer):
    """Base: a (num_classes, D) trainable proxy matrix and the cosine similarities to it.

    `adds_loss` says how to train a head: False, compile the trainer with
    `SparseCategoricalCrossentropy(from_logits=True)` on the labels; True, the head adds
    its loss itself (compile with `loss=None`).
    """

    adds_loss = False

    def __init__(self, num_classes, proxy_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"`num_classes` must be a positive integer. Received: num_classes={num_classes!r}"
            )
        self.num_classes = num_classes
        self.proxy_initializer = keras.initializers.get(proxy_initializer)

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
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

    def cosine(self, embeddings):
        """(B, num_classes) cosine similarities, float32."""
        x = _l2_normalize(check_embeddings(embeddings, "embeddings"))
        proxies = _l2_normalize(ops.cast(self.proxies, x.dtype))
        return ops.matmul(x, ops.transpose(proxies))

    def _one_hot(self, labels, batch_size):
        labels = check_labels(labels, batch_size, "labels")
        return ops.cast(ops.one_hot(ops.cast(labels, "int32"), self.num_classes), "bool")

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        return (input_shape[0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "proxy_initializer": keras.initializers.serialize(self.proxy_initializer),
        }


@export
class CosFace(_ProxyHead):
    r"""CosFace / large-margin cosine head (Wang et al., CVPR 2018, arXiv:1801.09414).

    Logits $z_{ic} = s\,(\cos\theta_{ic} - m\,[c = y_i])$, where $\theta_{ic}$ is the angle
    between the embedding and the proxy of class c; train with
    `SparseCategoricalCrossentropy(from_logits=True)` (see the module docstring).

    Args:
      num_classes: number of classes (proxies).
      scale: the scale s.
      margin: the cosine margin m.
      proxy_initializer: initializer of the (num_classes, D) proxies.

    >>> import numpy as np
    >>> head = CosFace(num_classes=3, scale=10.0, margin=0.5)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape)
    (2, 3)
    """

    def __init__(self, num_classes, scale=64.0, margin=0.35, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.scale = check_number("scale", scale, positive=True)
        self.margin = check_number("margin", margin)

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "A head")
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        target = self._one_hot(labels, cos.shape[0])
        return self.scale * ops.where(target, cos - self.margin, cos)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "margin": self.margin}


@export
class ArcFace(_ProxyHead):
    r"""ArcFace / additive angular margin head (Deng et al., CVPR 2019, arXiv:1801.07698).

    Logits $z_{ic} = s \cos(\theta_{ic} + m\,[c = y_i])$. As in the reference implementation
    (insightface), where $\theta + m > \pi$ the target logit is $s(\cos\theta - m \sin m)$
    instead, so that it keeps decreasing with $\theta$. The sine is computed from a clamped
    $1 - \cos^2$, so the gradient stays finite at $\cos\theta = \pm 1$.

    Args:
      num_classes: number of classes (proxies).
      scale: the scale s.
      margin: the angular margin m in radians.
      proxy_initializer: initializer of the (num_classes, D) proxies.

    >>> import numpy as np
    >>> head = ArcFace(num_classes=3, scale=10.0, margin=0.5)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape)
    (2, 3)
    """

    def __init__(self, num_classes, scale=64.0, margin=0.5, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.scale = check_number("scale", scale, positive=True)
        self.margin = check_number("margin", margin)
        if not 0.0 <= self.margin < math.pi / 2:
            raise ValueError(f"`margin` must be in [0, pi/2) radians. Received: margin={margin!r}")

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "A head")
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        m = self.margin
        sin = ops.sqrt(ops.maximum(1.0 - ops.square(cos), 1e-7))
        shifted = cos * math.cos(m) - sin * math.sin(m)
        shifted = ops.where(cos > math.cos(math.pi - m), shifted, cos - m * math.sin(m))
        target = self._one_hot(labels, cos.shape[0])
        return self.scale * ops.where(target, shifted, cos)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "margin": self.margin}


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
      sub_centers: the number K of sub-centres per class.
      scale: the scale s.
      margin: the angular margin m in radians, in [0, pi/2).
      proxy_initializer: initializer of the (num_classes * K, D) proxies.

    >>> import numpy as np
    >>> head = SubCenterArcFace(num_classes=3, sub_centers=2, scale=10.0)
    >>> logits = head([np.ones((2, 4)), np.array([0, 2])])
    >>> tuple(logits.shape), tuple(head.proxies.shape)
    ((2, 3), (6, 4))
    """

    def __init__(self, num_classes, sub_centers=3, scale=64.0, margin=0.5, **kwargs):
        super().__init__(num_classes, scale=scale, margin=margin, **kwargs)
        if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
            raise ValueError(
                f"`sub_centers` must be a positive integer. Received: sub_centers={sub_centers!r}"
            )
        self.sub_centers = sub_centers

    def _num_proxies(self):
        return self.num_classes * self.sub_centers

    def cosine(self, embeddings):
        """(B, num_classes) largest cosine similarity to each class's sub-centres, float32."""
        cos = super().cosine(embeddings)
        return ops.max(ops.reshape(cos, (-1, self.num_classes, self.sub_centers)), axis=2)

    def get_config(self):
        return {**super().get_config(), "sub_centers": self.sub_centers}


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

    def __init__(self, num_classes, temperature=0.05, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.temperature = check_number("temperature", temperature, positive=True)

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "A head")
        cos = self.cosine(embeddings)
        if labels is not None:
            check_labels(labels, cos.shape[0], "labels")
        return cos / self.temperature

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


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
      margin: the margin delta.
      alpha: the scale alpha (> 0).

    Returns:
      The scalar loss.

    >>> import numpy as np
    >>> loss = proxy_anchor_loss(np.array([0, 1]), np.eye(2), np.eye(2))
    >>> round(float(loss), 4)  # log(1 + e^(32 * 0.1)) from the negatives
    3.24
    """
    margin = check_number("margin", margin)
    alpha = check_number("alpha", alpha, positive=True)
    x = _l2_normalize(check_embeddings(embeddings, "embeddings"))
    proxies = _l2_normalize(ops.cast(check_embeddings(proxies, "proxies"), x.dtype))
    labels = check_labels(labels, x.shape[0], "labels")
    num_classes = proxies.shape[0]
    # (C, B): one row per proxy.
    cos = ops.matmul(proxies, ops.transpose(x))
    positive = ops.transpose(ops.cast(ops.one_hot(ops.cast(labels, "int32"), num_classes), "bool"))
    pos_term = masked_logsumexp(-alpha * (cos - margin), positive, add_one=True)
    neg_term = masked_logsumexp(alpha * (cos + margin), ops.logical_not(positive), add_one=True)
    with_positives = ops.sum(ops.cast(ops.any(positive, axis=1), cos.dtype))
    return ops.divide_no_nan(ops.sum(pos_term), with_positives) + ops.sum(neg_term) / num_classes


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
      margin: the margin delta.
      alpha: the scale alpha.
      proxy_initializer: initializer of the proxies ("he_normal", as the paper's
        kaiming-normal initialisation, by default).
    """

    adds_loss = True

    def __init__(
        self, num_classes, margin=0.1, alpha=32.0, proxy_initializer="he_normal", **kwargs
    ):
        super().__init__(num_classes, proxy_initializer=proxy_initializer, **kwargs)
        self.margin = check_number("margin", margin)
        self.alpha = check_number("alpha", alpha, positive=True)

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "A head")
        if labels is not None:
            self.add_loss(
                proxy_anchor_loss(
                    labels, embeddings, self.proxies, margin=self.margin, alpha=self.alpha
                )
            )
        return self.alpha * self.cosine(embeddings)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "alpha": self.alpha}


def _proxy_nca_logits(x, proxies, softmax_scale):
    """-scale * squared Euclidean distances between already normalised rows, (B, C)."""
    squared = (
        ops.sum(ops.square(x), axis=1, keepdims=True)
        + ops.sum(ops.square(proxies), axis=1)[None, :]
        - 2.0 * ops.matmul(x, ops.transpose(proxies))
    )
    return -softmax_scale * ops.maximum(squared, 0.0)


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
      The scalar loss, the mean over the batch.

    >>> import numpy as np
    >>> loss = proxy_nca_loss(np.array([0, 1]), np.eye(2), np.eye(2))
    >>> round(float(loss), 4)  # -log(e^0 / (e^0 + e^-2)) = log(1 + e^-2)
    0.1269
    """
    softmax_scale = check_number("softmax_scale", softmax_scale, positive=True)
    x = _l2_normalize(check_embeddings(embeddings, "embeddings"))
    proxies = _l2_normalize(ops.cast(check_embeddings(proxies, "proxies"), x.dtype))
    labels = check_labels(labels, x.shape[0], "labels")
    logits = _proxy_nca_logits(x, proxies, softmax_scale)
    target = ops.cast(ops.one_hot(ops.cast(labels, "int32"), proxies.shape[0]), "bool")
    target_logit = ops.sum(ops.where(target, logits, 0.0), axis=1)
    return ops.mean(ops.logsumexp(logits, axis=1) - target_logit)


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

    def __init__(self, num_classes, softmax_scale=1.0, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.softmax_scale = check_number("softmax_scale", softmax_scale, positive=True)

    def call(self, inputs):
        embeddings, labels = split_inputs(inputs, "A head")
        if labels is not None:
            self.add_loss(
                proxy_nca_loss(labels, embeddings, self.proxies, softmax_scale=self.softmax_scale)
            )
        x = _l2_normalize(check_embeddings(embeddings, "embeddings"))
        proxies = _l2_normalize(ops.cast(self.proxies, x.dtype))
        return _proxy_nca_logits(x, proxies, self.softmax_scale)

    def get_config(self):
        return {**super().get_config(), "softmax_scale": self.softmax_scale}


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
        for obj in globals().values()
        if isinstance(obj, type) and issubclass(obj, _ProxyHead) and obj is not _ProxyHead
    ]
    return lookup(identifier, classes, "head", instantiate=False)
