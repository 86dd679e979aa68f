"""The one internal module that knows the backends: gradients and compilation.

Library code uses `keras.ops` only. Tests and benchmarks need two things that
`keras.ops` does not offer: the gradient of a scalar function with respect to a
tensor, and the function compiled the way `fit` compiles it (`jax.jit`,
`tf.function` with an unknown batch dimension, torch eager). Both live here.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np


def name() -> str:
    return keras.backend.backend()


def value_and_grad(fn: Callable, x, *args, compiled: bool = False):
    """(fn(x, *args), d fn / d x) as numpy arrays, on the current backend.

    With `compiled`, the function runs under `jax.jit`, or under `tf.function`
    with the batch dimension of `x` and of every argument unknown; torch runs
    eagerly (as `fit` does unless `jit_compile` is set).
    """
    backend = name()
    x = np.asarray(x)
    if backend == "jax":
        import jax

        f = jax.value_and_grad(lambda v, *a: fn(v, *a))
        if compiled:
            f = jax.jit(f)
        value, grad = f(x, *args)
        return np.asarray(value), np.asarray(grad)
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
        value, grad = run(*tensors)
        grad = np.zeros_like(x) if grad is None else grad.numpy()
        return value.numpy(), grad
    if backend == "torch":
        import torch

        v = torch.tensor(x, requires_grad=True)
        targs = [torch.as_tensor(np.asarray(a)) for a in args]
        value = fn(v, *targs)
        (grad,) = torch.autograd.grad(value, v, allow_unused=True)
        grad = np.zeros_like(x) if grad is None else grad.detach().numpy()
        return value.detach().numpy(), grad
    raise NotImplementedError(f"value_and_grad is not implemented for the {backend} backend")


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
