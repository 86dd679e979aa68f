"""Modern batch losses against brute-force loops, pytorch-metric-learning, and invariants."""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses

BACKEND = keras.backend.backend()
torch_only = pytest.mark.skipif(
    BACKEND != "torch", reason="pytorch-metric-learning runs on the torch backend only"
)

# --- Brute-force references in float64, one loop per anchor / pair, from the papers. ---


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(labels, ref_labels):
    """Lists of positive and negative columns per anchor (self excluded without a reference)."""
    same_set = ref_labels is None
    ref_labels = labels if same_set else ref_labels
    pos, neg = [], []
    for i, label in enumerate(labels):
        pos.append(
            [j for j, r in enumerate(ref_labels) if r == label and not (same_set and i == j)]
        )
        neg.append([j for j, r in enumerate(ref_labels) if r != label])
    return pos, neg


def _degenerate(pos, neg):
    return not any(pos) or not any(neg)


def _nonzero_mean(values):
    values = [v for v in values if v > 0]
    return float(np.mean(values)) if values else 0.0


def _setup(labels, x, ref_labels, ref_x):
    x = np.asarray(x, np.float64)
    ref = x if ref_x is None else np.asarray(ref_x, np.float64)
    return _pairs(labels, ref_labels), _unit(x), _unit(ref)


def ref_multi_similarity(labels, x, ref_labels=None, ref_x=None, alpha=2.0, beta=50.0, base=0.5):
    """Every anchor's terms, also in a batch without positive or without negative pairs."""
    (pos, neg), q, r = _setup(labels, x, ref_labels, ref_x)
    losses_ = []
    for i in range(len(q)):
        s_pos = [q[i] @ r[j] for j in pos[i]]
        s_neg = [q[i] @ r[j] for j in neg[i]]
        pos_term = np.log(1 + sum(np.exp(-alpha * (s - base)) for s in s_pos)) / alpha
        neg_term = np.log(1 + sum(np.exp(beta * (s - base)) for s in s_neg)) / beta
        losses_.append(pos_term + neg_term)
    return float(np.mean(losses_))


def ref_circle(labels, x, ref_labels=None, ref_x=None, margin=0.4, gamma=80.0, fixed=None):
    """`fixed` = (x, ref_x) at which the weights alpha are evaluated (they carry no gradient)."""
    (pos, neg), q, r = _setup(labels, x, ref_labels, ref_x)
    fx, fr = (x, ref_x) if fixed is None else fixed
    _, wq, wr = _setup(labels, fx, ref_labels, fr)
    losses_ = []
    for i in range(len(q)):
        if not pos[i] or not neg[i]:
            losses_.append(0.0)
            continue
        lp = np.logaddexp.reduce(
            [
                -gamma * max(1 + margin - wq[i] @ wr[j], 0) * (q[i] @ r[j] - 1 + margin)
                for j in pos[i]
            ]
        )
        ln = np.logaddexp.reduce(
            [gamma * max(wq[i] @ wr[j] + margin, 0) * (q[i] @ r[j] - margin) for j in neg[i]]
        )
        losses_.append(np.logaddexp(0.0, lp + ln))
    return _nonzero_mean(losses_)


def ref_sup_con(labels, x, ref_labels=None, ref_x=None, temperature=0.1):
    (pos, neg), q, r = _setup(labels, x, ref_labels, ref_x)
    if _degenerate(pos, neg):
        return 0.0
    losses_ = []
    for i in range(len(q)):
        if not pos[i]:
            losses_.append(0.0)
            continue
        log_denominator = np.logaddexp.reduce([q[i] @ r[j] / temperature for j in pos[i] + neg[i]])
        log_probs = [q[i] @ r[p] / temperature - log_denominator for p in pos[i]]
        losses_.append(-np.mean(log_probs))
    return _nonzero_mean(losses_)


def ref_nt_xent(labels, x, ref_labels=None, ref_x=None, temperature=0.07):
    (pos, neg), q, r = _setup(labels, x, ref_labels, ref_x)
    if _degenerate(pos, neg):
        return 0.0
    pair_losses = []
    for a in range(len(q)):
        for p in pos[a]:
            numerator = np.exp(q[a] @ r[p] / temperature)
            negatives = sum(np.exp(q[a] @ r[n] / temperature) for n in neg[a])
            pair_losses.append(-np.log(numerator / (numerator + negatives)))
    return float(np.mean(pair_losses))


def ref_online_contrastive(labels, x, ref_labels=None, ref_x=None, pos_margin=0.0, neg_margin=1.0):
    """Both means, also in a batch without positive or without negative pairs."""
    (pos, neg), q, r = _setup(labels, x, ref_labels, ref_x)
    d = lambda i, j: np.linalg.norm(q[i] - r[j])
    pos_losses = [max(d(i, j) - pos_margin, 0) for i in range(len(q)) for j in pos[i]]
    neg_losses = [max(neg_margin - d(i, j), 0) for i in range(len(q)) for j in neg[i]]
    return _nonzero_mean(pos_losses) + _nonzero_mean(neg_losses)


# name: (function, class, reference, non-default options)
LOSSES = {
    "multi_similarity": (
        losses.multi_similarity_loss,
        losses.MultiSimilarityLoss,
        ref_multi_similarity,
        {"alpha": 1.5, "beta": 20.0, "base": 0.3},
    ),
    "circle": (losses.circle_loss, losses.CircleLoss, ref_circle, {"margin": 0.25, "gamma": 32.0}),
    "sup_con": (losses.sup_con_loss, losses.SupConLoss, ref_sup_con, {"temperature": 0.5}),
    "nt_xent": (losses.nt_xent_loss, losses.NTXentLoss, ref_nt_xent, {"temperature": 0.2}),
    "online_contrastive": (
        losses.online_contrastive_loss,
        losses.OnlineContrastiveLoss,
        ref_online_contrastive,
        {"pos_margin": 0.1, "neg_margin": 1.2},
    ),
}
NAMES = list(LOSSES)


def batch(seed, b=12, d=5, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype("float32")


def with_duplicates(seed):
    labels, x = batch(seed)
    x[1], labels[1] = x[0], labels[0]  # a duplicate positive
    x[3] = x[2]  # the same point under two labels when labels[2] != labels[3]
    labels[3] = labels[2] + 1
    return labels, x


def _value(name, labels, x, options=None, **kwargs):
    fn = LOSSES[name][0]
    return float(ops.convert_to_numpy(ops.mean(fn(labels, x, **(options or {}), **kwargs))))


def _value_and_grad(name, labels, x, options=None, compiled=False):
    fn = LOSSES[name][0]
    return _backend.value_and_grad(
        lambda v, lab: ops.mean(fn(lab, v, **(options or {}))), x, labels, compiled=compiled
    )


def _reference_value_and_grad(name, labels, x, options=None, ref_labels=None, ref_x=None, h=1e-6):
    reference = LOSSES[name][2]
    options = dict(options or {})
    x = np.asarray(x, np.float64)
    if name == "circle":  # the weights alpha are constants of the gradient
        options["fixed"] = (x.copy(), None if ref_x is None else np.asarray(ref_x, np.float64))
    value = reference(labels, x, ref_labels, ref_x, **options)
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = h
        upper = reference(labels, x + step, ref_labels, ref_x, **options)
        lower = reference(labels, x - step, ref_labels, ref_x, **options)
        grad[index] = (upper - lower) / (2 * h)
    return value, grad


def _assert_grad_close(grad, expected):
    scale = max(float(np.max(np.abs(expected))), 1e-3)
    np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-3 * scale)


# --- Values and gradients against the brute-force loops. ---


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["random", "duplicates", "options"])
def test_value_and_gradient_match_brute_force(name, case):
    """Random batches (3 classes, B=12, D=5), exact duplicates, and non-default options."""
    options = None
    if case == "duplicates":
        labels, x = with_duplicates(3)
        if name == "online_contrastive":  # |x_i - x_j| has no derivative where it is 0
            options = {"pos_margin": 0.05}
    else:
        labels, x = batch(0 if case == "random" else 7)
        options = LOSSES[name][3] if case == "options" else None
    value, grad = _value_and_grad(name, labels, x, options)
    expected_value, expected_grad = _reference_value_and_grad(name, labels, x, options)
    assert value == pytest.approx(expected_value, rel=2e-4, abs=1e-5)
    _assert_grad_close(grad, expected_grad)


@pytest.mark.parametrize("name", NAMES)
def test_reference_set_matches_brute_force(name):
    """Queries against a separate reference set: no pair is excluded, the gradient flows to
    the queries."""
    labels, x = batch(4, b=8)
    ref_labels, ref_x = batch(5, b=10)
    ref_x[0], ref_labels[0] = x[0], labels[0]  # a reference identical to a query is a positive
    fn = LOSSES[name][0]
    options = {"pos_margin": 0.05} if name == "online_contrastive" else {}
    value, grad = _backend.value_and_grad(
        lambda v, lab, rv, rl: ops.mean(
            fn(lab, v, reference_embeddings=rv, reference_labels=rl, **options)
        ),
        x,
        labels,
        ref_x,
        ref_labels,
    )
    expected_value, expected_grad = _reference_value_and_grad(
        name, labels, x, options, ref_labels=ref_labels, ref_x=ref_x
    )
    assert value == pytest.approx(expected_value, rel=2e-4, abs=1e-5)
    _assert_grad_close(grad, expected_grad)


@pytest.mark.parametrize(
    "name, options, expected",
    [
        # s = 1 for the positive, 0 for both negatives of every anchor.
        ("multi_similarity", {}, 0.5 * np.log1p(np.exp(-1.0)) + np.log1p(2 * np.exp(-25.0)) / 50),
        # positive logit -80 * 0.4 * 0.4 = -12.8, negative logits 80 * 0.4 * (0 - 0.4) = -12.8.
        ("circle", {}, np.logaddexp(0.0, -25.6 + np.log(2.0))),
        # -log(e^10 / (e^10 + 2)) = log(1 + 2 e^-10).
        ("sup_con", {}, np.log1p(2 * np.exp(-10.0))),
        # -log(e^(1/t) / (e^(1/t) + 2)) with t = 0.07.
        ("nt_xent", {}, np.logaddexp(0.0, np.log(2.0) - 1 / 0.07)),
        # positives at distance 0 (no loss), negatives at sqrt(2): 2 - sqrt(2) each.
        ("online_contrastive", {"neg_margin": 2.0}, 2.0 - np.sqrt(2.0)),
    ],
)
def test_analytic_case(name, options, expected):
    """Labels [0, 0, 1, 1] at e1, e1, e2, e2 (scaled: the losses normalise)."""
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.5]], "float32")
    value = _value(name, np.array([0, 0, 1, 1]), x, options)
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-6)  # float32 log(1 + 1e-4)


# The pair losses whose terms of one kind of pair stand alone: a batch with only negative (or
# only positive) pairs keeps them, as the formulas and pytorch-metric-learning do.
KEEP_TERMS = ("multi_similarity", "online_contrastive")
DEGENERATE = {"one-class": [4, 4, 4, 4, 4, 4], "distinct": [0, 1, 2, 3, 4, 5]}


@pytest.mark.parametrize("name", KEEP_TERMS)
@pytest.mark.parametrize("case", ["one-class", "distinct"])
def test_terms_of_one_kind_are_kept(name, case):
    """Only positive (one class) or only negative (distinct labels) pairs: the formula's terms
    of those pairs, value and gradient, finite."""
    labels = np.array(DEGENERATE[case])
    _, x = batch(0, b=len(labels))
    value, grad = _value_and_grad(name, labels, x, compiled=True)
    expected, expected_grad = _reference_value_and_grad(name, labels, x)
    assert value > 0.0
    assert value == pytest.approx(expected, rel=1e-4)
    assert np.all(np.isfinite(grad))
    _assert_grad_close(grad, expected_grad)


# --- pytorch-metric-learning 2.9, value and gradient (torch backend only). ---

PML_CLASSES = {
    "multi_similarity": ("MultiSimilarityLoss", {"alpha": 1.5, "beta": 20.0, "base": 0.3}),
    "circle": ("CircleLoss", {"m": 0.25, "gamma": 32.0}),
    "sup_con": ("SupConLoss", {"temperature": 0.5}),
    "nt_xent": ("NTXentLoss", {"temperature": 0.2}),
    "online_contrastive": ("ContrastiveLoss", {"pos_margin": 0.1, "neg_margin": 1.2}),
}


@torch_only
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "case", ["random", "duplicates", "options", "reference", "many", "distinct", "one-class"]
)
def test_equals_pytorch_metric_learning(name, case):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    class_name, pml_options = PML_CLASSES[name]
    options = LOSSES[name][3] if case == "options" else {}
    pml_loss = getattr(pml, class_name)(**(pml_options if case == "options" else {}))
    labels, x = with_duplicates(2) if case == "duplicates" else batch(11)
    if case == "many":  # more classes, some anchors without positives
        labels, x = batch(12, b=20, classes=9)
    if case in ("distinct", "one-class"):  # no positive pair / no negative pair
        x = batch(14, b=10)[1]
        labels = np.arange(10) if case == "distinct" else np.zeros(10, "int64")
    fn = LOSSES[name][0]
    if case == "reference":
        ref_labels, ref_x = batch(13, b=9)
        ours = _backend.value_and_grad(
            lambda v, lab, rv, rl: ops.mean(
                fn(lab, v, reference_embeddings=rv, reference_labels=rl)
            ),
            x, labels, ref_x, ref_labels,
        )  # fmt: skip
        theirs = _backend.value_and_grad(
            lambda v, lab, rv, rl: pml_loss(v, lab, ref_emb=rv, ref_labels=rl),
            x, labels, ref_x, ref_labels,
        )  # fmt: skip
    else:
        ours = _value_and_grad(name, labels, x, options)
        theirs = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab), x, labels)
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-4, abs=1e-6)
    _assert_grad_close(ours[1], theirs[1])


def test_circle_equals_keras_circle_value():
    """`keras.losses.Circle` on unit embeddings averages over the non-zero anchors too (through
    a Keras mask); its gradient also flows through the weights, so only values are compared."""
    labels, x = batch(5)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels[:2] = 9  # an anchor of class 9 has a positive but rows may differ in support
    expected = float(ops.convert_to_numpy(keras.losses.Circle()(labels, x)))
    assert _value("circle", labels, x) == pytest.approx(expected, rel=1e-5)
    circle = losses.CircleLoss()
    assert float(ops.convert_to_numpy(circle(labels, x))) == pytest.approx(expected, rel=1e-5)


# --- Compiled, class and config (the other invariants: deepmetric/testing). ---


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs eagerly when compiled")
@pytest.mark.parametrize("name", NAMES)
def test_eager_equals_compiled(name):
    labels, x = batch(6)
    eager = _value_and_grad(name, labels, x)
    compiled = _value_and_grad(name, labels, x, compiled=True)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_class_equals_function_and_sample_weight(name):
    labels, x = batch(10)
    options = LOSSES[name][3]
    loss = LOSSES[name][1](**options)
    expected = _value(name, labels, x, options)
    assert float(ops.convert_to_numpy(loss(labels, x))) == pytest.approx(expected, rel=1e-5)
    per_anchor = ops.convert_to_numpy(LOSSES[name][0](labels, x, **options))
    weights = np.linspace(0.0, 2.0, len(labels))
    weighted = float(ops.convert_to_numpy(loss(labels, x, sample_weight=weights)))
    assert weighted == pytest.approx(float(np.mean(per_anchor * weights)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_get_config_round_trip(name):
    cls, options = LOSSES[name][1], LOSSES[name][3]
    loss = cls(**options, reduction="sum", name="custom")
    config = loss.get_config()
    assert config.get("miner") is None  # the pair losses take a miner; None by default
    without_miner = {k: v for k, v in config.items() if k not in ("miner", "distance")}
    assert without_miner == {**options, "name": "custom", "reduction": "sum"}
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is cls and restored.get_config() == config


# --- Bad arguments. ---


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("multi_similarity", {"alpha": 0.0}, ValueError, "`alpha` must be a finite number > 0"),
        ("multi_similarity", {"beta": "50"}, TypeError, "`beta` must be a number"),
        ("circle", {"gamma": -1.0}, ValueError, "`gamma` must be a finite number > 0"),
        ("circle", {"margin": True}, TypeError, "`margin` must be a number"),
        ("sup_con", {"temperature": 0}, ValueError, "`temperature` must be a finite number > 0"),
        ("nt_xent", {"temperature": float("nan")}, ValueError, "`temperature` must be a finite"),
        ("online_contrastive", {"neg_margin": None}, TypeError, "`neg_margin` must be a number"),
    ],
)
def test_bad_options(name, options, error, message):
    with pytest.raises(error, match=message):
        LOSSES[name][1](**options)
    labels, x = batch(0)
    with pytest.raises(error, match=message):
        LOSSES[name][0](labels, x, **options)
