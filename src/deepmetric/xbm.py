"""Cross-batch memory (XBM): a queue of past embeddings as extra pairs for a pair-based loss.

Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020, arXiv:1912.06798. Embeddings
drift slowly once training has warmed up, so the embeddings of the last few thousand examples are
still good stand-ins for the current model's: keeping them in a first-in-first-out queue gives
each anchor thousands of positives and negatives per step for the price of a (B, B + M) matrix.

Why a layer, not a loss. The memory is state that must change at every training step. A
`keras.losses.Loss` is not tracked by the trainer: under JAX, `fit` calls the model as a pure
function of its variables and keeps only the variables that the model's layers return, so a
memory held by a loss object would never be updated (or would leak tracers). A layer can hold
the queue as non-trainable variables and `assign` them in `call`, which every backend's trainer
carries from step to step exactly like BatchNormalization's moving statistics. The layer adds
its loss with `add_loss`, as `deepmetric.heads.ProxyAnchor` does.

```python
images = keras.Input((28, 28, 1))
labels = keras.Input((), dtype="int32")
embeddings = embedder(images)                      # the model kept after training
xbm = deepmetric.xbm.CrossBatchMemory(deepmetric.losses.MultiSimilarityLoss(), memory_size=4096)
trainer = keras.Model([images, labels], xbm([embeddings, labels]))
trainer.compile(optimizer="adam")                  # the loss comes from the layer
trainer.fit((x, y), batch_size=64, epochs=10)
embedder.predict(x)                                # inference: the embedder alone
```
"""

from __future__ import annotations

import keras
from keras import ops

from deepmetric import distributed
from deepmetric import losses as losses_lib
from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels, check_nonempty, split_inputs
from deepmetric.losses.base import reduce_losses

_SCALAR_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight")


def _reference_losses():
    """The names of the public losses that have the `call_with_reference` hook."""
    return [
        name
        for name in losses_lib.__all__
        if isinstance(cls := getattr(losses_lib, name), type)
        and callable(getattr(cls, "call_with_reference", None))
    ]


def _check_loss(loss):
    if isinstance(loss, dict):
        loss = keras.saving.deserialize_keras_object(loss)
    if not callable(getattr(loss, "call_with_reference", None)):
        raise TypeError(
            "`loss` must be a deepmetric loss that accepts reference embeddings and a "
            f"reference mask ({', '.join(_reference_losses())}). Received: loss={loss!r}"
        )
    if loss.reduction not in _SCALAR_REDUCTIONS:
        raise ValueError(
            f"`loss.reduction` must reduce to a scalar, one of {_SCALAR_REDUCTIONS}. "
            f"Received: reduction={loss.reduction!r}"
        )
    return loss


def enqueue_indices(pointer, batch_size, memory_size):
    """Which batch row each memory slot receives when a batch is enqueued at `pointer`.

    Rows are written to slots `(pointer + i) % memory_size` in order, so a batch larger than the
    memory leaves its last `memory_size` rows. Fixed shapes: no scatter, no duplicate writes.

    Returns:
      (write, index): bool (M,) whether slot s is overwritten, int32 (M,) the batch row it gets
      (0 where it is not overwritten).

    >>> write, index = enqueue_indices(3, 2, 4)
    >>> ops.convert_to_numpy(write).tolist(), ops.convert_to_numpy(index).tolist()
    ([True, False, False, True], [1, 0, 0, 0])
    """
    slots = ops.arange(memory_size, dtype="int32")
    pointer = ops.cast(pointer, "int32")
    batch_size = ops.cast(batch_size, "int32")
    offset = ops.mod(slots - pointer + memory_size, memory_size)
    write = ops.less(offset, batch_size)
    last = offset + memory_size * ops.floor_divide(
        ops.maximum(batch_size - 1 - offset, 0), memory_size
    )
    return write, ops.where(write, last, 0)


@export
class CrossBatchMemory(keras.layers.Layer):
    r"""Cross-batch memory: a pair-based loss against the batch plus the last M embeddings.

    Called on `[embeddings, labels]`, the layer adds (`add_loss`)

    $$L = \text{loss}\big(\text{anchors} = \text{batch},\;
          \text{references} = \text{batch} \cup \text{memory}\big)$$

    where the batch compared with itself excludes each example with itself, the memory holds the
    stop-gradient embeddings and labels of the M most recent examples of earlier training steps,
    and slots not yet filled take part in no pair (`reference_mask`). Then, in training only,
    it enqueues the batch (first in, first out; a fixed (M, D) buffer with a write pointer and a
    filled count). Outside training (`evaluate`) the loss is added but nothing is written. It
    returns the embeddings unchanged, so it can end a training model. Called on embeddings
    alone, it is the identity and adds nothing.

    ```python
    out = CrossBatchMemory(MultiSimilarityLoss(), memory_size=4096)([embedder(images), labels])
    trainer = keras.Model([images, labels], out)
    trainer.compile(optimizer="adam")   # loss=None: the loss comes from the layer
    trainer.fit((x, y), batch_size=64)
    ```

    Gradients flow through both sides of the batch-batch pairs (as the wrapped loss on the batch
    alone) and through the anchor side of the batch-memory pairs. In value, the layer with
    `memory_size=M` equals pytorch-metric-learning's `CrossBatchMemory(loss, memory_size=M + B)`
    at a fixed batch size B (PML enqueues the batch first and compares it with the whole
    memory, itself included, minus the self pairs); see docs/losses.md.

    Across devices (docs/scaling.md), every replica scores its rows against the global batch
    and the memory, and enqueues the global batch in replica order, so the memories of all
    replicas stay equal.

    The memory is saved with the model (non-trainable variables in the `.keras` file), so a run
    resumed from a checkpoint keeps it. Memory labels are stored as int32.

    Args:
      loss: a deepmetric loss with a `call_with_reference` method (`MultiSimilarityLoss`,
        `CircleLoss`, `SupConLoss`, `NTXentLoss`, `OnlineContrastiveLoss`, `TripletLoss`, whose
        presets reproduce the TFA triplet losses), or its serialized config. Its `reduction`
        must give a scalar.
      memory_size: M, the number of past embeddings kept (>= 1).

    >>> import numpy as np
    >>> from deepmetric.losses import MultiSimilarityLoss
    >>> xbm = CrossBatchMemory(MultiSimilarityLoss(), memory_size=3)
    >>> x = np.eye(2, 4, dtype="float32")
    >>> _ = xbm([x, np.array([0, 1])], training=True)
    >>> _ = xbm([x + 1.0, np.array([2, 3])], training=True)
    >>> ops.convert_to_numpy(xbm.memory_labels).tolist(), int(xbm.filled), int(xbm.pointer)
    ([3, 1, 2], 3, 1)
    """

    def __init__(self, loss, memory_size=1024, **kwargs):
        super().__init__(**kwargs)
        self.loss = _check_loss(loss)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ValueError(
                f"`memory_size` must be a positive integer. Received: memory_size={memory_size!r}"
            )
        self.memory_size = memory_size

    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(f"The embedding size must be known. Received: shape={input_shape}")
        self.memory_embeddings = self.add_weight(
            shape=(self.memory_size, dim),
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
            name="memory_embeddings",
        )
        self.memory_labels = self.add_weight(
            shape=(self.memory_size,),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="memory_labels",
        )
        self.pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="pointer"
        )
        self.filled = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", trainable=False, name="filled"
        )

    def memory_loss(self, embeddings, labels):
        """Per-anchor losses of the batch against the batch and the current memory (no update)."""
        embeddings = check_nonempty(check_embeddings(embeddings, "embeddings"), "embeddings")
        labels = check_labels(labels, embeddings.shape[0], "labels")
        if not self.built:
            self.build(tuple(embeddings.shape))
            self.built = True
        memory = ops.cast(self.memory_embeddings.value, embeddings.dtype)
        reference = ops.concatenate([embeddings, memory], axis=0)
        reference_labels = ops.concatenate(
            [ops.cast(labels, "int32"), self.memory_labels.value], axis=0
        )
        n = ops.shape(embeddings)[0]
        rows = ops.arange(n, dtype="int32")
        not_self = ops.not_equal(ops.expand_dims(rows, 1), ops.expand_dims(rows, 0))
        filled = ops.less(ops.arange(self.memory_size, dtype="int32"), self.filled.value)
        memory_mask = ops.broadcast_to(ops.expand_dims(filled, 0), (n, self.memory_size))
        mask = ops.concatenate([not_self, memory_mask], axis=1)
        return self.loss.call_with_reference(
            ops.cast(labels, "int32"),
            embeddings,
            reference_embeddings=reference,
            reference_labels=reference_labels,
            reference_mask=mask,
        )

    def enqueue(self, embeddings, labels):
        """Writes the batch into the memory (first in, first out) and moves the pointer."""
        embeddings = ops.stop_gradient(ops.cast(embeddings, "float32"))
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        n = ops.shape(embeddings)[0]
        write, index = enqueue_indices(self.pointer.value, n, self.memory_size)
        new_embeddings = ops.take(embeddings, index, axis=0)
        self.memory_embeddings.assign(
            ops.where(ops.expand_dims(write, 1), new_embeddings, self.memory_embeddings.value)
        )
        self.memory_labels.assign(
            ops.where(write, ops.take(labels, index, axis=0), self.memory_labels.value)
        )
        n = ops.cast(n, "int32")
        self.pointer.assign(ops.mod(self.pointer.value + n, self.memory_size))
        self.filled.assign(ops.minimum(self.filled.value + n, self.memory_size))

    def reset_memory(self):
        """Empties the memory (for example after a warm-up without XBM)."""
        self.memory_embeddings.assign(ops.zeros(self.memory_embeddings.shape, "float32"))
        self.memory_labels.assign(ops.zeros(self.memory_labels.shape, "int32"))
        self.pointer.assign(0)
        self.filled.assign(0)

    def call(self, inputs, training=None):
        embeddings, labels = split_inputs(inputs, "`CrossBatchMemory`")
        if labels is None:
            return embeddings
        replicas = distributed.replicas()
        if replicas is not None and getattr(self.loss, "mining", "global") == "global":
            # Several replicas (tf.distribute, torch.distributed): every replica scores its
            # rows against the global batch and the memory, and enqueues the global batch in
            # replica order, so that the memories stay equal.
            embeddings = check_embeddings(embeddings, "embeddings")
            labels = check_labels(labels, embeddings.shape[0], "labels")
            loss, all_labels, all_embeddings = distributed.added_loss(
                replicas,
                lambda y, x: self.memory_loss(x, y),
                labels,
                embeddings,
                self.loss.reduction,
            )
            self.add_loss(loss)
            if training:
                self.enqueue(all_embeddings, all_labels)
            return embeddings
        values = self.memory_loss(embeddings, labels)
        self.add_loss(reduce_losses(values, None, self.loss.reduction))
        if training:
            self.enqueue(embeddings, labels)
        return embeddings

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        return tuple(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "loss": keras.saving.serialize_keras_object(self.loss),
            "memory_size": self.memory_size,
        }
