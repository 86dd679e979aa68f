"""Tests of global-batch mining across devices (deepmetric.distributed).

The in-process tests run on every backend. The equivalence tests need several devices, which
must be configured before the backend initialises, so each runs this file as a child process
(`python distributed_test.py <backend> <out.npz>`) and is backend-specific: JAX with 8 forced
host devices under `keras.distribution.DataParallel`, TensorFlow with `MirroredStrategy` on 2
logical CPUs, torch with 2 gloo processes on 127.0.0.1 and `deepmetric.distributed.train_step`.
Each child trains the same tiny model on the same global batches on one device, with global
mining across devices, and with local mining (which must differ, so that the comparison can
fail), and writes the largest weight differences.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, distributed, heads, losses, xbm
from deepmetric.losses.base import MetricLoss

BACKEND = keras.backend.backend()
IN_DIM, DIM, CLASSES, STEPS = 6, 4, 4, 3
BATCH = {"jax": 32, "tensorflow": 16, "torch": 16}
CASES = ("triplet_semihard", "supcon", "proxy_anchor", "xbm", "triplet_margin")
# The cases also trained with local mining, to show that the comparison can fail.
LOCAL_CASES = ("triplet_semihard",)
# Float32 training of the same steps in another order of summation.
TOLERANCE = 5e-5


def _data(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * batch, IN_DIM)).astype("float32")
    y = rng.integers(0, CLASSES, size=STEPS * batch).astype("int32")
    return x, y


def _model(case, mining="global"):
    """A compiled tiny embedder for `case` with fixed initial weights; (model, takes labels)."""
    inputs = keras.Input((IN_DIM,))
    embeddings = keras.layers.Dense(DIM)(inputs)
    if case in ("proxy_anchor", "xbm"):
        labels = keras.Input((), dtype="int32")
        if case == "proxy_anchor":
            out = heads.ProxyAnchor(num_classes=CLASSES)([embeddings, labels])
        else:
            loss = losses.MultiSimilarityLoss(mining=mining)
            out = xbm.CrossBatchMemory(loss, memory_size=24)([embeddings, labels])
        model = keras.Model([inputs, labels], out)
        loss = None
    elif case == "triplet_margin":
        # Explicit (anchor, positive, negative) triplets: a per-example loss with its own
        # `__call__`, which must scale its mean as Keras' losses do under tf.distribute.
        triplets = keras.layers.Dense(DIM)(keras.layers.Reshape((3, IN_DIM // 3))(inputs))
        model = keras.Model(inputs, triplets)
        loss = losses.TripletMarginLoss(margin=2.0)
    else:
        model = keras.Model(inputs, embeddings)
        loss = {
            "triplet_semihard": losses.TripletSemiHardLoss(margin=0.5, mining=mining),
            "supcon": losses.SupConLoss(temperature=0.5, mining=mining),
        }[case]
    rng = np.random.default_rng(1)
    model.set_weights(
        [
            (rng.normal(size=w.shape) * 0.5).astype(w.dtype)
            if w.trainable
            else np.zeros(w.shape, w.dtype)
            for w in model.weights
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    return model, case in ("proxy_anchor", "xbm")


def _fit(case, batch, mining="global"):
    model, with_labels = _model(case, mining)
    x, y = _data(batch)
    if with_labels:
        model.fit([x, y], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    else:
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def _max_difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u, "float64") - v))) for u, v in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------------------
# Children: one per backend


def _jax_child(out):
    import jax

    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == 8, devices
    batch = BATCH["jax"]
    result = {}
    data_parallel = keras.distribution.DataParallel(devices=devices)
    for case in CASES:
        single = _fit(case, batch)
        with data_parallel.scope():
            result[f"global_{case}"] = _max_difference(_fit(case, batch), single)
            if case in LOCAL_CASES:
                local = _fit(case, batch, mining="local")
                result[f"local_{case}"] = _max_difference(local, single)
    # The B x B matrix of a loss on a batch sharded by rows: rows per device, not B.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    b = 64
    x, y = _data(b)
    loss = losses.MultiSimilarityLoss()
    grad = jax.jit(jax.grad(lambda e, labels: loss(labels, e)))
    hlo = grad.lower(jax.device_put(x[:b, :DIM], rows), jax.device_put(y[:b], rows))
    text = hlo.compile().as_text()
    result["hlo_row_block"] = float(f"f32[{b // 8},{b}]" in text)
    result["hlo_full_matrix"] = float(f"f32[{b},{b}]" in text)
    np.savez(out, **result)


def _tensorflow_child(out):
    import tensorflow as tf

    batch = BATCH["tensorflow"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {}
    for case in CASES:
        single = _fit(case, batch)
        with strategy.scope():
            result[f"global_{case}"] = _max_difference(_fit(case, batch), single)
            if case in LOCAL_CASES:
                local = _fit(case, batch, mining="local")
                result[f"local_{case}"] = _max_difference(local, single)
    np.savez(out, **result)


def _torch_steps(case, mining, rank, world):
    """Trains `case` with `train_step` on this process's slice of each global batch."""
    model, with_labels = _model(case, mining)
    distributed.broadcast_variables(model)
    batch = BATCH["torch"]
    x, y = _data(batch)
    local = batch // world
    for step in range(STEPS):
        start = step * batch + rank * local
        xs, ys = x[start : start + local], y[start : start + local]
        if with_labels:
            distributed.train_step(model, [xs, ys])
        else:
            distributed.train_step(model, xs, ys)
    return [np.asarray(w) for w in model.get_weights()]


def _torch_process(rank, port, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trained = {}
        for case in CASES:
            trained[f"global_{case}"] = _torch_steps(case, "global", rank, 2)
            if case in LOCAL_CASES:
                trained[f"local_{case}"] = _torch_steps(case, "local", rank, 2)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        # One process on the whole global batches: train_step is then Keras' plain step.
        single = {case: _torch_steps(case, "global", 0, 1) for case in CASES}
        result = {
            key: _max_difference(weights, single[key.split("_", 1)[1]])
            for key, weights in trained.items()
        }
        np.savez(out, **result)


def _torch_child(out):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torch_process, args=(port, out), nprocs=2, join=True)


def _run_child(tmp_path):
    out = str(tmp_path / "result.npz")
    env = dict(os.environ, KERAS_BACKEND=BACKEND, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p
        for p in (
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            env.get("PYTHONPATH"),
        )
        if p
    )
    if BACKEND == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), BACKEND, out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


# ---------------------------------------------------------------------------
# The equivalence tests (backend-specific: each runs on its own backend)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_training_across_devices_equals_one_device(tmp_path):
    """JAX: fit under DataParallel on 8 host devices; TensorFlow: fit under MirroredStrategy on
    2 logical CPUs; torch: train_step in 2 gloo processes. Against one device on the same
    global batches; local mining must differ."""
    result = _run_child(tmp_path)
    for case in CASES:
        assert result[f"global_{case}"] < TOLERANCE, (case, result)
    for case in LOCAL_CASES:
        assert result[f"local_{case}"] > 1e-3, (case, result)
    if BACKEND == "jax":
        # XLA partitions the B x B matrix by rows: (B/8, B) blocks, never the (B, B) matrix.
        assert result["hlo_row_block"] == 1.0 and result["hlo_full_matrix"] == 0.0, result


# ---------------------------------------------------------------------------
# In-process tests, every backend


class _ThreadReplicas(_backend.Replicas):
    """Replicas simulated by threads of one process: the collectives exchange eager tensors."""

    averages_gradients = False

    def __init__(self, rank, slots, barrier):
        self.count, self._rank, self.slots, self.barrier = len(slots), rank, slots, barrier

    def gather(self, x):
        self.slots[self._rank] = x
        self.barrier.wait()
        gathered = ops.concatenate(list(self.slots), axis=0)
        self.barrier.wait()
        return gathered

    gather_constant = gather

    def rank(self):
        return self._rank


def _reference_losses():
    return [
        name
        for name in losses.__all__
        if isinstance(cls := getattr(losses, name), type)
        and issubclass(cls, MetricLoss)
        and callable(getattr(cls, "call_with_reference", None))
    ]


def _on_two_replicas(share, parts):
    """`share(replicas, rank, part)` run by two threads as replicas; the results by rank."""
    slots, barrier = [None, None], threading.Barrier(2, timeout=60)
    results, errors = [None, None], []

    def replica(rank):
        try:
            replicas = _ThreadReplicas(rank, slots, barrier)
            results[rank] = ops.convert_to_numpy(share(replicas, parts[rank]))
        except Exception as e:  # reported by the test thread
            barrier.abort()
            errors.append(e)

    threads = [threading.Thread(target=replica, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _split_batch():
    x, y = _data(16)
    x, y, w = x[:16, :DIM], y[:16] % 3, np.linspace(0.5, 2.0, 16).astype("float32")
    return x, y, w, [(y[:7], x[:7], w[:7]), (y[7:], x[7:], w[7:])]


def assert_global_batch_on_two_replicas(loss):
    """Each replica (threads, 7 and 9 rows) scores its rows against the gathered batch, with the
    counts summed over the replicas: the replicas' shares add up to the loss of the global batch
    (and each replica's values are not its local loss). A loss whose rows are not separable
    (`separable_rows=False`), or that takes no reference set, takes the whole-batch path, as
    `MetricLoss.__call__` does. Shared with the loss tests (ap, pnp, dynamic soft margin)."""
    x, y, _, parts = _split_batch()
    hook = loss.call_with_reference if loss.separable_rows else None

    def share(replicas, part):
        labels, embeddings = ops.convert_to_tensor(part[0]), ops.convert_to_tensor(part[1])
        values, total = distributed.global_values(replicas, loss.call, labels, embeddings, hook)
        return distributed.global_share(replicas, values, total)

    expected = float(ops.convert_to_numpy(loss(y, x)))
    np.testing.assert_allclose(sum(_on_two_replicas(share, parts)), expected, rtol=1e-5, atol=1e-6)
    local = sum(float(ops.convert_to_numpy(loss(p[0], p[1]))) * len(p[0]) / 16 for p in parts)
    assert abs(local - expected) > 1e-4


@pytest.mark.parametrize("name", _reference_losses())
def test_own_rows_against_the_global_batch_sum_to_the_global_loss(name):
    """Each replica scores its rows against the gathered batch, with the counts summed over
    the replicas: the replicas' shares add up to the loss of the global batch (and each
    replica's values are not its local loss). Replicas of unequal sizes (7 and 9 rows). A
    loss whose rows are not separable (`separable_rows=False`) takes the whole-batch path, as
    `MetricLoss.__call__` does."""
    assert_global_batch_on_two_replicas(getattr(losses, name)())


@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight", "sum_over_batch_size"])
@pytest.mark.parametrize("with_reference", [True, False])
def test_shares_of_weighted_and_summed_losses(reduction, with_reference):
    """Sample weights and Keras' reductions: the shares add up to the global batch's loss, by
    the reference-set path and by the whole-batch path."""
    x, y, w, parts = _split_batch()
    loss = losses.SupConLoss(reduction=reduction)

    def share(replicas, part):
        labels, embeddings = ops.convert_to_tensor(part[0]), ops.convert_to_tensor(part[1])
        hook = loss.call_with_reference if with_reference else None
        values, total = distributed.global_values(replicas, loss.call, labels, embeddings, hook)
        return distributed.global_share(replicas, values, total, part[2], reduction)

    expected = float(ops.convert_to_numpy(loss(y, x, sample_weight=w)))
    np.testing.assert_allclose(sum(_on_two_replicas(share, parts)), expected, rtol=1e-5, atol=1e-6)


def test_mining_option_is_checked_and_serialized():
    with pytest.raises(ValueError, match=r"`mining` must be one of 'global', 'local'.*'rows'"):
        losses.SupConLoss(mining="rows")
    assert "mining" not in losses.SupConLoss().get_config()
    loss = losses.SupConLoss(temperature=0.2, mining="local")
    restored = losses.SupConLoss.from_config(loss.get_config())
    assert restored.mining == "local" and restored.temperature == 0.2


def test_one_device_is_the_plain_loss():
    """Without replicas both settings give the loss of the batch."""
    x, y = _data(8)
    plain = ops.convert_to_numpy(losses.multi_similarity_loss(y, x[:, :DIM]))
    for mining in ("global", "local"):
        value = losses.MultiSimilarityLoss(mining=mining)(y, x[:, :DIM])
        np.testing.assert_allclose(ops.convert_to_numpy(value), np.mean(plain), rtol=1e-6)


def test_split_values_mines_inside_each_shard():
    """Local mining on JAX: the mean of the shards' losses, each mined alone."""
    x, y = _data(16)
    x, y = x[:16, :DIM], y[:16]
    fn = losses.sup_con_loss
    values = ops.convert_to_numpy(distributed.split_values(fn, y, x, 2))
    halves = [np.mean(ops.convert_to_numpy(fn(y[i : i + 8], x[i : i + 8]))) for i in (0, 8)]
    np.testing.assert_allclose(np.mean(values), np.mean(halves), rtol=1e-6)
    assert abs(np.mean(values) - np.mean(ops.convert_to_numpy(fn(y, x)))) > 1e-3
    with pytest.raises(ValueError, match="multiple of 3. Received: batch size 16"):
        distributed.split_values(fn, y, x, 3)


@pytest.mark.skipif(BACKEND == "torch", reason="train_step is the torch step")
def test_train_step_is_for_torch():
    model, _ = _model("supcon")
    with pytest.raises(ValueError, match="backend='"):
        distributed.train_step(model, np.zeros((4, IN_DIM)), np.zeros(4))


@pytest.mark.skipif(BACKEND != "torch", reason="train_step is the torch step")
def test_train_step_on_one_process_is_keras_step():
    x, y = _data(8)
    model, _ = _model("supcon")
    reference, _ = _model("supcon")
    distributed.train_step(model, x[:8], y[:8])
    reference.train_on_batch(x[:8], y[:8])
    assert _max_difference(model.get_weights(), reference.get_weights()) < 1e-6


if __name__ == "__main__":
    # The child process: `python distributed_test.py <backend> <out.npz>` (prints the figures).
    if BACKEND == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    {"jax": _jax_child, "tensorflow": _tensorflow_child, "torch": _torch_child}[sys.argv[1]](
        sys.argv[2]
    )
    print({key: float(value) for key, value in np.load(sys.argv[2]).items()})
