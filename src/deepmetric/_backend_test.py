"""The command line's seeding and determinism helpers of `deepmetric._backend`."""

import keras
import numpy as np
import pytest

from deepmetric import _backend

X = np.ones((4, 64), "float32")


def _dropout_model():
    inputs = keras.Input((64,))
    x = keras.layers.Dropout(0.5)(keras.layers.Dense(64, kernel_initializer="identity")(inputs))
    return keras.Model(inputs, keras.layers.Dropout(0.5)(x))


def _draw(model):
    return keras.ops.convert_to_numpy(model(X, training=True))


def test_seed_epoch_makes_the_dropout_masks_a_function_of_seed_and_epoch():
    """After `seed_epoch(model, seed, epoch)` a model draws the same masks, whatever it drew
    before and whichever seeds its layers got when built (a model loaded from a checkpoint);
    another epoch or seed draws others."""
    model = _dropout_model()
    _backend.seed_epoch(model, 7, 3)
    first = _draw(model)
    second = _draw(model)
    assert not np.array_equal(first, second)  # the generators move on within an epoch
    _backend.seed_epoch(model, 7, 3)
    np.testing.assert_array_equal(_draw(model), first)
    np.testing.assert_array_equal(_draw(model), second)
    other = _dropout_model()
    _draw(other)
    _backend.seed_epoch(other, 7, 3)
    np.testing.assert_array_equal(_draw(other), first)
    for seed, epoch in ((7, 4), (8, 3)):
        _backend.seed_epoch(model, seed, epoch)
        assert not np.array_equal(_draw(model), first)


def test_seed_epoch_without_random_layers_seeds_the_global_generators():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    _backend.seed_epoch(model, 0, 5)
    a = np.random.random(3)
    _backend.seed_epoch(model, 0, 5)
    np.testing.assert_array_equal(np.random.random(3), a)


def test_deterministic_turns_the_setting_on_for_the_block_only():
    """Backend-specific: reads TensorFlow's and torch's own determinism flags."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from tensorflow.python.framework import config

        flag = config.is_op_determinism_enabled
    elif backend == "torch":
        import torch

        flag = torch.are_deterministic_algorithms_enabled
    else:
        pytest.skip("jax has no determinism setting")
    before = flag()
    with _backend.deterministic():
        assert flag()
    assert flag() == before
