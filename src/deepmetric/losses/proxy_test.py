"""Proxy losses against brute-force numpy from the papers' definitions and against PML."""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend
from deepmetric.losses import proxy


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(seed, b=12, d=5, classes=4):
    """(labels, embeddings, proxies): random integer labels, float32 embeddings and proxies."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, b)
    embeddings = rng.normal(size=(b, d)).astype("float32")
    return labels, embeddings, rng.normal(size=(classes, d)).astype("float32")


def ref_proxy_anchor(labels, x, proxies, margin=0.1, alpha=32.0):
    """Kim et al. 2020, eq. 4: a sum per proxy of log(1 + sum_x e^...), over the present
    proxies for the positives and over all proxies for the negatives."""
    cos = unit(x) @ unit(proxies).T
    present = sorted(set(labels.tolist()))
    pos = sum(
        np.log1p(
            sum(np.exp(-alpha * (cos[i, p] - margin)) for i in range(len(x)) if labels[i] == p)
        )
        for p in present
    ) / len(present)
    neg = sum(
        np.log1p(sum(np.exp(alpha * (cos[i, p] + margin)) for i in range(len(x)) if labels[i] != p))
        for p in range(len(proxies))
    ) / len(proxies)
    return pos + neg


def ref_proxy_nca(labels, x, proxies, softmax_scale=1.0):
    """PML's ProxyNCALoss: mean_i -log softmax_c(-s ||x_i/|x_i| - p_c/|p_c|||^2)[y_i]."""
    x, p = unit(x), unit(proxies)
    total = 0.0
    for i in range(len(x)):
        logits = np.array([-softmax_scale * np.sum((x[i] - p[c]) ** 2) for c in range(len(p))])
        total += -(logits[labels[i]] - np.log(np.sum(np.exp(logits))))
    return total / len(x)


def finite_differences(f, x, h=1e-6):
    """The central-difference gradient of the float64 function `f` at `x`."""
    x = np.asarray(x, np.float64)
    grad = np.zeros(x.shape)
    for index in np.ndindex(*x.shape):
        step = np.zeros(x.shape)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def check_value_and_grad(fn, ref, x, labels, compiled):
    """`fn(x, labels)` equals the numpy `ref(x)`, its gradient the finite differences of it."""
    value, grad = _backend.value_and_grad(fn, x, labels, compiled=compiled)
    expected_grad = finite_differences(ref, x)
    assert float(value) == pytest.approx(ref(x), rel=1e-4)
    scale = np.max(np.abs(expected_grad))
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-3, atol=2e-3 * scale)


# Compiled: jax.jit and tf.function; torch runs eagerly, the same as compiled=False.
COMPILED = [False, True] if _backend.name() != "torch" else [False]


@pytest.mark.parametrize("compiled", COMPILED)
def test_proxy_anchor_loss_matches_brute_force(compiled):
    labels, x, proxies = data(6)
    labels[labels == 3] = 0  # a proxy without positives in the batch
    check_value_and_grad(
        lambda v, lab: proxy.proxy_anchor_loss(lab, v, proxies),
        lambda v: ref_proxy_anchor(labels, v, proxies),
        x,
        labels,
        compiled,
    )


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("softmax_scale", [1.0, 9.0])
def test_proxy_nca_loss_matches_brute_force(softmax_scale, compiled):
    labels, x, proxies = data(30)
    check_value_and_grad(
        lambda v, lab: proxy.proxy_nca_loss(lab, v, proxies, softmax_scale=softmax_scale),
        lambda v: ref_proxy_nca(labels, v, proxies, softmax_scale),
        x,
        labels,
        compiled,
    )


def test_proxy_nca_logits_are_minus_scaled_squared_distances():
    labels, x, proxies = data(34)
    logits = proxy.proxy_nca_logits(x, proxies, softmax_scale=2.0)
    expected = -2.0 * np.sum((unit(x)[:, None] - unit(proxies)[None]) ** 2, axis=-1)
    np.testing.assert_allclose(ops.convert_to_numpy(logits), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PML runs on torch only")
@pytest.mark.parametrize(
    "ours, theirs, kwargs",
    [
        ("proxy_anchor_loss", "ProxyAnchorLoss", {}),
        ("proxy_nca_loss", "ProxyNCALoss", {"softmax_scale": 3}),
    ],
)
def test_equals_pytorch_metric_learning(ours, theirs, kwargs):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x, proxies = data(8)
    pml_loss = getattr(pml, theirs)(num_classes=4, embedding_size=5, **kwargs)
    pml_loss.proxies.data = ops.convert_to_tensor(proxies)
    fn = getattr(proxy, ours)
    value, grad = _backend.value_and_grad(lambda v, lab: fn(lab, v, proxies, **kwargs), x, labels)
    pml_value, pml_grad = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab), x, labels)
    assert float(value) == pytest.approx(float(pml_value), rel=1e-5)
    np.testing.assert_allclose(grad, pml_grad, rtol=1e-3, atol=1e-6)


LABELS, EMBEDDINGS, PROXIES = np.zeros(2, "int32"), np.ones((2, 3)), np.ones((3, 3))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: proxy.proxy_nca_loss(LABELS, EMBEDDINGS, PROXIES, softmax_scale=0),
            ValueError,
            "`softmax_scale` must be a finite number > 0",
        ),
        (
            lambda: proxy.proxy_nca_logits(EMBEDDINGS, PROXIES, softmax_scale=-1.0),
            ValueError,
            "`softmax_scale` must be a finite number > 0",
        ),
        (
            lambda: proxy.proxy_anchor_loss(LABELS, EMBEDDINGS, PROXIES, alpha=float("nan")),
            ValueError,
            "`alpha` must be a finite number",
        ),
        (
            lambda: proxy.proxy_anchor_loss(LABELS, EMBEDDINGS, PROXIES, margin=float("inf")),
            ValueError,
            "`margin` must be a finite number",
        ),
        (
            lambda: proxy.proxy_anchor_loss(LABELS, EMBEDDINGS, PROXIES, alpha="32"),
            TypeError,
            "`alpha` must be a number",
        ),
        (
            lambda: proxy.proxy_anchor_loss(LABELS, EMBEDDINGS, np.ones(3)),
            ValueError,
            r"proxies.shape=\(3,\)",
        ),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
