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
visit the triplets one positive of every row at a time (`deepmetric.mining.each_positive`):
a first pass without gradient gives each anchor's per-bin shares and sums of x, the histogram
and its CDF follow, and a second pass writes out the gradient of each distance (through the
sums of x and through this batch's share of the histogram, as PML's autograd gives it),
recomputed in the backward pass. Memory grows as B^2 + B * num_bins, the work as
B^2 K * num_bins for classes of K examples (PML's: B^3 * num_bins).
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

    def triplets(index, query, query_labels, reference, reference_labels, ranks):
        """The block's (b, B) distances, label masks and the order of its positives."""
        d = distance.matrix(query, reference, self_index=index)
        positives, negatives = mining.label_masks(
            query_labels, reference_labels, anchor_index=index
        )
        anchor_rank = ops.take(ranks, ops.mod(index, ops.shape(ranks)[0]))
        return d, positives, negatives, mining.PositiveOrder(ranks, anchor_rank)

    def positions(d, selected, negatives):
        """The triplets (a, p, n) of the selected positives p: x, t's bin, its fractional
        part, whether t is inside [0, K - 1] (else clipped), and which n count."""
        has = ops.any(selected, axis=1, keepdims=True)
        x = ops.sum(ops.where(selected, d, 0.0), axis=1, keepdims=True) - d  # d_ap - d_an
        scaled = (x - min_val) / delta
        position = ops.clip(scaled, 0.0, num_bins - 1.0)
        low = ops.floor(position)
        inside = ops.logical_and(
            ops.greater_equal(scaled, 0.0), ops.less_equal(scaled, num_bins - 1.0)
        )
        # The bin clipped as an integer too: a non-finite x (NaN embeddings, the loss is NaN)
        # must not index past the bins in the gradient pass's gathers.
        low_bin = ops.clip(ops.cast(low, "int32"), 0, num_bins - 1)
        return x, low_bin, position - low, inside, ops.logical_and(negatives, has)

    def histogram_block(*args):
        """Per anchor: the histogram of its triplets' x (by bin), the sums of x by bin, and
        the number of its triplets; one positive of every row per step, without gradient."""
        d, positives, negatives, order = triplets(*args)
        d = ops.stop_gradient(d)
        bins = ops.reshape(ops.arange(num_bins, dtype="int32"), (1, num_bins, 1))

        def body(selected, state):
            counts, sums, count = state
            x, low, fraction, _, use = positions(d, selected, negatives)
            # (b, K, 3): per bin, the sums of 1 - frac, frac and x over the bin's triplets, as
            # a product with the (b, K, B) one-hot of the bins (XLA on CPU materialises the
            # operand of a reduction: per-bin masked sums would each hold a whole (b, B)).
            in_bin = ops.logical_and(
                ops.expand_dims(use, 1), ops.equal(ops.expand_dims(low, 1), bins)
            )
            parts = ops.stack([1.0 - fraction, fraction, x], axis=1)  # (b, 3, B)
            per_bin = ops.einsum("akn,acn->akc", ops.cast(in_bin, d.dtype), parts)
            below, above, by_bin = per_bin[:, :, 0], per_bin[:, :, 1], per_bin[:, :, 2]
            # Bin k gets 1 - frac from the triplets in k and frac from those in k - 1.
            shares = below + ops.pad(above[:, :-1], ((0, 0), (1, 0)))
            return (
                counts + shares,
                sums + by_bin,
                count + ops.sum(ops.cast(use, d.dtype), axis=1),
            )

        rows = ops.shape(d)[0]
        zeros = ops.zeros((rows, num_bins), d.dtype)
        return mining.each_positive(
            positives, body, (zeros, zeros, ops.zeros((rows,), d.dtype)), order
        )

    def gradient_block(*args):
        """Per anchor: sum(w * (d - stop_gradient(d))) over its row, w the gradient of the
        sum of all anchors' terms with respect to its distances (zero in value)."""
        *args, of_counts, of_sums = args
        d, positives, negatives, order = triplets(*args)
        fixed = ops.stop_gradient(d)

        def body(selected, state):
            (weights,) = state
            _, low, _, inside, use = positions(fixed, selected, negatives)
            # d/dx of a triplet: through its bin's sum of x, and through its fraction's
            # shares of bins low and low + 1 (0 where t is clipped).
            per_triplet = ops.take(of_sums, low) + ops.where(
                inside, (ops.take(of_counts, low + 1) - ops.take(of_counts, low)) / delta, 0.0
            )
            per_triplet = ops.where(use, per_triplet, 0.0)  # x = d_ap - d_an
            weights = weights - per_triplet
            weights = weights + ops.where(
                selected, ops.sum(per_triplet, axis=1, keepdims=True), 0.0
            )
            return (weights,)

        (weights,) = mining.each_positive(positives, body, (ops.zeros_like(fixed),), order)
        return (ops.sum(weights * (d - fixed), axis=1),)

    ranks = mining.column_ranks(labels)
    rows, shared = [unit, labels], [unit, labels, ranks]
    # The histogram pass holds a (b, K, B) one-hot: blocks K times smaller (no gradient, so
    # nothing is recomputed).
    counts, sums, count = _blocks.map_rows(
        histogram_block, rows, shared, max_entries=max(1, _blocks.BLOCK_ENTRIES // num_bins)
    )
    num_triplets = ops.sum(count)
    weight = ops.cast(
        ops.where(ops.not_equal(ops.sum(previous), 0.0), momentum, 1.0), previous.dtype
    )
    mixed = (1.0 - weight) * previous + weight * ops.sum(counts, axis=0)
    total = ops.where(num_triplets > 0, ops.sum(mixed), 1.0)
    new = mixed / total
    cdf = ops.cumsum(new)
    # The gradient of the sum over anchors of sum_k sums[a, k] cdf[k]: cdf[k] for each x in
    # bin k; through the histogram, for this batch's share of each bin (`of_counts`, the
    # derivative through new = mixed / sum(mixed)), 0 past the last bin.
    sum_by_bin = ops.sum(sums, axis=0)
    of_new = ops.flip(ops.cumsum(ops.flip(sum_by_bin, 0)), 0)
    of_counts = weight * (of_new - ops.sum(of_new * new)) / total
    of_counts = ops.concatenate([of_counts, ops.zeros((1,), of_counts.dtype)], axis=0)
    (moving,) = _blocks.map_rows(gradient_block, rows, [*shared, of_counts, cdf])
    per_anchor = ops.sum(sums * ops.expand_dims(cdf, 0), axis=1) + moving
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
