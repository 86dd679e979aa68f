"""The per-backend `train_step` of `deepmetric.gradcache.GradCacheModel`.

Keras' `Model.train_step` is written once per backend (keras/src/backend/{jax,tensorflow,
torch}/trainer.py): JAX's is a pure function of the variables' values, TensorFlow's records a
`GradientTape` inside a `tf.function`, torch's calls `backward`. The gradient-caching step
follows each one line by line (loss tracking, loss scaling, the optimizer, the metrics) and
replaces the single forward and backward pass with the three stages of gradient caching:
embed the chunks without gradients, differentiate the loss in the embeddings, embed the
chunks again and accumulate the vector-Jacobian products. Like the `deepmetric._backend`
module beside it, this is the only place that imports a backend; it uses Keras' private
trainer helpers (`unpack_x_y_sample_weight`, the loss tracker) exactly as Keras' own steps do.

Random state is replayed by running the second pass from the non-trainable state the first
pass started from (JAX: the same values; TensorFlow and torch: saved and assigned back).
"""

from __future__ import annotations

import keras
from keras.src.trainers.data_adapters import data_adapter_utils


def train_step(model, *args):
    """`model.train_step(*args)` with gradient caching, on the current backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_train_step(model, *args)
    if backend == "tensorflow":
        return _tensorflow_train_step(model, *args)
    if backend == "torch":
        return _torch_train_step(model, *args)
    raise NotImplementedError(f"gradient caching is not implemented for the {backend} backend")


def _rows(x, start, stop):
    return keras.tree.map_structure(lambda t: t[start:stop], x)


def _first(x):
    return next(t for t in keras.tree.flatten(x) if t is not None)


def _chunks(batch: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, batch)) for s in range(0, batch, size)]


def _refuse_added_losses(count: int) -> None:
    if count:
        raise ValueError(
            "GradCacheModel trains with the loss given to `compile` only; the embedder adds "
            f"{count} loss(es) with `add_loss` (a head, CrossBatchMemory or an activity "
            "regularizer), which would see one chunk at a time. Train such a model without "
            "gradient caching."
        )


def _regularized_weights(model) -> int:
    return sum(w.regularizer is not None for w in model.trainable_weights)


def _added_losses(model) -> int:
    return len(model.losses) - _regularized_weights(model)


# ---------------------------------------------------------------------------
# JAX: a pure function of (trainable, non-trainable, optimizer, metrics) values


def _jax_train_step(model, state, data):
    import jax
    import jax.numpy as jnp

    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    batch = _first(x).shape[0]
    size = min(model.chunk_size, batch)
    scanned = (batch // size) * size  # rows embedded under lax.scan, one chunk per step

    def embed(trainable, non_trainable, rows):
        out, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, rows, return_losses=True, training=True
        )
        # The losses of a stateless call include the weight regularizers (which the loss of
        # stage 2 adds itself); anything beyond them came from `add_loss`.
        _refuse_added_losses(len(losses) - _regularized_weights(model))
        return out, non_trainable

    def stacked(t):  # (n * size, ...) -> (n, size, ...)
        return t[:scanned].reshape((scanned // size, size) + t.shape[1:])

    xs = keras.tree.map_structure(stacked, x)
    rest = _rows(x, scanned, batch) if scanned < batch else None

    # 1. The embeddings of every chunk, without gradients, one chunk alive at a time.
    def forward(carry, rows):
        out, carry = embed(trainable, carry, rows)
        return carry, jax.lax.stop_gradient(out)

    nt, outs = jax.lax.scan(forward, non_trainable, xs)
    embeddings = outs.reshape((scanned,) + outs.shape[2:])
    if rest is not None:
        out, nt = embed(trainable, nt, rest)
        embeddings = jnp.concatenate([embeddings, jax.lax.stop_gradient(out)])

    # 2. The loss, its gradient in the embeddings and (regularizers) in the weights.
    def loss_fn(trainable, embeddings):
        loss, (_, _, metrics) = model.stateless_compute_loss(
            trainable,
            non_trainable,
            metrics_variables,
            x=x,
            y=y,
            y_pred=embeddings,
            sample_weight=sample_weight,
            training=True,
        )
        unscaled = loss
        if model.optimizer is not None:
            mapping = list(zip(model.optimizer.variables, optimizer_variables, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                loss = model.optimizer.scale_loss(loss)
        return loss, (unscaled, metrics)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (_, (unscaled_loss, metrics_variables)), (grads, cached) = grad_fn(trainable, embeddings)

    # 3. Each chunk again from the same state (the same dropout masks), with the
    # vector-Jacobian product of its cached embedding gradient.
    def backward(carry, inputs):
        non_trainable, grads = carry
        rows, cotangent = inputs
        _, vjp, non_trainable = jax.vjp(
            lambda w: embed(w, non_trainable, rows), trainable, has_aux=True
        )
        (g,) = vjp(cotangent)
        return (non_trainable, jax.tree.map(jnp.add, grads, g)), None

    cotangents = stacked(cached)
    (nt, grads), _ = jax.lax.scan(backward, (non_trainable, grads), (xs, cotangents))
    if rest is not None:
        _, vjp, nt = jax.vjp(lambda w: embed(w, nt, rest), trainable, has_aux=True)
        (g,) = vjp(cached[scanned:])
        grads = jax.tree.map(jnp.add, grads, g)

    trainable, optimizer_variables = model.optimizer.stateless_apply(
        optimizer_variables, grads, trainable
    )
    logs, metrics_variables = model._update_metrics_variables(
        metrics_variables, unscaled_loss, x, y, embeddings, sample_weight
    )
    return logs, (trainable, nt, optimizer_variables, metrics_variables)


# ---------------------------------------------------------------------------
# TensorFlow: tf.while_loop over the chunks (the batch size may be unknown when traced)


def _tensorflow_train_step(model, data):
    import tensorflow as tf
    from keras.src.losses import loss as loss_module

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    size = model.chunk_size
    batch = tf.shape(_first(x))[0]
    count = (batch + size - 1) // size

    def embed(i):
        return model(_rows(x, i * size, (i + 1) * size), training=True)

    state = model.non_trainable_variables
    saved = [tf.identity(v.value) for v in state]

    # 1. The embeddings of every chunk, without gradients.
    first = tf.stop_gradient(embed(0))
    _refuse_added_losses(_added_losses(model))
    parts = tf.TensorArray(first.dtype, size=count, infer_shape=False, element_shape=None)
    parts = parts.write(0, first)
    _, parts = tf.while_loop(
        lambda i, parts: i < count,
        lambda i, parts: (i + 1, parts.write(i, tf.stop_gradient(embed(i)))),
        (tf.constant(1), parts),
    )
    embeddings = parts.concat()
    embeddings.set_shape([None, *first.shape[1:]])
    for v, value in zip(state, saved, strict=True):
        v.assign(value)

    # 2. The loss, its gradient in the embeddings and (regularizers) in the weights.
    weights = model.trainable_weights
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss = model._compute_loss(
            x=x, y=y, y_pred=embeddings, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss), sample_weight=batch
        )
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    if not weights:
        return model.compute_metrics(x, y, embeddings, sample_weight=sample_weight)
    cached, *direct = tape.gradient(loss, [embeddings, *weights])
    grads = [
        tf.zeros_like(w.value) if g is None else tf.convert_to_tensor(g)
        for w, g in zip(weights, direct, strict=True)
    ]

    # 3. Each chunk again with the same random state, accumulating its VJP.
    def backward(i, *grads):
        with tf.GradientTape() as tape:
            out = embed(i)
        g = tape.gradient(out, weights, output_gradients=cached[i * size : (i + 1) * size])
        return (i + 1, *[a if b is None else a + b for a, b in zip(grads, g, strict=True)])

    _, *grads = tf.while_loop(lambda i, *_: i < count, backward, (tf.constant(0), *grads))
    model.optimizer.apply_gradients(zip(grads, weights, strict=True))
    return model.compute_metrics(x, y, embeddings, sample_weight=sample_weight)


# ---------------------------------------------------------------------------
# torch: no_grad forward, backward of the loss to the embeddings, backward per chunk


def _torch_train_step(model, data):
    import torch

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    batch = _first(x).shape[0]
    chunks = _chunks(batch, model.chunk_size)
    state = model.non_trainable_variables
    saved = [v.value.detach().clone() for v in state]

    # 1. The embeddings of every chunk, without gradients.
    with torch.no_grad():
        parts = []
        for start, stop in chunks:
            parts.append(model(_rows(x, start, stop), training=True))
            _refuse_added_losses(_added_losses(model))
        embeddings = torch.cat(parts)
    for v, value in zip(state, saved, strict=True):
        v.assign(value)

    # 2. The loss and its gradient in the embeddings (regularizers: in the weights' .grad).
    model.zero_grad()
    embeddings.requires_grad_(True)
    loss = model._compute_loss(
        x=x, y=y, y_pred=embeddings, sample_weight=sample_weight, training=True
    )
    model._loss_tracker.update_state(loss, sample_weight=batch)
    if model.optimizer is not None:
        loss = model.optimizer.scale_loss(loss)
    weights = model.trainable_weights[:]
    if weights:
        loss.backward()
        cached = embeddings.grad
        # 3. Each chunk again with the same random state; backward adds into .grad.
        for start, stop in chunks:
            out = model(_rows(x, start, stop), training=True)
            out.backward(cached[start:stop])
        gradients = [v.value.grad for v in weights]
        with torch.no_grad():
            model.optimizer.apply(gradients, weights)
    return model.compute_metrics(x, y, embeddings.detach(), sample_weight=sample_weight)
