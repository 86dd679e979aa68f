"""Tests of deepmetric.layers: L2Normalization, NearestNeighbors, PairDistance."""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend
from deepmetric.index import METRICS, Index
from deepmetric.layers import L2Normalization, NearestNeighbors, PairDistance


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


# ------------------------------------------------------------------ NearestNeighbors


def _data(seed=3, n=60, dim=8, queries=9):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype("float32"), rng.normal(size=(queries, dim))


@pytest.mark.parametrize("metric", METRICS)
def test_nearest_neighbors_equals_index_search(metric):
    candidates, queries = _data()
    index = Index(metric).add(candidates)
    distances, indices = NearestNeighbors(candidates, k=6, metric=metric)(queries)
    want = index.search(queries, k=6)
    np.testing.assert_array_equal(_np(indices), want.indices)
    np.testing.assert_allclose(_np(distances), want.distances, rtol=1e-5, atol=1e-5)
    assert _np(distances).dtype == np.float32 and _np(indices).dtype == np.int32


def test_search_and_pair_distance_stay_float32_under_mixed_precision():
    """A query at 1.0004 is nearer 2 than 0; rounded to float16 it would be 1.0, a tie
    that goes to 0."""
    candidates = np.array([[0.0], [2.0]], "float32")
    queries = np.array([[1.0004]], "float32")
    keras.config.set_dtype_policy("mixed_float16")
    distances, indices = NearestNeighbors(candidates, k=2)(queries)
    assert _np(indices).tolist() == [[1, 0]] and _np(distances).dtype == np.float32
    np.testing.assert_allclose(_np(distances), [[0.9996, 1.0004]], rtol=1e-5)
    d = PairDistance()([queries, candidates[:1]])
    np.testing.assert_allclose(_np(d), [1.0004], rtol=1e-6)


def test_as_layer_and_the_candidates_are_not_trained():
    candidates, queries = _data()
    layer = Index("cosine").add(candidates).as_layer(k=100)
    assert layer.k == 60 and layer.metric == "cosine"
    assert not layer.trainable_weights and len(layer.non_trainable_weights) == 1
    np.testing.assert_array_equal(_np(layer.candidates), candidates)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_model_with_search_loads_in_safe_mode(tmp_path, metric):
    """An embedder and the search in one .keras file: raw inputs in, neighbours out."""
    candidates, _ = _data(dim=4)
    inputs = keras.Input((5,))
    embedder = keras.Model(inputs, L2Normalization()(keras.layers.Dense(4)(inputs)))
    model = keras.Sequential([embedder, NearestNeighbors(candidates, k=3, metric=metric)])
    path = tmp_path / "search.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    raw = np.random.default_rng(4).normal(size=(7, 5)).astype("float32")
    distances, indices = loaded.predict(raw, verbose=0)
    want = Index(metric).add(candidates).search(_np(embedder(raw)), k=3)
    np.testing.assert_array_equal(indices, want.indices)
    np.testing.assert_allclose(distances, want.distances, rtol=1e-5, atol=1e-5)
    assert isinstance(loaded.layers[-1], NearestNeighbors)


def test_nearest_neighbors_config_round_trip():
    layer = NearestNeighbors(np.ones((4, 2)), k=2, metric="inner_product", name="nn")
    clone = NearestNeighbors.from_config(layer.get_config())
    assert (clone.k, clone.metric, clone.name) == (2, "inner_product", "nn")
    assert tuple(clone.candidates.shape) == (4, 2)
    assert "candidates" not in layer.get_config()  # the values live in the weights file


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.ones((3, 2)),), {"k": 4}, r"k.*\[1, 3\]"),
        ((np.ones((3, 2)),), {"k": 0}, "k"),
        ((np.ones((3, 2)),), {"metric": "hamming"}, "metric"),
        ((np.ones(3),), {}, "2-D"),
        ((None,), {"num_candidates": 3}, "dim"),
    ],
)
def test_nearest_neighbors_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NearestNeighbors(*args, **kwargs)


# ------------------------------------------------------------------ PairDistance


def _pair_reference(a, b, metric):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "euclidean":
        return np.sqrt(((a - b) ** 2).sum(-1))
    if metric == "squared_euclidean":
        return ((a - b) ** 2).sum(-1)
    if metric == "cosine":
        return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return -(a * b).sum(-1)


@pytest.mark.parametrize("metric", METRICS)
def test_pair_distance_values(metric):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    got = _np(PairDistance(metric)([a, b]))
    assert got.shape == (6,)
    np.testing.assert_allclose(got, _pair_reference(a, b, metric), rtol=1e-5, atol=1e-6)


def test_pair_distance_gradient_is_zero_at_zero_distance():
    """d = sqrt(sum (a - b)^2) at a = b: sqrt's derivative would be infinite."""
    b = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], "float32")
    layer = PairDistance()
    value, grad = _backend.value_and_grad(lambda a: ops.sum(layer([a, b])), b.copy())
    assert value == 0.0 and np.all(grad == 0.0)


def test_siamese_model_loads_in_safe_mode(tmp_path):
    tower = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    left, right = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([left, right], PairDistance("cosine")([tower(left), tower(right)]))
    path = tmp_path / "siamese.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(5, 3)).astype("float32"), rng.normal(size=(5, 3)).astype("float32")
    np.testing.assert_allclose(_np(loaded([a, b])), _np(model([a, b])), rtol=1e-6, atol=1e-6)
    assert loaded.layers[-1].get_config()["metric"] == "cosine"


def test_pair_distance_bad_input():
    with pytest.raises(ValueError, match="metric"):
        PairDistance("manhattan")
    with pytest.raises(ValueError, match="pair"):
        PairDistance()(np.zeros((2, 3)))
