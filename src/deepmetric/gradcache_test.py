"""Tests of `deepmetric.gradcache.GradCacheModel`: the chunked step equals the plain step."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from deepmetric import losses
from deepmetric.gradcache import GradCacheModel
from deepmetric.samplers import PKSampler

BATCH = 12


def data(n=BATCH * 2, dim=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype("float32")
    y = np.tile(np.arange(classes), n // classes).astype("int32")
    return x, y


def embedder(dim=6, *, dropout=0.0, norm=None, regularizer=None, seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((dim,))
    h = keras.layers.Dense(16, activation="tanh", kernel_regularizer=regularizer)(inputs)
    if norm == "batch":
        h = keras.layers.BatchNormalization()(h)
    if dropout:
        h = keras.layers.Dropout(dropout, seed=3)(h)
    h = keras.layers.Dense(5)(h)
    return keras.Model(inputs, keras.layers.UnitNormalization()(h))


def train(model, loss, x, y, *, optimizer=None, steps=2, sampler=False):
    model.compile(optimizer=optimizer() if optimizer else keras.optimizers.SGD(1.0), loss=loss)
    if sampler:
        model.fit(PKSampler(x, y, 4, 3, batches_per_epoch=steps, seed=0), epochs=1, verbose=0)
    else:
        model.fit(
            x[: steps * BATCH],
            y[: steps * BATCH],
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def plain_and_cached(loss, chunk, **kwargs):
    x, y = data()
    make = kwargs.pop("make", embedder)
    plain = train(make(), loss, x, y, **kwargs)
    net = make()
    cached = train(GradCacheModel(net, chunk), loss, x, y, **kwargs)
    return plain, cached, net


def assert_weights_close(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)


LOSSES = {
    "triplet_semihard": lambda: losses.TripletSemiHardLoss(margin=0.2),
    "multi_similarity": lambda: losses.MultiSimilarityLoss(),
    "supcon": lambda: losses.SupConLoss(),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_one_sgd_step_gradient_equals_plain_step(name):
    """SGD with rate 1 moves each weight by minus its gradient: the gradients are equal.

    Chunks of 5 rows split the batch of 12 unevenly (5, 5, 2), the remainder included.
    """
    plain, cached, _ = plain_and_cached(LOSSES[name](), 5, steps=1)
    assert_weights_close(plain, cached)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [4, 100])
def test_weights_after_adam_steps_equal_plain_steps(chunk):
    plain, cached, _ = plain_and_cached(
        losses.MultiSimilarityLoss(), chunk, steps=2, optimizer=lambda: keras.optimizers.Adam(0.05)
    )
    assert_weights_close(plain, cached)
    before = [keras.ops.convert_to_numpy(w) for w in embedder().weights]
    assert any(
        not np.allclose(u, v) for u, v in zip(before, plain, strict=True)
    )  # training moved them


def test_pk_sampler_and_weight_regularizer():
    """A P x K sampler feeds it as `fit` does; an L2 weight penalty reaches the gradient."""
    plain, cached, _ = plain_and_cached(
        losses.TripletSemiHardLoss(),
        5,
        sampler=True,
        make=lambda: embedder(regularizer=keras.regularizers.L2(0.1)),
    )
    assert_weights_close(plain, cached)


def test_dropout_masks_replayed_and_moving_statistics_updated_once():
    """With one chunk, the plain step and the cached step draw the same dropout masks.

    The first (gradient-free) pass draws the mask; the second pass must draw the same one,
    from the restored seed state, or its gradient belongs to other embeddings than those the
    loss was differentiated at (and the seed would advance twice per step). Likewise the
    BatchNormalization moving statistics must move once per step, not twice.
    """
    plain, cached, net = plain_and_cached(
        losses.SupConLoss(), BATCH, make=lambda: embedder(dropout=0.5, norm="batch")
    )
    assert_weights_close(plain, cached)  # non-trainable weights included
    moving = [keras.ops.convert_to_numpy(w) for w in net.non_trainable_weights]
    assert len(moving) >= 2 and any(not np.allclose(m, 0.0) for m in moving)


def test_loss_is_logged_and_predict_uses_the_embedder():
    x, y = data()
    net = embedder()
    model = GradCacheModel(net, 5)
    model.compile(optimizer="sgd", loss=losses.SupConLoss())
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and history.history["loss"][0] > 0
    np.testing.assert_allclose(model.predict(x, verbose=0), net.predict(x, verbose=0), rtol=1e-6)


def test_config_round_trip():
    model = GradCacheModel(embedder(), 7, name="cached")
    clone = GradCacheModel.from_config(model.get_config())
    assert clone.chunk_size == 7 and clone.name == "cached"
    assert len(clone.embedder.weights) == len(model.embedder.weights)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((0,), ValueError, r"`chunk_size` must be a positive integer.*chunk_size=0"),
        ((2.5,), ValueError, r"chunk_size=2.5"),
        ((True,), ValueError, r"chunk_size=True"),
    ],
)
def test_bad_chunk_size(args, error, match):
    with pytest.raises(error, match=match):
        GradCacheModel(embedder(), *args)


def test_bad_embedder():
    with pytest.raises(TypeError, match=r"`embedder` must be a keras.Model.*embedder='x'"):
        GradCacheModel("x", 4)


def test_losses_added_inside_the_model_are_refused():
    class AddsLoss(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(keras.ops.mean(inputs))
            return inputs

    inputs = keras.Input((6,))
    net = keras.Model(inputs, AddsLoss()(keras.layers.Dense(4)(inputs)))
    model = GradCacheModel(net, 4)
    model.compile(optimizer="sgd", loss=losses.SupConLoss())
    x, y = data()
    with pytest.raises(ValueError, match="add_loss"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
