"""The AdaBelief optimizer, and one factory for the optimizers the command line offers.

`AdaBelief` reproduces, step for step, `AdaBelief.step` of the official
adabelief-pytorch 0.2.1 (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by
the Belief in Observed Gradients", NeurIPS 2020), written with `keras.ops` only so
that it runs on JAX, TensorFlow and PyTorch and compiles inside `fit`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
from keras import ops

from deepmetric._api import export

OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "rmsprop", "adabelief")


def _check_real(name: str, value: Any, allowed: str, ok) -> float:
    """`value` as a float when it is a real number (not a bool) for which `ok` holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    return float(value)


def _check_learning_rate(learning_rate: Any) -> Any:
    """A positive float, a `LearningRateSchedule` or a callable; ints become floats."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return learning_rate
    if callable(learning_rate):
        return learning_rate
    return _check_real(
        "learning_rate",
        learning_rate,
        "a float > 0, a `keras.optimizers.schedules.LearningRateSchedule` or a callable",
        lambda v: v > 0.0 and math.isfinite(v),
    )


def _power_and_complement(beta: float, step):
    """(beta^step, 1 - beta^step) for a float32 `step` >= 1, accurate in float32.

    `1 - beta**step` computed as `-expm1(step * log(beta))` with `log(beta)` taken in
    float64 avoids the cancellation of `1 - power(float32(beta), step)` (a relative
    error of 1e-5 at step 1 for beta = 0.999), so the bias corrections and the
    RAdam length `rho_t` follow the float64 scalars of the reference implementation.
    """
    if beta == 0.0:
        return ops.zeros_like(step), ops.ones_like(step)
    x = step * math.log(beta)
    return ops.exp(x), ops.negative(ops.expm1(x))


@export
class AdaBelief(keras.optimizers.Optimizer):
    """AdaBelief: Adam whose step size follows the belief in the observed gradient.

    AdaBelief (Zhuang et al., NeurIPS 2020) replaces Adam's second moment of the
    gradient by the exponential moving average of the squared deviation of the gradient
    from its own moving average: a gradient close to its prediction earns a large step,
    a surprising one a small step. This class performs exactly the update of
    `AdaBelief.step` in the official adabelief-pytorch 0.2.1, whose defaults it keeps
    (epsilon 1e-16, rectification on, decoupled weight decay). For a parameter `p` with
    gradient `g` at step `t` (counted from 1), learning rate `lr`:

        m_t = beta_1 * m_{t-1} + (1 - beta_1) * g
        s_t = beta_2 * s_{t-1} + (1 - beta_2) * (g - m_t)^2 + epsilon
        bc1 = 1 - beta_1^t,  bc2 = 1 - beta_2^t
        s_hat = max(s_hat_{t-1}, s_t) with amsgrad, else s_t

    Without `rectify`: `p -= lr / bc1 * m_t / (sqrt(s_hat) / sqrt(bc2) + epsilon)`.

    With `rectify` (RAdam's variance rectification):

        rho_max = 2 / (1 - beta_2) - 1,  rho_t = rho_max - 2 t beta_2^t / bc2
        if rho_t >= 5:
            r_t = sqrt(bc2 (rho_t - 4) / (rho_max - 4) (rho_t - 2) / rho_t
                       rho_max / (rho_max - 2)) / bc1
            p -= lr * r_t * m_t / (sqrt(s_t) + epsilon)
        elif degenerated_to_sgd:
            p -= lr / bc1 * m_t
        else: no update.

    As in the official code, the rectified branch divides by `sqrt(s_t)`, not by the
    AMSGrad maximum, and `bc2` enters through `r_t` only; so with `rectify=True`,
    `amsgrad` only maintains the maximum and does not change the update.

    Weight decay is decoupled (AdamW style), applied before the update with the
    current learning rate: `p *= 1 - lr * weight_decay`. This is the official
    `weight_decouple=True, fixed_decay=False`; those two options are fixed here (the
    L2-penalty and fixed-decay variants are not offered). Like every Keras optimizer,
    `exclude_from_weight_decay()` removes variables from the decay.

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule` (for example
            `deepmetric.schedules.WarmUp`), or a callable without arguments.
            Defaults to `1e-3`.
        beta_1: Decay rate of the gradient's moving average, in [0, 1).
        beta_2: Decay rate of the moving average of the squared residual, in [0, 1).
        epsilon: Added to the residual's moving average at every step and to the
            denominator, >= 0. Defaults to `1e-16` (the official default; the authors
            recommend `1e-8` where SGD beats Adam, as for CNNs on images).
        amsgrad: Keep the running maximum of `s_t` and divide by it (non-rectified
            update only, as in the official code).
        rectify: RAdam's rectified update. Defaults to `True`.
        degenerated_to_sgd: With `rectify`, take an SGD-with-momentum step while the
            rectification term is undefined (`rho_t < 5`, the first 5 steps at
            `beta_2=0.999`); otherwise skip those steps. Defaults to `True`.
        weight_decay: Decoupled weight decay factor, >= 0, or `None` for none.
        name: The optimizer's name.
        **kwargs: The other `keras.optimizers.Optimizer` arguments (`clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, `ema_momentum`,
            `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`).

    Example:

    >>> import keras, numpy as np
    >>> from deepmetric.optimizers import AdaBelief
    >>> variable = keras.Variable([1.0, 2.0])
    >>> optimizer = AdaBelief(learning_rate=0.1)
    >>> _ = optimizer.apply_gradients([(keras.ops.convert_to_tensor([0.5, -1.0]), variable)])
    >>> np.round(keras.ops.convert_to_numpy(variable), 4)  # step 1: SGD step lr * g
    array([0.95, 2.1 ], dtype=float32)

    In a model:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=AdaBelief(1e-3, weight_decay=1e-4), loss="mse")
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-16,
        amsgrad: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        weight_decay: float | None = None,
        name: str = "adabelief",
        **kwargs: Any,
    ) -> None:
        learning_rate = _check_learning_rate(learning_rate)
        in_unit = "a float in [0, 1)"
        beta_1 = _check_real("beta_1", beta_1, in_unit, lambda v: 0.0 <= v < 1.0)
        beta_2 = _check_real("beta_2", beta_2, in_unit, lambda v: 0.0 <= v < 1.0)
        epsilon = _check_real(
            "epsilon", epsilon, "a float >= 0", lambda v: v >= 0.0 and math.isfinite(v)
        )
        if weight_decay is not None:
            weight_decay = _check_real(
                "weight_decay",
                weight_decay,
                "None or a float >= 0",
                lambda v: v >= 0.0 and math.isfinite(v),
            )
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = bool(amsgrad)
        self.rectify = bool(rectify)
        self.degenerated_to_sgd = bool(degenerated_to_sgd)

    def build(self, var_list):
        """Creates the moving averages (and the AMSGrad maximum) for `var_list`."""
        if self.built:
            return
        super().build(var_list)
        self._exp_avgs, self._exp_avg_vars = self.add_optimizer_variables(
            var_list, ["exp_avg", "exp_avg_var"]
        )
        if self.amsgrad:
            self._max_exp_avg_vars = self.add_optimizer_variables(var_list, "max_exp_avg_var")

    def update_step(self, gradient, variable, learning_rate):
        """One AdaBelief step for one variable (weight decay is already applied)."""
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2, eps = self.beta_1, self.beta_2, self.epsilon
        index = self._get_variable_index(variable)
        exp_avg = self._exp_avgs[index]
        exp_avg_var = self._exp_avg_vars[index]

        _, bias_correction1 = _power_and_complement(beta_1, step)
        beta_2_power, bias_correction2 = _power_and_complement(beta_2, step)

        # exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        new_exp_avg = ops.add(ops.multiply(exp_avg, beta_1), ops.multiply(grad, 1.0 - beta_1))
        # grad_residual = grad - exp_avg
        residual = ops.subtract(grad, new_exp_avg)
        # exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2), then the
        # in-place exp_avg_var.add_(eps) of both branches of the official code.
        new_exp_avg_var = ops.add(
            ops.add(
                ops.multiply(exp_avg_var, beta_2),
                ops.multiply(ops.square(residual), 1.0 - beta_2),
            ),
            eps,
        )
        self.assign(exp_avg, new_exp_avg)
        self.assign(exp_avg_var, new_exp_avg_var)

        second_moment = new_exp_avg_var
        if self.amsgrad:
            max_exp_avg_var = self._max_exp_avg_vars[index]
            second_moment = ops.maximum(max_exp_avg_var, new_exp_avg_var)
            self.assign(max_exp_avg_var, second_moment)

        if not self.rectify:
            denom = ops.add(ops.divide(ops.sqrt(second_moment), ops.sqrt(bias_correction2)), eps)
            step_size = ops.divide(lr, bias_correction1)
            self.assign_sub(variable, ops.multiply(step_size, ops.divide(new_exp_avg, denom)))
            return

        # Rectified update, forked from RAdam. The official code divides by
        # sqrt(exp_avg_var) here, never by the AMSGrad maximum.
        n_sma_max = 2.0 / (1.0 - beta_2) - 1.0
        n_sma = ops.subtract(
            n_sma_max, ops.divide(ops.multiply(2.0 * step, beta_2_power), bias_correction2)
        )
        rectified = ops.greater_equal(n_sma, 5.0)
        sgd_step_size = ops.divide(lr, bias_correction1)
        sgd_update = ops.multiply(sgd_step_size, new_exp_avg)
        if not self.degenerated_to_sgd:
            sgd_update = ops.zeros_like(sgd_update)
        if n_sma_max <= 5.0:
            # rho_t <= rho_max < 5 at every step: the rectified branch is never taken.
            self.assign_sub(variable, sgd_update)
            return
        safe_n_sma = ops.maximum(n_sma, 5.0)  # the sqrt below only matters where rho_t >= 5
        ratio = ops.sqrt(
            bias_correction2
            * (safe_n_sma - 4.0)
            / (n_sma_max - 4.0)
            * (safe_n_sma - 2.0)
            / safe_n_sma
            * n_sma_max
            / (n_sma_max - 2.0)
        )
        step_size = ops.multiply(ops.divide(ratio, bias_correction1), lr)
        denom = ops.add(ops.sqrt(new_exp_avg_var), eps)
        rectified_update = ops.multiply(step_size, ops.divide(new_exp_avg, denom))
        self.assign_sub(variable, ops.where(rectified, rectified_update, sgd_update))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "rectify": self.rectify,
                "degenerated_to_sgd": self.degenerated_to_sgd,
            }
        )
        return config


def build(name: str, learning_rate: Any) -> keras.optimizers.Optimizer:
    """The optimizer called `name`, with Keras' defaults for everything but the rate.

    Args:
        name: One of `"adam"`, `"adamw"`, `"sgd"`, `"rmsprop"`, `"adabelief"`
            (case-insensitive).
        learning_rate: A float > 0 or a
            `keras.optimizers.schedules.LearningRateSchedule`.

    Returns:
        A new `keras.optimizers.Optimizer`: `keras.optimizers.Adam`, `AdamW`
        (weight decay 0.004), `SGD` (no momentum), `RMSprop`, or
        `deepmetric.optimizers.AdaBelief` with its official defaults.

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones) or a
            learning rate that is not positive.

    Example:

    >>> from deepmetric.optimizers import build
    >>> type(build("adabelief", 1e-3)).__name__
    'AdaBelief'
    >>> build("lamb", 1e-3)
    Traceback (most recent call last):
    ...
    ValueError: Unknown optimizer name: 'lamb'. Allowed names: 'adam', 'adamw', 'sgd', 'rmsprop', 'adabelief'.
    """  # noqa: E501
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZER_NAMES:
        allowed = ", ".join(repr(n) for n in OPTIMIZER_NAMES)
        raise ValueError(f"Unknown optimizer name: {name!r}. Allowed names: {allowed}.")
    learning_rate = _check_learning_rate(learning_rate)
    if key == "adabelief":
        return AdaBelief(learning_rate=learning_rate)
    classes = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    return classes[key](learning_rate=learning_rate)
