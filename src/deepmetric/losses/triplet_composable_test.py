"""TripletLoss with composable mining against brute force."""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses
from deepmetric.distances import CosineSimilarity

POSITIVE = ["all", "hard", "easy"]
NEGATIVE = ["all", "semi-hard", "hard", "easy"]


def batch(seed, b=12, d=5, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype("float32")


def pk_batch(seed, p=3, k=4, d=5):
    """P classes x K samples: every anchor has a positive."""
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(p), k), rng.normal(size=(p * k, d)).astype("float32")


def _np(x):
    return ops.convert_to_numpy(x)


# --- Brute force: enumerate the selected triplets one by one. ---


def _matrix(x, r, distance):
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    if distance in ("cosine", "angular"):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
        cos = x @ r.T
        return -cos if distance == "cosine" else np.maximum(1.0 - cos, 0.0)
    squared = ((x[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    return squared if distance == "squared-L2" else np.sqrt(squared)


def ref_triplet(
    labels,
    x,
    margin=0.1,
    distance="L2",
    positive_mining="all",
    negative_mining="all",
    soft_margin=False,
    average_nonzero=False,
    ref_labels=None,
    ref_x=None,
    swap=False,
    smooth_loss=False,
):
    same_set = ref_x is None
    ref_labels = labels if same_set else ref_labels
    d = _matrix(x, x if same_set else ref_x, distance)
    costs = []
    for a in range(len(labels)):
        pos = [j for j in range(len(ref_labels)) if ref_labels[j] == labels[a]]
        pos = [j for j in pos if not (same_set and j == a)]
        neg = [j for j in range(len(ref_labels)) if ref_labels[j] != labels[a]]
        if not pos or not neg:
            continue
        if positive_mining != "all":
            pick = max if positive_mining == "hard" else min
            pos = [pick(pos, key=lambda j: d[a, j])]
        for p in pos:
            if negative_mining == "all":
                chosen = neg
            elif negative_mining == "hard":
                chosen = [min(neg, key=lambda j: d[a, j])]
            elif negative_mining == "easy":
                chosen = [max(neg, key=lambda j: d[a, j])]
            else:
                farther = [n for n in neg if d[a, n] > d[a, p]]
                chosen = (
                    [min(farther, key=lambda j: d[a, j])]
                    if farther
                    else [max(neg, key=lambda j: d[a, j])]
                )
            for n in chosen:
                an = min(d[a, n], d[p, n]) if swap else d[a, n]
                gap = d[a, p] - an
                if soft_margin:
                    costs.append(np.logaddexp(0.0, gap))
                elif smooth_loss:
                    costs.append(np.logaddexp(0.0, gap + margin))
                else:
                    costs.append(max(gap + margin, 0.0))
    if average_nonzero:
        costs = [c for c in costs if c > 0]
    return float(np.mean(costs)) if costs else 0.0


def _fd_grad(fn, x, h=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


def _ours(labels, x, compiled=False, **options):
    return _backend.value_and_grad(
        lambda v, lab: ops.mean(losses.triplet_loss(lab, v, **options)),
        x,
        labels,
        compiled=compiled,
    )


def _assert_close(ours, expected_value, expected_grad):
    assert ours[0] == pytest.approx(expected_value, rel=2e-4, abs=1e-5)
    scale = max(float(np.max(np.abs(expected_grad))), 1e-3)
    np.testing.assert_allclose(ours[1], expected_grad, rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.parametrize("soft_margin", [False, True], ids=["hinge", "soft"])
@pytest.mark.parametrize("negative_mining", NEGATIVE)
@pytest.mark.parametrize("positive_mining", POSITIVE)
def test_matches_brute_force(positive_mining, negative_mining, soft_margin):
    """Every combination on Euclidean distances: value and gradient (finite differences)."""
    labels, x = batch(0)
    options = dict(
        margin=0.5,
        positive_mining=positive_mining,
        negative_mining=negative_mining,
        soft_margin=soft_margin,
    )
    expected = ref_triplet(labels, x, **options)
    grad = _fd_grad(lambda v: ref_triplet(labels, v, **options), x)
    _assert_close(_ours(labels, x, **options), expected, grad)


@pytest.mark.parametrize("average_nonzero", [False, True], ids=["mean", "nonzero"])
@pytest.mark.parametrize(
    "swap, smooth_loss",
    [(True, False), (False, True), (True, True)],
    ids=["swap", "smooth", "both"],
)
def test_swap_and_smooth_loss_match_brute_force(swap, smooth_loss, average_nonzero):
    """swap: min(d_an, d_pn) as the negative distance; smooth_loss: softplus(gap + margin).

    Value and gradient (finite differences) of a loop over all triplets, on Euclidean and on
    cosine distances (the swap reads the positive's own row of the matrix).
    """
    labels, x = batch(2)
    for distance in ("L2", "cosine"):
        options = dict(
            margin=0.3,
            distance=distance,
            swap=swap,
            smooth_loss=smooth_loss,
            average_nonzero=average_nonzero,
        )
        expected = ref_triplet(labels, x, **options)
        grad = _fd_grad(lambda v, o=options: ref_triplet(labels, v, **o), x)
        _assert_close(_ours(labels, x, **options), expected, grad)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="torch runs eagerly")
def test_swap_eager_equals_compiled():
    labels, x = batch(3)
    options = dict(swap=True, smooth_loss=True, average_nonzero=True)
    eager = _ours(labels, x, **options)
    compiled = _ours(labels, x, compiled=True, **options)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "positive_mining, negative_mining", [("all", "all"), ("all", "semi-hard"), ("hard", "hard")]
)
@pytest.mark.parametrize("distance", ["squared-L2", "cosine", "angular"])
def test_distances_and_average_nonzero(distance, positive_mining, negative_mining):
    """Similarities (cosine: larger is closer) and distances share one code path."""
    labels, x = batch(1)
    options = dict(
        margin=0.2,
        distance=distance,
        positive_mining=positive_mining,
        negative_mining=negative_mining,
        average_nonzero=True,
    )
    expected = ref_triplet(labels, x, **options)
    grad = _fd_grad(lambda v: ref_triplet(labels, v, **options), x)
    _assert_close(_ours(labels, x, **options), expected, grad)


@pytest.mark.parametrize("negative_mining", NEGATIVE)
def test_reference_set(negative_mining):
    labels, x = batch(2, b=8)
    ref_labels, ref_x = batch(3, b=10)
    options = dict(margin=0.5, positive_mining="all", negative_mining=negative_mining)
    ours = _backend.value_and_grad(
        lambda v, lab, rv, rl: ops.mean(
            losses.triplet_loss(lab, v, reference_embeddings=rv, reference_labels=rl, **options)
        ),
        x, labels, ref_x, ref_labels,
    )  # fmt: skip
    ref = lambda v: ref_triplet(labels, v, ref_labels=ref_labels, ref_x=ref_x, **options)
    _assert_close(ours, ref(x), _fd_grad(ref, x))


def test_distance_object_and_similarity():
    """A `Distance` object works like its name; "cosine" equals "angular" up to the constant."""
    labels, x = batch(4)
    by_name = _ours(labels, x, distance="cosine", negative_mining="hard")
    by_object = _ours(labels, x, distance=CosineSimilarity(), negative_mining="hard")
    angular = _ours(labels, x, distance="angular", negative_mining="hard")
    assert by_object[0] == pytest.approx(by_name[0], rel=1e-6)
    assert angular[0] == pytest.approx(by_name[0], rel=1e-5)
    np.testing.assert_allclose(angular[1], by_name[1], rtol=1e-4, atol=1e-6)


# --- The presets equal the TFA-compatible and batch-all losses. ---


@pytest.mark.parametrize("margin", [0.2, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_semihard_preset_equals_triplet_semihard_loss(seed, margin):
    labels, x = batch(seed)
    ours = _ours(labels, x, margin=margin, negative_mining="semi-hard")
    theirs = _backend.value_and_grad(
        lambda v, lab: losses.triplet_semihard_loss(lab, v, margin=margin), x, labels
    )
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_preset_equals_triplet_hard_loss(seed, soft):
    labels, x = pk_batch(seed)
    ours = _ours(
        labels, x, margin=0.3, positive_mining="hard", negative_mining="hard", soft_margin=soft
    )
    theirs = _backend.value_and_grad(
        lambda v, lab: losses.triplet_hard_loss(lab, v, margin=0.3, soft=soft), x, labels
    )
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("squared", [False, True])
def test_all_all_nonzero_preset_equals_triplet_batch_all_loss(squared):
    labels, x = batch(5)
    distance = "squared-L2" if squared else "L2"
    ours = _ours(labels, x, margin=1.0, distance=distance, average_nonzero=True)
    theirs = _backend.value_and_grad(
        lambda v, lab: losses.triplet_batch_all_loss(lab, v, margin=1.0, squared=squared),
        x,
        labels,
    )
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-6)


# --- Invariants beyond the conformance suite's option sets, and the config. ---


# The defaults (all, all, hinge) are in the conformance suite (deepmetric/testing).
@pytest.mark.parametrize(
    "positive_mining, negative_mining, soft",
    [("all", "all", True), ("all", "semi-hard", False), ("easy", "semi-hard", False)],
)
@pytest.mark.parametrize(
    "labels", [[4, 4, 4, 4, 4, 4], [0, 1, 2, 3, 4, 5]], ids=["one-class", "distinct"]
)
def test_degenerate_batch_is_zero_with_finite_gradient(
    labels, positive_mining, negative_mining, soft
):
    _, x = batch(0, b=len(labels))
    value, grad = _ours(
        np.array(labels),
        x,
        compiled=True,
        positive_mining=positive_mining,
        negative_mining=negative_mining,
        soft_margin=soft,
    )
    assert value == 0.0 and np.all(grad == 0.0)


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="torch runs eagerly")
@pytest.mark.parametrize(
    "positive_mining, negative_mining, soft",
    [
        ("all", "all", True),
        ("all", "all", False),
        ("all", "semi-hard", False),
        ("hard", "easy", True),
    ],
)
def test_eager_equals_compiled(positive_mining, negative_mining, soft):
    labels, x = batch(7)
    options = dict(
        positive_mining=positive_mining, negative_mining=negative_mining, soft_margin=soft
    )
    eager = _ours(labels, x, **options)
    compiled = _ours(labels, x, compiled=True, **options)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-6)


# "all" and "semi-hard" negatives are in the conformance suite (deepmetric/testing); its hard
# and easy negatives come with hard or easy positives, these with all positives.
@pytest.mark.parametrize("negative_mining", ["hard", "easy"])
def test_permutation_renaming_and_large_labels(negative_mining):
    labels, x = batch(8, classes=2)
    loss = losses.TripletLoss(margin=0.5, negative_mining=negative_mining)
    expected = float(_np(loss(labels, x)))
    order = np.random.default_rng(0).permutation(len(labels))
    assert float(_np(loss(labels[order], x[order]))) == pytest.approx(expected, rel=1e-5)
    assert float(_np(loss(np.array([-7, 90])[labels], x))) == pytest.approx(expected, rel=1e-5)
    big = labels.astype("int64") + 16777216  # one float32 value for both classes
    assert float(_np(loss(big, x))) == pytest.approx(expected, rel=1e-5)


def test_get_config_round_trip():
    loss = losses.TripletLoss(
        margin=0.3,
        distance=CosineSimilarity(),
        positive_mining="hard",
        negative_mining="semi-hard",
        soft_margin=True,
        average_nonzero=True,
        name="mine",
    )
    config = loss.get_config()
    assert config["positive_mining"] == "hard" and config["negative_mining"] == "semi-hard"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is losses.TripletLoss
    assert restored.get_config() == config and restored.distance == CosineSimilarity()


@pytest.mark.parametrize(
    "options, error, message",
    [
        (
            {"positive_mining": "medium"},
            ValueError,
            "`positive_mining` must be one of 'all', 'hard'",
        ),
        (
            {"negative_mining": "semihard"},
            ValueError,
            "'semi-hard'.*Received: negative_mining='semihard'",
        ),
        ({"distance": "manhattan"}, ValueError, "Unknown `distance`: 'manhattan'"),
        ({"margin": "1"}, TypeError, "`margin` must be a number"),
        ({"distance": 3}, TypeError, "`distance` must be a name"),
        (
            {"soft_margin": True, "smooth_loss": True},
            ValueError,
            "`soft_margin` and `smooth_loss` cannot both be True",
        ),
        (
            {"swap": True, "negative_mining": "hard"},
            ValueError,
            "`swap` and `miner` need positive_mining='all'",
        ),
        ({"miner": "batch_hard"}, TypeError, "`miner` must be None or a `deepmetric.miners`"),
    ],
)
def test_bad_arguments(options, error, message):
    labels, x = batch(0)
    if "miner" not in options:
        with pytest.raises(error, match=message):
            losses.TripletLoss(**options)(labels, x)
    else:
        with pytest.raises(error, match=message):
            losses.TripletLoss(**options)
    with pytest.raises(error, match=message):
        losses.triplet_loss(labels, x, **options)


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="pytorch-metric-learning runs on torch only"
)
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_pytorch_metric_learning_triplet_margin_loss(seed):
    """PML's TripletMarginLoss() (margin 0.05, normalised L2, all triplets, AvgNonZero)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(seed)
    unit = keras.layers.UnitNormalization()
    ours = _backend.value_and_grad(
        lambda v, lab: ops.mean(
            losses.triplet_loss(lab, unit(v), margin=0.05, average_nonzero=True)
        ),
        x,
        labels,
    )
    theirs = _backend.value_and_grad(lambda v, lab: pml.TripletMarginLoss()(v, lab), x, labels)
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-5)


def test_swap_needs_the_batch_itself():
    labels, x = batch(0)
    with pytest.raises(ValueError, match="`swap` compares positives with negatives"):
        losses.triplet_loss(labels, x, swap=True, reference_embeddings=x, reference_labels=labels)


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="pytorch-metric-learning runs on torch only"
)
@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap"])
@pytest.mark.parametrize("smooth_loss", [False, True], ids=["hinge", "smooth"])
def test_equals_pml_triplet_margin_loss_with_swap_and_smooth_loss(swap, smooth_loss):
    """On L2-normalised embeddings TripletLoss(margin=m, average_nonzero=True, swap=s,
    smooth_loss=t) is PML's TripletMarginLoss(margin=m, swap=s, smooth_loss=t)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    labels, x = batch(4, b=16, classes=4)
    unit = keras.layers.UnitNormalization()
    options = dict(margin=0.1, swap=swap, smooth_loss=smooth_loss)
    ours = _backend.value_and_grad(
        lambda v, lab: ops.mean(losses.triplet_loss(lab, unit(v), average_nonzero=True, **options)),
        x,
        labels,
    )
    theirs = _backend.value_and_grad(
        lambda v, lab: pml.TripletMarginLoss(**options)(v, lab), x, labels
    )
    assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-5)
