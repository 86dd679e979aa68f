"""The losses inside Keras: compile/fit on every backend, save/load, labels, bad input."""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses, metrics

BATCH_LOSSES = {
    "semihard": lambda: losses.TripletSemiHardLoss(margin=0.5),
    "hard": lambda: losses.TripletHardLoss(margin=0.5),
    "hard-soft": lambda: losses.TripletHardLoss(soft=True),
    "hard-angular": lambda: losses.TripletHardLoss(margin=0.2, distance_metric="angular"),
    "batch-all": lambda: losses.TripletBatchAllLoss(margin=0.5),
    "lifted": lambda: losses.LiftedStructLoss(margin=1.0),
}


def clusters(n=100, classes=5, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 2
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(size=(n, dim))).astype("float32")
    return x, y


def embedding_model(dim=8, out=4):
    inputs = keras.Input((dim,))
    h = keras.layers.Dense(out)(inputs)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


@pytest.mark.parametrize("name", sorted(BATCH_LOSSES))
def test_fit_lowers_the_loss_and_the_model_reloads(name, tmp_path):
    keras.utils.set_random_seed(0)
    x, y = clusters()
    model = embedding_model()
    loss = BATCH_LOSSES[name]()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    before = model.evaluate(x, y, batch_size=100, verbose=0)
    # 100 examples in batches of 32: the last batch has 4 (an unknown batch dimension).
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0, shuffle=True)
    after = model.evaluate(x, y, batch_size=100, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert after < before
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe mode, no custom_objects
    assert type(loaded.loss) is type(loss)
    assert loaded.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_contrastive_pair_model_fits():
    keras.utils.set_random_seed(0)
    x, y = clusters(n=64)
    a, b = x[:32], x[32:]
    similar = (y[:32] == y[32:]).astype("int32")
    left, right = keras.Input((8,)), keras.Input((8,))
    dense = keras.layers.Dense(4)
    d = keras.layers.Lambda(lambda t: ops.norm(t[0] - t[1], axis=-1, keepdims=True))(
        [dense(left), dense(right)]
    )
    model = keras.Model([left, right], d)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=losses.ContrastiveLoss(margin=1.0))
    history = model.fit([a, b], similar, epochs=5, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_triplet_margin_loss_fits_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = clusters(n=60)
    rng = np.random.default_rng(1)
    triplets = []
    for i in range(60):
        p = rng.choice(np.flatnonzero((y == y[i]) & (np.arange(60) != i)))
        n = rng.choice(np.flatnonzero(y != y[i]))
        triplets.append(np.stack([x[i], x[p], x[n]]))
    triplets = np.stack(triplets)
    inputs = keras.Input((3, 8))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    model.compile(
        optimizer=keras.optimizers.Adam(0.05), loss=losses.TripletMarginLoss(margin=1.0, swap=True)
    )
    history = model.fit(triplets, np.zeros(60), epochs=5, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.loss.get_config() == model.loss.get_config()


def test_npairs_fits_on_a_similarity_model():
    keras.utils.set_random_seed(0)
    x, y = clusters(n=64)
    inputs = keras.Input((8,))
    e = keras.layers.Dense(4)(inputs)
    sim = keras.layers.Lambda(lambda t: ops.matmul(t, ops.transpose(t)))(e)
    model = keras.Model(inputs, sim)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=losses.NpairsLoss())
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_fraction_positive_triplets_metric_in_fit():
    keras.utils.set_random_seed(0)
    x, y = clusters()
    model = embedding_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=losses.TripletBatchAllLoss(0.5),
        metrics=[metrics.FractionPositiveTriplets(margin=0.5)],
    )
    history = model.fit(x, y, batch_size=50, epochs=3, verbose=0)
    fractions = history.history["fraction_positive_triplets"]
    assert all(0.0 < f <= 1.0 for f in fractions)
    assert fractions[-1] < fractions[0]


def test_mixed_precision_trains_without_nan():
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    x, y = clusters()
    model = embedding_model()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=losses.TripletSemiHardLoss(0.5))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.skipif(_backend.name() == "torch", reason="torch runs the function itself")
def test_compiled_with_unknown_batch_dimension():
    loss = losses.TripletSemiHardLoss()
    x = np.random.default_rng(1).normal(size=(10, 3)).astype("float32")
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 3])
    fn = _backend.compiled(lambda lab, emb: loss(lab, emb), y, x)
    np.testing.assert_allclose(ops.convert_to_numpy(fn(y, x)), float(loss(y, x)), rtol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(fn(y[:6], x[:6])), float(loss(y[:6], x[:6])), rtol=1e-6
    )


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (np.zeros((4, 2), "int32"), ValueError, r"shape \(batch_size,\) or \(batch_size, 1\)"),
        (np.zeros((3,), "int32"), ValueError, r"expected 4 labels, received y_true.shape=\(3,\)"),
        (np.array([0.0, 0.5, 1.0, 1.0]), ValueError, r"integer-valued.*0.5"),
        (np.array(["a", "a", "b", "b"]), TypeError, r"integer class labels.*<U1"),
    ],
)
def test_bad_labels_are_named(labels, error, message):
    x = np.zeros((4, 3), "float32")
    for make in BATCH_LOSSES.values():
        with pytest.raises(error, match=message):
            make()(labels, x)


def test_integer_valued_float_labels_are_accepted():
    x = np.random.default_rng(2).normal(size=(4, 3)).astype("float32")
    loss = losses.TripletSemiHardLoss()
    assert float(loss(np.array([0.0, 0.0, 1.0, 1.0]), x)) == pytest.approx(
        float(loss(np.array([0, 0, 1, 1]), x))
    )


def test_bad_embeddings_and_options_are_named():
    with pytest.raises(ValueError, match=r"rank-2.*y_pred.shape=\(4,\)"):
        losses.TripletSemiHardLoss()(np.zeros(4, "int32"), np.zeros(4, "float32"))
    with pytest.raises(TypeError, match=r"floating-point.*int32"):
        losses.triplet_hard_loss(np.zeros(2, "int32"), np.zeros((2, 2), "int32"))
    with pytest.raises(ValueError, match=r"Unknown `distance_metric`: 'L1'. Allowed names"):
        losses.TripletSemiHardLoss(distance_metric="L1")
    with pytest.raises(TypeError, match=r"`margin` must be a number. Received: margin='1'"):
        losses.TripletHardLoss(margin="1")


# --- Keras' registry: every public loss function and class by its registered name. ---

PUBLIC = [getattr(losses, name) for name in losses.__all__ if name != "get"]
FUNCTIONS = [obj for obj in PUBLIC if not isinstance(obj, type)]
CLASSES = [obj for obj in PUBLIC if isinstance(obj, type)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_keras_losses_get_resolves_every_class(cls):
    loss = keras.losses.get({"class_name": f"deepmetric>{cls.__name__}", "config": {}})
    assert type(loss) is cls


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_every_function_is_registered(fn):
    name = f"deepmetric>{fn.__name__}"
    assert keras.saving.get_registered_name(fn) == name
    assert keras.saving.get_registered_object(name) is fn


def test_a_loss_function_saves_and_reloads_in_safe_mode(tmp_path):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss=losses.contrastive_loss)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.loss is losses.contrastive_loss


def test_metric_loss_is_every_labels_and_embeddings_loss():
    """`issubclass(cls, MetricLoss)`: the losses of (labels, embeddings) batches, and no other."""
    metric = {cls.__name__ for cls in CLASSES if issubclass(cls, losses.base.MetricLoss)}
    assert metric == {
        "AngularLoss",
        "CircleLoss",
        "DynamicSoftMarginLoss",
        "GeneralizedLiftedStructureLoss",
        "IntraPairVarianceLoss",
        "LiftedStructureLoss",
        "MarginLoss",
        "NCALoss",
        "PNPLoss",
        "RankedListLoss",
        "SignalToNoiseRatioContrastiveLoss",
        "ThresholdConsistentMarginLoss",
        "TupletMarginLoss",
        "FastAPLoss",
        "HistogramLoss",
        "SmoothAPLoss",
        "LiftedStructLoss",
        "MultiSimilarityLoss",
        "NTXentLoss",
        "OnlineContrastiveLoss",
        "SupConLoss",
        "TripletBatchAllLoss",
        "TripletHardLoss",
        "TripletLoss",
        "TripletSemiHardLoss",
    }
