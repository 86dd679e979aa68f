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


def _logsumexp(z):
    top = np.max(z, axis=1, keepdims=True)
    return (top + np.log(np.sum(np.exp(z - top), axis=1, keepdims=True)))[:, 0]


def _cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy from logits, numpy float64."""
    return float(np.mean(_logsumexp(logits) - logits[np.arange(len(labels)), labels]))


def _finite_differences(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros(x.shape)
    for index in np.ndindex(*x.shape):
        step = np.zeros(x.shape)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _check_value_and_grad(fn, ref, x, labels, compiled):
    value, grad = _backend.value_and_grad(fn, x, labels, compiled=compiled)
    expected_grad = _finite_differences(ref, x)
    assert float(value) == pytest.approx(ref(x), rel=1e-4)
    scale = np.max(np.abs(expected_grad))
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-3, atol=2e-3 * scale)


def _head_cross_entropy(head):
    def fn(v, lab):
        logits = head([v, lab])
        return ops.mean(keras.losses.sparse_categorical_crossentropy(lab, logits, from_logits=True))

    return fn


def ref_normalized_softmax_logits(x, proxies, temperature):
    """Zhai & Wu: z_ic = cos(x_i, p_c) / T."""
    return _unit(np.asarray(x, np.float64)) @ _unit(np.asarray(proxies, np.float64)).T / temperature


@pytest.mark.parametrize("with_labels", [True, False])
def test_normalized_softmax_logits(with_labels):
    labels, x = data(20)
    proxies = np.random.default_rng(21).normal(size=(4, 5)).astype("float32")
    head = _head_with(heads.NormalizedSoftmax, proxies, temperature=0.1)
    logits = head([x, labels]) if with_labels else head(x)
    np.testing.assert_allclose(
        ops.convert_to_numpy(logits),
        ref_normalized_softmax_logits(x, proxies, 0.1),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_normalized_softmax_cross_entropy_value_and_gradient(compiled):
    """Cross-entropy of cos / T against numpy; gradient against finite differences."""
    labels, x = data(22)
    proxies = np.random.default_rng(23).normal(size=(4, 5)).astype("float32")
    head = _head_with(heads.NormalizedSoftmax, proxies)  # the paper's T = 0.05
    _check_value_and_grad(
        _head_cross_entropy(head),
        lambda v: _cross_entropy(labels, ref_normalized_softmax_logits(v, proxies, 0.05)),
        x,
        labels,
        compiled,
    )


def ref_subcenter_arcface_logits(labels, x, proxies, sub_centers, scale, margin):
    """Deng et al. 2020: cos theta_ic = max_k cos(x_i, p_ck), rows c*K..c*K+K-1 of class c;
    then ArcFace's s cos(theta + m) on the target (s (cos theta - m sin m) past pi)."""
    all_cos = _unit(np.asarray(x, np.float64)) @ _unit(np.asarray(proxies, np.float64)).T
    cos = np.max(all_cos.reshape(len(x), -1, sub_centers), axis=2)
    theta = np.arccos(np.clip(cos, -1, 1))
    target = np.where(
        theta + margin <= math.pi, np.cos(theta + margin), cos - margin * math.sin(margin)
    )
    return scale * np.where(np.eye(cos.shape[1])[labels] > 0, target, cos)


def _subcenter_head(proxies, sub_centers, **kwargs):
    head = heads.SubCenterArcFace(
        num_classes=proxies.shape[0] // sub_centers, sub_centers=sub_centers, **kwargs
    )
    head.build((None, proxies.shape[1]))
    head.proxies.assign(proxies)
    return head


def test_subcenter_arcface_logits():
    labels, x = data(24)
    proxies = np.random.default_rng(25).normal(size=(12, 5)).astype("float32")
    proxies[3 * labels[0] + 1] = -x[0]  # theta = pi to one sub-centre: not the maximum
    proxies[3 * labels[1] + 2] = x[1]  # cos = 1 to one sub-centre: the maximum
    head = _subcenter_head(proxies, 3, scale=16.0, margin=0.5)
    expected = ref_subcenter_arcface_logits(labels, x, proxies, 3, 16.0, 0.5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head([x, labels])), expected, rtol=1e-4, atol=2e-3
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(head(x)),
        16.0 * np.max((_unit(x) @ _unit(proxies).T).reshape(12, 4, 3), axis=2),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_subcenter_arcface_cross_entropy_value_and_gradient(compiled):
    labels, x = data(26)
    proxies = np.random.default_rng(27).normal(size=(8, 5)).astype("float32")
    head = _subcenter_head(proxies, 2, scale=8.0, margin=0.3)
    _check_value_and_grad(
        _head_cross_entropy(head),
        lambda v: _cross_entropy(
            labels, ref_subcenter_arcface_logits(labels, v, proxies, 2, 8.0, 0.3)
        ),
        x,
        labels,
        compiled,
    )


def test_subcenter_arcface_with_one_sub_center_is_arcface():
    labels, x = data(28)
    proxies = np.random.default_rng(29).normal(size=(4, 5)).astype("float32")
    ours = _subcenter_head(proxies, 1, scale=10.0, margin=0.4)([x, labels])
    arcface = _head_with(heads.ArcFace, proxies, scale=10.0, margin=0.4)([x, labels])
    np.testing.assert_allclose(ops.convert_to_numpy(ours), ops.convert_to_numpy(arcface), atol=1e-6)


def ref_proxy_nca(labels, x, proxies, softmax_scale=1.0):
    """PML's ProxyNCALoss: mean_i -log softmax_c(-s ||x_i/|x_i| - p_c/|p_c|||^2)[y_i]."""
    x = _unit(np.asarray(x, np.float64))
    p = _unit(np.asarray(proxies, np.float64))
    total = 0.0
    for i in range(len(x)):
        logits = np.array([-softmax_scale * np.sum((x[i] - p[c]) ** 2) for c in range(len(p))])
        total += -(logits[labels[i]] - np.log(np.sum(np.exp(logits))))
    return total / len(x)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("softmax_scale", [1.0, 9.0])
def test_proxy_nca_loss_matches_brute_force(softmax_scale, compiled):
    labels, x = data(30)
    proxies = np.random.default_rng(31).normal(size=(4, 5)).astype("float32")
    _check_value_and_grad(
        lambda v, lab: heads.proxy_nca_loss(lab, v, proxies, softmax_scale=softmax_scale),
        lambda v: ref_proxy_nca(labels, v, proxies, softmax_scale),
        x,
        labels,
        compiled,
    )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PML runs on torch only")
def test_proxy_nca_loss_equals_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = data(32)
    proxies = np.random.default_rng(33).normal(size=(4, 5)).astype("float32")
    pml_loss = pml.ProxyNCALoss(num_classes=4, embedding_size=5, softmax_scale=3)
    pml_loss.proxies.data = ops.convert_to_tensor(proxies)
    ours = _backend.value_and_grad(
        lambda v, lab: heads.proxy_nca_loss(lab, v, proxies, softmax_scale=3), x, labels
    )
    theirs = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab), x, labels)
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-6)


def test_proxy_nca_head_adds_the_loss():
    labels, x = data(34)
    proxies = np.random.default_rng(35).normal(size=(4, 5)).astype("float32")
    head = _head_with(heads.ProxyNCA, proxies, softmax_scale=2.0)
    logits = head([x, labels])
    assert len(head.losses) == 1
    assert float(head.losses[0]) == pytest.approx(ref_proxy_nca(labels, x, proxies, 2.0), rel=1e-4)
    expected = -2.0 * np.sum((_unit(x)[:, None] - _unit(proxies)[None]) ** 2, axis=-1)
    np.testing.assert_allclose(ops.convert_to_numpy(logits), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ops.convert_to_numpy(head(x)), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("NormalizedSoftmax", {}),
        ("SubCenterArcFace", {"sub_centers": 2, "scale": 8.0}),
        ("ProxyNCA", {"softmax_scale": 4.0}),
    ],
)
def test_new_heads_train_save_and_load(name, kwargs, tmp_path):
    """A short fit lowers the loss and moves the proxies; `.keras` keeps them (safe mode)."""
    head = getattr(heads, name)(num_classes=4, **kwargs)
    model = _trainer(head)
    if name == "ProxyNCA":
        model.compile(optimizer=keras.optimizers.Adam(0.05))
    else:
        model.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    labels, x = data(36)
    before = ops.convert_to_numpy(head.proxies).copy()
    targets = None if name == "ProxyNCA" else labels
    # One batch per epoch: the first loss is the loss before any update.
    history = model.fit((x, labels), targets, batch_size=12, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    proxies = ops.convert_to_numpy(head.proxies)
    assert proxies.shape == (4 * kwargs.get("sub_centers", 1), 3)
    assert not np.allclose(proxies, before)
    path = str(tmp_path / "trainer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    loaded_head = loaded.layers[-1]
    assert type(loaded_head) is type(head)
    assert loaded_head.get_config() == head.get_config()
    np.testing.assert_allclose(ops.convert_to_numpy(loaded_head.proxies), proxies)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded((x, labels))),
        ops.convert_to_numpy(model((x, labels))),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: heads.NormalizedSoftmax(0), "`num_classes` must be a positive integer"),
        (lambda: heads.NormalizedSoftmax(3, temperature=0.0), "`temperature` must be positive"),
        (lambda: heads.ProxyNCA(3, softmax_scale=-1), "`softmax_scale` must be positive"),
        (lambda: heads.SubCenterArcFace(3, sub_centers=0), r"`sub_centers` must be a positive"),
        (lambda: heads.SubCenterArcFace(3, sub_centers=2.0), r"sub_centers=2\.0"),
        (lambda: heads.SubCenterArcFace(3, margin=-0.1), r"\[0, pi/2\)"),
        (
            lambda: heads.proxy_nca_loss(
                np.zeros(2, "int32"), np.ones((2, 3)), np.ones((3, 3)), softmax_scale=0
            ),
            "`softmax_scale` must be positive",
        ),
    ],
)
def test_new_heads_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", ["NormalizedSoftmax", "SubCenterArcFace", "ProxyNCA"])
def test_new_heads_bad_labels(name):
    labels, x = data(0)
    head = getattr(heads, name)(4)
    with pytest.raises(ValueError, match=r"labels.shape=\(12, 2\)"):
        head([x, np.stack([labels, labels], 1)])
