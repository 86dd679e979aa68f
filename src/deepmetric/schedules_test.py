"""Tests for deepmetric.schedules: WarmUp and the schedule factory."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from deepmetric import _backend, schedules
from deepmetric.schedules import WarmUp

WARMUP = 8


def value(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def inner_schedules():
    return {
        "float": 0.1,
        "cosine-restarts": keras.optimizers.schedules.CosineDecayRestarts(
            0.1, first_decay_steps=10, t_mul=2.0, m_mul=0.5, alpha=0.01
        ),
        "exponential": keras.optimizers.schedules.ExponentialDecay(
            0.1, decay_steps=5, decay_rate=0.5
        ),
    }


def inner_value(inner, step):
    """The wrapped schedule at `step`, from its own formula."""
    if isinstance(inner, float):
        return inner
    if isinstance(inner, keras.optimizers.schedules.ExponentialDecay):
        return 0.1 * 0.5 ** (step / 5)
    # CosineDecayRestarts(0.1, 10, t_mul=2, m_mul=0.5, alpha=0.01): cycles of 10, 20, 40...
    start, length, scale = 0, 10, 1.0
    while step >= start + length:
        start, length, scale = start + length, 2 * length, 0.5 * scale
    cosine = 0.5 * scale * (1 + math.cos(math.pi * (step - start) / length))
    return 0.1 * ((1 - 0.01) * cosine + 0.01)


STEPS = [0, 1, WARMUP // 2, WARMUP - 1, WARMUP, WARMUP + 1, WARMUP + 25]


def values(schedule, steps):
    """The schedule at each of `steps`, in one call on an int32 vector."""
    return keras.ops.convert_to_numpy(schedule(np.asarray(steps, dtype="int32")))


@pytest.mark.parametrize("inner_name", ["float", "cosine-restarts", "exponential"])
@pytest.mark.parametrize("initial", [0.0, 0.02])
def test_values_follow_the_formula(inner_name, initial):
    inner = inner_schedules()[inner_name]
    schedule = WarmUp(inner, warmup_steps=WARMUP, initial_learning_rate=initial)
    expected = [
        initial + (inner_value(inner, 0) - initial) * step / WARMUP
        if step < WARMUP
        else inner_value(inner, step - WARMUP)
        for step in STEPS
    ]
    np.testing.assert_allclose(values(schedule, STEPS), expected, rtol=1e-5, atol=1e-7)
    # A Python int step, as the optimizer's iteration count, gives the same values.
    for i in (0, 3, 4):
        assert value(schedule, STEPS[i]) == pytest.approx(expected[i], rel=1e-5, abs=1e-7)


def test_warm_up_is_continuous_and_starts_from_initial():
    schedule = WarmUp(0.1, warmup_steps=4, initial_learning_rate=0.01)
    assert value(schedule, 0) == pytest.approx(0.01)
    assert [round(value(schedule, s), 6) for s in range(6)] == [
        0.01,
        0.0325,
        0.055,
        0.0775,
        0.1,
        0.1,
    ]


@pytest.mark.parametrize("inner_name", ["float", "cosine-restarts", "exponential"])
def test_zero_warmup_steps_is_the_schedule(inner_name):
    inner = inner_schedules()[inner_name]
    expected = [inner_value(inner, step) for step in (0, 3, 17)]
    np.testing.assert_allclose(values(WarmUp(inner, warmup_steps=0), [0, 3, 17]), expected, 1e-5)


def test_result_is_float32_for_integer_steps():
    schedule = WarmUp(inner_schedules()["exponential"], warmup_steps=3)
    out = schedule(keras.ops.convert_to_tensor(2, dtype="int32"))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


@pytest.mark.parametrize("inner_name", ["float", "cosine-restarts", "exponential"])
def test_compiled_equals_eager(inner_name):
    """Under jax.jit / tf.function the step is a tracer: no Python branching on it."""
    inner = inner_schedules()[inner_name]
    schedule = WarmUp(inner, warmup_steps=WARMUP, initial_learning_rate=0.01)
    steps = np.arange(0, 40, dtype="int32")
    compiled = _backend.compiled(lambda s: schedule(s), steps)
    actual = keras.ops.convert_to_numpy(compiled(steps))
    expected = [
        0.01 + (inner_value(inner, 0) - 0.01) * s / WARMUP
        if s < WARMUP
        else inner_value(inner, s - WARMUP)
        for s in steps
    ]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)
    for s in (0, WARMUP - 1, WARMUP, 39):
        assert actual[s] == pytest.approx(value(schedule, s), rel=1e-6)


def test_drives_an_optimizer_inside_fit():
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    schedule = WarmUp(inner_schedules()["cosine-restarts"], warmup_steps=3)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    # 8 steps done; the optimizer's rate is the schedule at the iteration count.
    rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    assert rate == pytest.approx(inner_value(schedule.schedule, 8 - 3), rel=1e-5)


@pytest.mark.parametrize("inner_name", ["float", "cosine-restarts", "exponential"])
def test_serialization_round_trip(inner_name):
    schedule = WarmUp(
        inner_schedules()[inner_name], warmup_steps=WARMUP, initial_learning_rate=0.01
    )
    config = keras.saving.serialize_keras_object(schedule)
    assert config["registered_name"] == "deepmetric>WarmUp"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, WarmUp)
    assert restored.get_config() == schedule.get_config()
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule)
    )
    steps = [0, 3, WARMUP, 30]
    np.testing.assert_allclose(values(restored, steps), values(schedule, steps))


def test_nested_warm_up_round_trip():
    schedule = WarmUp(WarmUp(0.1, warmup_steps=2), warmup_steps=3)
    restored = WarmUp.from_config(schedule.get_config())
    assert isinstance(restored.schedule, WarmUp)
    np.testing.assert_allclose(values(restored, range(7)), values(schedule, range(7)))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"warmup_steps": -1},
            ValueError,
            r"`warmup_steps` must be an integer >= 0\. "
            r"Received: warmup_steps=-1",
        ),
        ({"warmup_steps": 2.5}, ValueError, r"Received: warmup_steps=2\.5"),
        ({"warmup_steps": True}, ValueError, r"Received: warmup_steps=True"),
        (
            {"warmup_steps": 5, "initial_learning_rate": -0.1},
            ValueError,
            r"`initial_learning_rate` must be a float >= 0\. Received: initial_learning_rate=-0\.1",
        ),
        ({"warmup_steps": 5, "schedule": -0.1}, ValueError, r"Received: schedule=-0\.1"),
        (
            {"warmup_steps": 5, "schedule": "cosine"},
            TypeError,
            r"`schedule` must be a float or a .*LearningRateSchedule.*Received: schedule='cosine'",
        ),
    ],
)
def test_invalid_arguments(kwargs, error, message):
    kwargs = {"schedule": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        WarmUp(**kwargs)


# ---------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------


def test_build_constant():
    assert schedules.build("constant", 0.1, total_steps=100) == 0.1
    warm = schedules.build("constant", 0.1, total_steps=100, warmup_steps=10)
    assert isinstance(warm, WarmUp)
    assert value(warm, 5) == pytest.approx(0.05)
    assert value(warm, 99) == pytest.approx(0.1)


@pytest.mark.parametrize("warmup_steps", [0, 10])
def test_build_cosine(warmup_steps):
    schedule = schedules.build("cosine", 0.1, total_steps=110, warmup_steps=warmup_steps)
    assert isinstance(schedule, WarmUp if warmup_steps else keras.optimizers.schedules.CosineDecay)
    assert value(schedule, warmup_steps) == pytest.approx(0.1)
    assert value(schedule, warmup_steps + (110 - warmup_steps) // 2) == pytest.approx(
        0.05, rel=1e-5
    )
    assert value(schedule, 110) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("warmup_steps", [0, 10])
def test_build_cosine_restarts_fills_the_run_with_three_cycles(warmup_steps):
    schedule = schedules.build(
        "cosine-restarts", 0.1, total_steps=70 + warmup_steps, warmup_steps=warmup_steps
    )
    # Cycles of 10, 20 and 40 steps after the warm-up; each restarts at 0.1.
    starts = values(schedule, [warmup_steps + offset for offset in (0, 10, 30)])
    np.testing.assert_allclose(starts, 0.1, rtol=1e-5)
    ends = values(schedule, [warmup_steps + offset for offset in (9, 29, 69)])
    assert np.all(ends < 0.003)


@pytest.mark.parametrize("warmup_steps", [0, 10])
def test_build_exponential_ends_at_one_hundredth(warmup_steps):
    schedule = schedules.build("exponential", 0.1, total_steps=110, warmup_steps=warmup_steps)
    assert value(schedule, warmup_steps) == pytest.approx(0.1)
    assert value(schedule, 110) == pytest.approx(0.1 * 0.01, rel=1e-5)
    midway = warmup_steps + (110 - warmup_steps) // 2
    expected = 0.1 * 0.01 ** ((midway - warmup_steps) / (110 - warmup_steps))
    assert value(schedule, midway) == pytest.approx(expected, rel=1e-5)
    if warmup_steps:
        assert value(schedule, 5) == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["Cosine", "COSINE-RESTARTS", "Exponential", "Constant"])
def test_build_accepts_any_case(name):
    """As `optimizers.build`: names are case-insensitive."""
    got = schedules.build(name, 0.1, total_steps=70, warmup_steps=7)
    want = schedules.build(name.lower(), 0.1, total_steps=70, warmup_steps=7)
    np.testing.assert_allclose(values(got, range(70)), values(want, range(70)))


def test_build_errors():
    with pytest.raises(
        ValueError,
        match=r"Unknown schedule name: 'linear'\. Allowed names: 'constant', 'cosine', "
        r"'cosine-restarts', 'exponential'\.",
    ):
        schedules.build("linear", 0.1, total_steps=10)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be smaller than `total_steps`"):
        schedules.build("cosine", 0.1, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match=r"Received: total_steps=0"):
        schedules.build("cosine", 0.1, total_steps=0)
    with pytest.raises(ValueError, match=r"Received: warmup_steps=-2"):
        schedules.build("constant", 0.1, total_steps=10, warmup_steps=-2)
    with pytest.raises(ValueError, match=r"Received: learning_rate=0"):
        schedules.build("constant", 0, total_steps=10)
