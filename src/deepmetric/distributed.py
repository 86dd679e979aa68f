r"""Mining over the global batch when training on several devices, on every backend.

A batch loss mines its pairs and triplets inside the batch: the more examples, the more and the
harder the negatives. In data-parallel training each device holds a slice of the batch. What the
loss sees then depends on the engine:

- JAX, `keras.distribution.DataParallel`: the training step is one program over the global
  batch, sharded by rows across the devices; the loss sees the global batch and XLA partitions
  its B x B matrix by rows. Nothing is gathered here.
- TensorFlow, a `tf.distribute` strategy (Mirrored, MultiWorkerMirrored, TPU): each replica runs
  the step on its own rows and Keras sums the replicas' gradients.
- torch, an initialised `torch.distributed` process group (DDP, `torchrun`): each process runs
  the step on its own rows and the gradients are averaged.

On TensorFlow and torch, every `deepmetric.losses` batch loss (a `MetricLoss`), the heads that add
their own loss (`ProxyAnchor`, `ProxyNCA`) and `CrossBatchMemory` therefore gather the embeddings
and labels of all replicas (an all-gather of B x D floats and B integers; the B x B matrix is
never communicated) and keep the per-anchor terms of their own rows of the global loss: a loss
with a reference set scores only its rows against the gathered batch (an (n, B) block, its
normalising counts summed over the replicas); the others compute the loss of the whole global
batch. The gather is differentiable: its gradient sums the replicas' upstream gradients and
hands each replica its own rows, so the gradient that reaches each replica's embeddings is the
gradient of the global loss, and the summed (TensorFlow) or averaged (torch, scaled by the world
size) replica gradients equal the single-device gradient of the global batch:

$$\nabla_\theta L(\text{global batch}) = \sum_r \nabla_\theta \ell_r,\qquad
  \ell_r = \frac{1}{B}\sum_{a \in \text{rows of } r} v_a$$

with $v_a$ the per-anchor values of the loss on the global batch (their mean is the loss) and
$B$ the global batch size. Counts that normalise a loss (positive pairs, active triplets, anchors
with a non-zero loss) are thereby global counts.

Local mining (each replica mines its own slice, and the loss is the mean of the slices' losses)
is an explicit choice: `mining="local"` on the loss. On JAX it splits the global batch into the
device shards of the current `keras.distribution` and mines inside each.

Keras 3's `fit` has no data-parallel mode on torch; `train_step` is the supported step: Keras'
torch step with the gradients averaged over the processes (as DDP averages them), and
`broadcast_variables` starts every process from the same weights. See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
import threading

from keras import ops

from deepmetric import _backend

__all__ = ["MINING", "broadcast_variables", "replicas", "train_step"]

MINING = ("global", "local")

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def check_mining(name, value):
    """`value` if it is `"global"` or `"local"`, else a ValueError naming the argument."""
    if not isinstance(value, str) or value not in MINING:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(m) for m in MINING)}. "
            f"Received: {name}={value!r}"
        )
    return value


def own_rows(values, start, count):
    """Rows `start .. start + count - 1` of `values` (`count` static where the shapes are)."""
    return ops.take(values, start + ops.arange(count, dtype="int32"), axis=0)


def gather_batch(replicas, labels, embeddings):
    """(global labels, global embeddings, start): every replica's rows, in replica order.

    The embeddings are gathered differentiably; `start` is the index of this replica's first
    row in the global batch (from the gathered batch sizes, which may differ between
    replicas). Shapes stay those of the inputs and of the gathered tensors, so the batch
    sizes are static where the inputs' are (TPU).
    """
    size = ops.reshape(ops.cast(ops.shape(embeddings)[0], "int32"), (1,))
    sizes = replicas.gather_constant(size)
    before = ops.less(ops.arange(replicas.count, dtype="int32"), ops.cast(replicas.rank(), "int32"))
    start = ops.sum(ops.where(before, sizes, 0))
    all_labels = replicas.gather_constant(ops.cast(labels, "int32"))
    return all_labels, replicas.gather(embeddings), start


# The replicas whose counts `replica_sum` adds up while a loss scores this replica's rows;
# per thread, since MirroredStrategy runs each replica's step in a thread of its own.
_STATE = threading.local()


def replica_sum(x):
    """A scalar count summed over the replicas while a loss scores only this replica's rows.

    The normalisers of a batch loss (the batch size, the number of positive pairs, of active
    triplets, of anchors with a non-zero loss) are sums over anchors; a loss that scores the
    rows of one replica against the global batch (`global_values`) needs their global sums.
    Outside that, `x` unchanged. No gradient flows through the sum (counts have none).
    """
    replicas = getattr(_STATE, "summing", None)
    if replicas is None:
        return x
    return ops.sum(replicas.gather_constant(ops.reshape(x, (1,))))


@contextlib.contextmanager
def _summing(replicas):
    before = getattr(_STATE, "summing", None)
    _STATE.summing = replicas
    try:
        yield
    finally:
        _STATE.summing = before


def global_values(replicas, call, labels, embeddings, call_with_reference=None):
    """This replica's per-anchor values on the global batch, and the global batch size.

    `call(labels, embeddings)` returns (B,) values whose mean is the loss of a batch. With
    `call_with_reference` (the loss's reference-set hook), only this replica's rows are
    scored: its anchors against the gathered batch as reference set, each anchor's pair
    with itself excluded by its global index (`reference_mask`), the normalisers summed over
    the replicas (`replica_sum`), so each replica builds an (n, B) matrix, not (B, B).
    Without it, the loss of the whole global batch is computed and this replica's rows kept.
    """
    all_labels, all_embeddings, start = gather_batch(replicas, labels, embeddings)
    count, total = ops.shape(embeddings)[0], ops.shape(all_embeddings)[0]
    if call_with_reference is None:
        return own_rows(call(all_labels, all_embeddings), start, count), total
    rows = start + ops.arange(count, dtype="int32")
    not_self = ops.not_equal(
        ops.expand_dims(rows, 1), ops.expand_dims(ops.arange(total, dtype="int32"), 0)
    )
    with _summing(replicas):
        values = call_with_reference(
            ops.cast(labels, "int32"), embeddings, all_embeddings, all_labels, not_self
        )
    return values, total


def _weighted(values, sample_weight):
    if sample_weight is None:
        return values, None
    sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), values.dtype)
    if len(sample_weight.shape) == len(values.shape) + 1:
        sample_weight = ops.squeeze(sample_weight, axis=-1)
    return values * sample_weight, sample_weight


def global_share(replicas, values, total, sample_weight=None, reduction="sum_over_batch_size"):
    """This replica's share of the reduced global loss, from its per-anchor `values`.

    The shares of all replicas add up to the loss of the global batch (`total` examples):
    `sum(values * w) / total` for the mean reductions (over the global sum of the weights
    for `"mean_with_sample_weight"`), `sum(values * w)` for `"sum"`; `"none"` returns the
    weighted values.
    """
    values, sample_weight = _weighted(values, sample_weight)
    if reduction in (None, "none"):
        return values
    share = ops.sum(values)
    if reduction == "sum":
        return share
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        local = ops.reshape(ops.sum(sample_weight * ops.ones_like(values)), (1,))
        return ops.divide_no_nan(share, ops.sum(replicas.gather_constant(local)))
    return ops.divide_no_nan(share, ops.cast(total, share.dtype))


def split_values(call, labels, embeddings, shards):
    """Per-anchor values of `call` mined inside each of `shards` equal slices of the batch."""
    batch = embeddings.shape[0]
    if batch is None or batch % shards:
        raise ValueError(
            "Local mining splits the batch into the device shards, so the batch size must be "
            f"a multiple of {shards}. Received: batch size {batch}"
        )
    size = batch // shards
    parts = [
        call(labels[i * size : (i + 1) * size], embeddings[i * size : (i + 1) * size])
        for i in range(shards)
    ]
    return ops.concatenate(parts, axis=0)


def scale_for_replicas(loss, reduction):
    """Keras' division of a mean-reduced loss by the replicas in sync (`tf.distribute`).

    Keras' own losses apply it in their reduction, so that the summed replica gradients are
    the gradient of the mean; a loss with its own `__call__` applies it here. Other backends
    and other reductions: `loss` unchanged.
    """
    count = _backend.replicas_in_sync()
    if count > 1 and reduction in _MEAN_REDUCTIONS:
        return loss / count
    return loss


def batch_loss(
    call,
    labels,
    embeddings,
    sample_weight=None,
    *,
    reduction,
    mining="global",
    call_with_reference=None,
):
    """The loss a `MetricLoss` returns in one replica: mined globally or locally.

    `call(labels, embeddings)` gives per-anchor values; `call_with_reference`, when the
    loss has the hook, lets a replica score only its own rows (`global_values`). On one
    device: Keras' reduction of the values. On several replicas (TensorFlow, torch): scaled
    so that the engine's combination of the replicas' gradients (a sum under
    `tf.distribute`, an average under torch DDP) gives the gradient of the global-batch
    loss (`mining="global"`) or of the mean of the replicas' own losses (`mining="local"`,
    with Keras' division by the number of replicas).
    """
    from deepmetric.losses.base import reduce_losses

    replicas = _backend.replicas()
    if replicas is None:
        shards = _backend.batch_shards() if mining == "local" else 1
        if shards > 1:
            values = split_values(call, labels, embeddings, shards)
        else:
            values = call(labels, embeddings)
        return reduce_losses(values, sample_weight, reduction)
    if mining == "local":
        loss = reduce_losses(call(labels, embeddings), sample_weight, reduction)
        if reduction in (None, "none"):
            return loss
        if replicas.averages_gradients:
            return loss * replicas.count if reduction == "sum" else loss
        return scale_for_replicas(loss, reduction)
    values, total = global_values(replicas, call, labels, embeddings, call_with_reference)
    loss = global_share(replicas, values, total, sample_weight, reduction)
    if replicas.averages_gradients and reduction not in (None, "none"):
        loss = loss * replicas.count
    return loss


def added_loss(replicas, call, labels, embeddings, reduction="sum_over_batch_size"):
    """The value a layer adds with `add_loss` for a loss mined over the global batch.

    This replica's share of the global loss (`global_share`), times the number of replicas:
    Keras divides the added losses by the number of replicas under `tf.distribute`, and DDP
    averages the gradients. Also returns the gathered (labels, embeddings), in replica order.
    """
    all_labels, all_embeddings, start = gather_batch(replicas, labels, embeddings)
    values = own_rows(call(all_labels, all_embeddings), start, ops.shape(embeddings)[0])
    share = global_share(replicas, values, ops.shape(all_embeddings)[0], None, reduction)
    return share * replicas.count, all_labels, all_embeddings


def replicas():
    """The replicas of the current step whose loss sees only its own rows, or None.

    Not None inside a `tf.distribute` replica context with several replicas (TensorFlow) or
    with an initialised `torch.distributed` group of several processes (torch); always None
    on JAX, where the step is one program over the global batch.
    """
    return _backend.replicas()


def train_step(model, x, y=None, sample_weight=None):
    """One data-parallel training step of a compiled Keras model on torch.

    Keras 3's `fit` on torch trains one process. In a `torch.distributed` group (started by
    `torchrun` or `torch.multiprocessing.spawn`), each process calls `train_step` on its own
    slice of the global batch: the model's compiled loss (and the losses it adds) mine over
    the global batch, and the gradients are averaged over the processes before the optimizer
    applies them, as DDP does; the result equals one step of single-device training on the
    global batch. Without an initialised group it is Keras' plain torch step. Call
    `broadcast_variables(model)` once before training so that every process starts from
    the same weights.

    ```python
    torch.distributed.init_process_group("gloo")        # or "nccl"
    model.compile(optimizer="adam", loss=deepmetric.losses.SupConLoss())
    deepmetric.distributed.broadcast_variables(model)
    for x, y in my_slice_of_each_global_batch:
        loss = deepmetric.distributed.train_step(model, x, y)
    ```

    Returns the loss of this process (a torch scalar; its mean over the processes is the
    loss of the global batch under the default reduction).
    """
    if _backend.name() != "torch":
        raise ValueError(
            "`train_step` is the torch backend's data-parallel step; on JAX and TensorFlow use "
            f"`fit` under a distribution or strategy. Received: backend={_backend.name()!r}"
        )
    if model.optimizer is None:
        raise ValueError("`model` must be compiled with an optimizer. Received: optimizer=None")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return _backend.torch_train_step(model, x, y, sample_weight)


def broadcast_variables(model, source=0):
    """Copies every weight of `model` from process `source` to all processes (torch)."""
    if _backend.name() != "torch":
        raise ValueError(
            f"`broadcast_variables` is for torch.distributed. Received: backend={_backend.name()!r}"
        )
    if _backend.replicas() is not None:
        _backend.torch_broadcast_variables(model.variables, source)
