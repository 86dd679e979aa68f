"""Tests of deepmetric.models.build_embedding_model."""

import json
import os
import subprocess
import sys
import zipfile

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
    assert isinstance(model.layers[-1], keras.layers.UnitNormalization)


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


def test_unit_normalization_computes_what_l2_normalization_does():
    """The built-in last layer: the same values as L2Normalization, zero for zero."""
    model = build_embedding_model((6,), 5)
    x = np.random.default_rng(3).normal(size=(8, 5)).astype("float32")
    x[::2] *= 1e-5  # lengths near 2e-5: above both layers' floors
    x[0] = 0.0
    np.testing.assert_allclose(
        _np(model.layers[-1](x)), _np(L2Normalization()(x)), rtol=1e-6, atol=1e-7
    )


def test_mixed_precision_normalises_in_float32():
    keras.config.set_dtype_policy("mixed_float16")
    model = build_embedding_model((6,), 4)
    y = _np(model(np.full((2, 6), 300.0, "float32")))
    assert y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)


_LOAD_WITHOUT_DEEPMETRIC = """
import sys
class NoDeepmetric:
    def find_spec(self, name, path=None, target=None):
        if name == "deepmetric" or name.startswith("deepmetric."):
            raise ImportError("deepmetric is not installed here")
sys.meta_path.insert(0, NoDeepmetric())
sys.path = [p for p in sys.path if "deepmetric" not in p]
import keras, numpy as np
for i in range(1, len(sys.argv), 3):
    model = keras.saving.load_model(sys.argv[i], safe_mode=True)
    np.save(sys.argv[i + 2], keras.ops.convert_to_numpy(model(np.load(sys.argv[i + 1]))))
assert not any(m.startswith("deepmetric") for m in sys.modules)
"""


def test_saved_models_load_with_plain_keras(tmp_path):
    """The .keras files name Keras' own classes only, and a Python where deepmetric
    cannot be imported loads them and computes the same embeddings (one process for
    a CNN with rescaling and an MLP with standardisation)."""
    rng = np.random.default_rng(4)
    cases = [((8, 8, 1), {"pixel_scale": 1 / 16}), ((5,), {"standardize": ([1.0] * 5, [2.0] * 5)})]
    args, want = [], []
    for i, (shape, kwargs) in enumerate(cases):
        model = build_embedding_model(shape, 6, **kwargs)
        path = tmp_path / f"embedder_{i}.keras"
        model.save(path)
        config = zipfile.ZipFile(path).read("config.json").decode()
        assert "deepmetric" not in config
        modules = {v for k, v in _walk(json.loads(config)) if k == "module"}
        assert all(m.startswith("keras") for m in modules), modules
        x = rng.uniform(0, 16, size=(3, *shape)).astype("float32")
        np.save(tmp_path / f"x_{i}.npy", x)
        args += [str(path), str(tmp_path / f"x_{i}.npy"), str(tmp_path / f"y_{i}.npy")]
        want.append(_np(model(x)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_DEEPMETRIC, *args], check=True, env=env,
                   cwd=tmp_path, timeout=120)  # fmt: skip
    for i, expected in enumerate(want):
        np.testing.assert_allclose(np.load(tmp_path / f"y_{i}.npy"), expected, rtol=1e-5, atol=1e-6)


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)
