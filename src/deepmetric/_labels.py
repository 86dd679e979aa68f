"""Label handling shared by every loss: shapes, integer dtypes, no float cast."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def _concrete(x):
    """Returns `x` as a numpy array when its values are known, else None."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return ops.convert_to_numpy(x)
    except Exception:  # a symbolic tensor inside jit / tf.function
        return None


def _dtype_name(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def check_embeddings(embeddings, name: str = "y_pred"):
    """Checks that `embeddings` is a rank-2 float tensor and returns it as float32.

    Distances are always computed in float32, also for float16 / bfloat16 inputs
    (mixed precision), so that the square root and the mining are exact enough.
    """
    embeddings = ops.convert_to_tensor(embeddings)
    if len(embeddings.shape) != 2:
        raise ValueError(
            f"`{name}` must be a rank-2 tensor of embeddings with shape "
            f"(batch_size, embedding_dim). Received: {name}.shape={tuple(embeddings.shape)}"
        )
    dtype = _dtype_name(embeddings)
    if "float" not in dtype:
        raise TypeError(
            f"`{name}` must hold floating-point embeddings. Received: {name}.dtype={dtype}"
        )
    if dtype != "float64":
        embeddings = ops.cast(embeddings, "float32")
    return embeddings


def check_nonempty(tensor, name: str = "y_pred"):
    """`tensor` unchanged, or a ValueError naming it when its batch (first axis) is 0.

    An empty batch is an error wherever its size is known while tracing (eager calls,
    `jax.jit`); where it is not (a `tf.function` traced with an unknown batch dimension), the
    losses give 0 with finite gradients, the rule for a batch without any term.
    """
    if tensor.shape and tensor.shape[0] == 0:
        raise ValueError(
            f"`{name}` must hold at least one example: the batch is empty. "
            f"Received: {name}.shape={tuple(tensor.shape)}"
        )
    return tensor


def check_labels(labels, batch_size=None, name: str = "y_true"):
    """Returns class labels as a 1-D integer tensor, never through a float cast.

    Accepts shape (B,) or (B, 1), integer dtype or integer-valued floats (checked
    when the values are known). Float labels are cast to an integer type wide
    enough for them: int32 for 16- and 32-bit floats, int64 for float64.

    Raises:
      ValueError: the labels are not of shape (B,) or (B, 1), their length is not
        the batch size, or float labels hold a non-integer value.
      TypeError: the labels are not numbers (strings, booleans, complex).
    """
    if isinstance(labels, (list, tuple)):
        labels = np.asarray(labels)
    if isinstance(labels, np.ndarray) and labels.dtype.kind not in "iuf":
        raise TypeError(
            f"`{name}` must hold integer class labels. Received: {name}.dtype={labels.dtype}"
        )
    labels = ops.convert_to_tensor(labels)
    shape = tuple(labels.shape)
    if len(shape) == 2 and shape[1] == 1:
        labels = ops.reshape(labels, (-1,))
    elif len(shape) != 1:
        raise ValueError(
            f"`{name}` must hold one integer class label per example, with shape "
            f"(batch_size,) or (batch_size, 1). Received: {name}.shape={shape}"
        )
    n = labels.shape[0]
    if batch_size is not None and n is not None and n != batch_size:
        raise ValueError(
            f"`{name}` must have one label per embedding: expected {batch_size} labels, "
            f"received {name}.shape={shape}"
        )
    dtype = _dtype_name(labels)
    if dtype.startswith(("int", "uint")):
        return labels
    if "float" not in dtype:
        raise TypeError(
            f"`{name}` must hold integer class labels (an integer dtype or integer-valued "
            f"floats). Received: {name}.dtype={dtype}"
        )
    values = _concrete(labels)
    if values is not None:
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            bad = values[~(np.isfinite(values) & (values == np.round(values)))][:3]
            raise ValueError(
                f"`{name}` must hold integer class labels; float labels must be "
                f"integer-valued. Received non-integer values such as {bad.tolist()}"
            )
    return ops.cast(labels, "int64" if dtype == "float64" else "int32")


def split_inputs(inputs, layer: str):
    """`embeddings` or `[embeddings, labels]`, as the training-only layers take them.

    Returns (embeddings, labels), labels None when only embeddings were given.
    """
    if isinstance(inputs, (list, tuple)):
        if len(inputs) != 2:
            raise ValueError(
                f"{layer} takes `embeddings` or `[embeddings, labels]`. "
                f"Received a list of {len(inputs)} inputs."
            )
        return inputs[0], inputs[1]
    return inputs, None
