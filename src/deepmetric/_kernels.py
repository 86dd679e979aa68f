"""Backend-specific kernels for the few mining steps where `keras.ops` is far too slow.

Library code calls `deepmetric.mining`, which uses a kernel of this module when one exists for
the current backend and its `keras.ops` form otherwise; both give the same result (tested on
every backend in `_kernels_test.py`). Today there are two, both for PyTorch:

- `torch_semihard_signed_weights` (`mining.semihard_signed_weights`) and
- `torch_batch_all_signed_counts` (`mining.batch_all_signed_counts`).

Eager PyTorch runs each `keras.ops` call as its own pass over the (B, R) matrix. The `keras.ops`
forms make about 15 such passes per positive rank for the semi-hard rule and 8 for batch-all,
several of them `torch.where` on a mask with no pattern (`d > t`), which PyTorch computes
with a branch per entry, at about 4 ms for a 1024 x 1024 matrix on one core against 0.3 ms
for a comparison. The kernels make 3 or 4 passes per rank and write comparisons into float
buffers. XLA fuses the `keras.ops` forms into a few passes, so JAX and TensorFlow keep them.
At B = 1024 on one core, the semi-hard weights take about 10 ms instead of 45-55 ms, and the
semi-hard and batch-all losses went from 3.3x and 2.8x the floor to 1.9x
(`benchmarks/losses.py`; docs/benchmarks.md).
"""

from __future__ import annotations

import keras


def has_torch_kernels() -> bool:
    """Whether `mining` runs the PyTorch kernels of this module (on the torch backend)."""
    return keras.backend.backend() == "torch"


def torch_semihard_signed_weights(distances, positive_mask, negative_mask, margin):
    """`mining.semihard_signed_weights` for torch tensors, in about four passes per rank.

    The same weights as the `keras.ops` form, in the same edge cases (a row without
    negatives, a row without positives, ties, distances below zero such as negated
    similarities), computed another way:

    1. The positives' distances of every row come from one `topk` over the positive entries
       (`steps` = the largest number of positives in a row; shorter rows are padded).
    2. For each rank k, the closest negative farther than the positive is the row minimum of
       `d + span * (1 - sign(d - t_k))` over the negatives: every entry that is not farther
       is lifted above the largest distance. The arithmetic replaces a `where` on the
       unpatterned mask `d > t_k`; an entry that is farther is unchanged (`d + 0`), so the
       minimum is exactly a distance of the matrix.
    3. Where that negative has no tie, its weight is added by index (`scatter_add`). Where a
       row of an active pair ties another negative at the chosen distance, the rank falls back
       to the mask `d == chosen` and splits the weight equally, as the `keras.ops` form does.

    The number of ranks and the tie test are Python numbers read from the tensors, as the
    `keras.ops` loop reads its trip count in eager PyTorch; the number of ranks is also the
    width of the (B, steps) thresholds, the one shape here that depends on the data (only
    PyTorch runs this, eagerly or with graph breaks under `torch.compile`; the traced
    backends keep the fixed-shape `keras.ops` form).
    """
    import torch

    d = distances.detach()
    negative_mask = negative_mask.bool()
    w = torch.zeros_like(d)
    ranked = _ranked_positives(d, positive_mask)
    if ranked is None:
        return w
    # 1. Each row's positive distances.
    thresholds, positive_index, is_positive, low = ranked
    steps = thresholds.shape[1]
    high = d.max() + 1.0
    span = float(2.0 * (high - low))
    # The keras.ops form's chosen value in a row without negatives (`-big`).
    no_negative = -high

    # Non-negatives sit at `low`: never farther than a positive, never the farthest negative.
    negative_d = torch.where(negative_mask, d, low)
    farthest, farthest_index = negative_d.max(dim=1, keepdim=True)
    has_negative = farthest > low
    farthest = torch.where(has_negative, farthest, no_negative)
    lifted = negative_d.clone()  # a buffer, reused at every rank
    farthest_tied = _second_largest(lifted, farthest_index) == farthest

    chosen_index, weight, actives = [], [], []
    for k in range(steps):
        threshold = thresholds[:, k : k + 1]
        # 2. `lifted = d + span * (d <= t)`: entries not farther than the threshold
        # (non-negatives included) move past `high`; farther negatives keep their distance
        # exactly (`d + 0`). A comparison written to a float buffer costs half a `where`.
        torch.le(negative_d, threshold, out=lifted)
        torch.add(negative_d, lifted, alpha=span, out=lifted)
        closest, closest_index = lifted.min(dim=1, keepdim=True)
        exists = closest < high
        chosen = torch.where(exists, closest, farthest)
        active = is_positive[:, k : k + 1] & (margin + threshold - chosen > 0)
        # 3. A tie at the chosen distance: another farther negative at `closest`, or another
        # negative at the farthest distance.
        tied = torch.where(
            exists, _second_smallest(lifted, closest_index) == closest, farthest_tied
        )
        share = (active & has_negative).to(d.dtype)
        if bool(torch.any(tied & active & has_negative)):
            at_chosen = negative_mask & (d == chosen)
            ties = at_chosen.sum(dim=1, keepdim=True).clamp(min=1).to(d.dtype)
            w -= at_chosen.to(d.dtype) * (share / ties)
            share = torch.zeros_like(share)
        chosen_index.append(torch.where(exists, closest_index, farthest_index))
        weight.append(share)
        actives.append(active.to(d.dtype))
    # Positives and negatives are disjoint columns, and every positive appears at one rank:
    # the additions below set the positives' 1 and sum the negatives' -1 per active pair.
    w.scatter_add_(1, torch.cat(chosen_index, dim=1), -torch.cat(weight, dim=1))
    return w.scatter_add_(1, positive_index, torch.cat(actives, dim=1))


def _ranked_positives(d, positive_mask):
    """Each row's positive distances, or None if the matrix has no positive pair.

    Returns `(thresholds, positive_index, is_positive, low)`: (B, steps) distances and
    columns of every row's positives from one `topk`, `steps` the largest number of positives
    in a row; shorter rows are padded with `low` (below every distance) at columns that are
    not positives, marked False in `is_positive`.
    """
    import torch

    positive_mask = positive_mask.bool()
    if d.numel() == 0:
        return None
    steps = int(positive_mask.sum(dim=1, dtype=torch.int32).max())
    if steps == 0:
        return None
    low = d.min() - 1.0
    thresholds, positive_index = torch.topk(
        torch.where(positive_mask, d, low), steps, dim=1, sorted=False
    )
    return thresholds, positive_index, positive_mask.gather(1, positive_index), low


def _second_smallest(values, smallest_index):
    """(B, 1): each row's smallest value once its smallest entry (by index) is removed.

    Overwrites that entry of `values` (a buffer).
    """
    return values.scatter_(1, smallest_index, float("inf")).amin(dim=1, keepdim=True)


def _second_largest(values, largest_index):
    """(B, 1): each row's largest value once its largest entry (by index) is removed.

    Overwrites that entry of `values` (a buffer).
    """
    return values.scatter_(1, largest_index, float("-inf")).amax(dim=1, keepdim=True)


def torch_batch_all_signed_counts(distances, positive_mask, negative_mask, margin):
    """`mining.batch_all_signed_counts` for torch tensors, in about three passes per rank.

    The positives' distances come from one `topk` (as in `torch_semihard_signed_weights`);
    for each rank k the active negatives `d < t_k + margin` are written to a float buffer by
    one comparison, counted per row for the positive and added up per negative. Counts are
    whole numbers, so the result equals the `keras.ops` form exactly.
    """
    import torch

    d = distances.detach()
    negative_mask = negative_mask.bool()
    w = torch.zeros_like(d)
    ranked = _ranked_positives(d, positive_mask)
    if ranked is None:
        return w
    thresholds, positive_index, is_positive, _ = ranked
    # `d < t + margin` as in the keras.ops form; padding ranks compare with -inf (no entry
    # is below it) and non-negatives sit at +inf (above every bound).
    bounds = torch.where(is_positive, thresholds + margin, float("-inf"))
    negative_d = torch.where(negative_mask, d, float("inf"))
    active = torch.empty_like(d)
    counts = []
    for k in range(thresholds.shape[1]):
        torch.lt(negative_d, bounds[:, k : k + 1], out=active)
        counts.append(active.sum(dim=1, keepdim=True))
        w -= active
    return w.scatter_add_(1, positive_index, torch.cat(counts, dim=1))
