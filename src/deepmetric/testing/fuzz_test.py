"""Property-based fuzzing of every public loss and head: only three outcomes are allowed.

For every name of `deepmetric.losses.__all__` and every head of `deepmetric.heads`, hypothesis
draws a batch size (0, 1 and a few small sizes), a label layout (one class, all distinct,
random classes; large label values), a label dtype (signed and unsigned integers), an
embedding dtype (float32, float16, bfloat16), option values (the default, a value inside the
option's range, or NaN, an infinity, a value outside the range, a string) and, sometimes, one
non-finite entry in the embeddings. The outcome must be:

- an invalid option: a ValueError / TypeError naming the option;
- otherwise an empty batch: a ValueError naming the embeddings' argument;
- otherwise a non-finite entry in the input: a non-finite loss;
- otherwise a finite loss with a finite gradient.

The targets come from the registries of `deepmetric.testing` (`metric_losses`, `proxy_heads`)
and `deepmetric.losses.__all__`; a public function is paired with the class whose option table
it shares, so the option ranges are those of the tables. Inputs that are not
(labels, embeddings) (pair distances, similarity matrices, proxies, explicit triplets, two
views) are listed in `SPECIAL`; a new public loss that fits neither fails
`test_every_loss_is_fuzzed`.
Reproducible (`derandomize=True`) and bounded: few distinct shapes, so that JAX compiles
little; the number of cases run is printed at the end of the module.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any, NamedTuple

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from keras import ops

import deepmetric.losses as losses
from deepmetric import testing
from deepmetric.losses.base import NON_NEGATIVE, POSITIVE, MetricLoss
from deepmetric.testing.invariants import NONFINITE, make_head, values_outside

# Few distinct shapes (JAX compiles each op per shape); 6 twice: most cases are a real batch.
SIZES = (0, 1, 6, 6)
DIM = 4
NUM_CLASSES = 3  # of the heads and proxies
EMBEDDING_DTYPES = ("float32", "float16", "bfloat16")
LABEL_DTYPES = ("int32", "int64", "int16", "uint8")
FUZZ = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
CASES: Counter[str] = Counter()


class Target(NamedTuple):
    """One public loss or head: `make(options)` builds the callable (raising for a bad option);
    `inputs(rng, size, labels)` the float input x and the other arguments;
    `run(fn, v, *args)` the scalar objective; `empty` the argument an empty batch names."""

    name: str
    options: dict[str, Any]  # numeric options (name -> Bounds) and flags (name -> FLAG)
    make: Any
    inputs: Any
    run: Any
    empty: str
    labels_below: int | None = None  # labels must index classes (heads, proxies)
    # `flags_refused(flags)`: the error a combination of flags gets on its own (None: allowed).
    flags_refused: Any = None


def _scalar(value):
    return ops.mean(value[0] if isinstance(value, tuple) else value)


def _embeddings(rng, size, labels):
    return rng.normal(size=(size, DIM)).astype("float32"), (labels,)


FLAG = "flag"
# Valid option values are drawn from these, where inside the option's range: values of
# practical use (a temperature of 1e-30 is in range too, but overflows float32 logits).
PRACTICAL = (-1.0, -0.5, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 10.0, 64.0)


def _accepts(option, value):
    try:
        option.checked(value)
    except (TypeError, ValueError):
        return False
    return True


def _table(cls):
    """The numeric options (name -> bounds; also those that may be None and declare bounds)
    and the flags (name -> FLAG) of an option table. A flag the class allows at one value
    only (`MarginLoss(learn_beta=True)` needs a layer) keeps its default."""
    table: dict[str, Any] = {}
    for o in cls.options:
        if isinstance(o.default, bool):
            if _accepts(o, True) and _accepts(o, False):
                table[o.name] = FLAG
        elif isinstance(o.default, float) or o.bounds is not None:
            table[o.name] = o.bounds
    return table


def _flags_refused(cls):
    """A probe of the flag combinations the loss function of `cls` refuses (`TripletLoss`:
    `soft_margin` with `smooth_loss`), called on a tiny valid batch; its error, or None."""
    labels, x = np.array([0, 0, 1, 1]), np.eye(4, DIM, dtype="float32")

    def probe(flags):
        try:
            cls.function(labels, x, **flags)
        except ValueError as error:
            return str(error)
        return None

    return probe


def _class_target(cls):
    return Target(
        cls.__name__,
        _table(cls),
        lambda kw: cls(**kw),
        _embeddings,
        lambda loss, v, lab: loss(lab, v),
        "y_pred",
        flags_refused=_flags_refused(cls),
    )


def _function_target(name, cls):
    """A labels-and-embeddings function, with the option table of its class `cls`."""
    fn = getattr(losses, name)
    return Target(
        name,
        _table(cls),
        lambda kw: lambda lab, v: fn(lab, v, **kw),
        _embeddings,
        lambda f, v, lab: _scalar(f(lab, v)),
        next(iter(list(inspect.signature(fn).parameters)[1:2])),
        flags_refused=_flags_refused(cls),
    )


def _pairs(rng, size, labels):
    return np.abs(rng.normal(size=size)).astype("float32"), (labels % 2,)


def _similarity(rng, size, labels):
    return rng.normal(size=(size, size)).astype("float32"), (labels,)


def _multilabel(rng, size, labels):
    indicators = rng.integers(0, 2, size=(size, NUM_CLASSES)).astype(labels.dtype)
    return rng.normal(size=(size, size)).astype("float32"), (indicators,)


def _proxies(rng, size, labels):
    x, _ = _embeddings(rng, size, labels)
    return x, (labels, rng.normal(size=(NUM_CLASSES, DIM)).astype("float32"))


def _triplets(rng, size, labels):
    return rng.normal(size=(size, 3, DIM)).astype("float32"), (np.zeros(size, labels.dtype),)


def _two_views(rng, size, labels):
    return rng.normal(size=(size, 2, DIM)).astype("float32"), (np.zeros(size, labels.dtype),)


MARGIN = {"margin": NON_NEGATIVE}
# The public losses whose inputs are not (labels, embeddings): name -> options, make, inputs,
# run, argument named by an empty batch, label bound.
SPECIAL: dict[str, tuple] = {
    "contrastive_loss": (
        MARGIN,
        lambda kw: lambda y, d: losses.contrastive_loss(y, d, **kw),
        _pairs,
        lambda f, v, y: _scalar(f(y, v)),
        "y_pred",
    ),
    "ContrastiveLoss": (
        MARGIN,
        lambda kw: losses.ContrastiveLoss(**kw),
        _pairs,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "npairs_loss": (
        {},
        lambda kw: losses.npairs_loss,
        _similarity,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "NpairsLoss": (
        {},
        lambda kw: losses.NpairsLoss(),
        _similarity,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "npairs_multilabel_loss": (
        {},
        lambda kw: losses.npairs_multilabel_loss,
        _multilabel,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "NpairsMultilabelLoss": (
        {},
        lambda kw: losses.NpairsMultilabelLoss(),
        _multilabel,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "proxy_anchor_loss": (
        {"margin": NON_NEGATIVE, "alpha": POSITIVE},
        lambda kw: lambda lab, v, p: losses.proxy_anchor_loss(lab, v, p, **kw),
        _proxies,
        lambda f, v, lab, p: f(lab, v, p),
        "embeddings",
        NUM_CLASSES,
    ),
    "proxy_nca_loss": (
        {"softmax_scale": POSITIVE},
        lambda kw: lambda lab, v, p: losses.proxy_nca_loss(lab, v, p, **kw),
        _proxies,
        lambda f, v, lab, p: f(lab, v, p),
        "embeddings",
        NUM_CLASSES,
    ),
    "triplet_margin_with_distance_loss": (
        {"margin": POSITIVE, "swap": FLAG},
        lambda kw: lambda a, p, n: losses.triplet_margin_with_distance_loss(a, p, n, **kw),
        _triplets,
        lambda f, v, _: f(v[:, 0], v[:, 1], v[:, 2]),
        "anchor",
    ),
    "TripletMarginLoss": (
        {"margin": POSITIVE, "swap": FLAG},
        lambda kw: losses.TripletMarginLoss(**kw),
        _triplets,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "vicreg_loss": (
        _table(losses.VICRegLoss),
        lambda kw: lambda a, b: losses.vicreg_loss(a, b, **kw),
        _two_views,
        lambda f, v, _: _scalar(f(v[:, 0], v[:, 1])),
        "embeddings",
    ),
    "VICRegLoss": (
        _table(losses.VICRegLoss),
        lambda kw: losses.VICRegLoss(**kw),
        _two_views,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
    "SelfSupervisedLoss": (
        {"symmetric": FLAG},
        lambda kw: losses.SelfSupervisedLoss(**kw),
        _two_views,
        lambda f, v, y: f(y, v),
        "y_pred",
    ),
}


def _head_target(cls):
    def run(head, v, lab):
        return testing.invariants.head_objective(head)(v, lab)

    def make(kw):
        cls(NUM_CLASSES, **kw)  # the checks of the options, before any weight
        proxies = testing.invariants.head_proxies(cls, NUM_CLASSES, DIM)
        return make_head(cls, proxies, **kw)

    return Target(cls.__name__, _table(cls), make, _embeddings, run, "embeddings", NUM_CLASSES)


def targets() -> list[Target]:
    found = []
    classes: dict[str, Any] = {cls.__name__: cls for cls in testing.metric_losses()}
    by_function = {(c.default_name or c.function.__name__): c for c in classes.values()}
    for name in losses.__all__:
        if name == "get":
            continue
        if name in SPECIAL:
            found.append(Target(name, *SPECIAL[name]))
        elif name in classes:
            found.append(_class_target(classes[name]))
        elif name in by_function:
            found.append(_function_target(name, by_function[name]))
    found.extend(_head_target(cls) for cls in testing.proxy_heads())
    return found


TARGETS = targets()


def test_every_loss_is_fuzzed():
    names = {t.name for t in TARGETS}
    assert {n for n in losses.__all__ if n != "get"} <= names, "a public loss is not fuzzed"
    assert {cls.__name__ for cls in testing.proxy_heads()} <= names
    assert issubclass(losses.TripletLoss, MetricLoss)


@st.composite
def cases(draw, target: Target):
    options: dict[str, Any] = {}
    invalid = None
    for name, bounds in target.options.items():
        if bounds == FLAG:
            options[name] = draw(st.booleans())
            continue
        assert bounds is not None, f"{target.name}: option `{name}` declares no range"
        kind = draw(st.sampled_from(["default", "default", "valid", "invalid"]))
        if kind == "valid":
            options[name] = draw(st.sampled_from([v for v in PRACTICAL if v in bounds]))
        elif kind == "invalid" and invalid is None:
            bad = [*NONFINITE, *values_outside(bounds), "1"]
            options[name] = draw(st.sampled_from(bad))
            invalid = name
    flags = {n: v for n, v in options.items() if target.options[n] == FLAG}
    refused = target.flags_refused(flags) if flags and target.flags_refused else None
    if refused is not None:
        # A combination refused on its own must name the flags it refuses (each such rule
        # has its own test beside its loss); the fuzz then draws another.
        on = [n for n, v in flags.items() if v and f"`{n}`" in refused]
        assert len(on) >= 2, f"{target.name}: {refused} for flags {flags}"
        assume(False)
    size = draw(st.sampled_from(SIZES))
    layout = draw(st.sampled_from(["one class", "distinct", "random"]))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    large = (
        target.labels_below is None and label_dtype in ("int32", "int64") and draw(st.booleans())
    )
    nonfinite = draw(st.sampled_from([None, None, None, *NONFINITE]))
    return {
        "options": options,
        "invalid": invalid,
        "size": size,
        "layout": layout,
        "label_dtype": label_dtype,
        "offset": 1 << 24 if large else 0,
        "dtype": draw(st.sampled_from(EMBEDDING_DTYPES)),
        "nonfinite": nonfinite,
        "seed": draw(st.integers(0, 2**16)),
    }


def _labels(case, classes_below):
    size, rng = case["size"], np.random.default_rng(case["seed"])
    classes = classes_below or 3
    if case["layout"] == "one class":
        values = np.zeros(size, "int64")
    elif case["layout"] == "distinct":
        values = np.arange(size) % (classes_below or max(size, 1))
    else:
        values = rng.integers(0, classes, size=size)
    return (values + case["offset"]).astype(case["label_dtype"])


def run_case(target: Target, case) -> str:
    """Runs one case and checks its outcome; returns the outcome's name."""
    try:
        fn = target.make(case["options"])
    except (ValueError, TypeError) as error:
        assert case["invalid"] is not None, f"{target.name}: valid options refused: {error}"
        assert f"`{case['invalid']}`" in str(error), f"{target.name}: {error}"
        return "invalid option"
    labels = _labels(case, target.labels_below)
    rng = np.random.default_rng(case["seed"])
    x, args = target.inputs(rng, case["size"], labels)
    if case["nonfinite"] is not None and x.size:
        x.reshape(-1)[rng.integers(x.size)] = case["nonfinite"]
    dtype = case["dtype"]

    def objective(v, *a):
        return target.run(fn, ops.cast(v, dtype), *a)

    try:
        value, grad = testing.value_and_grad(objective, x, *args)
    except (ValueError, TypeError) as error:
        message = str(error)
        named = [f"`{n}`" for n in (case["invalid"],) if n is not None]
        if case["size"] == 0:
            named.append(f"`{target.empty}`")  # either bad input may be reported first
        assert any(n in message for n in named), f"{target.name}: {message} for {case}"
        if case["invalid"] is not None:
            return "invalid option"
        assert case["size"] == 0, f"{target.name} raised for a valid case {case}: {message}"
        assert f"`{target.empty}`" in message, f"{target.name}: {message}"
        return "empty batch"
    assert case["invalid"] is None, f"{target.name} accepted {case['options']}"
    assert case["size"] > 0, f"{target.name} accepted an empty batch, gave {value}"
    if case["nonfinite"] is not None:
        assert not np.all(np.isfinite(value)), f"{target.name}: finite {value} for {case}"
        return "non-finite input"
    assert np.all(np.isfinite(value)), f"{target.name}: {value} for {case}"
    assert np.all(np.isfinite(grad)), f"{target.name}: a non-finite gradient for {case}"
    return "valid"


@pytest.fixture(scope="module", autouse=True)
def _report_count(request):
    yield
    total = sum(CASES.values())
    line = f"fuzz ({keras.backend.backend()}): {total} cases: " + ", ".join(
        f"{k} {v}" for k, v in sorted(CASES.items())
    )
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_fuzz(target):
    @FUZZ
    @given(cases(target))
    def check(case):
        CASES[run_case(target, case)] += 1

    check()
