"""Distances: TFA semantics, safe gradients at zero, the Distance objects and get()."""

import keras
import numpy as np
import pytest
from keras import ops

import deepmetric
from deepmetric import _backend, distances
from deepmetric.testing import references as ref


def _x(seed=0, b=6, d=3):
    return np.random.default_rng(seed).normal(size=(b, d)).astype("float32")


@pytest.mark.parametrize("squared", [False, True])
def test_pairwise_distance_matches_definition(squared):
    x = _x()
    got = ops.convert_to_numpy(distances.pairwise_distance(x, squared=squared))
    expected = ref.distance_matrix(x, "squared-L2" if squared else "L2")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.diag(got) == 0.0)


def test_angular_distance_matches_definition():
    x = _x(1)
    got = ops.convert_to_numpy(distances.angular_distance(x))
    np.testing.assert_allclose(got, ref.distance_matrix(x, "angular"), atol=1e-6)


def test_zero_distance_has_finite_zero_gradient():
    """Two identical rows: d = 0, and sqrt's gradient there would be infinite."""
    x = _x(2, b=3)
    x[1] = x[0]
    _, grad = _backend.value_and_grad(lambda v: ops.sum(distances.pairwise_distance(v)), x)
    assert np.all(np.isfinite(grad))
    numeric_rows = ref.numeric_grad(lambda v: ref.distance_matrix(v).sum(), x[[0, 2]][None, 1])
    assert numeric_rows.shape == (1, 3)
    _, grad_e = _backend.value_and_grad(
        lambda v: ops.sum(distances.EuclideanDistance()(v, ops.zeros_like(v))), np.zeros((2, 3))
    )
    assert np.all(grad_e == 0.0)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _snr_loop(q, r):
    """PML's SNRDistance from its definition, a pair at a time: var(r_j - q_i) / var(q_i)
    (unbiased variances over the components, as torch.var)."""
    q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
    out = np.empty((len(q), len(r)))
    for i in range(len(q)):
        for j in range(len(r)):
            out[i, j] = np.var(r[j] - q[i], ddof=1) / np.var(q[i], ddof=1)
    return out


def test_half_precision_inputs_compute_in_float32():
    x = _x(3).astype("float16")
    d = distances.pairwise_distance(x)
    assert keras.backend.standardize_dtype(d.dtype) == "float32"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("L2", lambda q, r: np.linalg.norm(q[:, None] - r[None], axis=-1)),
        ("squared-L2", lambda q, r: np.sum((q[:, None] - r[None]) ** 2, axis=-1)),
        (
            "cosine",
            lambda q, r: (
                (q / np.linalg.norm(q, axis=1, keepdims=True))
                @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
            ),
        ),
        ("dot", lambda q, r: q @ r.T),
        ("snr", lambda q, r: _snr_loop(_unit(q), _unit(r))),
        (
            "lp",
            lambda q, r: np.sqrt(
                (
                    (
                        (q / np.linalg.norm(q, axis=1, keepdims=True))[:, None]
                        - (r / np.linalg.norm(r, axis=1, keepdims=True))[None]
                    )
                    ** 2
                ).sum(-1)
            ),
        ),
        (
            "angular",
            lambda q, r: (
                1
                - (q / np.linalg.norm(q, axis=1, keepdims=True))
                @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
            ),
        ),
    ],
)
def test_distance_objects_query_reference_and_paired(name, expected):
    q, r = _x(4, b=5), _x(5, b=7)
    distance = distances.get(name)
    got = ops.convert_to_numpy(distance(q, r))
    np.testing.assert_allclose(got, expected(q.astype(np.float64), r), rtol=1e-4, atol=1e-5)
    paired = ops.convert_to_numpy(distance.paired(q, r[:5]))
    np.testing.assert_allclose(
        paired, np.diag(expected(q.astype(np.float64), r[:5])), rtol=1e-4, atol=1e-5
    )
    assert distance.larger_is_closer == (name in ("cosine", "dot"))


def test_distance_serialization_round_trip():
    for distance in (
        distances.EuclideanDistance(squared=True),
        distances.CosineSimilarity(),
        distances.LpDistance(normalize_embeddings=False, power=2),
        distances.DotProductSimilarity(normalize_embeddings=True),
        distances.SNRDistance(normalize_embeddings=False),
    ):
        config = keras.saving.serialize_keras_object(distance)
        assert keras.saving.deserialize_keras_object(config) == distance
        assert distances.get(config) == distance


def test_get_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown `distance`: 'manhattan'. Allowed names: .*'l2'"):
        distances.get("manhattan")
    with pytest.raises(TypeError, match="must be a name"):
        distances.get(3)


def test_embeddings_must_be_rank_two():
    with pytest.raises(ValueError, match=r"rank-2.*embeddings.shape=\(2, 3, 4\)"):
        distances.pairwise_distance(np.zeros((2, 3, 4), "float32"))


@pytest.mark.parametrize("name", ["L2", "squared-L2", "angular", "cosine", "dot", "lp", "snr"])
def test_matrix_rows_of_a_self_comparison_equal_the_whole_matrix(name):
    """`matrix(x[index], x, self_index=index)` is those rows of `matrix(x)` (self-pairs
    included, exactly 0 for the Euclidean distances); `rows` is the same entry point."""
    x = ops.convert_to_tensor(_x(6, b=7))
    distance = distances.get(name)
    whole = ops.convert_to_numpy(distance.matrix(x))
    index = np.array([5, 0, 3], "int32")
    block = distance.matrix(ops.take(x, index, axis=0), x, self_index=index)
    np.testing.assert_allclose(ops.convert_to_numpy(block), whole[index], rtol=1e-6, atol=1e-6)
    rows = distance.rows(ops.take(x, index, axis=0), x, index)
    np.testing.assert_array_equal(ops.convert_to_numpy(rows), ops.convert_to_numpy(block))
    np.testing.assert_allclose(ops.convert_to_numpy(distance(x)), whole, rtol=1e-6, atol=1e-6)
    if name in ("L2", "squared-L2", "lp", "snr"):
        assert np.all(np.diag(whole) == 0.0)


def test_pml_distances_by_name_and_options():
    """PML's LpDistance options and DotProductSimilarity(normalize_embeddings=True) == cosine."""
    x = _x(7, b=6)
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    squared = ((u[:, None] - u[None]) ** 2).sum(-1)
    lp = distances.get("LpDistance")
    assert lp == distances.LpDistance() and not lp.larger_is_closer
    np.testing.assert_allclose(
        ops.convert_to_numpy(distances.LpDistance(power=2)(x)), squared, rtol=1e-5, atol=1e-6
    )
    raw = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1) ** 0.5
    np.testing.assert_allclose(
        ops.convert_to_numpy(distances.LpDistance(normalize_embeddings=False)(x)),
        raw,
        rtol=1e-5,
        atol=1e-5,
    )
    normalised = distances.DotProductSimilarity(normalize_embeddings=True)(x)
    np.testing.assert_allclose(ops.convert_to_numpy(normalised), u @ u.T, rtol=1e-5, atol=1e-6)
    assert distances.get("CosineSimilarity") == distances.CosineSimilarity()
    with pytest.raises(ValueError, match="`p` must be 2"):
        distances.LpDistance(p=1)


def test_snr_distance_without_normalisation_duplicates_and_constant_rows():
    """Unnormalised rows against the loop (scale matters: the query's variance is the signal);
    a duplicate row is exactly 0 (the matrix-product form's rounding is floored), a constant
    row gives finite values, `paired` is the diagonal."""
    x = _x(8, b=6, d=5) * np.array([[1.0], [3.0], [0.2], [1.0], [2.0], [1.0]], "float32")
    x[3] = x[0]
    distance = distances.get("SNRDistance")
    assert distance == distances.SNRDistance() and not distance.larger_is_closer
    raw = distances.SNRDistance(normalize_embeddings=False)
    got = ops.convert_to_numpy(raw(x))
    np.testing.assert_allclose(got, _snr_loop(x, x), rtol=1e-4, atol=1e-5)
    assert got[0, 3] == 0.0 and got[3, 0] == 0.0
    assert not np.allclose(got, got.T)  # not symmetric
    paired = ops.convert_to_numpy(raw.paired(x[:3], x[3:]))
    np.testing.assert_allclose(paired, np.diag(_snr_loop(x[:3], x[3:])), rtol=1e-4, atol=1e-6)
    constant = np.concatenate([np.full((1, 5), 2.0, "float32"), x[:2]])
    assert np.all(np.isfinite(ops.convert_to_numpy(raw(constant))))


def test_snr_distance_gradient_equals_central_differences():
    x = _x(9, b=5, d=4)
    distance = distances.SNRDistance()
    weights = np.random.default_rng(1).uniform(0.5, 1.5, size=(5, 5))

    def objective(v):
        return ops.sum(distance(v) * ops.convert_to_tensor(weights, "float32"))

    value, grad = _backend.value_and_grad(objective, x)
    assert float(value) == pytest.approx(
        float((_snr_loop(_unit(x), _unit(x)) * weights).sum()), rel=1e-4
    )
    numeric = ref.numeric_grad(lambda v: (_snr_loop(_unit(v), _unit(v)) * weights).sum(), x)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="compares with PML (torch)")
def test_snr_distance_equals_pml():
    pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
    x = _x(10, b=7, d=6)
    weights = np.random.default_rng(2).uniform(0.5, 1.5, size=(7, 7)).astype("float32")
    for ours, theirs in (
        (distances.SNRDistance(), pml_distances.SNRDistance()),
        (
            distances.SNRDistance(normalize_embeddings=False),
            pml_distances.SNRDistance(normalize_embeddings=False),
        ),
    ):
        got = _backend.value_and_grad(
            lambda v, d=ours: ops.sum(d(v) * ops.convert_to_tensor(weights)), x
        )
        expected = _backend.value_and_grad(
            lambda v, d=theirs: ops.sum(d(v) * ops.convert_to_tensor(weights)), x
        )
        assert float(got[0]) == pytest.approx(float(expected[0]), rel=1e-5)
        np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-5)


def test_a_callable_distance_builds_only_the_whole_batch():
    distance = distances.get(lambda v: distances.pairwise_distance(v))
    x = _x(7, b=4)
    np.testing.assert_allclose(
        ops.convert_to_numpy(distance(x)),
        ops.convert_to_numpy(distances.pairwise_distance(x)),
    )
    with pytest.raises(ValueError, match="cannot compare against reference embeddings"):
        distance(x, x)


def test_float64_input_keeps_float64_on_tensorflow_only():
    """What docs/losses.md says: JAX converts float64 input to float32, PyTorch's matmul
    returns float32 for it, TensorFlow keeps float64 (distances and losses alike)."""
    x = np.random.default_rng(0).normal(size=(8, 4))
    labels = np.repeat(np.arange(4), 2)
    expected = "float64" if keras.backend.backend() == "tensorflow" else "float32"
    for value in (
        distances.pairwise_distance(x),
        deepmetric.losses.TripletSemiHardLoss()(labels, x),
        deepmetric.losses.multi_similarity_loss(labels, x),
    ):
        assert keras.backend.standardize_dtype(value.dtype) == expected
