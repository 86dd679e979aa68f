"""The shared layer of deepmetric's losses: checks, inputs, reductions, and `MetricLoss`.

Every labels-and-embeddings loss is a function `name_loss(labels, embeddings, *, options...)`
and a `MetricLoss` subclass that declares its options once, as a table of `Option`s (name,
default, check); from that table the class gets its constructor signature, the validation of
the options, `get_config` / `from_config` (distances included) and `call_with_reference`, the
hook of `deepmetric.xbm.CrossBatchMemory`. The helpers here (number and choice checks, the
checked inputs with an optional reference set, the reference mask, a masked log-sum-exp with
finite gradients, Keras' reduction) are the ones the loss families and the heads share.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops

from deepmetric import distances as distances_lib
from deepmetric import miners as miners_lib
from deepmetric._labels import check_embeddings, check_labels

# Finite stand-in for -inf in masked reductions (exp(-LARGE - x) is exactly 0 in float32).
LARGE = 1e30


def check_number(name, value, *, positive=False):
    """`value` as a float, or a TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite. Received: {name}={value!r}")
    if positive and value <= 0.0:
        raise ValueError(f"`{name}` must be positive. Received: {name}={value!r}")
    return value


def check_choice(name, value, allowed):
    """`value` if it is one of the strings `allowed`, else a ValueError listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(a) for a in allowed)}. "
            f"Received: {name}={value!r}"
        )
    return value


def loss_inputs(labels, embeddings, reference_embeddings=None, reference_labels=None):
    """Checked (labels, embeddings, reference_labels, reference_embeddings).

    The references are None when not given (the batch is compared with itself
    and each example with itself is excluded). Embeddings are float32 (float64 input
    stays float64 on TensorFlow only: JAX turns it into float32, and PyTorch's
    `keras.ops.matmul` returns float32); labels stay integers.
    """
    embeddings = check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, embeddings.shape[0], "labels")
    if (reference_embeddings is None) != (reference_labels is None):
        raise ValueError(
            "`reference_embeddings` and `reference_labels` must be given together. Received: "
            f"reference_embeddings={'None' if reference_embeddings is None else 'a tensor'}, "
            f"reference_labels={'None' if reference_labels is None else 'a tensor'}"
        )
    if reference_embeddings is None:
        return labels, embeddings, None, None
    reference = check_embeddings(reference_embeddings, "reference_embeddings")
    dim, ref_dim = embeddings.shape[1], reference.shape[1]
    if dim is not None and ref_dim is not None and dim != ref_dim:
        raise ValueError(
            "`reference_embeddings` must have the embedding size of `embeddings`. Received: "
            f"embeddings.shape={tuple(embeddings.shape)}, "
            f"reference_embeddings.shape={tuple(reference.shape)}"
        )
    if reference.dtype != embeddings.dtype:
        reference = ops.cast(reference, embeddings.dtype)
    reference_labels = check_labels(reference_labels, reference.shape[0], "reference_labels")
    return labels, embeddings, reference_labels, reference


def check_reference_mask(reference_mask, embeddings, reference):
    """`reference_mask` as a bool tensor of shape (R,) or (B, R), or None.

    A ValueError when it is given without a reference set or has another shape.
    """
    if reference_mask is None:
        return None
    if reference is None:
        raise ValueError(
            "`reference_mask` needs `reference_embeddings` and `reference_labels`. Received: "
            "reference_mask without a reference set"
        )
    mask = ops.convert_to_tensor(reference_mask)
    if mask.dtype != "bool":
        mask = ops.cast(mask, "bool")
    expected = {1: (reference.shape[0],), 2: (embeddings.shape[0], reference.shape[0])}
    shape = tuple(mask.shape)
    wanted = expected.get(len(shape))
    if wanted is None or any(
        w is not None and m is not None and w != m for w, m in zip(wanted, shape, strict=True)
    ):
        raise ValueError(
            "`reference_mask` must have shape (R,) or (B, R) for B embeddings and R references. "
            f"Received: reference_mask.shape={shape}, embeddings.shape="
            f"{tuple(embeddings.shape)}, reference_embeddings.shape={tuple(reference.shape)}"
        )
    return mask


def masked_logsumexp(x, mask, add_one=False):
    """Row-wise `log(sum_{j in mask} exp(x_ij))` of a (B, R) matrix, shape (B,).

    With `add_one`, a term exp(0) joins each row: `log(1 + sum exp(x_ij))`. Rows with an
    empty mask give 0 (pytorch-metric-learning's `logsumexp`). Masked entries enter as a finite
    `-LARGE`, and the shift by the row maximum has no gradient, so gradients stay finite.
    """
    masked = ops.where(mask, x, -LARGE)
    top = ops.stop_gradient(ops.max(masked, axis=1, keepdims=True))
    if add_one:
        top = ops.maximum(top, 0.0)
    total = ops.sum(ops.where(mask, ops.exp(masked - top), 0.0), axis=1)
    top = ops.squeeze(top, axis=1)
    nonempty = ops.any(mask, axis=1)
    if add_one:
        return top + ops.log(total + ops.exp(-top))
    return ops.where(nonempty, top + ops.log(ops.where(nonempty, total, 1.0)), 0.0)


def count_positive(values, axis=None):
    """How many entries of `values` are > 0 (no gradient), in the dtype of `values`."""
    positive = ops.greater(ops.stop_gradient(values), 0.0)
    return ops.sum(ops.cast(positive, values.dtype), axis=axis)


def reduce_losses(values, sample_weight=None, reduction="sum_over_batch_size"):
    """Keras' reduction of per-example values, with optional (B,) sample weights."""
    values = ops.convert_to_tensor(values)
    if sample_weight is not None:
        sample_weight = ops.cast(ops.convert_to_tensor(sample_weight), values.dtype)
        if len(sample_weight.shape) == len(values.shape) + 1:
            sample_weight = ops.squeeze(sample_weight, axis=-1)
        values = values * sample_weight
    if reduction in (None, "none"):
        return values
    total = ops.sum(values)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        return ops.divide_no_nan(total, ops.sum(sample_weight * ops.ones_like(values)))
    size = ops.cast(ops.size(values), values.dtype)
    return ops.divide_no_nan(total, size)


def per_anchor_share(contributions, normalizer):
    """Spreads a normalised sum over the anchors for Keras' mean reduction.

    A batch loss `sum_a c_a / normalizer` (a mean over pairs or triplets) is
    returned per anchor as `B * c_a / normalizer`, so that Keras' default
    reduction (the mean over the batch) gives exactly the batch loss, and a
    sample weight scales that anchor's share.
    """
    batch = ops.cast(ops.shape(contributions)[0], contributions.dtype)
    return ops.divide_no_nan(contributions * batch, normalizer)


# --- Option tables. ---


class Option(NamedTuple):
    """One option of a loss: its keyword, default, and the check that returns its value.

    `check(name, value)` raises a TypeError / ValueError naming the option, or returns the
    value to store. `serialize` / `deserialize` map the stored value to and from its config
    entry (identity when None).
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    serialize: Callable[[Any], Any] | None = None
    deserialize: Callable[[Any], Any] | None = None


def options_signature(options, *, before=(), after=()) -> inspect.Signature:
    """A constructor's signature: `before`, the options (by position or name, with their
    defaults) in table order, `after`, then `**kwargs` (passed on to Keras)."""
    param = inspect.Parameter
    return inspect.Signature(
        [
            *before,
            *(param(o.name, param.POSITIONAL_OR_KEYWORD, default=o.default) for o in options),
            *after,
            param("kwargs", param.VAR_KEYWORD),
        ]
    )


def store_options(obj, options, values) -> None:
    """Checks each option's value in `values` and keeps it as an attribute of `obj`."""
    for option in options:
        setattr(obj, option.name, option.check(option.name, values[option.name]))


def options_config(obj, options) -> dict[str, Any]:
    """The options of `obj` as config entries (each serialised by its `serialize`)."""
    config = {}
    for option in options:
        value = getattr(obj, option.name)
        config[option.name] = option.serialize(value) if option.serialize else value
    return config


def number_option(name, default, *, positive=False) -> Option:
    """A float option (finite; > 0 with `positive`)."""
    return Option(name, default, lambda key, value: check_number(key, value, positive=positive))


def flag_option(name, default) -> Option:
    """A boolean option."""
    return Option(name, default, lambda key, value: bool(value))


def choice_option(name, default, allowed) -> Option:
    """A string option from `allowed`."""
    return Option(name, default, lambda key, value: check_choice(key, value, allowed))


def _check_distance(key, value):
    distances_lib.get(value, key)  # fails early on a bad name
    return value


def distance_option(name, default) -> Option:
    """A distance option: a `deepmetric.distances` name, a `Distance`, or a callable."""
    return Option(
        name, default, _check_distance, distances_lib.serialize, distances_lib.deserialize
    )


def _check_miner(key, value):
    return miners_lib.get(value)


def miner_option() -> Option:
    """The `miner` option of the pair and triplet losses: None or a `deepmetric.miners` miner."""
    return Option("miner", None, _check_miner, miners_lib.serialize, miners_lib.get)


class MetricLoss(keras.losses.Loss):
    """Base of the losses that take class labels and a batch of embeddings.

    Keras' `Loss.__call__` casts `y_true` to the loss dtype, which merges labels
    16777216 and 16777217 in float32 (and 256 and 257 in bfloat16). This class
    keeps the labels integers: they are checked and compared as integers only.
    Embeddings are computed in float32, also under a mixed-precision policy.

    A subclass sets two class attributes:

    - `function`: the per-anchor loss, `function(labels, embeddings, **options)` returning
      (B,) values whose mean is the batch loss; if it also takes `reference_embeddings`,
      `reference_labels` and `reference_mask`, the loss works with a reference set
      (`call_with_reference`); otherwise the subclass sets `takes_reference = False`, and
      it has no `call_with_reference`.
    - `options`: a tuple of `Option`s, in the order of the constructor's positional
      arguments; the constructor also takes `name` (default: `default_name`, else the
      function's name) and Keras' `reduction` / `dtype`.
    """

    function: Callable[..., Any]
    options: tuple[Option, ...] = ()
    # The default `name`; None: the function's name.
    default_name: str | None = None
    # Whether `function` takes a reference set (then `call_with_reference` exists).
    takes_reference = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.takes_reference:
            cls.call_with_reference = None  # type: ignore[assignment,method-assign]
        if "options" not in cls.__dict__ and "function" not in cls.__dict__:
            return
        default_name = cls.default_name or cls.function.__name__
        signature = options_signature(
            cls.options,
            before=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)],
            after=[
                inspect.Parameter(
                    "name", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default_name
                )
            ],
        )

        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            del values["self"]
            extra = values.pop("kwargs")
            MetricLoss._setup(self, values.pop("name"), values, extra)

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        __init__.__doc__ = f"Builds a `{cls.__name__}`; see `{default_name}` for the options."
        cls.__init__ = __init__  # type: ignore[method-assign]

    def _setup(self, name, values, extra):
        super().__init__(name=name, **extra)
        store_options(self, self.options, values)

    def option_values(self) -> dict[str, Any]:
        """The options as keyword arguments of `function`."""
        return {option.name: getattr(self, option.name) for option in self.options}

    def __call__(self, y_true, y_pred, sample_weight=None):
        with keras.name_scope(self.name):
            embeddings = check_embeddings(y_pred, "y_pred")
            labels = check_labels(y_true, embeddings.shape[0], "y_true")
            losses = self.call(labels, embeddings)
            return reduce_losses(losses, sample_weight, self.reduction)

    def call(self, labels, embeddings):
        return type(self).function(labels, embeddings, **self.option_values())

    def call_with_reference(
        self, labels, embeddings, reference_embeddings, reference_labels, reference_mask=None
    ):
        """Per-anchor losses of `embeddings` against a reference set (not reduced).

        The hook `deepmetric.xbm.CrossBatchMemory` calls: a loss that has it accepts a
        reference set and a `reference_mask`.
        """
        return type(self).function(
            labels,
            embeddings,
            reference_embeddings=reference_embeddings,
            reference_labels=reference_labels,
            reference_mask=reference_mask,
            **self.option_values(),
        )

    def get_config(self):
        return {
            "name": self.name,
            "reduction": self.reduction,
            **options_config(self, self.options),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for option in cls.options:
            if option.deserialize is not None and option.name in config:
                config[option.name] = option.deserialize(config[option.name])
        return cls(**config)
