"""Tests of deepmetric.layers.L2Normalization."""

import keras
import numpy as np
import pytest

from deepmetric.layers import L2Normalization


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_values_match_numpy():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype("float32")
    y = _np(L2Normalization()(x))
    np.testing.assert_allclose(y, x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)


def test_zero_vector_stays_finite():
    y = _np(L2Normalization()(np.zeros((2, 3), "float32")))
    assert np.all(np.isfinite(y)) and np.all(y == 0)


def test_axis_tuple_and_list():
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype("float32")
    y = _np(L2Normalization(axis=[1, 2])(x))
    np.testing.assert_allclose(np.sqrt((y**2).sum(axis=(1, 2))), 1.0, rtol=1e-5)


def test_mixed_precision_computes_in_float32():
    """A float16 input whose squared norm (1e6) overflows float16 still normalises."""
    keras.config.set_dtype_policy("mixed_float16")
    layer = L2Normalization()
    x = np.full((1, 4), 500.0, "float16")
    y = layer(x)
    assert "float16" in str(y.dtype)
    np.testing.assert_allclose(_np(y).astype("float32"), 0.5, rtol=1e-3)


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"axis": "x"}])
def test_bad_arguments(kwargs):
    with pytest.raises((ValueError, TypeError), match="epsilon|axis"):
        L2Normalization(**kwargs)


def test_config_round_trip():
    layer = L2Normalization(axis=(1,), epsilon=1e-6, name="norm")
    clone = L2Normalization.from_config(layer.get_config())
    assert clone.axis == (1,) and clone.epsilon == 1e-6 and clone.name == "norm"
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(again, L2Normalization)


def test_keras_file_loads_in_safe_mode(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, L2Normalization()(keras.layers.Dense(4)(inputs)))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(2).normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=1e-6)
    assert isinstance(loaded.layers[-1], L2Normalization)
