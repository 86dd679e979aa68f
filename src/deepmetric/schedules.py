"""Learning-rate warm-up in front of any schedule, and one factory for the common schedules."""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
from keras import ops

from deepmetric._api import export

SCHEDULE_NAMES = ("constant", "cosine", "cosine-restarts", "exponential")

# `build("exponential", ...)` decays the rate by this factor over the steps after warm-up.
EXPONENTIAL_FINAL_FRACTION = 0.01
# `build("cosine-restarts", ...)` fits this many cycles (lengths 1, 2, 4 with t_mul=2).
RESTART_CYCLES = 3


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@export
class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up in front of a schedule or a constant learning rate.

    Large batches of hard-mined pairs give large, noisy gradients at the start of
    training; ramping the rate up over the first steps keeps the adaptive optimizers'
    moment estimates from being dominated by them (Goyal et al. 2017, "Accurate, Large
    Minibatch SGD"). For a step `t`, with `w = warmup_steps` and `r0 =
    initial_learning_rate`:

        rate(t) = r0 + (schedule(0) - r0) * t / w     if t < w
        rate(t) = schedule(t - w)                     otherwise

    so the wrapped schedule starts, at step `w`, from its own step 0. A float
    `schedule` is a constant rate. The rate is computed with `keras.ops` only
    (`where`, no Python branching on the step), so it traces under `jax.jit`,
    `tf.function` and inside `fit`; the result is float32.

    Args:
        schedule: A float >= 0 or a `keras.optimizers.schedules.LearningRateSchedule`
            (for example `CosineDecayRestarts` or `ExponentialDecay`).
        warmup_steps: An int >= 0, the number of warm-up steps. With 0 the schedule
            is returned unchanged.
        initial_learning_rate: The rate at step 0, a float >= 0. Defaults to `0.0`.

    Example:

    >>> import keras
    >>> from deepmetric.schedules import WarmUp
    >>> schedule = WarmUp(0.1, warmup_steps=4)
    >>> [round(float(schedule(step)), 3) for step in range(6)]
    [0.0, 0.025, 0.05, 0.075, 0.1, 0.1]
    >>> cosine = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=100)
    >>> optimizer = keras.optimizers.SGD(learning_rate=WarmUp(cosine, warmup_steps=10))
    """

    def __init__(
        self,
        schedule: float | keras.optimizers.schedules.LearningRateSchedule,
        warmup_steps: int,
        initial_learning_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            pass
        elif _is_real(schedule):
            if not (float(schedule) >= 0.0 and math.isfinite(float(schedule))):
                raise ValueError(
                    "`schedule` must be a float >= 0 or a LearningRateSchedule. "
                    f"Received: schedule={schedule!r}"
                )
            schedule = float(schedule)
        else:
            raise TypeError(
                "`schedule` must be a float or a "
                "`keras.optimizers.schedules.LearningRateSchedule`. "
                f"Received: schedule={schedule!r} of type {type(schedule).__name__}"
            )
        if not _is_integer(warmup_steps) or warmup_steps < 0:
            raise ValueError(
                f"`warmup_steps` must be an integer >= 0. Received: warmup_steps={warmup_steps!r}"
            )
        if not _is_real(initial_learning_rate) or not (
            float(initial_learning_rate) >= 0.0 and math.isfinite(float(initial_learning_rate))
        ):
            raise ValueError(
                "`initial_learning_rate` must be a float >= 0. "
                f"Received: initial_learning_rate={initial_learning_rate!r}"
            )
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.initial_learning_rate = float(initial_learning_rate)

    def _target(self, step):
        if isinstance(self.schedule, float):
            return ops.convert_to_tensor(self.schedule, dtype="float32")
        return ops.cast(self.schedule(step), "float32")

    def __call__(self, step):
        step = ops.cast(step, "float32")
        if self.warmup_steps == 0:
            return self._target(step)
        warmup_steps = float(self.warmup_steps)
        start = self.initial_learning_rate
        peak = self._target(ops.zeros_like(step))
        warm = start + (peak - start) * (step / warmup_steps)
        # The wrapped schedule never sees a negative step, even in the unused branch.
        after = self._target(ops.maximum(step - warmup_steps, 0.0))
        return ops.where(ops.less(step, warmup_steps), warm, after)

    def get_config(self) -> dict[str, Any]:
        schedule: Any = self.schedule
        if not isinstance(schedule, float):
            schedule = keras.saving.serialize_keras_object(schedule)
        return {
            "schedule": schedule,
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WarmUp:
        config = dict(config)
        if isinstance(config.get("schedule"), dict):
            config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def build(
    name: str, learning_rate: float, total_steps: int, warmup_steps: int = 0
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate called `name` over a run of `total_steps`, after a warm-up.

    The decaying schedules span the `total_steps - warmup_steps` steps after the
    warm-up, so that they end with the run:

    - `"constant"`: `learning_rate` (a float when there is no warm-up).
    - `"cosine"`: `keras.optimizers.schedules.CosineDecay` to 0.
    - `"cosine-restarts"`: `CosineDecayRestarts` with Keras' defaults (`t_mul=2`,
      `m_mul=1`, `alpha=0`) and a first cycle of `(total_steps - warmup_steps) // 7`
      steps, so that three cycles (1 + 2 + 4 = 7 lengths) fill the run.
    - `"exponential"`: `ExponentialDecay` down to `learning_rate / 100` at the end.

    With `warmup_steps > 0` the result is wrapped in `WarmUp(schedule, warmup_steps)`,
    which ramps linearly from 0.

    Args:
        name: One of `"constant"`, `"cosine"`, `"cosine-restarts"`, `"exponential"`
            (case-insensitive).
        learning_rate: The peak rate, a float > 0.
        total_steps: The number of optimizer steps of the run, an int >= 1.
        warmup_steps: An int >= 0; below `total_steps` for the decaying schedules.

    Returns:
        A float or a `keras.optimizers.schedules.LearningRateSchedule`.

    Example:

    >>> from deepmetric.schedules import build
    >>> build("constant", 0.1, total_steps=100)
    0.1
    >>> schedule = build("cosine", 0.1, total_steps=100, warmup_steps=10)
    >>> [round(float(schedule(step)), 4) for step in (0, 5, 10, 55, 100)]
    [0.0, 0.05, 0.1, 0.05, 0.0]
    >>> build("linear", 0.1, total_steps=100)
    Traceback (most recent call last):
    ...
    ValueError: Unknown schedule name: 'linear'. Allowed names: 'constant', 'cosine', 'cosine-restarts', 'exponential'.
    """  # noqa: E501
    key = name.lower() if isinstance(name, str) else name
    if key not in SCHEDULE_NAMES:
        allowed = ", ".join(repr(n) for n in SCHEDULE_NAMES)
        raise ValueError(f"Unknown schedule name: {name!r}. Allowed names: {allowed}.")
    if not _is_real(learning_rate) or not (
        float(learning_rate) > 0.0 and math.isfinite(float(learning_rate))
    ):
        raise ValueError(
            f"`learning_rate` must be a float > 0. Received: learning_rate={learning_rate!r}"
        )
    if not _is_integer(total_steps) or total_steps < 1:
        raise ValueError(
            f"`total_steps` must be an integer >= 1. Received: total_steps={total_steps!r}"
        )
    if not _is_integer(warmup_steps) or warmup_steps < 0:
        raise ValueError(
            f"`warmup_steps` must be an integer >= 0. Received: warmup_steps={warmup_steps!r}"
        )
    learning_rate = float(learning_rate)
    decay_steps = int(total_steps) - int(warmup_steps)
    if key != "constant" and decay_steps < 1:
        raise ValueError(
            f"`warmup_steps` must be smaller than `total_steps` for the {key!r} schedule. "
            f"Received: warmup_steps={warmup_steps!r}, total_steps={total_steps!r}"
        )
    schedules = keras.optimizers.schedules
    schedule: float | keras.optimizers.schedules.LearningRateSchedule
    if key == "constant":
        schedule = learning_rate
    elif key == "cosine":
        schedule = schedules.CosineDecay(learning_rate, decay_steps=decay_steps)
    elif key == "cosine-restarts":
        first = max(1, decay_steps // (2**RESTART_CYCLES - 1))
        schedule = schedules.CosineDecayRestarts(learning_rate, first_decay_steps=first)
    else:
        schedule = schedules.ExponentialDecay(
            learning_rate, decay_steps=decay_steps, decay_rate=EXPONENTIAL_FINAL_FRACTION
        )
    if warmup_steps > 0:
        return WarmUp(schedule, warmup_steps=int(warmup_steps))
    return schedule
