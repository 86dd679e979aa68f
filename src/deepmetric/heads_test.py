"""Proxy heads: logits and losses against numpy / PML, training, and `.keras` round trips."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, heads


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(seed, b=12, d=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype("float32")


def _head_with(cls, proxies, **kwargs):
    head = cls(num_classes=proxies.shape[0], **kwargs)
    head.build((None, proxies.shape[1]))
    head.proxies.assign(proxies)
    return head


@pytest.mark.parametrize("with_labels", [True, False])
def test_cosface_logits(with_labels):
    labels, x = data(0)
    proxies = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    head = _head_with(heads.CosFace, proxies, scale=30.0, margin=0.2)
    cos = _unit(x.astype(np.float64)) @ _unit(proxies.astype(np.float64)).T
    if with_labels:
        logits = head([x, labels])
        expected = 30.0 * (cos - 0.2 * np.eye(4)[labels])
    else:
        logits = head(x)
        expected = 30.0 * cos
    np.testing.assert_allclose(ops.convert_to_numpy(logits), expected, rtol=1e-5, atol=1e-4)


def test_arcface_logits():
    """Target logit s cos(theta + m), or s (cos theta - m sin m) where theta + m > pi."""
    labels, x = data(2)
    proxies = np.random.default_rng(3).normal(size=(4, 5)).astype("float32")
    proxies[labels[0]] = -x[0]  # theta = pi for the first example: the fallback branch
    m = 0.5
    head = _head_with(heads.ArcFace, proxies, scale=16.0, margin=m)
    cos = _unit(x.astype(np.float64)) @ _unit(proxies.astype(np.float64)).T
    theta = np.arccos(np.clip(cos, -1, 1))
    target = np.where(theta + m <= math.pi, np.cos(theta + m), cos - m * math.sin(m))
    expected = 16.0 * np.where(np.eye(4)[labels] > 0, target, cos)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head([x, labels])), expected, rtol=1e-4, atol=2e-3
    )


def test_arcface_gradient_is_finite_at_cosine_one():
    labels, x = data(4)
    proxies = np.random.default_rng(5).normal(size=(4, 5)).astype("float32")
    proxies[labels[0]] = x[0]  # cos = 1 exactly: d sin / d cos is infinite without the clamp
    head = _head_with(heads.ArcFace, proxies)
    _, grad = _backend.value_and_grad(lambda v, lab: ops.sum(head([v, lab])), x, labels)
    assert np.all(np.isfinite(grad))


def ref_proxy_anchor(labels, x, proxies, margin=0.1, alpha=32.0):
    cos = _unit(np.asarray(x, np.float64)) @ _unit(np.asarray(proxies, np.float64)).T
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


def test_proxy_anchor_loss_matches_brute_force():
    labels, x = data(6)
    labels[labels == 3] = 0  # a proxy without positives in the batch
    proxies = np.random.default_rng(7).normal(size=(4, 5)).astype("float32")
    value, grad = _backend.value_and_grad(
        lambda v, lab: heads.proxy_anchor_loss(lab, v, proxies), x, labels
    )
    expected = ref_proxy_anchor(labels, x, proxies)
    h = 1e-6
    expected_grad = np.zeros(x.shape)
    for index in np.ndindex(*x.shape):
        step = np.zeros(x.shape)
        step[index] = h
        expected_grad[index] = (
            ref_proxy_anchor(labels, x + step, proxies)
            - ref_proxy_anchor(labels, x - step, proxies)
        ) / (2 * h)
    assert float(value) == pytest.approx(expected, rel=1e-4)
    scale = np.max(np.abs(expected_grad))
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PML runs on torch only")
def test_proxy_anchor_loss_equals_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = data(8)
    proxies = np.random.default_rng(9).normal(size=(4, 5)).astype("float32")
    pml_loss = pml.ProxyAnchorLoss(num_classes=4, embedding_size=5)
    pml_loss.proxies.data = ops.convert_to_tensor(proxies)
    ours = _backend.value_and_grad(
        lambda v, lab: heads.proxy_anchor_loss(lab, v, proxies), x, labels
    )
    theirs = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab), x, labels)
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-6)


def _trainer(head):
    images = keras.Input((5,))
    labels = keras.Input((), dtype="int32")
    embedder = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)], name="embedder")
    return keras.Model([images, labels], head([embedder(images), labels]))


@pytest.mark.parametrize("name", ["ArcFace", "CosFace", "ProxyAnchor"])
def test_train_save_and_load(name, tmp_path):
    """The documented pattern: labels as a second input; the proxies train and are saved."""
    head = getattr(heads, name)(num_classes=4)
    model = _trainer(head)
    if name == "ProxyAnchor":
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    else:
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    labels, x = data(10)
    before = ops.convert_to_numpy(head.proxies).copy()
    targets = None if name == "ProxyAnchor" else labels
    model.fit((x, labels), targets, batch_size=12, epochs=2, verbose=0)
    assert not np.allclose(ops.convert_to_numpy(head.proxies), before)
    path = str(tmp_path / "trainer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_head = loaded.layers[-1]
    assert type(loaded_head) is type(head)
    assert loaded_head.get_config() == head.get_config()
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded_head.proxies), ops.convert_to_numpy(head.proxies)
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded((x, labels))),
        ops.convert_to_numpy(model((x, labels))),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: heads.ArcFace(0), ValueError, "`num_classes` must be a positive integer"),
        (lambda: heads.CosFace(3.0), ValueError, r"num_classes=3\.0"),
        (lambda: heads.ArcFace(3, margin=2.0), ValueError, r"\[0, pi/2\)"),
        (lambda: heads.CosFace(3, scale=-1), ValueError, "`scale` must be positive"),
        (lambda: heads.ProxyAnchor(3, alpha="32"), TypeError, "`alpha` must be a number"),
    ],
)
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_inputs():
    labels, x = data(0)
    head = heads.CosFace(4)
    with pytest.raises(ValueError, match="list of 3 inputs"):
        head([x, labels, labels])
    with pytest.raises(ValueError, match=r"labels.shape=\(12, 2\)"):
        head([x, np.stack([labels, labels], 1)])
