"""The invariants every labels-and-embeddings loss and every proxy head must keep.

`check_loss(loss)` and `check_head(head_class)` run them all on a small random batch; each
invariant is also a function of its own (`LOSS_CHECKS`, `HEAD_CHECKS`), so that a test can run
one at a time. A failed invariant raises an `AssertionError` that names it.

For a loss (a `keras.losses.Loss` called as `loss(labels, embeddings)`):

- `large_labels`: labels 16777216 + k (16777216 and 16777217 are one float32) give the value and
  gradient of labels k, also as a (B, 1) column;
- `bfloat16_labels`: under the `mixed_bfloat16` policy, labels 1000 + k (1000 and 1001 are one
  bfloat16) and bfloat16 embeddings give a float32 value equal to the float32 one; likewise
  under `mixed_float16` with labels 4097 + k;
- `eager_equals_compiled`: the compiled forward + backward (`jax.jit`, `tf.function` with an
  unknown batch dimension) equals the eager one, and the compiled value at a second batch size
  equals the eager value;
- `permutation`: permuting the batch keeps the value and permutes the gradient;
- `relabelling`: renaming the classes (negative and large integers) keeps value and gradient;
- `config_round_trip`: `from_config(get_config())` and Keras (de)serialisation give the same
  class, config and value;
- `keras_save_load`: a model compiled with the loss saves to `.keras` and loads in safe mode
  with the same loss class, config and value;
- `degenerate`: a batch of one example (no pair at all) gives 0 and a zero gradient; a batch of
  one class and a batch of distinct labels (each with a duplicate embedding) give a finite value
  and gradient, and 0 with a zero gradient unless the loss keeps the terms of one kind of pair
  (`one_sided`: multi-similarity and online contrastive keep the negative pairs' terms); each
  eager and compiled. An all-zero embedding in the batch gives a finite value and gradient;
- `nonfinite`: a NaN, inf or -inf anywhere in the embeddings gives a non-finite value, eager
  and compiled, also in a batch of one example and in a batch without positive pairs;
- `empty_batch`: an empty batch is a ValueError naming `y_pred` where its size is known
  (eager, `jax.jit`), and 0 with finite gradients where it is not (`tf.function` with an
  unknown batch dimension);
- `option_ranges`: every numeric option of the class's option table declares its range
  (`Option.bounds`), and NaN, inf, -inf and values just outside the range raise a ValueError
  naming the option and the range, from the class and from its loss function; the bounds
  themselves, where inclusive, are accepted.

For a head (a layer called as `head([embeddings, labels])` with a `proxies` weight), the same
invariants on its training objective (the loss it adds, or the cross-entropy of its logits),
where they apply: labels index the proxies, so `large_labels` becomes `bfloat16_labels` with
1004 classes, and `relabelling` permutes the proxies with the classes (the logits' columns
follow). The degenerate batch (one class, an embedding equal to its proxy) has a finite value
and gradient. `nonfinite` also covers non-finite proxies; `empty_batch` names `embeddings`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile

import keras
import numpy as np
from keras import ops

from deepmetric._backend import compiled, value_and_grad

HEAD_NAMES = (
    "arcface",
    "cosface",
    "sub_center_arcface",
    "normalized_softmax",
    "proxy_nca",
    "proxy_anchor",
    "large_margin_softmax",
    "sphereface",
    "soft_triple",
    "p2sgrad",
)
LARGE = 16777216  # 2^24: 2^24 and 2^24 + 1 are one float32
RTOL, ATOL, GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6, 1e-4, 1e-6


def metric_loss_base() -> type:
    """The base class of the losses that take (labels, embeddings)."""
    import deepmetric.losses as losses

    return next(c for c in losses.TripletLoss.__mro__ if c.__name__ == "MetricLoss")


def metric_losses() -> list[type]:
    """The classes of `deepmetric.losses.__all__` that take (labels, embeddings)."""
    import deepmetric.losses as losses

    base = metric_loss_base()
    found = [getattr(losses, name) for name in losses.__all__]
    return [
        c
        for c in found
        if isinstance(c, type) and issubclass(c, base) and c.__name__ != "NpairsLoss"
    ]


def proxy_heads() -> list[type]:
    """The head classes of `deepmetric.heads`, one per name of `HEAD_NAMES`."""
    import deepmetric.heads as heads

    return [heads.get(name) for name in HEAD_NAMES]


def batch(seed=0, size=12, dim=5, classes=3):
    """(labels, embeddings): every class at least twice, float32 normal embeddings."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(size) % classes)
    return labels, rng.normal(size=(size, dim)).astype("float32")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _close(got, expected, what, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


def _same(got, expected, what):
    """Value and gradient pairs `(value, grad)` equal within the module's tolerances (the
    gradient's absolute tolerance grows with its largest entry)."""
    _close(got[0], expected[0], f"{what}: value")
    scale = float(np.max(np.abs(expected[1]), initial=0.0))
    _close(got[1], expected[1], f"{what}: gradient", GRAD_RTOL, GRAD_ATOL + GRAD_RTOL * scale)


@contextlib.contextmanager
def _policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# ----------------------------------------------------------------------------- losses


def _loss_grad(loss, labels, x, compiled_=False):
    return value_and_grad(lambda v, lab: loss(lab, v), x, labels, compiled=compiled_)


def _loss_value(loss, labels, x):
    return float(_np(loss(labels, x)))


def check_large_labels(loss, labels, x):
    expected = _loss_grad(loss, labels, x)
    assert float(expected[0]) != 0.0, "large_labels: the batch gives 0, nothing to compare"
    big = labels.astype("int64") + LARGE
    _same(_loss_grad(loss, big, x), expected, "large_labels: labels 2^24 + k")
    _close(_loss_value(loss, big.reshape(-1, 1), x), expected[0], "large_labels: (B, 1) labels")


def check_bfloat16_labels(loss, labels, x):
    """Also under `mixed_float16` with labels 4097 + k (4097 and 4098 are one float16)."""
    for policy, dtype, offset in [
        ("mixed_bfloat16", "bfloat16", 1000),
        ("mixed_float16", "float16", 4097),
    ]:
        rounded = _np(ops.cast(ops.cast(x, dtype), "float32"))
        expected = _loss_value(loss, labels, rounded)
        with _policy(policy):
            restored = type(loss).from_config(loss.get_config())
            value = restored(labels + offset, ops.cast(rounded, dtype))
            got = keras.backend.standardize_dtype(value.dtype)
            assert got == "float32", f"bfloat16_labels: the value is {got} under {policy}"
            _close(float(_np(value)), expected, f"bfloat16_labels: labels {offset} + k, {policy}")


def check_eager_equals_compiled(loss, labels, x):
    _same(_loss_grad(loss, labels, x, True), _loss_grad(loss, labels, x), "eager_equals_compiled")
    fn = compiled(lambda lab, emb: loss(lab, emb), labels, x)
    smaller = len(labels) - 4
    _close(
        float(_np(fn(labels[:smaller], x[:smaller]))),
        _loss_value(loss, labels[:smaller], x[:smaller]),
        "eager_equals_compiled: a second batch size",
    )


def check_permutation(loss, labels, x):
    order = np.random.default_rng(1).permutation(len(labels))
    value, grad = _loss_grad(loss, labels, x)
    _same(_loss_grad(loss, labels[order], x[order]), (value, grad[order]), "permutation")


def check_relabelling(loss, labels, x):
    classes = np.unique(labels)
    names = np.random.default_rng(2).permutation(len(classes)) * 1009 - 7
    renamed = names[np.searchsorted(classes, labels)]
    _same(_loss_grad(loss, renamed, x), _loss_grad(loss, labels, x), "relabelling")


def check_config_round_trip(loss, labels, x):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config, "config_round_trip: from_config(get_config()) differs"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss), f"config_round_trip: {type(restored)} is not the class"
    assert restored.get_config() == config, "config_round_trip: deserialised config differs"
    _close(_loss_value(restored, labels, x), _loss_value(loss, labels, x), "config_round_trip")


def _saved_and_loaded(model):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.keras")
        model.save(path)
        return keras.saving.load_model(path, safe_mode=True)


def check_keras_save_load(loss, labels, x):
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=loss)
    loaded = _saved_and_loaded(model)
    assert type(loaded.loss) is type(loss), f"keras_save_load: {type(loaded.loss)} loaded"
    assert loaded.loss.get_config() == loss.get_config(), "keras_save_load: config differs"
    embeddings = _np(model(x))
    _close(
        _loss_value(loaded.loss, labels, embeddings),
        _loss_value(loss, labels, embeddings),
        "keras_save_load: value",
    )


def check_degenerate(loss, labels, x, one_sided=False):
    x = x[:6].copy()
    x[1] = x[0]  # a duplicate: zero distance, where a square root has no gradient
    cases = [("one example", np.zeros(1, "int64")), ("one class", np.zeros(6, "int64"))]
    cases.append(("distinct", np.arange(6)))
    for name, lab in cases:
        for compiled_ in (False, True):
            what = f"degenerate: {name}{', compiled' if compiled_ else ''}"
            value, grad = _loss_grad(loss, lab, x[: len(lab)], compiled_)
            assert np.isfinite(value) and np.all(np.isfinite(grad)), f"{what}: not finite"
            if name == "one example" or not one_sided:
                assert float(value) == 0.0, f"{what} gives {float(value)}, not 0"
                assert np.all(grad == 0.0), f"{what} gives a non-zero gradient"
    x[2] = 0.0
    value, grad = _loss_grad(loss, labels[:6], x)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), "degenerate: a zero embedding"


NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _not_finite(value, what):
    assert not np.all(np.isfinite(_np(value))), f"{what} gives the finite {_np(value)}"


def check_nonfinite(loss, labels, x):
    for bad in NONFINITE:
        y = x.copy()
        y[3, 1] = bad
        _not_finite(loss(labels, y), f"nonfinite: an embedding entry {bad}")
    y = x.copy()
    y[-1, 0] = np.nan
    fn = compiled(lambda lab, emb: loss(lab, emb), labels, y)
    _not_finite(fn(labels, y), "nonfinite: NaN, compiled")
    _not_finite(loss(labels[:1], y[-1:]), "nonfinite: NaN in a batch of one example")
    distinct = np.arange(len(labels))
    _not_finite(loss(distinct, y), "nonfinite: NaN in a batch without positive pairs")


def _empty_batch(value_and_grad_fn, name):
    """Eager: a ValueError naming `name`; compiled: that error (a known size) or 0 with a
    finite gradient (an unknown size)."""
    for compiled_ in (False, True):
        what = f"empty_batch{', compiled' if compiled_ else ''}"
        try:
            value, grad = value_and_grad_fn(compiled_)
        except ValueError as error:
            assert f"`{name}`" in str(error), f"{what}: the error does not name `{name}`: {error}"
            continue
        assert compiled_, f"{what}: an empty batch of known size gives {value}, not an error"
        assert float(value) == 0.0, f"{what}: gives {float(value)}, not 0"
        assert np.all(np.isfinite(grad)), f"{what}: the gradient is not finite"


def check_empty_batch(loss, labels, x):
    _empty_batch(lambda compiled_: _loss_grad(loss, labels[:0], x[:0], compiled_), "y_pred")


def values_outside(bounds):
    """Numbers just outside `bounds` (a `deepmetric.losses.base.Bounds`), and its open ends."""
    values = []
    if bounds.minimum is not None:
        values.append(bounds.minimum - max(1.0, abs(bounds.minimum)))
        values.append(math.nextafter(bounds.minimum, -math.inf))
        if bounds.exclusive_minimum:
            values.append(bounds.minimum)
    if bounds.maximum is not None:
        values.append(bounds.maximum + max(1.0, abs(bounds.maximum)))
        values.append(math.nextafter(bounds.maximum, math.inf))
        if bounds.exclusive_maximum:
            values.append(bounds.maximum)
    return values


def _numeric_options(options, owner):
    """The options of `options` with a float default, each of which must declare its
    `bounds`, and the other options that declare bounds (a number that may be None)."""
    numeric = [o for o in options if isinstance(o.default, float) or o.bounds is not None]
    for option in numeric:
        assert option.bounds is not None, (
            f"option_ranges: {owner} option `{option.name}` declares no range (give "
            "`number_option` its bounds)"
        )
    return numeric


def _check_ranges(options, owner, make):
    """Each bad value of each numeric option: `make({name: value})` raises the range error."""
    for option in _numeric_options(options, owner):
        message = re.escape(f"`{option.name}` must be a finite number {option.bounds}.")
        for bad in [*NONFINITE, *values_outside(option.bounds)]:
            try:
                make({option.name: bad})
            except ValueError as error:
                assert re.search(message, str(error)), (
                    f"option_ranges: {owner}({option.name}={bad}): {error}"
                )
            else:
                raise AssertionError(f"option_ranges: {owner}({option.name}={bad}) accepted")
        b = option.bounds
        for edge, open_ in [(b.minimum, b.exclusive_minimum), (b.maximum, b.exclusive_maximum)]:
            if edge is not None and not open_:
                make({option.name: edge})  # the bound itself is in the range


def check_option_ranges(loss, labels, x):
    cls = type(loss)
    options = getattr(cls, "options", ())
    _check_ranges(options, cls.__name__, lambda kw: cls(**kw))
    function = getattr(cls, "function", None)
    if function is not None:
        _check_ranges(
            options,
            f"{cls.__name__}.function",
            lambda kw: function(labels, x, **{**loss.option_values(), **kw}),
        )


LOSS_CHECKS = {
    "large_labels": check_large_labels,
    "bfloat16_labels": check_bfloat16_labels,
    "eager_equals_compiled": check_eager_equals_compiled,
    "permutation": check_permutation,
    "relabelling": check_relabelling,
    "config_round_trip": check_config_round_trip,
    "keras_save_load": check_keras_save_load,
    "degenerate": check_degenerate,
    "nonfinite": check_nonfinite,
    "empty_batch": check_empty_batch,
    "option_ranges": check_option_ranges,
}


def check_loss(loss, labels=None, embeddings=None, *, checks=None, one_sided=False):
    """Runs the invariants `checks` (names of `LOSS_CHECKS`; all by default) on `loss`.

    `loss` is a loss instance or a class built with its defaults; the batch defaults to
    `batch()`. `one_sided`: the loss keeps the terms of one kind of pair in a batch without
    the other (see the module docstring).

    >>> import deepmetric
    >>> check_loss(deepmetric.losses.TripletSemiHardLoss(margin=0.5), checks=["permutation"])
    """
    loss = loss() if isinstance(loss, type) else loss
    if labels is None:
        labels, embeddings = batch()
    labels, embeddings = np.asarray(labels), np.asarray(embeddings, "float32")
    for name in checks or LOSS_CHECKS:
        if name == "degenerate":
            check_degenerate(loss, labels, embeddings, one_sided=one_sided)
        else:
            LOSS_CHECKS[name](loss, labels, embeddings)


# ----------------------------------------------------------------------------- heads


def make_head(cls, proxies, **kwargs):
    """`cls` for `proxies.shape[0]` proxy rows (`num_classes` from the class's proxies per
    class), built on their embedding size and holding `proxies`."""
    probe = cls(num_classes=1, **kwargs)
    probe.build((None, proxies.shape[1]))
    per_class = probe.proxies.shape[0]
    head = cls(num_classes=proxies.shape[0] // per_class, **kwargs)
    head.build((None, proxies.shape[1]))
    head.proxies.assign(proxies)
    return head


def head_proxies(cls, num_classes, dim, seed=0):
    """Random normal proxies of the shape `cls(num_classes)` holds for `dim`-dimensional input."""
    head = cls(num_classes=num_classes)
    head.build((None, dim))
    return np.random.default_rng(seed).normal(size=head.proxies.shape).astype("float32")


def head_objective(head):
    """(embeddings, labels) -> the head's training loss: the loss it adds, or the mean sparse
    cross-entropy of its logits (how the command line trains each)."""

    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fn(v, lab):
        logits = head([v, lab])
        if head.adds_loss:
            return ops.sum(ops.stack(head.losses))
        return cross_entropy(lab, logits)

    return fn


def _head_grad(head, labels, x, compiled_=False):
    return value_and_grad(head_objective(head), x, labels, compiled=compiled_)


def check_head_bfloat16_labels(cls, labels, x):
    proxies = head_proxies(cls, 1004, x.shape[1])
    x = _np(ops.cast(ops.cast(x, "bfloat16"), "float32"))
    big = labels + 1000
    expected = float(_head_grad(make_head(cls, proxies), big, x)[0])
    with _policy("mixed_bfloat16"):
        head = make_head(cls, proxies)
        value = float(_np(head_objective(head)(ops.cast(x, "bfloat16"), big)))
    np.testing.assert_allclose(value, expected, rtol=1e-2, err_msg="bfloat16_labels")
    merged = float(_head_grad(make_head(cls, proxies), np.full_like(big, 1000), x)[0])
    if abs(merged - expected) > 1e-2 * abs(expected):
        return
    # An objective averaged over every class (P2SGrad's mean over B x C) hardly moves with the
    # labels of 1004 classes; they show in the gradient, which must then be the float32 one.
    grad = _np(_head_grad(make_head(cls, proxies), big, x)[1])
    merged_grad = _np(_head_grad(make_head(cls, proxies), np.full_like(big, 1000), x)[1])
    scale = np.max(np.abs(grad))
    assert np.max(np.abs(merged_grad - grad)) > 5e-2 * scale, "bfloat16_labels: nothing to tell"
    with _policy("mixed_bfloat16"):
        head = make_head(cls, proxies)
        low = _np(_head_grad(head, big, x)[1])  # the head computes in bfloat16
    assert np.max(np.abs(low - grad)) <= 1e-2 * scale, "bfloat16_labels: the gradient"


def check_head_eager_equals_compiled(cls, labels, x):
    head = make_head(cls, head_proxies(cls, 4, x.shape[1]))
    _same(_head_grad(head, labels, x, True), _head_grad(head, labels, x), "eager_equals_compiled")


def check_head_permutation(cls, labels, x):
    head = make_head(cls, head_proxies(cls, 4, x.shape[1]))
    order = np.random.default_rng(1).permutation(len(labels))
    value, grad = _head_grad(head, labels, x)
    _same(_head_grad(head, labels[order], x[order]), (value, grad[order]), "permutation")
    _close(_np(head([x[order], labels[order]])), _np(head([x, labels]))[order], "logits")


def check_head_relabelling(cls, labels, x):
    proxies = head_proxies(cls, 4, x.shape[1])
    sigma = np.array([2, 0, 3, 1])  # class c becomes sigma[c]
    rows = proxies.reshape(4, -1, proxies.shape[1])
    moved = np.empty_like(rows)
    moved[sigma] = rows
    head, renamed = make_head(cls, proxies), make_head(cls, moved.reshape(proxies.shape))
    _same(_head_grad(renamed, sigma[labels], x), _head_grad(head, labels, x), "relabelling")
    logits = _np(head([x, labels]))
    _close(_np(renamed([x, sigma[labels]]))[:, sigma], logits, "relabelling: logits", 1e-4, 1e-4)


def check_head_config_round_trip(cls, labels, x):
    head = cls(num_classes=4)
    config = head.get_config()
    assert cls.from_config(config).get_config() == config, "config_round_trip: from_config"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert type(restored) is cls, f"config_round_trip: {type(restored)} is not the class"
    assert restored.get_config() == config, "config_round_trip: deserialised config differs"


def check_head_keras_save_load(cls, labels, x):
    head = make_head(cls, head_proxies(cls, 4, x.shape[1]))
    inputs = [keras.Input((x.shape[1],)), keras.Input((), dtype="int32")]
    model = keras.Model(inputs, head(inputs))
    loaded = _saved_and_loaded(model)
    loaded_head = loaded.layers[-1]
    assert type(loaded_head) is cls, f"keras_save_load: {type(loaded_head)} loaded"
    assert loaded_head.get_config() == head.get_config(), "keras_save_load: config differs"
    _close(_np(loaded_head.proxies), _np(head.proxies), "keras_save_load: proxies", 0, 0)
    _close(_np(loaded([x, labels])), _np(model([x, labels])), "keras_save_load: logits")


def check_head_degenerate(cls, labels, x):
    proxies = head_proxies(cls, 4, x.shape[1])
    x = x.copy()
    x[1] = x[0]
    x[2] = proxies.reshape(4, -1, x.shape[1])[0, 0]  # cosine 1 with its proxy
    value, grad = _head_grad(make_head(cls, proxies), np.zeros(len(x), "int64"), x)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), "degenerate: one class not finite"


def check_head_nonfinite(cls, labels, x):
    proxies = head_proxies(cls, 4, x.shape[1])
    for bad in NONFINITE:
        y = x.copy()
        y[3, 1] = bad
        head = make_head(cls, proxies)
        _not_finite(head_objective(head)(y, labels), f"nonfinite: an embedding entry {bad}")
    y = x.copy()
    y[0, 0] = np.nan
    head = make_head(cls, proxies)
    fn = compiled(lambda v, lab: head_objective(head)(v, lab), y, labels)
    _not_finite(fn(y, labels), "nonfinite: NaN, compiled")
    bad_proxies = proxies.copy()
    bad_proxies[0, 0] = np.inf
    head = make_head(cls, bad_proxies)
    _not_finite(head_objective(head)(x, labels), "nonfinite: an infinite proxy")


def check_head_empty_batch(cls, labels, x):
    head = make_head(cls, head_proxies(cls, 4, x.shape[1]))
    _empty_batch(lambda compiled_: _head_grad(head, labels[:0], x[:0], compiled_), "embeddings")


def check_head_option_ranges(cls, labels, x):
    _check_ranges(cls.options, cls.__name__, lambda kw: cls(4, **kw))


HEAD_CHECKS = {
    "bfloat16_labels": check_head_bfloat16_labels,
    "eager_equals_compiled": check_head_eager_equals_compiled,
    "permutation": check_head_permutation,
    "relabelling": check_head_relabelling,
    "config_round_trip": check_head_config_round_trip,
    "keras_save_load": check_head_keras_save_load,
    "degenerate": check_head_degenerate,
    "nonfinite": check_head_nonfinite,
    "empty_batch": check_head_empty_batch,
    "option_ranges": check_head_option_ranges,
}


def check_head(cls, labels=None, embeddings=None, *, checks=None):
    """Runs the invariants `checks` (names of `HEAD_CHECKS`; all by default) on the head
    class `cls`, with 4 classes (1004 for `bfloat16_labels`) and random normal proxies.

    >>> import deepmetric
    >>> check_head(deepmetric.heads.CosFace, checks=["permutation", "relabelling"])
    """
    if labels is None:
        labels, embeddings = batch(classes=4)
    labels, embeddings = np.asarray(labels), np.asarray(embeddings, "float32")
    for name in checks or HEAD_CHECKS:
        HEAD_CHECKS[name](cls, labels, embeddings)
