"""Losses computed over blocks of anchor rows equal the one-block computation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, _blocks, distances, losses


def batch(seed, size=26, dim=5):
    """Uneven classes (one singleton) so blocks see anchors without positives."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.repeat(np.arange(6), 4), [6, 7]])[:size].astype("int32")
    rng.shuffle(labels)
    x = rng.normal(size=(size, dim)).astype("float32")
    return labels, x


BATCH_LOSSES = [
    (losses.TripletSemiHardLoss, {}),
    (losses.TripletSemiHardLoss, {"distance_metric": "angular"}),
    (losses.TripletSemiHardLoss, {"distance_metric": distances.CosineSimilarity()}),
    (losses.TripletHardLoss, {}),
    (losses.TripletHardLoss, {"soft": True, "distance_metric": "squared-L2"}),
    (losses.TripletBatchAllLoss, {}),
    (losses.TripletBatchAllLoss, {"squared": True}),
    (losses.LiftedStructLoss, {}),
    (losses.MultiSimilarityLoss, {}),
    (losses.CircleLoss, {}),
    (losses.SupConLoss, {}),
    (losses.NTXentLoss, {}),
    (losses.OnlineContrastiveLoss, {}),
    (losses.TripletLoss, {}),
    (losses.TripletLoss, {"positive_mining": "hard", "negative_mining": "hard"}),
    (losses.TripletLoss, {"negative_mining": "semi-hard", "distance": "cosine"}),
    (losses.TripletLoss, {"positive_mining": "easy", "negative_mining": "all"}),
    (losses.TripletLoss, {"positive_mining": "hard", "negative_mining": "semi-hard"}),
    (losses.TripletLoss, {"soft_margin": True, "average_nonzero": True}),
    (losses.NCALoss, {}),
    (losses.SignalToNoiseRatioContrastiveLoss, {}),
    (losses.GeneralizedLiftedStructureLoss, {}),
    (losses.IntraPairVarianceLoss, {}),
    (losses.TupletMarginLoss, {"scale": 16.0}),
    (losses.MarginLoss, {}),
    (losses.ThresholdConsistentMarginLoss, {}),
    (losses.RankedListLoss, {}),
    (losses.LiftedStructureLoss, {}),
    (losses.LiftedStructureLoss, {"neg_margin": 0.4, "pos_margin": 0.2}),
    (losses.AngularLoss, {}),
]


def _ids(params):
    cls, kwargs = params
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kwargs.items())


# Every configuration eagerly; compiled, one per code path of the blocks (the row driver with
# mining order, the lifted loss's two passes, the driver on normalised rows, a similarity, the
# intra-pair variance loss's two passes, the lifted structure loss's two passes, the angular
# loss's blocks of positive rows inside blocks of anchors),
# except on torch, which runs eagerly when compiled.
COMPILED = (
    [BATCH_LOSSES[i] for i in (2, 7, 8, 14, 22, 27, 29)] if _backend.name() != "torch" else []
)
CASES = [(p, False) for p in BATCH_LOSSES] + [(p, True) for p in COMPILED]


@pytest.mark.parametrize(
    "params, compiled",
    CASES,
    ids=[_ids(p) + ("-compiled" if c else "-eager") for p, c in CASES],
)
def test_blocks_equal_one_block(params, compiled, monkeypatch):
    cls, kwargs = params
    labels, x = batch(1)
    loss = cls(**kwargs)

    def fn(v, lab):
        return loss(lab, v)

    expected = _backend.value_and_grad(fn, x, labels, compiled=compiled)
    # 26 anchors x 26 references in blocks of 5 rows: six blocks, the last one padded.
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 5 * 26)
    assert _blocks.block_size(26, 26) == 5
    got = _backend.value_and_grad(fn, x, labels, compiled=compiled)
    assert float(got[0]) == pytest.approx(float(expected[0]), rel=1e-5, abs=1e-7)
    scale = np.max(np.abs(expected[1]))
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-5 * scale)
    assert float(expected[0]) > 0.0


REFERENCE_LOSSES = [
    losses.multi_similarity_loss,
    losses.circle_loss,
    losses.sup_con_loss,
    losses.nt_xent_loss,
    losses.online_contrastive_loss,
    losses.triplet_loss,
    losses.angular_loss,
]


@pytest.mark.parametrize("mask_rank", [0, 1, 2])
@pytest.mark.parametrize("fn", REFERENCE_LOSSES, ids=lambda f: f.__name__)
def test_blocks_with_a_reference_set(fn, mask_rank, monkeypatch):
    labels, x = batch(2)
    ref_labels, reference = batch(3, size=20)
    rng = np.random.default_rng(4)
    mask = {
        0: None,
        1: rng.random(20) > 0.3,
        2: rng.random((26, 20)) > 0.3,
    }[mask_rank]

    def loss(v, lab):
        per_anchor = fn(
            lab,
            v,
            reference_embeddings=reference,
            reference_labels=ref_labels,
            reference_mask=mask,
        )
        return ops.mean(per_anchor)

    expected = _backend.value_and_grad(loss, x, labels)
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 6 * 20)
    got = _backend.value_and_grad(loss, x, labels)
    assert float(got[0]) == pytest.approx(float(expected[0]), rel=1e-5, abs=1e-7)
    scale = np.max(np.abs(expected[1]))
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-4, atol=1e-5 * scale)


def test_lifted_structure_blocks_in_a_one_class_batch(monkeypatch):
    """No negative pair: 0 and a zero gradient, blocked as in one block (no NaN from the
    rows' empty log-sum-exps)."""
    _, x = batch(7)
    labels = np.zeros(26, "int32")

    def fn(v, lab):
        return ops.mean(losses.lifted_structure_loss(lab, v))

    expected = _backend.value_and_grad(fn, x, labels)
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 5 * 26)
    got = _backend.value_and_grad(fn, x, labels)
    assert float(expected[0]) == float(got[0]) == 0.0
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[1], np.zeros_like(x))


def test_a_callable_distance_stays_one_block(monkeypatch):
    """A callable `distance_metric` only builds the whole matrix: never split."""
    labels, x = batch(5)
    calls = []

    def metric(v):
        calls.append(tuple(v.shape))
        return distances.pairwise_distance(v)

    expected = float(losses.triplet_semihard_loss(labels, x))
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 5 * 26)
    got = float(losses.triplet_semihard_loss(labels, x, distance_metric=metric))
    assert calls == [(26, 5)]
    assert got == pytest.approx(expected, rel=1e-5)


def test_block_size():
    assert _blocks.block_size(4096, 4096) is None  # 2^24 entries: one block
    assert _blocks.block_size(8192, 8192) == 2048
    assert _blocks.block_size(16384, 16384) == 1024
    assert _blocks.block_size(None, 16384) is None  # unknown while tracing: one block
    assert _blocks.block_size(10, 10, max_entries=7) == 1


def test_map_rows_covers_every_row_once():
    seen = []

    def fn(index, rows, shared):
        seen.append(tuple(index.shape))
        return (ops.cast(index, "float32") + ops.sum(shared) * 0.0, rows * 2.0)

    rows = ops.convert_to_tensor(np.arange(7, dtype="float32"))
    index, doubled = _blocks.map_rows(fn, (rows,), (rows,), max_entries=3 * 7)
    np.testing.assert_array_equal(ops.convert_to_numpy(index), np.arange(7))
    np.testing.assert_array_equal(ops.convert_to_numpy(doubled), 2 * np.arange(7))
    assert seen and all(shape[0] <= 3 for shape in seen)  # never the 7 rows at once


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA's memory plan")
@pytest.mark.parametrize(
    "name",
    ["TripletSemiHardLoss", "LiftedStructLoss", "CircleLoss", "LiftedStructureLoss", "AngularLoss"],
)
def test_blocks_bound_the_planned_memory(name, monkeypatch):
    """At B = 2048, blocks of 128 rows: XLA plans a fraction of the one-block temporaries."""
    import jax

    labels, x = batch(6, size=2048, dim=16)
    labels = np.repeat(np.arange(512), 4).astype("int32")
    loss = getattr(losses, name)()

    def temp_bytes():
        step = jax.jit(jax.value_and_grad(lambda v, lab: loss(lab, v)))
        return step.lower(x, labels).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes()
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 128 * 2048)
    blocked = temp_bytes()
    matrix = 2048 * 2048 * 4
    assert whole > 2 * matrix
    assert blocked < matrix
    assert blocked < whole / 4
