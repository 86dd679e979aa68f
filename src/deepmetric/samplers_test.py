"""Tests of `deepmetric.samplers.PKSampler`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from deepmetric.losses import TripletSemiHardLoss
from deepmetric.samplers import PKSampler


def data(sizes, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    rng.shuffle(y)
    x = rng.normal(size=(len(y), dim)).astype("float32")
    return x, y


def epoch_indices(sampler):
    return np.stack([sampler.batch_indices(i) for i in range(len(sampler))])


@pytest.mark.parametrize("p, k", [(2, 1), (3, 4), (5, 2)])
def test_every_batch_has_p_classes_of_k(p, k):
    x, y = data([8, 9, 12, 4, 7, 16])
    sampler = PKSampler(x, y, p, k, seed=3)
    for _ in range(3):
        for i in range(len(sampler)):
            xb, yb = sampler[i]
            assert xb.shape == (p * k, 3) and yb.shape == (p * k,)
            classes, counts = np.unique(yb, return_counts=True)
            assert len(classes) == p and np.all(counts == k)
            idx = sampler.batch_indices(i)
            np.testing.assert_array_equal(xb, x[idx])
            np.testing.assert_array_equal(yb, y[idx])
            # Classes of at least K samples give K distinct samples.
            for c in classes:
                members = idx[yb == c]
                assert len(np.unique(members)) == min(k, np.sum(y == c))
        sampler.on_epoch_end()


def test_default_epoch_length():
    x, y = data([10] * 7)
    assert len(PKSampler(x, y, 3, 4)) == 6  # ceil(70 / 12)
    assert len(PKSampler(x, y, 3, 4, batches_per_epoch=2)) == 2


def test_deterministic_by_seed_and_reshuffled_each_epoch():
    x, y = data([6, 7, 8, 9, 10])
    a, b, c = (
        PKSampler(x, y, 2, 3, seed=5),
        PKSampler(x, y, 2, 3, seed=5),
        PKSampler(x, y, 2, 3, seed=6),
    )
    first = epoch_indices(a)
    np.testing.assert_array_equal(first, epoch_indices(b))
    assert not np.array_equal(first, epoch_indices(c))
    a.on_epoch_end()
    b.on_epoch_end()
    second = epoch_indices(a)
    np.testing.assert_array_equal(second, epoch_indices(b))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_sample_seen_once_per_epoch(seed):
    """Sizes that are multiples of K and a class count that is a multiple of P."""
    x, y = data([8, 4, 12, 4, 8, 16, 4, 8], seed=seed)
    sampler = PKSampler(x, y, classes_per_batch=4, samples_per_class=4, seed=seed)
    for _ in range(2):
        seen = np.sort(epoch_indices(sampler).ravel())
        np.testing.assert_array_equal(seen, np.arange(len(y)))
        sampler.on_epoch_end()


def test_every_sample_seen_with_uneven_sizes():
    x, y = data([5, 7, 9, 3, 11, 6])
    sampler = PKSampler(x, y, 3, 3, batches_per_epoch=12, seed=0)
    assert set(epoch_indices(sampler).ravel()) == set(range(len(y)))


def test_small_classes_sampled_with_replacement():
    x, y = data([2, 10, 10])
    sampler = PKSampler(x, y, 3, 5, batches_per_epoch=4, seed=0)
    small = np.flatnonzero(y == 0)
    for i in range(len(sampler)):
        idx = sampler.batch_indices(i)
        picks = idx[y[idx] == 0]
        assert len(picks) == 5 and set(picks) == set(small)


def test_single_sample_classes_warn():
    x, y = data([1, 5, 1, 5])
    with pytest.warns(UserWarning, match=r"2 classes have a single sample.*0, 2"):
        PKSampler(x, y, 2, 2)


def test_string_labels_mapped_and_integer_labels_kept():
    x, y = data([4, 4, 4])
    names = np.array(["zebra", "ant", "moth"])[y]
    sampler = PKSampler(x, names, 3, 2, seed=0)
    assert sampler.classes.tolist() == ["ant", "moth", "zebra"]
    _, yb = sampler[0]
    assert yb.dtype.kind == "i"
    idx = sampler.batch_indices(0)
    np.testing.assert_array_equal(sampler.classes[yb], names[idx])
    big = y.reshape(-1, 1) + 16777216
    _, yb = PKSampler(x, big, 3, 2)[0]
    assert set(yb.tolist()) == {16777216, 16777217, 16777218}


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((4, 2), {}, ValueError, r"classes_per_batch.*at most.*\(3\).*classes_per_batch=4"),
        ((1, 2), {}, ValueError, r"classes_per_batch.*>= 2.*classes_per_batch=1"),
        ((2, 0), {}, ValueError, r"samples_per_class.*>= 1.*samples_per_class=0"),
        ((2, 2), {"batches_per_epoch": 0}, ValueError, "batches_per_epoch"),
        ((2.5, 2), {}, TypeError, "classes_per_batch"),
    ],
)
def test_bad_arguments(args, kwargs, error, match):
    x, y = data([3, 3, 3])
    with pytest.raises(error, match=match):
        PKSampler(x, y, *args, **kwargs)


def test_mismatched_lengths_and_bad_labels():
    x, y = data([3, 3, 3])
    with pytest.raises(ValueError, match=r"len\(x\)=8, len\(y\)=9"):
        PKSampler(x[:8], y, 2, 2)
    with pytest.raises(ValueError, match=r"y.shape=\(9, 2\)"):
        PKSampler(x, np.stack([y, y], axis=1), 2, 2)


def test_fit_with_triplet_semihard_loss():
    x, y = data([6, 6, 6, 6], dim=4)
    sampler = PKSampler(x, y, classes_per_batch=2, samples_per_class=3, seed=0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=TripletSemiHardLoss())
    history = model.fit(sampler, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["loss"]))
    assert sampler.epoch >= 1


@pytest.mark.parametrize("p, k, w", [(4, 3, 2), (4, 3, 4), (3, 4, 2), (6, 2, 3)])
def test_replica_shares_make_up_the_global_batch(p, k, w):
    """Each rank's share is its slice of the one global batch: disjoint, and together the batch.

    Every rank builds its own sampler with the same seed, as every DDP process does; the
    concatenated shares of one step must be exactly the single-process batch, over two epochs.
    """
    x, y = data([8, 9, 12, 4, 7, 16])
    single = PKSampler(x, y, p, k, seed=7)
    ranks = [PKSampler(x, y, p, k, seed=7, num_replicas=w, rank=r) for r in range(w)]
    for _ in range(2):
        for i in range(len(single)):
            shares = [s.batch_indices(i) for s in ranks]
            assert all(len(s) == p * k // w for s in shares)
            np.testing.assert_array_equal(np.concatenate(shares), single.batch_indices(i))
            np.testing.assert_array_equal(single.global_batch_indices(i), single.batch_indices(i))
            # The shares are disjoint positions (rows) of the global batch.
            xb = np.concatenate([s[i][0] for s in ranks])
            yb = np.concatenate([s[i][1] for s in ranks])
            np.testing.assert_array_equal(xb, single[i][0])
            classes, counts = np.unique(yb, return_counts=True)
            assert len(classes) == p and np.all(counts == k)
            for r, s in enumerate(ranks):
                np.testing.assert_array_equal(s.global_batch_indices(i), single.batch_indices(i))
                assert s.rank == r and s.batch_size * w == s.global_batch_size == p * k
        for s in [single, *ranks]:
            s.on_epoch_end()


def test_replica_shares_are_disjoint_when_classes_are_large():
    x, y = data([20] * 6)
    ranks = [PKSampler(x, y, 4, 4, seed=1, num_replicas=2, rank=r) for r in range(2)]
    for i in range(len(ranks[0])):
        a, b = (s.batch_indices(i) for s in ranks)
        assert not set(a.tolist()) & set(b.tolist())
        # W divides P: every share holds P / W whole classes of K samples.
        for s in ranks:
            _, counts = np.unique(s[i][1], return_counts=True)
            assert len(counts) == 2 and np.all(counts == 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_replicas": 0}, ValueError, "num_replicas"),
        ({"num_replicas": 5}, ValueError, r"multiple of `num_replicas`.*num_replicas=5"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"`rank` must be in \[0, num_replicas=2\)"),
        ({"num_replicas": 2, "rank": -1}, ValueError, "rank=-1"),
        ({"num_replicas": 2, "rank": 1.0}, TypeError, "rank=1.0"),
    ],
)
def test_bad_replica_arguments(kwargs, error, match):
    x, y = data([5] * 4)
    with pytest.raises(error, match=match):
        PKSampler(x, y, 3, 2, **kwargs)


TF_SPLIT = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
from deepmetric.samplers import PKSampler
x = np.arange(48, dtype="float32").reshape(48, 1)
y = np.repeat(np.arange(6), 8)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
sampler = PKSampler(x, y, 4, 3, batches_per_epoch=3, seed=2)
dataset = PyDatasetAdapter(sampler, shuffle=False).get_tf_dataset()
shares = []
for xb, _ in strategy.experimental_distribute_dataset(dataset):  # as Keras' fit does
    shares.append([r.numpy()[:, 0].astype(int).tolist() for r in
                   strategy.experimental_local_results(xb)])
print(json.dumps(shares))
"""


@pytest.mark.multiprocess
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute")
def test_tensorflow_mirrored_split_gives_each_replica_its_rank_share():
    """Backend-specific: MirroredStrategy on 2 logical CPUs splits the sampler's global batch
    into the contiguous shares that `PKSampler(num_replicas=2, rank=r)` gives each rank."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    done = subprocess.run(
        [sys.executable, "-c", TF_SPLIT], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shares = json.loads(done.stdout.strip().splitlines()[-1])
    x = np.arange(48, dtype="float32").reshape(48, 1)
    y = np.repeat(np.arange(6), 8)
    ranks = [
        PKSampler(x, y, 4, 3, batches_per_epoch=3, seed=2, num_replicas=2, rank=r) for r in range(2)
    ]
    expected = [[ranks[r].batch_indices(i).tolist() for r in range(2)] for i in range(3)]
    assert shares == expected
