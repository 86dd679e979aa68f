"""Embedding models: a small CNN for images, an MLP for feature vectors, any backbone.

Every model built here takes the raw inputs as the data set gives them (pixel values
0..16 for scikit-learn's digits, 0..255 for 8-bit images): the rescaling lives inside
the model, so a saved model needs no preprocessing code. Every model ends with a Dense
projection to `embedding_dim` and Keras' own `UnitNormalization` under a float32 dtype
policy, and is made of Keras' built-in layers only: its `.keras` file loads back in
safe mode with plain Keras, where deepmetric is not installed.

`UnitNormalization` computes x / max(||x||, 1e-12), `deepmetric.layers.L2Normalization`
x / max(||x||, 1e-6): the same values for every embedding of length at least 1e-6,
and zero for a zero vector. At exactly zero their gradients differ: the built-in
layer's is not finite there (NaN on JAX), L2Normalization's is. Files saved with
L2Normalization load as before once `deepmetric` is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

_KINDS = ("auto", "cnn", "mlp")


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise TypeError(
            f"`input_shape` must be a tuple of positive ints (without the batch axis). "
            f"Received: input_shape={input_shape!r}"
        ) from None
    if not shape or len(shape) > 3 or any(d <= 0 for d in shape):
        raise ValueError(
            "`input_shape` must be (features,), (height, width) or (height, width, channels) "
            f"with positive sizes. Received: input_shape={input_shape!r}"
        )
    return shape


def _cnn(x, *, dropout: float):
    """The convolutional trunk of the TFA triplet-loss tutorial, 'same' padding."""
    x = keras.layers.Conv2D(64, 2, padding="same", activation="relu", name="conv_1")(x)
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool_1")(x)
    x = keras.layers.Dropout(dropout, name="dropout_1")(x)
    x = keras.layers.Conv2D(32, 2, padding="same", activation="relu", name="conv_2")(x)
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool_2")(x)
    x = keras.layers.Dropout(dropout, name="dropout_2")(x)
    return keras.layers.Flatten(name="flatten")(x)


def _mlp(x, *, hidden: Sequence[int], dropout: float):
    for i, units in enumerate(hidden, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return x


def build_embedding_model(
    input_shape,
    embedding_dim: int = 64,
    *,
    kind: str = "auto",
    backbone: keras.Model | None = None,
    pixel_scale: float | None = None,
    standardize: tuple | None = None,
    dropout: float = 0.3,
    hidden: Sequence[int] = (256, 128),
    name: str = "embedding_model",
) -> keras.Model:
    """Builds a model that maps raw inputs to L2-normalised embeddings.

    - Images, `input_shape` (H, W, C) or (H, W) (a channel axis is added inside the
      model), get the small CNN of the TensorFlow Addons triplet-loss tutorial:
      Conv2D(64, 2) relu, MaxPool 2, Dropout 0.3, Conv2D(32, 2) relu, MaxPool 2,
      Dropout 0.3, Flatten, Dense(embedding_dim), UnitNormalization ('same' padding so
      that 8x8 inputs work).
    - Feature vectors, `input_shape` (D,), get an MLP: Dense(256) relu, Dropout,
      Dense(128) relu, Dropout, Dense(embedding_dim), UnitNormalization.
    - With `backbone`, any Keras model: its output (globally average-pooled if it is a
      feature map) goes through Dense(embedding_dim) and UnitNormalization.
    - UnitNormalization (float32 policy: it computes and returns float32 under a
      mixed-precision policy) scales each embedding to unit length; the model holds
      Keras layers only (and the backbone's), so it loads without deepmetric.

    Args:
      input_shape: the shape of one example, without the batch axis.
      embedding_dim: size of the embeddings.
      kind: "auto" (images get the CNN, vectors the MLP), "cnn" or "mlp".
      backbone: a Keras model applied after the preprocessing instead of the CNN/MLP.
      pixel_scale: if given, a `Rescaling(pixel_scale)` layer first, for example
        1/16 for scikit-learn's digits, 1/255 for 8-bit images.
      standardize: optional `(mean, variance)` of the features: a `Normalization`
        layer with these statistics (after `pixel_scale`).
      dropout: dropout rate of the CNN / MLP.
      hidden: widths of the MLP's hidden layers.
      name: the model's name.

    Returns:
      A functional `keras.Model` from raw inputs to unit-length embeddings.

    >>> model = build_embedding_model((8, 8, 1), 16, pixel_scale=1 / 16)
    >>> model.output_shape
    (None, 16)
    """
    shape = _check_shape(input_shape)
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {_KINDS}. Received: kind={kind!r}")
    if not isinstance(embedding_dim, int) or isinstance(embedding_dim, bool) or embedding_dim < 1:
        raise ValueError(
            f"`embedding_dim` must be a positive int. Received: embedding_dim={embedding_dim!r}"
        )
    if pixel_scale is not None and not pixel_scale > 0:
        raise ValueError(f"`pixel_scale` must be positive. Received: pixel_scale={pixel_scale!r}")
    if kind == "auto":
        kind = "mlp" if len(shape) == 1 else "cnn"
    if kind == "cnn" and backbone is None and len(shape) == 1:
        raise ValueError(
            f"kind='cnn' needs image inputs (H, W) or (H, W, C). Received: input_shape={shape}"
        )

    inputs = keras.Input(shape=shape, name="inputs")
    x = inputs
    if pixel_scale is not None:
        x = keras.layers.Rescaling(float(pixel_scale), name="rescaling")(x)
    if standardize is not None:
        mean, variance = standardize
        x = keras.layers.Normalization(mean=mean, variance=variance, name="standardize")(x)
    if len(shape) == 2 and (kind == "cnn" or backbone is not None):
        x = keras.layers.Reshape((*shape, 1), name="add_channel")(x)

    if backbone is not None:
        x = backbone(x)
        if len(x.shape) > 2:
            x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif kind == "cnn":
        x = _cnn(x, dropout=dropout)
    else:
        if len(shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        x = _mlp(x, hidden=hidden, dropout=dropout)
    x = keras.layers.Dense(embedding_dim, name="embedding")(x)
    outputs = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="l2_normalization")(x)
    return keras.Model(inputs, outputs, name=name)
