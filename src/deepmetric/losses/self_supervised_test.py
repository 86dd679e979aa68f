"""VICReg and SelfSupervisedLoss against pytorch-metric-learning, a numpy form, and Keras."""

import os
import tempfile

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses

BACKEND = keras.backend.backend()
torch_only = pytest.mark.skipif(
    BACKEND != "torch", reason="pytorch-metric-learning runs on the torch backend only"
)


def views(seed, b=10, d=6):
    return np.random.default_rng(seed).normal(size=(b, 2, d)).astype("float32")


def ref_vicreg(y, invariance_lambda=25.0, variance_mu=25.0, covariance_v=1.0, eps=1e-4):
    """The paper's terms in float64, with PML's halving of each view's variance term."""
    z1, z2 = np.asarray(y[:, 0], np.float64), np.asarray(y[:, 1], np.float64)
    invariance = np.mean(np.sum((z1 - z2) ** 2, axis=1)) / z1.shape[1]
    total = invariance_lambda * invariance
    for z in (z1, z2):
        std = np.sqrt(z.var(axis=0, ddof=1) + eps)
        cov = np.cov(z, rowvar=False)
        off = cov - np.diag(np.diag(cov))
        total += variance_mu * np.mean(np.maximum(1 - std, 0)) / 2
        total += covariance_v * np.sum(off**2) / z.shape[1]
    return total


def _value_and_grad(loss, y, compiled=False):
    return _backend.value_and_grad(lambda v: loss(None, v), y, compiled=compiled)


def _assert_close(ours, theirs, rtol=1e-4):
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=rtol, abs=1e-6)
    scale = max(float(np.max(np.abs(theirs[1]))), 1e-3)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.parametrize(
    "options", [{}, {"invariance_lambda": 5.0, "variance_mu": 2.0, "covariance_v": 3.0}]
)
def test_vicreg_matches_numpy(options):
    y = views(0)
    y[:, :, 0] *= 0.1  # a dimension whose standard deviation is below 1
    value = float(ops.convert_to_numpy(losses.VICRegLoss(**options)(None, y)))
    assert value == pytest.approx(ref_vicreg(y, **options), rel=1e-5)


@torch_only
@pytest.mark.parametrize("options", [{}, {"invariance_lambda": 5.0, "eps": 1e-2}])
def test_vicreg_equals_pytorch_metric_learning(options):
    import pytorch_metric_learning.losses as pml

    y = views(1)
    theirs = _backend.value_and_grad(
        lambda v: pml.VICRegLoss(**options)(v[:, 0], ref_emb=v[:, 1]), y
    )
    _assert_close(_value_and_grad(losses.VICRegLoss(**options), y), theirs)


# The deepmetric loss and the PML loss of the same name for `SelfSupervisedLoss`.
WRAPPED: dict[str, tuple[str, dict[str, float]]] = {
    "NTXentLoss": ("NTXentLoss", {}),
    "SupConLoss": ("SupConLoss", {}),
    "TupletMarginLoss": ("TupletMarginLoss", {}),
    "OnlineContrastiveLoss": ("ContrastiveLoss", {}),
    "MultiSimilarityLoss": ("MultiSimilarityLoss", {}),
}


@torch_only
@pytest.mark.parametrize("name", list(WRAPPED))
@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_equals_pytorch_metric_learning(name, symmetric):
    import pytorch_metric_learning.losses as pml

    pml_name, options = WRAPPED[name]
    y = views(2)
    ours = losses.SelfSupervisedLoss(getattr(losses, name)(**options), symmetric=symmetric)
    theirs = pml.SelfSupervisedLoss(getattr(pml, pml_name)(**options), symmetric=symmetric)
    _assert_close(
        _value_and_grad(ours, y),
        _backend.value_and_grad(lambda v: theirs(v[:, 0], v[:, 1]), y),
    )


def test_self_supervised_symmetric_is_the_loss_on_both_views():
    """Labels [0..B-1, 0..B-1] over the 2B embeddings; each example the mean of its views."""
    y = views(3)
    inner = losses.NTXentLoss(temperature=0.2)
    both = np.concatenate([y[:, 0], y[:, 1]])
    labels = np.concatenate([np.arange(10), np.arange(10)])
    expected = float(ops.convert_to_numpy(inner(labels, both)))
    got = float(ops.convert_to_numpy(losses.SelfSupervisedLoss(inner)(None, y)))
    assert got == pytest.approx(expected, rel=1e-6)
    assert type(losses.SelfSupervisedLoss().loss) is losses.NTXentLoss  # SimCLR by default


@pytest.mark.skipif(BACKEND == "torch", reason="torch runs eagerly when compiled")
@pytest.mark.parametrize("which", ["vicreg", "self_supervised"])
def test_eager_equals_compiled(which):
    loss = (
        losses.VICRegLoss()
        if which == "vicreg"
        else losses.SelfSupervisedLoss(losses.NTXentLoss(), symmetric=False)
    )
    y = views(4)
    eager, compiled = _value_and_grad(loss, y), _value_and_grad(loss, y, compiled=True)
    assert float(compiled[0]) == pytest.approx(float(eager[0]), rel=1e-5)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["vicreg", "self_supervised"])
def test_config_and_keras_save_load(which):
    loss = (
        losses.VICRegLoss(invariance_lambda=10.0, eps=1e-3, reduction="sum")
        if which == "vicreg"
        else losses.SelfSupervisedLoss(losses.SupConLoss(temperature=0.3), symmetric=False)
    )
    config = loss.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss) and restored.get_config() == config
    inputs = keras.Input((2, 4))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer="sgd", loss=loss)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.loss) is type(loss) and loaded.loss.get_config() == config
    y = ops.convert_to_numpy(model(views(5, d=4)))
    expected = float(ops.convert_to_numpy(loss(None, y)))
    assert float(ops.convert_to_numpy(loaded.loss(None, y))) == pytest.approx(expected, rel=1e-6)


def test_fit_lowers_vicreg():
    inputs = keras.Input((2, 4))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=losses.VICRegLoss())
    y = views(6, b=16, d=4)
    history = model.fit(y, np.zeros(16), batch_size=16, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_sample_weight_and_one_example():
    y = views(7)
    per_example = ops.convert_to_numpy(losses.vicreg_loss(y[:, 0], y[:, 1]))
    weights = np.linspace(0.0, 2.0, 10)
    got = float(ops.convert_to_numpy(losses.VICRegLoss()(None, y, sample_weight=weights)))
    assert got == pytest.approx(float(np.mean(per_example * weights)), rel=1e-5)
    for loss in (losses.VICRegLoss(), losses.SelfSupervisedLoss(losses.NTXentLoss())):
        value, grad = _value_and_grad(loss, y[:1])
        assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"shape \(batch_size, 2, embedding_dim\)"):
        losses.VICRegLoss()(None, np.zeros((4, 3, 2), "float32"))
    with pytest.raises(ValueError, match="`eps` must be a finite number > 0"):
        losses.VICRegLoss(eps=0.0)
    with pytest.raises(ValueError, match="`variance_mu` must be a finite number >= 0"):
        losses.vicreg_loss(np.ones((2, 2)), np.ones((2, 2)), variance_mu=-1.0)
    with pytest.raises(TypeError, match="`loss` must be a deepmetric loss"):
        losses.SelfSupervisedLoss(keras.losses.MeanSquaredError())
    with pytest.raises(ValueError, match="RankedListLoss does not take"):
        losses.SelfSupervisedLoss(losses.RankedListLoss(), symmetric=False)
