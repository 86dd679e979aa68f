"""Tests for deepmetric.optimizers: AdaBelief against a numpy transcription of the official step."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from deepmetric import _backend, optimizers, schedules
from deepmetric.optimizers import AdaBelief

STEPS = 200


# ----------------------------------------------------------------------------------------
# Reference: adabelief-pytorch 0.2.1, AdaBelief.step, line by line, in numpy.
# Tensors are float32 (as the torch parameters and states); scalars (bias corrections,
# N_sma, step sizes) are Python floats (float64), as in the official code.
# ----------------------------------------------------------------------------------------


def reference_adabelief(
    params,
    grad_fn,
    learning_rates,
    *,
    beta_1=0.9,
    beta_2=0.999,
    epsilon=1e-16,
    amsgrad=False,
    rectify=True,
    degenerated_to_sgd=True,
    weight_decay=0.0,
):
    """Trajectory (one list of float32 arrays per step) of the official AdaBelief.step.

    weight_decouple=True and fixed_decay=False (the official defaults).
    """
    params = [np.array(p, dtype=np.float32) for p in params]
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_var = [np.zeros_like(p) for p in params]
    max_exp_avg_var = [np.zeros_like(p) for p in params]
    trajectory = []
    for step, lr in enumerate(learning_rates, start=1):
        grads = [np.asarray(g, dtype=np.float32) for g in grad_fn(params)]
        for i, grad in enumerate(grads):
            p = params[i]
            # p.data.mul_(1.0 - group['lr'] * group['weight_decay'])
            p = p * np.float32(1.0 - lr * weight_decay)
            bias_correction1 = 1 - beta_1**step
            bias_correction2 = 1 - beta_2**step
            # exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg[i] = exp_avg[i] * np.float32(beta_1) + grad * np.float32(1 - beta_1)
            grad_residual = grad - exp_avg[i]
            # exp_avg_var.mul_(beta2).addcmul_(grad_residual, grad_residual, value=1 - beta2)
            exp_avg_var[i] = exp_avg_var[i] * np.float32(beta_2) + grad_residual * (
                grad_residual
            ) * np.float32(1 - beta_2)
            if amsgrad:
                # torch.max(max_exp_avg_var, exp_avg_var.add_(eps), out=max_exp_avg_var)
                exp_avg_var[i] = exp_avg_var[i] + np.float32(epsilon)
                max_exp_avg_var[i] = np.maximum(max_exp_avg_var[i], exp_avg_var[i])
                denom = np.sqrt(max_exp_avg_var[i]) / np.float32(
                    math.sqrt(bias_correction2)
                ) + np.float32(epsilon)
            else:
                exp_avg_var[i] = exp_avg_var[i] + np.float32(epsilon)
                denom = np.sqrt(exp_avg_var[i]) / np.float32(
                    math.sqrt(bias_correction2)
                ) + np.float32(epsilon)
            if not rectify:
                step_size = lr / bias_correction1
                p = p - np.float32(step_size) * (exp_avg[i] / denom)
            else:
                beta2_t = beta_2**step
                n_sma_max = 2 / (1 - beta_2) - 1
                n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
                if n_sma >= 5:
                    step_size = math.sqrt(
                        (1 - beta2_t)
                        * (n_sma - 4)
                        / (n_sma_max - 4)
                        * (n_sma - 2)
                        / n_sma
                        * n_sma_max
                        / (n_sma_max - 2)
                    ) / (1 - beta_1**step)
                elif degenerated_to_sgd:
                    step_size = 1.0 / (1 - beta_1**step)
                else:
                    step_size = -1
                if n_sma >= 5:
                    denom = np.sqrt(exp_avg_var[i]) + np.float32(epsilon)
                    p = p - np.float32(step_size * lr) * (exp_avg[i] / denom)
                elif step_size > 0:
                    p = p - np.float32(step_size * lr) * exp_avg[i]
            params[i] = p.astype(np.float32)
        trajectory.append([p.copy() for p in params])
    return trajectory


def logistic_problem(seed=0, n=64, d=5):
    """A small non-separable logistic regression: the mean of softplus(z) - y z, z = X w + b."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    y = (x @ w_true + rng.normal(scale=2.0, size=n) > 0).astype(np.float64)

    def grad_fn(params):
        w, b = (np.asarray(p, dtype=np.float64) for p in params)
        z = x @ w + b[0]
        residual = 1.0 / (1.0 + np.exp(-z)) - y
        return [x.T @ residual / n, np.array([residual.mean()])]

    init = [rng.normal(scale=0.5, size=d).astype(np.float32), np.array([0.3], np.float32)]
    return init, grad_fn


def keras_trajectory(optimizer, init, grad_fn, steps):
    """Parameters after each `apply_gradients`, the gradients computed by `grad_fn`."""
    variables = [keras.Variable(p) for p in init]
    optimizer.build(variables)

    def apply(*grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return grads[0]

    if _backend.name() == "tensorflow":
        # Eager TensorFlow runs each small op slowly; `fit` would compile the step too.
        apply = _backend.compiled(apply, *init)
    trajectory = []
    for _ in range(steps):
        values = [keras.ops.convert_to_numpy(v) for v in variables]
        apply(*[keras.ops.convert_to_tensor(g.astype(np.float32)) for g in grad_fn(values)])
        trajectory.append([keras.ops.convert_to_numpy(v).copy() for v in variables])
    return trajectory


def assert_trajectories_close(actual, expected):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        for a_p, e_p in zip(a, e, strict=True):
            np.testing.assert_allclose(a_p, e_p, rtol=2e-5, atol=2e-6, err_msg=f"step {step}")


OPTIONS = [
    pytest.param(
        {"rectify": rectify, "amsgrad": amsgrad, "weight_decay": weight_decay},
        id=f"rectify={rectify}-amsgrad={amsgrad}-wd={weight_decay}",
    )
    for rectify in (True, False)
    for amsgrad in (False, True)
    for weight_decay in (None, 1e-2)
] + [
    pytest.param(
        {"rectify": True, "degenerated_to_sgd": False, "amsgrad": True, "weight_decay": 1e-2},
        id="no-sgd-warmup-amsgrad-wd",
    ),
    pytest.param({"rectify": True, "beta_2": 0.5}, id="rho-max-below-5"),
    # epsilon large enough to show in float32: checks where the official code adds it.
    pytest.param({"rectify": False, "epsilon": 1e-8, "beta_1": 0.0}, id="eps=1e-8-beta_1=0"),
    pytest.param({"rectify": True, "amsgrad": True, "epsilon": 1e-8}, id="eps=1e-8-amsgrad"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_trajectory_matches_official_step(options):
    init, grad_fn = logistic_problem()
    lr = 0.02
    optimizer = AdaBelief(learning_rate=lr, **options)
    actual = keras_trajectory(optimizer, init, grad_fn, STEPS)
    reference_options = dict(options)
    reference_options["weight_decay"] = reference_options.get("weight_decay") or 0.0
    expected = reference_adabelief(init, grad_fn, [lr] * STEPS, **reference_options)
    assert_trajectories_close(actual, expected)
    # The run went somewhere: the parameters moved well beyond the tolerance.
    assert np.abs(expected[-1][0] - init[0]).max() > 0.1


def test_without_sgd_warmup_the_first_steps_do_not_move():
    """With rectify and no degeneration to SGD, rho_t < 5 for t <= 5 at beta_2 = 0.999."""
    init, grad_fn = logistic_problem()
    optimizer = AdaBelief(learning_rate=0.1, degenerated_to_sgd=False)
    trajectory = keras_trajectory(optimizer, init, grad_fn, 6)
    for params in trajectory[:5]:
        np.testing.assert_array_equal(params[0], init[0])
    assert np.abs(trajectory[5][0] - init[0]).max() > 0.0


def test_schedule_as_learning_rate_matches_official_step():
    """A WarmUp(ExponentialDecay) rate, evaluated at the iteration count before each step."""
    init, grad_fn = logistic_problem(seed=1)
    inner = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=50, decay_rate=0.5)
    schedule = schedules.WarmUp(inner, warmup_steps=20, initial_learning_rate=0.001)
    steps = 80
    rates = [
        0.001 + (0.05 - 0.001) * t / 20 if t < 20 else 0.05 * 0.5 ** ((t - 20) / 50)
        for t in range(steps)
    ]
    optimizer = AdaBelief(learning_rate=schedule, weight_decay=1e-2)
    actual = keras_trajectory(optimizer, init, grad_fn, steps)
    expected = reference_adabelief(init, grad_fn, rates, weight_decay=1e-2)
    assert_trajectories_close(actual, expected)


def test_exclude_from_weight_decay():
    variables = [keras.Variable([1.0, 2.0], name="kernel"), keras.Variable([3.0], name="bias")]
    optimizer = AdaBelief(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    zeros = [keras.ops.zeros((2,)), keras.ops.zeros((1,))]
    optimizer.apply_gradients(zip(zeros, variables, strict=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variables[0]), [0.95, 1.9], rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variables[1]), [3.0])


def tiny_regression(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x @ rng.normal(size=(4, 1)) + 0.5).astype(np.float32)
    return x, y


def test_serialize_round_trip():
    schedule = schedules.WarmUp(
        keras.optimizers.schedules.CosineDecayRestarts(0.01, first_decay_steps=10), 5
    )
    optimizer = AdaBelief(
        learning_rate=schedule,
        beta_1=0.8,
        beta_2=0.99,
        epsilon=1e-12,
        amsgrad=True,
        rectify=False,
        degenerated_to_sgd=False,
        weight_decay=1e-3,
        clipnorm=1.0,
        name="belief",
    )
    config = keras.optimizers.serialize(optimizer)
    assert config["registered_name"] == "deepmetric>AdaBelief"
    restored = keras.optimizers.deserialize(config)
    assert isinstance(restored, AdaBelief)
    assert restored.get_config() == optimizer.get_config()
    assert isinstance(restored._learning_rate, schedules.WarmUp)
    steps = np.array([0, 3, 12], dtype="int32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored._learning_rate(steps)),
        keras.ops.convert_to_numpy(schedule(steps)),
    )


def test_get_config_is_complete():
    config = AdaBelief().get_config()
    for key, value in {
        "learning_rate": 1e-3,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-16,
        "amsgrad": False,
        "rectify": True,
        "degenerated_to_sgd": True,
        "weight_decay": None,
        "name": "adabelief",
    }.items():
        assert config[key] == (pytest.approx(value) if key == "learning_rate" else value), key
    assert isinstance(AdaBelief.from_config(config), AdaBelief)


def test_fit_decreases_the_loss_then_save_and_load(tmp_path):
    """A few `fit` steps with a warmed-up schedule, then a `.keras` round trip in safe mode."""
    x, y = tiny_regression()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
    )
    schedule = schedules.WarmUp(
        keras.optimizers.schedules.CosineDecayRestarts(0.05, first_decay_steps=20), 3
    )
    model.compile(
        optimizer=AdaBelief(learning_rate=schedule, amsgrad=True, weight_decay=1e-3), loss="mse"
    )
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    after = model.evaluate(x, y, verbose=0)
    assert after < 0.7 * before
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 20

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.optimizer, AdaBelief)
    assert isinstance(loaded.optimizer._learning_rate, schedules.WarmUp)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # Training resumes from the restored state.
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 24


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"learning_rate": 0.0},
            r"`learning_rate` must be a float > 0.*Received: learning_rate=0.0",
        ),
        ({"learning_rate": -1e-3}, r"Received: learning_rate=-0.001"),
        ({"learning_rate": "fast"}, r"learning_rate.*Received: learning_rate='fast'"),
        ({"beta_1": 1.0}, r"`beta_1` must be a float in \[0, 1\). Received: beta_1=1.0"),
        ({"beta_1": -0.1}, r"`beta_1` must be a float in \[0, 1\). Received: beta_1=-0.1"),
        ({"beta_2": 1.5}, r"`beta_2` must be a float in \[0, 1\). Received: beta_2=1.5"),
        ({"epsilon": -1e-8}, r"`epsilon` must be a float >= 0. Received: epsilon=-1e-08"),
        ({"weight_decay": -0.1}, r"`weight_decay` must be None or a float >= 0.*=-0.1"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaBelief(**kwargs)


def test_integer_learning_rate_is_accepted():
    assert AdaBelief(learning_rate=1).get_config()["learning_rate"] == 1.0


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adam", keras.optimizers.Adam),
        ("adamw", keras.optimizers.AdamW),
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adabelief", AdaBelief),
        ("AdaBelief", AdaBelief),
    ],
)
def test_build(name, cls):
    optimizer = optimizers.build(name, 0.01)
    assert isinstance(optimizer, cls)
    assert optimizer.get_config()["learning_rate"] == pytest.approx(0.01)


def test_build_with_schedule():
    schedule = schedules.WarmUp(0.1, warmup_steps=10)
    optimizer = optimizers.build("sgd", schedule)
    assert optimizer._learning_rate is schedule


def test_build_errors():
    with pytest.raises(
        ValueError,
        match=r"Unknown optimizer name: 'lamb'\. Allowed names: 'adam', 'adamw', 'sgd', "
        r"'rmsprop', 'adabelief'\.",
    ):
        optimizers.build("lamb", 0.01)
    with pytest.raises(ValueError, match=r"Received: learning_rate=-1.0"):
        optimizers.build("adam", -1.0)
