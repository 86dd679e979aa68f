"""pytorch-metric-learning's dynamic soft margin loss: a triplet loss weighted by a running CDF.

`DynamicSoftMarginLoss` (Zhang and Rusinkiewicz 2019) keeps a histogram of the triplets'
$d_{ap} - d_{an}$ across training steps and weighs each triplet by the histogram's CDF at its
value. The histogram is state: the class holds it as a non-trainable `keras.Variable`
(`hist_`, PML's name) and advances it at each call; the function `dynamic_soft_margin_loss`
is pure (it takes the histogram and returns the next one).

The state under each backend's `fit` and `jit`:

- Eager calls (every backend), `fit` on TensorFlow (the variable is assigned inside the
  `tf.function` of the train step) and `fit` on PyTorch (eager): the histogram advances at
  every call, as PML's buffer does.
- `fit` on JAX: the trainer runs the step as a pure function of the model's, the optimizer's
  and the metrics' variables and keeps only those. Attach the histogram to the model before
  `fit` (`model.dsm_histogram = loss.hist_`): it is then one of the model's non-trainable
  variables, advances at every step and is saved with the model's weights. Not attached, its
  update is dropped: every step reads the histogram as it was before `fit` (all zeros for a new
  loss, so that each step weighs by the histogram of its own batch alone).
- Inside a bare `jax.jit` of a function that calls the loss object, the histogram is read but
  not advanced (a traced value must not be stored in a variable); a custom JAX step calls the
  pure `dynamic_soft_margin_loss` and carries the histogram itself, or runs the loss inside a
  `keras.StatelessScope` and collects the update.
- `get_config` holds the current histogram (`histogram`, a list), so a model compiled with the
  loss and saved to `.keras` reloads with it, and `from_config` restores it.

Memory. PML enumerates every triplet. Here blocks of anchors (`deepmetric._blocks.map_rows`)
build their (b, B, B) slices of the triplet tensor (b * B * B at most `_TRIPLET_ENTRIES`) and
return per-anchor, per-bin sums, recomputed in the backward pass: memory grows as
B^2 + B * num_bins, the work as B^3 * num_bins.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from deepmetric import _backend, _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric.losses.base import (
    Bounds,
    MetricLoss,
    Option,
    loss_inputs,
    nonfinite_to_nan,
    number_option,
    per_anchor_share,
)
from deepmetric.losses.contrastive import _UnitEuclidean

# Entries of one block's (b, B, B) slice of the triplet tensor: 2^22 floats are 16 MB.
_TRIPLET_ENTRIES = 1 << 22


def _check_num_bins(key, value):
    """An integer >= 1; an integral float is accepted (4.0 is 4, 4.5 a ValueError: PML
    truncates the bin count with `int` but divides the range by the float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{key}` must be an integer. Received: {key}={value!r}")
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"`{key}` must be an integer >= 1. Received: {key}={value!r}")
    return int(value)


# The option table, shared by the function and the class: `min_val` is the lower end of the
# histogram's range [min_val, -min_val] (< 0), `num_bins` an integer >= 1, `momentum` the weight
# of the current batch's histogram, in [0, 1].
_MIN_VAL = number_option("min_val", -2.0, Bounds(maximum=0.0, exclusive_maximum=True))
_NUM_BINS = Option("num_bins", 10, _check_num_bins)
_MOMENTUM = number_option("momentum", 0.01, Bounds(0.0, 1.0))


def check_histogram(histogram, num_bins, name="histogram"):
    """`histogram` as a float32 (num_bins,) tensor without gradient; zeros when None."""
    if histogram is None:
        return ops.zeros((num_bins,), "float32")
    histogram = ops.stop_gradient(ops.cast(ops.convert_to_tensor(histogram), "float32"))
    if tuple(histogram.shape) != (num_bins,):
        raise ValueError(
            f"`{name}` must have shape (num_bins,) = ({num_bins},). "
            f"Received: {name}.shape={tuple(histogram.shape)}"
        )
    return histogram


@export
def dynamic_soft_margin_loss(
    labels, embeddings, histogram=None, *, min_val=-2.0, num_bins=10, momentum=0.01
):
    r"""Dynamic soft margin loss, per anchor, and the next histogram (Zhang and Rusinkiewicz).

    On Euclidean distances $d$ of the L2-normalised embeddings, every triplet (a, p, n) of the
    batch (p a positive, n a negative of a) has $x = d_{ap} - d_{an}$. With bins of width
    $\delta = 2|m|/K$ from $m$ = `min_val` ($K$ = `num_bins`), $x$ at position
    $t = (x - m)/\delta$ adds $1 - \operatorname{frac}(t)$ to bin $\lfloor t\rfloor$ and
    $\operatorname{frac}(t)$ to the next bin. The histogram becomes

    $$h \leftarrow \frac{(1 - \mu)h + \mu H}{\sum_k [(1 - \mu)h + \mu H]_k}$$

    ($H$: this batch's counts; $\mu$ = `momentum`, or 1 while $h$ is all zeros) and the loss is
    the mean over triplets of $\Phi(\lfloor t\rfloor)\,x$ with $\Phi$ the cumulative sum of the
    new $h$. A batch without a triplet gives 0 and leaves $h$ unchanged; a non-finite embedding
    gives NaN and leaves $h$ unchanged.

    Same value and gradient as `pytorch_metric_learning.losses.DynamicSoftMarginLoss(min_val,
    num_bins, momentum)` with labels, call after call (PML 2.9; PML's `hist_` is `histogram`).
    Where PML's code and the paper differ, deepmetric follows PML: every triplet of the batch
    (the paper: each positive pair with its hardest negative in the batch), and the gradient also
    flows through this batch's share of the histogram (the fractional positions), not only
    through $x$; the stored histogram carries no gradient. Where PML fails (an index error: a
    triplet with $t \ge K - 1$, by default $x \ge 1.6$, or $t < 0$), $t$ is clipped to
    $[0, K - 1]$: such a triplet counts in the end bin. Paper: "Learning Local Descriptors with
    a CDF-Based Dynamic Soft Margin", ICCV 2019.

    Args:
      labels: integer class labels, shape (B,) or (B, 1).
      embeddings: float embeddings, shape (B, D); normalised inside.
      histogram: the (num_bins,) histogram before this batch (no gradient); None: all zeros.
      min_val: the lower end m of the histogram's range [m, -m] (< 0).
      num_bins: the number of bins K (an integer >= 1).
      momentum: the weight $\mu$ of this batch's histogram (in [0, 1]).

    Returns:
      ((B,) per-anchor losses whose mean is the batch loss, the (num_bins,) next histogram).

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]])
    >>> values, histogram = dynamic_soft_margin_loss(np.array([0, 0, 1, 1]), x, num_bins=4)
    >>> round(float(ops.mean(values)), 4), [round(float(v), 2) for v in histogram]
    (-0.0715, [0.0, 0.51, 0.42, 0.07])
    """
    min_val = _MIN_VAL.checked(min_val)
    num_bins = _NUM_BINS.checked(num_bins)
    momentum = _MOMENTUM.checked(momentum)
    labels, embeddings, _, _ = loss_inputs(labels, embeddings)
    # Computed in the embeddings' dtype (float64 stays float64 on TensorFlow), returned float32.
    previous = ops.cast(check_histogram(histogram, num_bins), embeddings.dtype)
    delta = 2.0 * abs(min_val) / num_bins
    unit = distances_lib._l2_normalize(embeddings)
    distance = _UnitEuclidean()

    def block(index, query, query_labels, reference, reference_labels):
        d = distance.matrix(query, reference, self_index=index)  # (b, B)
        positives, negatives = mining.label_masks(
            query_labels, reference_labels, anchor_index=index
        )
        triplets = ops.logical_and(ops.expand_dims(positives, 2), ops.expand_dims(negatives, 1))
        x = ops.expand_dims(d, 2) - ops.expand_dims(d, 1)  # (b, p, n): d_ap - d_an
        position = ops.clip((x - min_val) / delta, 0.0, num_bins - 1.0)
        low = ops.floor(ops.stop_gradient(position))
        fraction = position - low
        low = ops.cast(low, "int32")
        below, above, sums = [], [], []
        for k in range(num_bins):
            in_bin = ops.logical_and(triplets, ops.equal(low, k))
            below.append(ops.sum(ops.where(in_bin, 1.0 - fraction, 0.0), axis=(1, 2)))
            above.append(ops.sum(ops.where(in_bin, fraction, 0.0), axis=(1, 2)))
            sums.append(ops.sum(ops.where(in_bin, x, 0.0), axis=(1, 2)))
        # Bin k gets 1 - frac from the triplets in k and frac from those in k - 1.
        counts = [below[0]] + [below[k] + above[k - 1] for k in range(1, num_bins)]
        count = ops.sum(ops.cast(triplets, d.dtype), axis=(1, 2))
        return ops.stack(counts, axis=1), ops.stack(sums, axis=1), count

    num_rows = embeddings.shape[0]
    max_entries = None if num_rows is None else max(num_rows, _TRIPLET_ENTRIES // num_rows)
    counts, sums, count = _blocks.map_rows(
        block, [unit, labels], [unit, labels], max_entries=max_entries
    )
    num_triplets = ops.sum(count)
    weight = ops.cast(
        ops.where(ops.not_equal(ops.sum(previous), 0.0), momentum, 1.0), previous.dtype
    )
    mixed = (1.0 - weight) * previous + weight * ops.sum(counts, axis=0)
    new = mixed / ops.where(num_triplets > 0, ops.sum(mixed), 1.0)
    cdf = ops.cumsum(new)
    per_anchor = ops.sum(sums * ops.expand_dims(cdf, 0), axis=1)
    loss = nonfinite_to_nan(per_anchor_share(per_anchor, num_triplets), embeddings)
    finite = ops.all(ops.isfinite(embeddings))
    advanced = ops.logical_and(finite, num_triplets > 0)
    return loss, ops.cast(ops.stop_gradient(ops.where(advanced, new, previous)), "float32")


def _per_anchor(labels, embeddings, **options):
    return dynamic_soft_margin_loss(labels, embeddings, **options)[0]


class _DynamicSoftMarginOptions(MetricLoss):
    """The option table and the generated constructor of `DynamicSoftMarginLoss`."""

    function = staticmethod(_per_anchor)
    default_name = "dynamic_soft_margin_loss"
    takes_reference = False
    # The weights (the CDF) come from the whole batch's histogram, with a gradient.
    separable_rows = False
    options = (_MIN_VAL, _NUM_BINS, _MOMENTUM)


@export
class DynamicSoftMarginLoss(_DynamicSoftMarginOptions):
    """Dynamic soft margin loss with its histogram as state; see `dynamic_soft_margin_loss`.

    The histogram is `hist_`, a non-trainable float32 `keras.Variable` of shape (num_bins,),
    advanced at every call (see the module for its behaviour under `fit` on each backend);
    `histogram` (a list or array) sets its initial value, and `get_config` returns its current
    value under that key.

    ```python
    model.compile(optimizer="adam", loss=deepmetric.losses.DynamicSoftMarginLoss())
    ```
    """

    def __init__(
        self,
        min_val=-2.0,
        num_bins=10,
        momentum=0.01,
        name="dynamic_soft_margin_loss",
        *,
        histogram=None,
        mining="global",
        **kwargs,
    ):
        super().__init__(min_val, num_bins, momentum, name=name, mining=mining, **kwargs)
        initial = ops.convert_to_numpy(check_histogram(histogram, self.num_bins))
        self.hist_ = keras.Variable(initial, dtype="float32", trainable=False, name="histogram")

    def call(self, labels, embeddings):
        values, histogram = dynamic_soft_margin_loss(
            labels, embeddings, self.hist_.value, **self.option_values()
        )
        if _backend.keeps_assignment(histogram):
            self.hist_.assign(histogram)
        return values

    def get_config(self):
        config = super().get_config()
        config["histogram"] = [float(v) for v in ops.convert_to_numpy(self.hist_)]
        return config
