"""Test support shipped with the library: gradients per backend, numpy references, invariants.

- `value_and_grad(fn, x, *args, compiled=False)`: `fn(x, *args)` and its gradient in `x` as
  numpy arrays, eager or compiled as `fit` compiles (`jax.jit`, `tf.function` with an unknown
  batch dimension); `gradient_step` the same as a repeatable step for timing; `compiled(fn,
  *example_args)` a function compiled that way. Their backend code is `deepmetric._backend`.
- `references`: brute-force float64 numpy forms of the losses, from their definitions.
- `check_loss(loss)` and `check_head(head_class)`: the invariants of `invariants` (large
  labels, eager equals compiled, permutation, relabelling, config round trip, `.keras`
  save/load, the degenerate batch). `conformance_test.py` runs them on every loss of
  `metric_losses()` and every head of `proxy_heads()`.
"""

from deepmetric._backend import compiled, gradient_step, value_and_grad
from deepmetric.testing import references
from deepmetric.testing.invariants import (
    HEAD_CHECKS,
    LOSS_CHECKS,
    check_head,
    check_loss,
    metric_losses,
    proxy_heads,
)

__all__ = [
    "HEAD_CHECKS",
    "LOSS_CHECKS",
    "check_head",
    "check_loss",
    "compiled",
    "gradient_step",
    "metric_losses",
    "proxy_heads",
    "references",
    "value_and_grad",
]
