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
from deepmetric import distributed
from deepmetric import miners as miners_lib

# The option checks live in a keras-free module (the miners use them too); re-exported here.
from deepmetric._checks import NON_NEGATIVE as NON_NEGATIVE
from deepmetric._checks import POSITIVE as POSITIVE
from deepmetric._checks import Bounds as Bounds
from deepmetric._checks import check_choice as check_choice
from deepmetric._checks import check_number as check_number
from deepmetric._labels import check_embeddings, check_labels, check_nonempty

# Finite stand-in for -inf in masked reductions (exp(-LARGE - x) is exactly 0 in float32).
LARGE = 1e30


def loss_inputs(labels, embeddings, reference_embeddings=None, reference_labels=None):
    """Checked (labels, embeddings, reference_labels, reference_embeddings).

    The references are None when not given (the batch is compared with itself
    and each example with itself is excluded). Embeddings are float32 (float64 input
    stays float64 on TensorFlow only: JAX turns it into float32, and PyTorch's
    `keras.ops.matmul` returns float32); labels stay integers. An empty batch is a
    ValueError where its size is known (`check_nonempty`); an empty reference set is allowed
    (no pair: the loss is 0).
    """
    embeddings = check_nonempty(check_embeddings(embeddings, "embeddings"), "embeddings")
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


def nonfinite_to_nan(values, *tensors):
    """`values` where every entry of every tensor of `tensors` is finite, NaN everywhere else.

    The rule of every loss and head: a NaN or an infinity anywhere in the embeddings (or the
    reference set, the proxies, the pair distances) makes every per-anchor value, and so the
    loss, NaN, so that `keras.callbacks.TerminateOnNaN` and the user see a diverged model;
    no mining, masking or count normalisation can turn it into a finite number or 0. For
    finite input the value and the gradient are those of `values` (the gradient of `where`
    reaches only the chosen branch). One pass over the inputs, O(B * D); works under
    `jax.jit` and `tf.function` with an unknown batch size. `values` may be a tuple (each
    float entry is guarded); None entries of `tensors` are skipped.
    """
    finite = None
    for tensor in tensors:
        if tensor is None:
            continue
        ok = ops.all(ops.isfinite(ops.convert_to_tensor(tensor)))
        finite = ok if finite is None else ops.logical_and(finite, ok)
    if finite is None:
        return values
    if isinstance(values, (tuple, list)):
        return type(values)(nonfinite_to_nan(v, *tensors) for v in values)
    return ops.where(finite, values, float("nan"))


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
    # Across devices, global counts where a replica scores its own anchors (distributed.py).
    batch, normalizer = distributed.replica_sum(batch), distributed.replica_sum(normalizer)
    return ops.divide_no_nan(contributions * batch, normalizer)


# --- Option tables. ---


class Option(NamedTuple):
    """One option of a loss: its keyword, default, and the check that returns its value.

    `check(name, value)` raises a TypeError / ValueError naming the option, or returns the
    value to store. `serialize` / `deserialize` map the stored value to and from its config
    entry (identity when None). `bounds`: the documented range of a numeric option (a
    `Bounds`), which its check enforces; the conformance suite tries values outside it.
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    serialize: Callable[[Any], Any] | None = None
    deserialize: Callable[[Any], Any] | None = None
    bounds: Bounds | None = None

    def checked(self, value):
        """`value` checked as this option (for the loss functions that share the table)."""
        return self.check(self.name, value)


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


def number_option(name, default, bounds=None, *, positive=False) -> Option:
    """A float option: finite, and inside `bounds` (a `Bounds`; `positive=True` is `POSITIVE`).

    Give every option its documented range (`NON_NEGATIVE` for a margin on distances,
    `POSITIVE` for a temperature or a scale), and write it in the docstring.
    """
    bounds = POSITIVE if positive else bounds
    return Option(name, default, lambda key, value: check_number(key, value, bounds), bounds=bounds)


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
      function's name), the keyword `mining` and Keras' `reduction` / `dtype`.

    Across devices (`deepmetric.distributed`) the loss mines over the global batch
    (`mining="global"`, the default): under a `tf.distribute` strategy or an initialised
    `torch.distributed` group it gathers every replica's embeddings and labels, and the
    replicas' gradients add up to the single-device gradient of the global batch (under
    `keras.distribution.DataParallel` on JAX the loss sees the global batch anyway).
    `mining="local"` mines inside each replica's (JAX: each device shard's) slice instead.
    """

    function: Callable[..., Any]
    options: tuple[Option, ...] = ()
    # The default `name`; None: the function's name.
    default_name: str | None = None
    # Whether `function` takes a reference set (then `call_with_reference` exists).
    takes_reference = True
    # Whether, across devices, a replica may score only its own rows against the gathered
    # batch (the loss is a sum over anchors whose only batch-wide terms are counts, summed
    # with `distributed.replica_sum`). False (a batch-wide mean with a gradient, as in the
    # intra-pair variance loss): every replica computes the global loss and keeps its rows.
    separable_rows = True

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
                ),
                inspect.Parameter("mining", inspect.Parameter.KEYWORD_ONLY, default="global"),
            ],
        )

        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            del values["self"]
            extra = values.pop("kwargs")
            self.mining = distributed.check_mining("mining", values.pop("mining"))
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
            embeddings = check_nonempty(check_embeddings(y_pred, "y_pred"), "y_pred")
            labels = check_labels(y_true, embeddings.shape[0], "y_true")
            return distributed.batch_loss(
                self.call,
                labels,
                embeddings,
                sample_weight,
                reduction=self.reduction,
                mining=getattr(self, "mining", "global"),
                call_with_reference=self.call_with_reference if self.separable_rows else None,
            )

    def call(self, labels, embeddings):
        """Per-anchor losses; all NaN if an embedding is not finite (`nonfinite_to_nan`)."""
        losses = type(self).function(labels, embeddings, **self.option_values())
        return nonfinite_to_nan(losses, embeddings)

    def call_with_reference(
        self, labels, embeddings, reference_embeddings, reference_labels, reference_mask=None
    ):
        """Per-anchor losses of `embeddings` against a reference set (not reduced).

        The hook `deepmetric.xbm.CrossBatchMemory` calls: a loss that has it accepts a
        reference set and a `reference_mask`. A non-finite embedding or reference row makes
        every value NaN.
        """
        losses = type(self).function(
            labels,
            embeddings,
            reference_embeddings=reference_embeddings,
            reference_labels=reference_labels,
            reference_mask=reference_mask,
            **self.option_values(),
        )
        return nonfinite_to_nan(losses, embeddings, reference_embeddings)

    def get_config(self):
        config = {
            "name": self.name,
            "reduction": self.reduction,
            **options_config(self, self.options),
        }
        if getattr(self, "mining", "global") != "global":
            config["mining"] = self.mining
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for option in cls.options:
            if option.deserialize is not None and option.name in config:
                config[option.name] = option.deserialize(config[option.name])
        return cls(**config)
