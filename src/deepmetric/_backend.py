"""The one internal module that knows the backends: gradients and compilation.

Library code uses `keras.ops` only. Tests and benchmarks need two things that
`keras.ops` does not offer: the gradient of a scalar function with respect to a
tensor, and the function compiled the way `fit` compiles it (`jax.jit`,
`tf.function` with an unknown batch dimension, torch eager). Both live here;
`deepmetric.testing` exposes them. The command line seeds every generator, turns on the
backends' deterministic settings and sets torch's threads through `seed_everything`,
`seed_epoch` and `torch_threads`; the blocked losses ask `sequential_blocks` whether blocks
must run as a Python loop.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Callable

import keras
import numpy as np


def name() -> str:
    return keras.backend.backend()


def gradient_step(fn: Callable, x, *args, compiled: bool = False) -> Callable[[], tuple]:
    """A no-argument callable running one forward + backward of `fn(x, *args)` in `x`.

    Each call returns `(value, d value / d x)` as tensors of the backend, after the
    computation has finished (for timing). The inputs are converted once, here. With
    `compiled`, the step runs as `fit` compiles it: under `jax.jit`, or under `tf.function`
    with the batch dimension of `x` and of every argument unknown; torch runs eagerly (as
    `fit` does unless `jit_compile` is set). The gradient is None where `fn` does not
    depend on `x` (TensorFlow and torch).
    """
    backend = name()
    x = np.asarray(x)
    if backend == "jax":
        import jax

        f = jax.value_and_grad(fn)
        if compiled:
            f = jax.jit(f)
        xv, av = jax.device_put(x), [jax.device_put(np.asarray(a)) for a in args]
        return lambda: jax.block_until_ready(f(xv, *av))
    if backend == "tensorflow":
        import tensorflow as tf

        def run(v, *a):
            with tf.GradientTape() as tape:
                tape.watch(v)
                value = fn(v, *a)
            return value, tape.gradient(value, v)

        tensors = [tf.convert_to_tensor(x)] + [tf.convert_to_tensor(a) for a in args]
        if compiled:
            signature = [tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in tensors]
            run = tf.function(run, input_signature=signature)
        return lambda: run(*tensors)
    if backend == "torch":
        import torch

        v = torch.tensor(x, requires_grad=True)
        targs = [torch.as_tensor(np.asarray(a)) for a in args]

        def step():
            value = fn(v, *targs)
            (grad,) = torch.autograd.grad(value, v, allow_unused=True)
            return value.detach(), grad

        return step
    raise NotImplementedError(f"gradients are not implemented for the {backend} backend")


def value_and_grad(fn: Callable, x, *args, compiled: bool = False):
    """(fn(x, *args), d fn / d x) as numpy arrays, on the current backend.

    `compiled` as in `gradient_step`. A gradient that does not depend on `x` is zeros.
    """
    value, grad = gradient_step(fn, x, *args, compiled=compiled)()
    value = keras.ops.convert_to_numpy(value)
    grad = np.zeros_like(np.asarray(x)) if grad is None else keras.ops.convert_to_numpy(grad)
    return value, grad


def compiled(fn: Callable, *example_args):
    """`fn` compiled as `fit` would compile it, for calls on numpy inputs.

    jax: `jax.jit`; tensorflow: `tf.function` with every dimension of every
    argument unknown; torch: the function itself.
    """
    backend = name()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        signature = [
            tf.TensorSpec([None] * np.ndim(a), tf.as_dtype(np.asarray(a).dtype))
            for a in example_args
        ]
        return tf.function(fn, input_signature=signature)
    return fn


# ---------------------------------------------------------------------------
# The blocked losses


def sequential_blocks() -> bool:
    """Whether blocks of anchor rows run as a Python loop instead of `keras.ops.scan`.

    True on TensorFlow: Keras' TensorFlow `scan` needs every step output to have the carry's
    dtype and shape. The loop runs the blocks one after the other in eager mode; in a
    `tf.function` (whose batch size must then be static) the executor may overlap them.
    """
    return name() == "tensorflow"


def keeps_assignment(value) -> bool:
    """Whether `variable.assign(value)` may store `value` (a loss's state, for example).

    False only for a JAX tracer outside a Keras `StatelessScope`: under a bare `jax.jit` the
    traced value would escape its trace (JAX's `UnexpectedTracerError` at the next use). Inside
    a `StatelessScope` (the JAX trainer's step) the assignment is recorded by the scope, and
    eager values and the other backends' tensors are always stored.
    """
    if name() != "jax":
        return True
    import jax

    if not isinstance(value, jax.core.Tracer):
        return True
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


# ---------------------------------------------------------------------------
# The command line: seeding and torch threads


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and the backend, as `keras.utils.set_random_seed` does.

    `set_random_seed` imports TensorFlow whenever it is installed, to seed it; on the jax
    and torch backends that is not needed (Keras' initializers and dropout draw their
    default seeds from Python's `random`), so TensorFlow is seeded only when it is the
    backend or already imported.
    """
    backend = name()
    if backend == "tensorflow" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if backend == "torch":
        import torch

        torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic():
    """Runs the block with the backend's deterministic ops, then restores the setting.

    TensorFlow: `tf.config.experimental.enable_op_determinism()` (an op without a
    deterministic kernel raises instead of varying; the setting is turned off again after
    the block unless it was on before). torch: `torch.use_deterministic_algorithms(True)`.
    jax: nothing to set; XLA's CPU kernels give the same result for the same program.
    """
    backend = name()
    if backend == "tensorflow":
        from tensorflow.python.framework import config as tf_config

        before = tf_config.is_op_determinism_enabled()
        tf_config.enable_op_determinism()
        try:
            yield
        finally:
            if not before:
                tf_config.disable_op_determinism()
    elif backend == "torch":
        import torch

        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before)
    else:
        yield


SEED_STATE = "seed_generator_state"  # the variable of a keras.random.SeedGenerator


def seed_epoch(model, seed: int, epoch: int) -> None:
    """Seeds every random draw of epoch `epoch` of `model.fit` from `seed` and `epoch` alone.

    Called at the start of each epoch, it makes an epoch draw the same numbers whether it
    follows the previous epoch in the same process or starts from a checkpoint. Dropout
    draws its masks from the layer's `keras.random.SeedGenerator` (jax, TensorFlow; torch
    when the layer has a seed) or, for an unseeded `Dropout` on torch, from torch's global
    generator. Neither is saved with a model: a `.keras` file keeps weights and optimizer
    state, not a SeedGenerator's position, so without this a resumed run would draw the
    masks of its first epochs again. With `w_0, w_1, ...` the 31-bit words of
    `numpy.random.SeedSequence([seed, epoch])`, Python's, numpy's and torch's global
    generators are seeded with `w_0`, and the i-th SeedGenerator of `model` (in the order
    of `model.variables`, the same in a model built anew and one loaded) gets the state
    `[w_i, 0]`, i = 1, 2, ...
    """
    states = [v for v in model.variables if v.name == SEED_STATE]
    state = np.random.SeedSequence([seed, epoch]).generate_state(len(states) + 1)
    words = [int(w) & 0x7FFFFFFF for w in state]
    random.seed(words[0])
    np.random.seed(words[0])
    if name() == "torch":
        import torch

        torch.manual_seed(words[0])
    for variable, word in zip(states, words[1:], strict=True):
        variable.assign(keras.ops.convert_to_tensor([word, 0], dtype=variable.dtype))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """On torch: runs the block with `threads` intra-op threads, then restores the number.

    Without `threads`, one thread unless `OMP_NUM_THREADS` is set: small models train
    several times faster on one thread than on all cores (docs/cli.md). Other backends:
    nothing changes.
    """
    if name() != "torch":
        yield
        return
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# The command line: data parallelism on local devices (`deepmetric train --devices N`)


def local_devices() -> list[str]:
    """The devices data parallelism can use: accelerators if any, else the CPUs.

    jax: `jax.devices()` (N host CPUs when XLA_FLAGS has
    `--xla_force_host_platform_device_count=N`, set before jax was imported); tensorflow: the
    logical GPUs, else the logical CPUs (see `split_host_cpu`); torch: none (one process per
    device with torchrun, see docs/cli.md).
    """
    backend = name()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.devices()]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    return []


def split_host_cpu(count: int) -> None:
    """TensorFlow without GPUs: makes the CPU `count` logical devices, if TF has not started.

    Once TensorFlow's runtime has started the devices are fixed; nothing changes then.
    """
    if name() != "tensorflow" or count < 2:
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    (cpu,) = tf.config.list_physical_devices("CPU")[:1]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:  # the runtime has started: keep its devices
        pass


@contextlib.contextmanager
def data_parallel_scope(devices: list[str]):
    """Builds and trains models under data parallelism over `devices` (tensorflow).

    TensorFlow: `tf.distribute.MirroredStrategy(devices)`, whose scope must hold the model's
    creation and compile (`fit` then splits each global batch into contiguous replica
    shares). jax: nothing here; see `data_parallel_fit`.
    """
    if name() == "tensorflow" and len(devices) > 1:
        import tensorflow as tf

        with tf.distribute.MirroredStrategy(devices).scope():
            yield
        return
    yield


@contextlib.contextmanager
def data_parallel_fit(model, devices: list[str]):
    """Runs `model.fit` under `keras.distribution.DataParallel(devices)` (jax).

    The model's, optimizer's and metrics' variables are replicated onto the devices and each
    batch is sharded over them, so that the loss sees the global batch. The distribution is
    set only around `fit`: Keras' jax `predict` under `DataParallel` needs every batch to be
    a multiple of the devices, which a held-out set rarely is, so predictions (callbacks
    included: wrap them with `outside_distribution`) run on the replicated weights without it.
    Other backends: nothing.
    """
    if name() != "jax" or len(devices) < 2:
        yield
        return
    import jax

    distribution = keras.distribution.DataParallel(devices=devices)
    sharding = jax.sharding.NamedSharding(
        distribution.device_mesh.backend_mesh, jax.sharding.PartitionSpec()
    )
    state = list(model.variables) + list(model.metrics_variables)
    if model.optimizer is not None:
        state += list(model.optimizer.variables)
    for variable in state:
        variable.assign(jax.device_put(variable.value, sharding))
    with distribution.scope():
        yield


@contextlib.contextmanager
def outside_distribution():
    """Runs the block without the current `keras.distribution` (jax predictions in `fit`)."""
    if name() != "jax":
        yield
        return
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


# ---------------------------------------------------------------------------
# Replicas: the collectives behind global-batch mining (deepmetric.distributed)


class Replicas:
    """This replica's view of a data-parallel step whose loss sees only its own rows.

    `count` replicas (> 1) each hold a slice of the global batch; `gather` concatenates the
    slices of all replicas in replica order, differentiably: its gradient sums the upstream
    gradients of every replica and gives each replica its own rows (TensorFlow's
    `ReplicaContext.all_gather`; the same rule for torch), so that when each replica's loss
    covers its own anchors, the replicas' gradients add up to the gradient of the global loss.
    `averages_gradients`: the engine averages the replica gradients (torch DDP) instead of
    summing them (`tf.distribute`).
    """

    count: int
    averages_gradients: bool

    def gather(self, x):
        """(sum of the replicas' rows, ...) of `x`, differentiable."""
        raise NotImplementedError

    def gather_constant(self, x):
        """`gather` without gradient (labels, sizes, weights)."""
        raise NotImplementedError

    def rank(self):
        """This replica's index (a Python int or a scalar int tensor)."""
        raise NotImplementedError


class _TensorFlowReplicas(Replicas):
    averages_gradients = False

    def __init__(self, context):
        self.context = context
        self.count = int(context.num_replicas_in_sync)

    def gather(self, x):
        return self.context.all_gather(x, axis=0)

    def gather_constant(self, x):
        import tensorflow as tf

        return tf.stop_gradient(self.context.all_gather(tf.stop_gradient(x), axis=0))

    def rank(self):
        return self.context.replica_id_in_sync_group


def _torch_gather(x):
    """all_gather of tensors whose first dimensions may differ, without gradient."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    top = max(sizes)
    padded = x.contiguous()
    if x.shape[0] < top:
        pad = torch.zeros((top - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded = torch.cat([padded, pad], dim=0)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0), sizes


def _torch_all_gather_function():
    import torch
    import torch.distributed as dist

    class AllGather(torch.autograd.Function):
        """all_gather whose backward sums the replicas' gradients and keeps this rank's rows."""

        @staticmethod
        def forward(ctx, x):
            gathered, sizes = _torch_gather(x.detach())
            ctx.sizes = sizes
            return gathered

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            rank = dist.get_rank()
            start = sum(ctx.sizes[:rank])
            return grad[start : start + ctx.sizes[rank]]

    return AllGather


class _TorchReplicas(Replicas):
    averages_gradients = True

    def __init__(self):
        import torch.distributed as dist

        self.count = dist.get_world_size()
        self._gather = _torch_all_gather_function()

    def gather(self, x):
        return self._gather.apply(x)

    def gather_constant(self, x):
        import torch

        with torch.no_grad():
            return _torch_gather(x.detach())[0]

    def rank(self):
        import torch.distributed as dist

        return dist.get_rank()


def replicas() -> Replicas | None:
    """The replicas of the current step when the loss sees only this replica's rows, else None.

    TensorFlow: inside a `tf.distribute` replica context with more than one replica in sync
    (`strategy.run`, as `fit` runs its step under a strategy). torch: an initialised
    `torch.distributed` process group with more than one process. JAX: always None; under
    `keras.distribution.DataParallel` the step is one program over the global batch.
    """
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.distribute.in_cross_replica_context():
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                return _TensorFlowReplicas(context)
        return None
    if backend == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return _TorchReplicas()
    return None


def replicas_in_sync() -> int:
    """How many replicas sum their gradients (`tf.distribute`); 1 on the other backends."""
    if name() == "tensorflow":
        import tensorflow as tf

        return int(tf.distribute.get_strategy().num_replicas_in_sync)
    return 1


def batch_shards() -> int:
    """JAX: into how many device shards `keras.distribution` splits the batch; 1 otherwise."""
    if name() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    batch_dim = getattr(distribution, "batch_dim_name", None)
    mesh = getattr(distribution, "device_mesh", None)
    if batch_dim is None or mesh is None or batch_dim not in mesh.axis_names:
        return 1
    return int(mesh.shape[list(mesh.axis_names).index(batch_dim)])


# ---------------------------------------------------------------------------
# torch data-parallel training (deepmetric.distributed.train_step)


def torch_average_gradients(gradients) -> None:
    """Averages each gradient over the torch.distributed processes, in place (as DDP does)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for grad in gradients:
        if grad is not None:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(world)


def torch_broadcast_variables(variables, source: int = 0) -> None:
    """Copies the values of `variables` from process `source` to every process."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for variable in variables:
            value = variable.value.detach().clone().contiguous()
            dist.broadcast(value, src=source)
            variable.assign(value)


def torch_train_step(model, x, y, sample_weight=None):
    """One step of Keras' torch trainer with the gradients averaged over the processes."""
    import torch

    model.zero_grad()
    y_pred = model(x, training=True)
    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    loss.backward()
    variables = model.trainable_variables
    gradients = [v.value.grad for v in variables]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        torch_average_gradients(gradients)
    with torch.no_grad():
        model.optimizer.apply(gradients, variables)
    return loss.detach()
