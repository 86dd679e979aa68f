"""Heads: logits and losses against the papers' equations, gradients, training, `.keras` round
trips and errors, one parametrised set over every head."""

import inspect
import math

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, heads
from deepmetric.losses.proxy_test import (
    check_value_and_grad,
    ref_proxy_anchor,
    ref_proxy_nca,
    unit,
)

# Each head with the options its equation checks use (and the number K of proxies per class).
OPTIONS = {
    "CosFace": {"scale": 30.0, "margin": 0.2},
    "ArcFace": {"scale": 16.0, "margin": 0.5},
    "SubCenterArcFace": {"sub_centers": 3, "scale": 16.0, "margin": 0.5},
    "NormalizedSoftmax": {"temperature": 0.1},
    "ProxyNCA": {"softmax_scale": 2.0},
    "ProxyAnchor": {"margin": 0.1, "alpha": 32.0},
    "LargeMarginSoftmax": {"margin": 3, "scale": 1.5},
    "SphereFace": {"margin": 4, "scale": 2.0},
    "SoftTriple": {"centers_per_class": 3, "la": 10.0, "gamma": 0.2, "margin": 0.05},
    "P2SGrad": {},
}
HEADS = list(OPTIONS)
LOSS_HEADS = ["ProxyNCA", "ProxyAnchor", "P2SGrad"]  # they add their loss (adds_loss)
MARGIN_HEADS = ["CosFace", "ArcFace", "SubCenterArcFace"]
OTHER_MARGIN_HEADS = ["ProxyAnchor", "LargeMarginSoftmax", "SphereFace", "SoftTriple"]


def per_class(options):
    """The number K of proxies per class of a head with `options`."""
    return options.get("sub_centers", options.get("centers_per_class", 1))


def data(seed, b=12, d=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype("float32")


def make_head(name, proxies, **options):
    """The head `name` with `options` and its proxies set to `proxies`."""
    k = per_class(options)
    head = getattr(heads, name)(num_classes=proxies.shape[0] // k, **options)
    head.build((None, proxies.shape[1]))
    head.proxies.assign(proxies)
    return head


def random_proxies(seed, name, classes=4, d=5, k=None):
    k = per_class(OPTIONS[name]) if k is None else k
    return np.random.default_rng(seed).normal(size=(classes * k, d)).astype("float32")


def ref_logits(name, options, labels, x, proxies):
    """The papers' logits in numpy float64; `labels` None: the logits without margin."""
    cos = unit(x) @ unit(proxies).T
    if name == "SubCenterArcFace":  # Deng et al. 2020: the largest cosine to the K sub-centres
        cos = np.max(cos.reshape(len(x), -1, options["sub_centers"]), axis=2)
    if name == "ProxyNCA":  # -s ||x_i/|x_i| - p_c/|p_c|||^2
        return -options["softmax_scale"] * np.sum(
            (unit(x)[:, None] - unit(proxies)[None]) ** 2, axis=-1
        )
    if name == "NormalizedSoftmax":  # Zhai & Wu: cos / T
        return cos / options["temperature"]
    if name == "ProxyAnchor":
        return options["alpha"] * cos
    if name == "P2SGrad":  # Zhang et al.: the cosines
        return cos
    if name == "SoftTriple":  # Qian et al.: lambda (sum_k softmax_k(cos / gamma) cos - delta)
        k, gamma = options["centers_per_class"], options["gamma"]
        cos = (unit(x) @ unit(proxies).T).reshape(len(x), -1, k)
        weights = np.exp((cos - cos.max(axis=2, keepdims=True)) / gamma)
        similarity = np.sum(weights / weights.sum(axis=2, keepdims=True) * cos, axis=2)
        if labels is not None:
            similarity = similarity - options["margin"] * np.eye(similarity.shape[1])[labels]
        return options["la"] * similarity
    if name in ("LargeMarginSoftmax", "SphereFace"):
        # Liu et al. 2016, eq. 6: psi(theta) = (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m],
        # times ||x|| ||w_c|| (SphereFace: ||x||) and the scale.
        s, m = options["scale"], options["margin"]
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if name == "LargeMarginSoftmax":
            norms = norms * np.linalg.norm(proxies, axis=1)[None]
        if labels is not None:
            theta = np.arccos(np.clip(cos, -1, 1))
            k = np.floor(theta / (math.pi / m))
            psi = (-1.0) ** k * np.cos(m * theta) - 2 * k
            cos = np.where(np.eye(cos.shape[1])[labels] > 0, psi, cos)
        return s * norms * cos
    s, m = options["scale"], options["margin"]
    if labels is None:
        return s * cos
    target = np.eye(cos.shape[1])[labels] > 0
    if name == "CosFace":  # Wang et al.: s (cos - m) on the target
        return s * np.where(target, cos - m, cos)
    # ArcFace: s cos(theta + m) on the target, s (cos theta - m sin m) where theta + m > pi.
    theta = np.arccos(np.clip(cos, -1, 1))
    margin_cos = np.where(theta + m <= math.pi, np.cos(theta + m), cos - m * math.sin(m))
    return s * np.where(target, margin_cos, cos)


def cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy from logits, numpy float64."""
    top = np.max(logits, axis=1, keepdims=True)
    logsumexp = (top + np.log(np.sum(np.exp(logits - top), axis=1, keepdims=True)))[:, 0]
    return float(np.mean(logsumexp - logits[np.arange(len(labels)), labels]))


def ref_objective(name, options, labels, x, proxies):
    """What training minimises: the head's own loss, or the cross-entropy of its logits."""
    if name == "ProxyNCA":
        return ref_proxy_nca(labels, x, proxies, options["softmax_scale"])
    if name == "ProxyAnchor":
        return ref_proxy_anchor(labels, x, proxies, options["margin"], options["alpha"])
    if name == "P2SGrad":  # the mean squared error between the cosines and the one-hot labels
        cos = unit(x) @ unit(proxies).T
        return float(np.mean((cos - np.eye(cos.shape[1])[labels]) ** 2))
    return cross_entropy(labels, ref_logits(name, options, labels, x, proxies))


def head_cross_entropy(head):
    def fn(v, lab):
        logits = head([v, lab])
        return ops.mean(keras.losses.sparse_categorical_crossentropy(lab, logits, from_logits=True))

    return fn


def edge_proxies(name, labels, x):
    """Random proxies with cos = -1 (theta = pi: ArcFace's fallback) between example 0 and the
    last proxy of its class, and cos = 1 between example 1 and the last proxy of another class
    (the largest of its sub-centres). At the target, theta near 0 is ill-conditioned in float32
    (arccos); the finite gradient there is the conformance suite's degenerate batch
    (`deepmetric.testing.invariants.check_head_degenerate`)."""
    proxies = random_proxies(3, name)
    k = per_class(OPTIONS[name])
    proxies[k * labels[0] + k - 1] = -x[0]
    proxies[k * ((labels[1] + 1) % 4) + k - 1] = x[1]
    return proxies


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("name", HEADS)
def test_logits(name, with_labels):
    """Each head's logits are its paper's equation, with the labels (margin) or without."""
    labels, x = data(2)
    labels[1] = (labels[0] + 1) % 4
    proxies = edge_proxies(name, labels, x)
    head = make_head(name, proxies, **OPTIONS[name])
    logits = head([x, labels]) if with_labels else head(x)
    expected = ref_logits(name, OPTIONS[name], labels if with_labels else None, x, proxies)
    angular = "ArcFace" in name or name in ("LargeMarginSoftmax", "SphereFace")
    tolerance = {"rtol": 1e-4, "atol": 2e-3} if angular else {"rtol": 1e-5, "atol": 1e-4}
    np.testing.assert_allclose(ops.convert_to_numpy(logits), expected, **tolerance)


@pytest.mark.parametrize("name", HEADS)
def test_adds_its_loss(name):
    labels, x = data(34)
    proxies = random_proxies(35, name)
    head = make_head(name, proxies, **OPTIONS[name])
    head([x, labels])
    if not head.adds_loss:
        assert head.losses == []
        return
    assert len(head.losses) == 1
    expected = ref_objective(name, OPTIONS[name], labels, x, proxies)
    assert float(head.losses[0]) == pytest.approx(expected, rel=1e-4)


# Smooth enough for finite differences; the paper's temperature T = 0.05.
OBJECTIVE_OPTIONS = {
    "ArcFace": {"scale": 8.0, "margin": 0.3},
    "SubCenterArcFace": {"sub_centers": 2, "scale": 8.0, "margin": 0.3},
    "NormalizedSoftmax": {"temperature": 0.05},
}


# Compiled: jax.jit and tf.function; torch runs eagerly, the same as compiled=False.
@pytest.mark.parametrize("compiled", [False, True] if _backend.name() != "torch" else [False])
@pytest.mark.parametrize("name", [n for n in HEADS if n not in LOSS_HEADS])
def test_cross_entropy_value_and_gradient(name, compiled):
    """The cross-entropy of the logits against numpy; its gradient against finite differences.
    (The losses the other heads add: losses/proxy_test.py, and `test_adds_its_loss`.)"""
    labels, x = data(22)
    options = {**OPTIONS[name], **OBJECTIVE_OPTIONS.get(name, {})}
    proxies = random_proxies(23, name, k=per_class(options))
    head = make_head(name, proxies, **options)
    check_value_and_grad(
        head_cross_entropy(head),
        lambda v: ref_objective(name, options, labels, v, proxies),
        x,
        labels,
        compiled,
    )


def test_subcenter_arcface_with_one_sub_center_is_arcface():
    labels, x = data(28)
    proxies = np.random.default_rng(29).normal(size=(4, 5)).astype("float32")
    ours = make_head("SubCenterArcFace", proxies, sub_centers=1, scale=10.0, margin=0.4)
    arcface = make_head("ArcFace", proxies, scale=10.0, margin=0.4)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ours([x, labels])),
        ops.convert_to_numpy(arcface([x, labels])),
        atol=1e-6,
    )


def _trainer(head):
    images = keras.Input((5,))
    labels = keras.Input((), dtype="int32")
    embedder = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)], name="embedder")
    return keras.Model([images, labels], head([embedder(images), labels]))


TRAIN_OPTIONS = {
    "SubCenterArcFace": {"sub_centers": 2, "scale": 8.0},
    "ProxyNCA": {"softmax_scale": 4.0},
    "SoftTriple": {"centers_per_class": 2},
}


@pytest.mark.parametrize("name", HEADS)
def test_fit_lowers_the_loss_and_moves_the_proxies(name):
    """The documented pattern: labels as a second input. A short fit lowers the loss and moves
    the proxies. (`.keras` keeps the head, its config and its proxies in safe mode: the
    conformance suite's `keras_save_load`.)"""
    options = TRAIN_OPTIONS.get(name, {})
    head = getattr(heads, name)(num_classes=4, **options)
    model = _trainer(head)
    if head.adds_loss:
        model.compile(optimizer=keras.optimizers.Adam(0.05))
    else:
        model.compile(
            optimizer=keras.optimizers.Adam(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    labels, x = data(36)
    before = ops.convert_to_numpy(head.proxies).copy()
    targets = None if head.adds_loss else labels
    # One batch per epoch: the first loss is the loss before any update.
    history = model.fit((x, labels), targets, batch_size=12, epochs=10, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    proxies = ops.convert_to_numpy(head.proxies)
    assert proxies.shape == (4 * per_class(options), 3)
    assert not np.allclose(proxies, before)


@pytest.mark.parametrize("name", HEADS)
def test_options_by_position_or_name_and_config_round_trip(name):
    cls = getattr(heads, name)
    options = OPTIONS[name]
    head = cls(4, **options)
    names = [o.name for o in cls.options]
    by_position = cls(
        4, *(options.get(n, o.default) for n, o in zip(names, cls.options, strict=True))
    )
    config = head.get_config()
    assert {k: v for k, v in by_position.get_config().items() if k != "name"} == {
        k: v for k, v in config.items() if k != "name"
    }
    assert cls.from_config(config).get_config() == config
    assert all(getattr(head, n) == v for n, v in options.items())
    assert list(inspect.signature(cls).parameters) == ["num_classes", *names, "kwargs"]
    assert ("margin" in names) == (name in [*MARGIN_HEADS, *OTHER_MARGIN_HEADS])


FLOAT_OPTIONS = [
    (name, option.name)
    for name in HEADS
    for option in getattr(heads, name).options
    if isinstance(option.default, float)
]


@pytest.mark.parametrize("name, option", FLOAT_OPTIONS)
@pytest.mark.parametrize(
    "value, error, message",
    [
        (float("nan"), ValueError, "must be a finite number [^.]+"),
        (float("inf"), ValueError, "must be a finite number [^.]+"),
        ("1", TypeError, "must be a number"),
    ],
)
def test_numeric_options_are_checked(name, option, value, error, message):
    with pytest.raises(error, match=f"`{option}` {message}. Received: {option}="):
        getattr(heads, name)(4, **{option: value})


@pytest.mark.parametrize(
    "make, error, message",
    [
        *[
            (
                lambda n=n: getattr(heads, n)(0),
                ValueError,
                "`num_classes` must be a positive integer",
            )
            for n in HEADS
        ],
        (lambda: heads.CosFace(3.0), ValueError, r"num_classes=3\.0"),
        (lambda: heads.ArcFace(3, margin=2.0), ValueError, r"\[0, pi/2\)"),
        (lambda: heads.SubCenterArcFace(3, margin=-0.1), ValueError, r"\[0, pi/2\)"),
        (lambda: heads.CosFace(3, scale=-1), ValueError, "`scale` must be a finite number > 0"),
        (lambda: heads.ProxyAnchor(3, alpha="32"), TypeError, "`alpha` must be a number"),
        (
            lambda: heads.NormalizedSoftmax(3, temperature=0.0),
            ValueError,
            "`temperature` must be a finite number > 0",
        ),
        (
            lambda: heads.ProxyNCA(3, softmax_scale=-1),
            ValueError,
            "`softmax_scale` must be a finite number > 0",
        ),
        (
            lambda: heads.SubCenterArcFace(3, sub_centers=0),
            ValueError,
            "`sub_centers` must be a positive",
        ),
        (lambda: heads.SubCenterArcFace(3, sub_centers=2.0), ValueError, r"sub_centers=2\.0"),
        (
            lambda: heads.CosFace(3, 30.0, scale=2.0),
            TypeError,
            "multiple values for argument 'scale'",
        ),
        (lambda: heads.ProxyNCA(3, 1.0, "he_normal", 2), TypeError, r"ProxyNCA\(num_classes, "),
        (lambda: heads.CosFace(3, nope=1), ValueError, "Unrecognized keyword arguments"),
        *[
            (lambda v=v: heads.LargeMarginSoftmax(3, margin=v), ValueError, "positive integer")
            for v in (0, 2.5, -1, float("nan"), float("inf"), True)
        ],
        (lambda: heads.SphereFace(3, margin="4"), ValueError, r"margin='4'"),
        (lambda: heads.SoftTriple(3, centers_per_class=0), ValueError, "`centers_per_class`"),
        (lambda: heads.SoftTriple(3, gamma=0.0), ValueError, "`gamma` must be a finite number > 0"),
        (
            lambda: heads.SoftTriple(3, margin=-0.1),
            ValueError,
            "`margin` must be a finite number >= 0",
        ),
    ],
)
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("name", HEADS)
def test_bad_inputs(name):
    labels, x = data(0)
    head = getattr(heads, name)(4)
    with pytest.raises(ValueError, match="list of 3 inputs"):
        head([x, labels, labels])
    with pytest.raises(ValueError, match=r"labels.shape=\(12, 2\)"):
        head([x, np.stack([labels, labels], 1)])


def test_large_margin_integral_float_margin_is_the_integer():
    """--margin arrives as a float: 4.0 is m = 4 (PML's `int(margin)`), kept as an int."""
    head = heads.SphereFace(3, margin=4.0)
    assert head.margin == 4 and isinstance(head.get_config()["margin"], int)


def test_large_margin_with_multiplier_one_is_the_plain_softmax():
    """m = 1: psi(theta) = cos(theta); the logits are s ||x|| ||w|| cos = s x.w (and the labels
    change nothing)."""
    labels, x = data(30)
    proxies = random_proxies(31, "LargeMarginSoftmax")
    head = make_head("LargeMarginSoftmax", proxies, margin=1, scale=2.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(head([x, labels])), 2.0 * x @ proxies.T, rtol=1e-5, atol=1e-5
    )


PML_HEADS = {  # PML 2.9's class, its positional arguments, and which weight holds the proxies
    "LargeMarginSoftmax": ("LargeMarginSoftmaxLoss", (4, 5), "W"),
    "SphereFace": ("SphereFaceLoss", (4, 5), "W"),
    "SoftTriple": ("SoftTripleLoss", (4, 5), "fc"),
    "P2SGrad": ("P2SGradLoss", (5, 4), "weight"),
}


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PML runs on torch only")
@pytest.mark.parametrize("name", list(PML_HEADS))
def test_equals_pytorch_metric_learning(name):
    """PML 2.9 with the same (transposed) weights: the loss, its gradient in the embeddings and
    in the weights (P2SGrad: PML's weight gradient projected on the unit sphere, since PML
    renormalises its weights outside the gradient and the head inside)."""
    import torch
    from pytorch_metric_learning import losses as pml_losses

    class_name, args, weight = PML_HEADS[name]
    options = OPTIONS[name]
    labels, x = data(40)
    proxies = random_proxies(41, name)
    if name == "P2SGrad":
        proxies = unit(proxies).astype("float32")
    pml = getattr(pml_losses, class_name)(*args, **options)
    pml_weight = getattr(pml, weight)
    with torch.no_grad():
        pml_weight.copy_(torch.tensor(proxies.T))
    pml_x = torch.tensor(x, requires_grad=True)
    expected = pml(pml_x, torch.tensor(labels))
    expected.backward()
    head = make_head(name, proxies, **options)
    ours_x = torch.tensor(x, requires_grad=True)
    if head.adds_loss:
        head([ours_x, torch.tensor(labels)])
        value = head.losses[0]
    else:
        value = head_cross_entropy(head)(ours_x, torch.tensor(labels))
    value.backward()
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    np.testing.assert_allclose(ours_x.grad.numpy(), pml_x.grad.numpy(), rtol=1e-4, atol=1e-6)
    pml_grad = pml_weight.grad.numpy().T
    if name == "P2SGrad":
        pml_grad = pml_grad - np.sum(pml_grad * proxies, axis=1, keepdims=True) * proxies
    np.testing.assert_allclose(head.proxies.value.grad.numpy(), pml_grad, rtol=1e-4, atol=1e-6)


# --- MarginBeta: the learned boundaries of the margin loss. ---


@pytest.mark.parametrize("num_classes", [None, 4])
def test_margin_beta_adds_the_margin_loss_with_its_betas(num_classes):
    """The added loss is `margin_loss` with the layer's betas and the regulariser."""
    from deepmetric.losses import margin_loss

    labels, x = data(3)
    layer = heads.MarginBeta(num_classes=num_classes, margin=0.1, nu=0.2, beta=0.9)
    out = layer([x, labels])
    np.testing.assert_array_equal(ops.convert_to_numpy(out), x)
    betas = np.linspace(0.8, 1.2, num_classes or 1).astype("float32")
    layer.beta.assign(betas)
    layer([x, labels])
    expected = margin_loss(labels, x, margin=0.1, nu=0.2, beta=betas, learn_beta=True)
    got = float(ops.convert_to_numpy(layer.losses[0]))
    assert got == pytest.approx(float(ops.convert_to_numpy(ops.mean(expected))), rel=1e-6)
    plain = float(ops.convert_to_numpy(ops.mean(margin_loss(labels, x, margin=0.1, beta=0.9))))
    if num_classes is None:  # one beta: the regulariser nu * beta is added as it is
        layer.beta.assign(np.full(1, 0.9, "float32"))
        layer([x, labels])
        assert float(ops.convert_to_numpy(layer.losses[0])) == pytest.approx(
            plain + 0.2 * 0.9, rel=1e-6
        )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PML runs on torch only")
@pytest.mark.parametrize("num_classes", [None, 4])
def test_margin_beta_equals_pytorch_metric_learning(num_classes):
    """PML's `MarginLoss(learn_beta=True)`: value and the gradient in beta."""
    import torch
    from pytorch_metric_learning.losses import MarginLoss

    labels, x = data(5)
    pml = MarginLoss(nu=0.3, learn_beta=True, num_classes=num_classes)
    betas = np.linspace(0.9, 1.3, num_classes or 1).astype("float32")
    with torch.no_grad():
        pml.beta.copy_(torch.tensor(betas))
    expected = pml(torch.tensor(x), torch.tensor(labels))
    expected.backward()
    layer = heads.MarginBeta(num_classes=num_classes, nu=0.3)
    layer.build((None, 5))
    layer.beta.assign(betas)
    layer([x, labels])
    value = layer.losses[0]
    value.backward()
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_allclose(
        layer.beta.value.grad.numpy(), pml.beta.grad.numpy(), rtol=1e-4, atol=1e-7
    )


def test_margin_beta_trains_and_saves():
    """A short fit moves the betas and lowers the loss; `.keras` keeps the layer and them.
    Seeded: the margin loss of a shuffled batch of 12 is noisy, and from some unseeded starts
    the last epoch's loss was above the first's."""
    import os
    import tempfile

    keras.utils.set_random_seed(0)
    labels, x = data(36)
    images = keras.Input((5,))
    label_input = keras.Input((), dtype="int32")
    embeddings = keras.layers.Dense(3)(images)
    layer = heads.MarginBeta(num_classes=4, nu=0.1, beta=1.0)
    model = keras.Model([images, label_input], layer([embeddings, label_input]))
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    history = model.fit((x, labels), batch_size=12, epochs=10, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    betas = ops.convert_to_numpy(layer.beta)
    assert not np.allclose(betas, 1.0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    restored = next(lay for lay in loaded.layers if isinstance(lay, heads.MarginBeta))
    assert restored.get_config() == layer.get_config()
    np.testing.assert_array_equal(ops.convert_to_numpy(restored.beta), betas)


def test_margin_beta_bad_options():
    with pytest.raises(ValueError, match="`num_classes` must be a positive integer"):
        heads.MarginBeta(num_classes=0)
    with pytest.raises(TypeError, match="`nu` must be a number"):
        heads.MarginBeta(nu="0.1")


@pytest.mark.parametrize("option", ["margin", "nu", "beta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, math.nextafter(0.0, -1.0)])
def test_margin_beta_option_ranges(option, value):
    """margin, nu and beta >= 0 (MarginLoss's ranges): NaN, inf and negatives are refused."""
    with pytest.raises(ValueError, match=f"`{option}` must be a finite number >= 0. Received"):
        heads.MarginBeta(num_classes=3, **{option: value})
    heads.MarginBeta(num_classes=3, **{option: 0.0})  # the bound itself is in the range


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_margin_beta_nonfinite_input_gives_nan(bad):
    """A non-finite embedding or learned beta makes the added loss NaN, not finite."""
    labels, x = data(7)
    layer = heads.MarginBeta(num_classes=4, nu=0.1)
    layer([x, labels])
    assert np.isfinite(float(ops.convert_to_numpy(layer.losses[0])))
    y = x.copy()
    y[3, 1] = bad
    layer([y, labels])
    assert np.isnan(float(ops.convert_to_numpy(layer.losses[0])))
    layer.beta.assign(np.array([1.0, bad, 1.0, 1.0], "float32"))
    layer([x, labels])
    assert np.isnan(float(ops.convert_to_numpy(layer.losses[0])))


def test_margin_beta_empty_batch_names_embeddings():
    labels, x = data(8)
    with pytest.raises(ValueError, match="`embeddings` must hold at least one example"):
        heads.MarginBeta(num_classes=4)([x[:0], labels[:0]])
