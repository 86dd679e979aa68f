"""Cross-batch memory: the FIFO queue, the loss against batch + memory, training and saving."""

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, losses, xbm

BACKEND = keras.backend.backend()

LOSSES = {
    "multi_similarity": (losses.multi_similarity_loss, losses.MultiSimilarityLoss),
    "circle": (losses.circle_loss, losses.CircleLoss),
    "sup_con": (losses.sup_con_loss, losses.SupConLoss),
    "nt_xent": (losses.nt_xent_loss, losses.NTXentLoss),
    "online_contrastive": (losses.online_contrastive_loss, losses.OnlineContrastiveLoss),
    "triplet": (losses.triplet_loss, losses.TripletLoss),
}
NAMES = list(LOSSES)


def batch(seed, b=6, d=4, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b).astype("int32"), rng.normal(size=(b, d)).astype("float32")


def _np(x):
    return ops.convert_to_numpy(x)


def _state(layer):
    return (
        _np(layer.memory_embeddings.value),
        _np(layer.memory_labels.value),
        int(_np(layer.pointer.value)),
        int(_np(layer.filled.value)),
    )


def _fifo(batches, memory_size, dim):
    """The queue written one row at a time, the way the paper describes it."""
    memory = np.zeros((memory_size, dim), np.float32)
    labels = np.zeros(memory_size, np.int32)
    pointer = filled = 0
    for y, x in batches:
        for row in range(len(y)):
            memory[pointer], labels[pointer] = x[row], y[row]
            pointer = (pointer + 1) % memory_size
            filled = min(filled + 1, memory_size)
    return memory, labels, pointer, filled


def _mean(values):
    return float(_np(ops.mean(values)))


# --- The queue. ---


@pytest.mark.parametrize("memory_size, sizes", [(5, [2, 2, 2, 2]), (5, [3, 4, 1]), (4, [7, 2])])
def test_queue_is_fifo_with_wrap_around(memory_size, sizes):
    """Batches of varying size, one larger than the memory (its last rows are kept)."""
    layer = xbm.CrossBatchMemory(losses.MultiSimilarityLoss(), memory_size=memory_size)
    batches = [batch(seed, b=size) for seed, size in enumerate(sizes)]
    for y, x in batches:
        out = layer([x, y], training=True)
        np.testing.assert_array_equal(_np(out), x)  # the layer passes the embeddings through
    memory, labels, pointer, filled = _state(layer)
    expected = _fifo(batches, memory_size, 4)
    np.testing.assert_array_equal(memory, expected[0])
    np.testing.assert_array_equal(labels, expected[1])
    assert (pointer, filled) == expected[2:]


def test_no_update_outside_training_and_identity_without_labels():
    layer = xbm.CrossBatchMemory(losses.MultiSimilarityLoss(), memory_size=8)
    y, x = batch(0)
    layer([x, y], training=True)
    before = _state(layer)
    layer([x + 1.0, y], training=False)
    layer([x + 2.0, y])
    out = layer(x + 3.0, training=True)
    np.testing.assert_array_equal(_np(out), x + 3.0)
    assert not layer.losses  # embeddings alone: no loss, no update
    after = _state(layer)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2:] == before[2:] == (6, 6)


def test_reset_memory():
    layer = xbm.CrossBatchMemory(losses.SupConLoss(), memory_size=8)
    y, x = batch(1)
    layer([x, y], training=True)
    layer.reset_memory()
    memory, labels, pointer, filled = _state(layer)
    assert not memory.any() and not labels.any() and (pointer, filled) == (0, 0)


# --- The value: the wrapped loss on batch + memory. ---


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force_multi_similarity(y, x, memory_y, memory_x, alpha=2.0, beta=50.0, base=0.5):
    """MS loss over the pairs (batch i, batch j != i) and (batch i, filled memory slot)."""
    q = _unit(np.asarray(x, np.float64))
    ref = np.concatenate([q, _unit(np.asarray(memory_x, np.float64))])
    ref_y = np.concatenate([y, memory_y])
    rows = []
    for i in range(len(q)):
        others = [j for j in range(len(ref)) if j != i]
        pos = [q[i] @ ref[j] for j in others if ref_y[j] == y[i]]
        neg = [q[i] @ ref[j] for j in others if ref_y[j] != y[i]]
        rows.append(
            np.log1p(sum(np.exp(-alpha * (s - base)) for s in pos)) / alpha
            + np.log1p(sum(np.exp(beta * (s - base)) for s in neg)) / beta
        )
    return float(np.mean(rows))


def test_value_and_gradient_match_brute_force():
    """After two steps (memory of 16 holding 12 rows), a third batch: the loss and its gradient
    equal the multi-similarity loss over batch pairs without self pairs plus the filled slots."""
    layer = xbm.CrossBatchMemory(losses.MultiSimilarityLoss(), memory_size=16)
    for seed in (1, 2):
        layer(list(reversed(batch(seed))), training=True)
    memory, memory_y, _, filled = _state(layer)
    y, x = batch(3)
    value, grad = _backend.value_and_grad(lambda v, lab: ops.mean(layer.memory_loss(v, lab)), x, y)
    expected = _brute_force_multi_similarity(y, x, memory_y[:filled], memory[:filled])
    assert float(value) == pytest.approx(expected, rel=1e-5)
    h, expected_grad = 1e-6, np.zeros(x.shape)
    for index in np.ndindex(*x.shape):
        step = np.zeros(x.shape)
        step[index] = h
        expected_grad[index] = (
            _brute_force_multi_similarity(y, x + step, memory_y[:filled], memory[:filled])
            - _brute_force_multi_similarity(y, x - step, memory_y[:filled], memory[:filled])
        ) / (2 * h)
    np.testing.assert_allclose(grad, expected_grad, rtol=2e-3, atol=2e-3 * np.abs(grad).max())


@pytest.mark.parametrize("name", NAMES)
def test_added_loss_equals_wrapped_loss_on_batch_and_memory(name):
    """The added loss is the wrapped loss's function with the batch and the filled slots as
    references and each example's pair with itself masked out, computed before the enqueue."""
    fn, cls = LOSSES[name]
    layer = xbm.CrossBatchMemory(cls(), memory_size=10)
    for seed in (4, 5):  # 12 rows into 10 slots: wrapped around
        layer(list(reversed(batch(seed))), training=True)
    memory, memory_y, _, filled = _state(layer)
    assert filled == 10
    y, x = batch(6)
    layer([x, y], training=True)
    (added,) = layer.losses
    reference = np.concatenate([x, memory])
    mask = np.concatenate([~np.eye(6, dtype=bool), np.ones((6, 10), bool)], axis=1)
    expected = fn(
        y,
        x,
        reference_embeddings=reference,
        reference_labels=np.concatenate([y, memory_y]),
        reference_mask=mask,
    )
    assert float(_np(added)) == pytest.approx(_mean(expected), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_unfilled_slots_are_ignored(name):
    """With 6 of 40 slots filled, garbage in the other 34 (labels equal to the batch's, large
    embeddings) changes nothing, and the value equals a memory of exactly 6 full slots."""
    cls = LOSSES[name][1]
    big = xbm.CrossBatchMemory(cls(), memory_size=40)
    exact = xbm.CrossBatchMemory(cls(), memory_size=6)
    first = list(reversed(batch(7)))
    big(first, training=True)
    exact(first, training=True)
    y, x = batch(8)
    clean = _mean(big.memory_loss(x, y))
    memory, labels, _, _ = _state(big)
    memory[6:] = 10.0 * np.random.default_rng(0).normal(size=(34, 4))
    labels[6:] = np.resize(y, 34)
    big.memory_embeddings.assign(memory)
    big.memory_labels.assign(labels)
    assert _mean(big.memory_loss(x, y)) == pytest.approx(clean, rel=1e-6, abs=1e-7)
    assert _mean(exact.memory_loss(x, y)) == pytest.approx(clean, rel=1e-5, abs=1e-6)


def test_empty_memory_equals_loss_on_the_batch():
    fn, cls = LOSSES["sup_con"]
    layer = xbm.CrossBatchMemory(cls(), memory_size=8)
    y, x = batch(9)
    assert _mean(layer.memory_loss(x, y)) == pytest.approx(_mean(fn(y, x)), rel=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="pytorch-metric-learning runs on torch only")
@pytest.mark.parametrize(
    "name, pml_name",
    [("multi_similarity", "MultiSimilarityLoss"), ("online_contrastive", "ContrastiveLoss")],
)
def test_values_equal_pytorch_metric_learning(name, pml_name):
    """PML's memory includes the current batch: ours with M equals PML's with M + B, step by
    step, through the filling phase and the wrap-around."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch = pytest.importorskip("torch")
    b, m = 6, 10
    theirs = pml.CrossBatchMemory(getattr(pml, pml_name)(), embedding_size=4, memory_size=m + b)
    ours = xbm.CrossBatchMemory(LOSSES[name][1](), memory_size=m)
    for seed in range(5):
        y, x = batch(20 + seed, b=b)
        ours([x, y], training=True)
        (value,) = ours.losses
        expected = theirs(torch.tensor(x), torch.tensor(y, dtype=torch.long))
        assert float(_np(value)) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


# --- Training, saving, config. ---


def _data(seed=0, n=48, classes=4):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes).astype("int32")
    centers = rng.normal(size=(classes, 6))
    x = (centers[y] + 0.8 * rng.normal(size=(n, 6))).astype("float32")
    order = rng.permutation(n)
    return x[order], y[order]


def _trainer(memory_size=20):
    keras.utils.set_random_seed(0)
    embedder = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)], name="embedder")
    images = keras.Input((6,))
    labels = keras.Input((), dtype="int32")
    layer = xbm.CrossBatchMemory(losses.MultiSimilarityLoss(), memory_size=memory_size)
    model = keras.Model([images, labels], layer([embedder(images), labels]))
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    return model, embedder, layer


def test_fit_lowers_the_loss_and_updates_the_memory_under_compilation(tmp_path):
    """The documented pattern: labels as a second input, `loss=None`, embedder for inference.
    48 examples in batches of 8 for 5 epochs: 240 rows through a memory of 18. The first epoch's
    loss is low while the memory fills (fewer pairs), so the loss is compared from the second
    epoch on, and the plain multi-similarity loss of the whole data set before and after."""
    model, embedder, layer = _trainer(memory_size=18)
    x, y = _data()
    before = _mean(losses.multi_similarity_loss(y, embedder(x)))
    history = model.fit((x, y), batch_size=8, epochs=5, shuffle=False, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < loss[1]
    assert _mean(losses.multi_similarity_loss(y, embedder(x))) < before - 0.1
    memory, labels, pointer, filled = _state(layer)
    assert (pointer, filled) == (240 % 18, 18)
    # The memory holds the stop-gradient embeddings of the last 18 rows seen, in slot order.
    np.testing.assert_array_equal(labels, np.roll(y[-18:], pointer))
    assert np.all(np.isfinite(memory)) and np.abs(memory).sum() > 0
    assert embedder.predict(x[:3], verbose=0).shape == (3, 4)

    # Saved with the model, loaded in safe mode without custom_objects.
    path = str(tmp_path / "trainer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    loaded_layer = loaded.layers[-1]
    assert type(loaded_layer) is xbm.CrossBatchMemory
    assert loaded_layer.get_config() == layer.get_config()
    for got, want in zip(_state(loaded_layer), _state(layer), strict=True):
        np.testing.assert_array_equal(got, want)
    # The loaded model computes the same loss and can go on training.
    y_eval, x_eval = y[:8], x[:8]
    assert loaded.evaluate((x_eval, y_eval), verbose=0) == pytest.approx(
        model.evaluate((x_eval, y_eval), verbose=0), rel=1e-5
    )


def test_get_config_round_trip():
    layer = xbm.CrossBatchMemory(
        losses.CircleLoss(margin=0.25, gamma=32.0, reduction="sum"), memory_size=7, name="mem"
    )
    config = layer.get_config()
    assert config["memory_size"] == 7 and config["name"] == "mem"
    restored = xbm.CrossBatchMemory.from_config(config)
    assert type(restored.loss) is losses.CircleLoss
    assert restored.loss.get_config() == layer.loss.get_config()
    assert restored.get_config() == config
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is xbm.CrossBatchMemory and again.get_config() == config


# --- Bad arguments. ---


@pytest.mark.parametrize("memory_size", [0, -3, 2.5, True, None])
def test_bad_memory_size(memory_size):
    with pytest.raises(ValueError, match=r"`memory_size` must be a positive integer.*Received"):
        xbm.CrossBatchMemory(losses.MultiSimilarityLoss(), memory_size=memory_size)


@pytest.mark.parametrize(
    "loss",
    [losses.TripletSemiHardLoss(), keras.losses.MeanSquaredError(), "multi_similarity_loss"],
    ids=["triplet-semihard", "mse", "string"],
)
def test_loss_without_references_is_rejected(loss):
    with pytest.raises(TypeError, match=r"`loss` must be a deepmetric loss that accepts reference"):
        xbm.CrossBatchMemory(loss, memory_size=8)


def test_unreduced_loss_and_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"`loss.reduction` must reduce to a scalar.*'none'"):
        xbm.CrossBatchMemory(losses.SupConLoss(reduction="none"), memory_size=8)
    layer = xbm.CrossBatchMemory(losses.SupConLoss(), memory_size=8)
    y, x = batch(0)
    with pytest.raises(ValueError, match="Received a list of 3 inputs"):
        layer([x, y, y])
    with pytest.raises(ValueError, match=r"expected 6 labels.*\(5,\)"):
        layer([x, y[:5]], training=True)


@pytest.mark.parametrize("name", ["sup_con", "circle"])
def test_a_nonfinite_embedding_gives_a_nan_loss_and_an_empty_batch_an_error(name):
    """Issue 12: SupCon and circle gave 0 for a NaN; through the memory the loss is NaN too,
    whether the NaN is in the batch or already in the memory."""
    layer = xbm.CrossBatchMemory(LOSSES[name][1](), memory_size=8)
    y, x = batch(0)
    bad = x.copy()
    bad[1, 0] = np.nan
    assert np.all(np.isnan(ops.convert_to_numpy(layer.memory_loss(bad, y))))
    layer([bad, y], training=True)  # the NaN row enters the memory
    assert np.all(np.isnan(ops.convert_to_numpy(layer.memory_loss(x, y))))
    with pytest.raises(ValueError, match=r"`embeddings` must hold at least one example"):
        layer.memory_loss(x[:0], y[:0])


def test_mixed_bfloat16_policy_keeps_a_float32_memory_and_loss():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = xbm.CrossBatchMemory(losses.MultiSimilarityLoss(), memory_size=12)
    y, x = batch(10)
    layer([ops.cast(x, "bfloat16"), y + 1000], training=True)
    layer([ops.cast(x, "bfloat16"), y + 1001], training=True)
    (value,) = layer.losses
    assert keras.backend.standardize_dtype(layer.memory_embeddings.dtype) == "float32"
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    memory, labels, _, _ = _state(layer)
    np.testing.assert_array_equal(labels, np.concatenate([y + 1000, y + 1001]))  # kept apart
    x16 = _np(ops.cast(ops.cast(x, "bfloat16"), "float32"))
    np.testing.assert_array_equal(memory, np.concatenate([x16, x16]))
