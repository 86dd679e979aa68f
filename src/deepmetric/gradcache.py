"""Gradient caching: train on batches larger than memory, with the exact gradient of the batch.

A batch loss (triplet, multi-similarity, SupCon, NT-Xent...) couples every embedding of the
batch with every other, so the batch cannot be split into independent micro-batches whose
gradients add up. Its memory, however, is almost all in the embedder's activations, one set per
sample; the loss itself needs only the B x D embeddings and a B x B matrix. Gradient caching
(Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", arXiv:2101.06983) uses that: with the batch cut into chunks x_1..x_n,

1. embed every chunk without keeping activations: E = [f(x_1; w), ..., f(x_n; w)] (B x D);
2. take the loss and its gradient in the embeddings, G = dL/dE, and in the weights directly
   (weight regularizers), g_0 = dL/dw;
3. embed every chunk again, now with gradients, and accumulate the vector-Jacobian products
   with the cached gradients: dL/dw = g_0 + sum_i (df(x_i; w)/dw)^T G_i.

By the chain rule this is the gradient of the whole batch, whatever the chunk size; peak memory
is that of one chunk's activations plus the B x D embeddings and the loss. The price is a
second forward pass over the batch (4/3 of a plain step's arithmetic if a backward pass costs
two forward passes) plus the overhead of calling the model once per chunk: 2.2x the CPU time
of the plain step at B = 256 in chunks of 32 on torch, CPU; about 10x on jax, CPU, where the
chunks run in a `lax.scan` loop (so that XLA keeps one chunk alive) and XLA's CPU convolutions
are slow inside it (docs/benchmarks.md, "Gradient caching").

`GradCacheModel(embedder, chunk_size)` is a `keras.Model` whose `train_step` does this on every
backend, so `compile` and `fit` are used as usual with any loss of labels and embeddings. The
per-backend steps live in `deepmetric._gradcache_kernels`.

What runs twice. The embedder's forward pass runs twice per chunk. Randomness is replayed:
before the first pass the embedder's non-trainable state (the seed generators of `Dropout`
and of Keras' random layers, and `BatchNormalization`'s moving statistics) is saved and
restored before the second pass, so both passes draw the same dropout masks and the moving
statistics are updated once per chunk, as in a plain step on that chunk. Layers that draw
random numbers outside Keras' seed generators (for example a torch module calling
`torch.rand`) are not replayed and make the gradient wrong. `BatchNormalization` normalises
each chunk with the chunk's own statistics, so a model with it computes a different (chunked)
function than the plain step; use `LayerNormalization` or `GroupNormalization`, or a chunk of
the whole batch, where exactness matters.

Restrictions. The loss is the one given to `compile` (a function of labels and embeddings);
losses that layers add inside the model with `add_loss` (`deepmetric.heads`,
`deepmetric.xbm.CrossBatchMemory`, activity regularizers) are refused with a `ValueError`,
since their layers would see one chunk at a time. Weight regularizers are fine.
"""

from __future__ import annotations

import keras

from deepmetric import _gradcache_kernels
from deepmetric._api import export

__all__ = ["GradCacheModel"]


@export
class GradCacheModel(keras.Model):
    """Trains `embedder` on whole batches in chunks of `chunk_size` (gradient caching).

    The gradient of each step is the gradient of the loss on the whole batch, as in a plain
    `embedder.fit` step (equal up to float rounding), while at most `chunk_size` samples have
    their activations in memory at once (Gao et al. 2021, "Scaling Deep Contrastive Learning
    Batch Size under Memory Limited Setup"):

        G = dL/dE at E = [f(x_1), ..., f(x_n)] embedded without gradients,
        dL/dw = sum_i (df(x_i)/dw)^T G_i           (each chunk embedded again)

    Calling the model, `predict` and `evaluate` call the embedder itself; the trained weights
    are the embedder's (keep and save `embedder`). Dropout masks are replayed between the two
    passes; `BatchNormalization` sees one chunk at a time (see the module docstring).

    Args:
        embedder: a `keras.Model` (or layer) mapping inputs to embeddings (B, D).
        chunk_size: samples embedded at once; the last chunk of a batch may be smaller.

    ```python
    embedder = deepmetric.models.build_embedding_model((28, 28, 1), 64)
    model = deepmetric.gradcache.GradCacheModel(embedder, chunk_size=64)
    model.compile(optimizer="adam", loss=deepmetric.losses.SupConLoss())
    model.fit(PKSampler(x, y, classes_per_batch=64, samples_per_class=16), epochs=10)
    embedder.save("embedder.keras")
    ```
    """

    def __init__(self, embedder, chunk_size, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(embedder, keras.layers.Layer):
            raise TypeError(
                f"`embedder` must be a keras.Model or layer. Received: embedder={embedder!r}"
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(
                f"`chunk_size` must be a positive integer. Received: chunk_size={chunk_size!r}"
            )
        self.embedder = embedder
        self.chunk_size = chunk_size
        if embedder.built:
            self.built = True

    def build(self, input_shape):
        if not self.embedder.built:
            self.embedder.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.embedder(inputs, training=training)

    def train_step(self, *args):
        return _gradcache_kernels.train_step(self, *args)

    def get_config(self):
        return {
            "name": self.name,
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "chunk_size": self.chunk_size,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedder"] = keras.saving.deserialize_keras_object(config["embedder"])
        return cls(**config)
