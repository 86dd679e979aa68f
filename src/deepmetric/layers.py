"""Serializable layers for embedding models."""

from __future__ import annotations

import keras
from keras import ops

from deepmetric._api import export


@export
class L2Normalization(keras.layers.Layer):
    r"""Scales each embedding to unit Euclidean length.

    $y = x / \sqrt{\max(\sum_i x_i^2, \epsilon)}$ along `axis`. The last layer of an
    embedding model, so that the distances of the metric-learning losses live on the
    unit sphere. Unlike a `Lambda` layer it is serializable: a model that ends with it
    saves to `.keras` and loads back with `safe_mode=True`. The norm is computed in
    float32 under a mixed-precision policy and the result cast back to the compute dtype.

    Args:
      axis: the axis (or axes) to normalise along.
      epsilon: lower bound of the squared norm; a zero vector maps to zero.

    >>> import numpy as np
    >>> y = L2Normalization()(np.array([[3.0, 4.0], [0.0, 0.0]]))
    >>> np.round(keras.ops.convert_to_numpy(y).astype("float64"), 4).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """

    def __init__(self, axis=-1, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        if isinstance(axis, list):
            axis = tuple(axis)
        if not isinstance(axis, (int, tuple)):
            raise TypeError(f"`axis` must be an int or a tuple of ints. Received: axis={axis!r}")
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon!r}")
        self.axis = axis
        self.epsilon = float(epsilon)
        self.supports_masking = True

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        squared = ops.sum(ops.square(x), axis=self.axis, keepdims=True)
        y = x * ops.rsqrt(ops.maximum(squared, self.epsilon))
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        axis = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        config.update({"axis": axis, "epsilon": self.epsilon})
        return config
