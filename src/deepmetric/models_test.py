"""Tests of deepmetric.models.build_embedding_model."""

import keras
import numpy as np
import pytest

from deepmetric.layers import L2Normalization
from deepmetric.models import build_embedding_model


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "shape, kind",
    [((8, 8, 1), "cnn"), ((8, 8), "cnn"), ((6, 6, 3), "cnn"), ((10,), "mlp"), ((4, 5), "mlp")],
)
def test_shapes_and_unit_norm(shape, kind):
    model = build_embedding_model(shape, 16, kind="auto" if len(shape) != 2 else kind)
    x = np.random.default_rng(0).uniform(0, 16, size=(3, *shape)).astype("float32")
    y = _np(model(x))
    assert y.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    assert isinstance(model.layers[-1], L2Normalization)


def test_auto_picks_cnn_for_images_and_mlp_for_vectors():
    cnn = build_embedding_model((8, 8, 1))
    mlp = build_embedding_model((12,))
    assert any(isinstance(layer, keras.layers.Conv2D) for layer in cnn.layers)
    assert not any(isinstance(layer, keras.layers.Conv2D) for layer in mlp.layers)


def test_rescaling_lives_inside_the_model():
    """pixel_scale=1/16 on raw pixels equals the same weights on pre-scaled pixels."""
    raw = np.random.default_rng(1).integers(0, 17, size=(4, 8, 8, 1)).astype("float32")
    scaled = build_embedding_model((8, 8, 1), 8, pixel_scale=1 / 16)
    plain = build_embedding_model((8, 8, 1), 8)
    plain.set_weights(scaled.get_weights())
    assert scaled.get_layer("rescaling").scale == pytest.approx(1 / 16)
    np.testing.assert_allclose(_np(scaled(raw)), _np(plain(raw / 16)), rtol=1e-5, atol=1e-6)


def test_standardize_for_features():
    model = build_embedding_model((3,), 4, standardize=([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    assert model.get_layer("standardize") is not None
    assert _np(model(np.ones((2, 3), "float32"))).shape == (2, 4)


def test_backbone_gets_a_head():
    backbone = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3)])
    model = build_embedding_model((8, 8, 1), 5, backbone=backbone, pixel_scale=1 / 255)
    assert model.output_shape == (None, 5)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (((8, 8, 1),), {"kind": "rnn"}, "kind"),
        (((8, 8, 1), 0), {}, "embedding_dim"),
        (((0, 8),), {}, "input_shape"),
        (((10,),), {"kind": "cnn"}, "image"),
        (((8, 8),), {"pixel_scale": -1.0}, "pixel_scale"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_embedding_model(*args, **kwargs)


def test_save_and_load_in_safe_mode(tmp_path):
    model = build_embedding_model((8, 8, 1), 8, pixel_scale=1 / 16)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(2).uniform(0, 16, size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=1e-5, atol=1e-6)
