"""Miners: which pairs or triplets of a batch a pair or triplet loss uses.

pytorch-metric-learning's miners (PML 2.9 names, keywords and defaults, default distances
included) as fixed-shape selections: a miner returns a `Mined`, boolean (B, R) masks of the
positive and negative pairs it keeps, and for a miner whose triplets are not "every kept
positive with every kept negative of the anchor" (`TripletMarginMiner`), the rule that says
which triplets it keeps (a `deepmetric.mining.TripletRule`), evaluated by the triplet loss
inside its per-anchor loop. Nothing lists pairs or triplets: no data-dependent shapes, no
B x B x B tensor, so every miner compiles under XLA and `tf.function` and its memory is O(B * R).

A loss built with `miner=M` equals PML's `loss(embeddings, labels, M(embeddings, labels))`:

- a pair loss (`OnlineContrastiveLoss`, `MultiSimilarityLoss`, `CircleLoss`) uses the kept
  positive and negative pairs; a triplet miner's triplets (a, p, n) give the pairs (a, p) and
  (a, n), counted as often as they occur where the loss counts pairs (the contrastive loss);
- a triplet loss (`TripletLoss`) uses, per anchor, every kept positive with every kept
  negative (a pair miner, and the miners that keep one triplet per anchor), or the triplets
  of the rule.

Every miner works on rows. For most, the selection of anchor a needs only row a of the miner's
own distance matrix, so a loss that computes its rows in blocks (`deepmetric._blocks`) mines
each block on its own. Two need figures of the whole batch (`HDCMiner`: the k-th hardest pair
of the batch; `UniformHistogramMiner`: the bins of all pairs and draws among them): they
compute them first, in passes over the same blocks of rows (`Miner.batch_state`, given a
`BatchRows`), then mine each block with them, so they too stay O(block * R) in memory. A
miner is called as `miner(labels, embeddings)` (deepmetric's order; PML's
is `miner(embeddings, labels)`) and has no gradient.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import keras
from keras import ops

from deepmetric import _blocks, mining
from deepmetric import distances as distances_lib
from deepmetric._api import export
from deepmetric._checks import NON_NEGATIVE, POSITIVE, Bounds, check_choice, check_number
from deepmetric._labels import check_embeddings, check_labels

# Finite stand-in for an infinite distance in masked minima and maxima.
_BIG = 1e30


class Mined(NamedTuple):
    """What a miner keeps from a batch, as fixed-shape tensors.

    Attributes:
      positives: bool (B, R), the kept positive pairs (a, p).
      negatives: bool (B, R), the kept negative pairs (a, n).
      rule: None, or the `deepmetric.mining.TripletRule` that selects the triplets among
        positives x negatives of each anchor (else every such combination is a triplet).
      positive_counts, negative_counts: None, or float32 (B, R): how many kept triplets each
        pair is part of (for a triplet miner whose pairs repeat); None means once.
      triplets: whether the miner keeps triplets (PML returns (a, p, n)) rather than pairs
        (PML returns (a1, p, a2, n)).
    """

    positives: Any
    negatives: Any
    rule: Any = None
    positive_counts: Any = None
    negative_counts: Any = None
    triplets: bool = False

    @classmethod
    def of_rule(cls, rule, positives, negatives, order=None):
        """The triplets that `rule` keeps among positives x negatives of each anchor, with the
        number of kept triplets of each pair."""
        per_positive, per_negative = mining.rule_pair_counts(rule, positives, negatives, order)
        return cls(
            ops.greater(per_positive, 0.0),
            ops.greater(per_negative, 0.0),
            rule,
            per_positive,
            per_negative,
            triplets=True,
        )

    def pair_counts(self):
        """float32 (B, R) multiplicities of the positive and negative pairs."""
        if self.positive_counts is not None:
            return self.positive_counts, self.negative_counts
        return ops.cast(self.positives, "float32"), ops.cast(self.negatives, "float32")


def _range(name, value):
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be None or a pair (low, high) of numbers. Received: {name}={value!r}"
        ) from None
    if not low <= high:
        raise ValueError(f"`{name}` must have low <= high. Received: {name}={value!r}")
    return (low, high)


class BatchRows:
    """The rows of a batch's mining, block by block: what `Miner.batch_state` reads.

    `map(fn, positions=None, per_row=())` calls `fn(gaps, positives, negatives, *per_row)` on
    blocks of rows: `gaps` is the block's (b, R) rows of the miner's distance matrix (larger
    farther, no gradient), `positives` / `negatives` its label masks (as the loss sees them:
    an example with itself in neither, a `reference_mask` applied), and `per_row` the block's
    slices of the (P,) tensors given, one entry per position. It returns `fn`'s per-row
    outputs for all the rows of `positions` (int32 row positions; default every row, in
    order). Built by `deepmetric._blocks.mining_rows`, for the loss's row driver
    (`deepmetric._blocks.anchor_rows`) and for a miner called on its own.
    """

    def __init__(self, map_positions, num_rows):
        self._map = map_positions
        self.num_rows = num_rows

    def map(self, fn, positions=None, per_row=()):
        if positions is None:
            positions = ops.arange(self.num_rows, dtype="int32")
        return self._map(fn, positions, tuple(per_row))


class Miner:
    """Base class of the miners: the distance, the call, the configuration.

    A subclass sets `default_distance` (a factory) and implements `_select(gaps, positives,
    negatives, order)`, where `gaps` is the (b, R) block of rows of its distance matrix with
    larger meaning farther (a similarity is negated), `positives` / `negatives` the label masks
    of the block, and `order` a `deepmetric.mining.PositiveOrder` or None; it returns a `Mined`.
    Thresholds given for a similarity are negated with `self._sign` (-1 for a similarity).
    """

    default_distance: Any = staticmethod(lambda: distances_lib.LpDistance())
    # Whether the selection of an anchor needs only its own row. A miner that also needs
    # figures of the whole batch sets False and implements `batch_state` (computed first, in
    # blocks) and `_select_with(gaps, positives, negatives, order, state, index)`.
    row_local = True

    def __init__(self, distance=None):
        self.distance = distance if distance is not None else self.default_distance()
        distances_lib.get(self.distance, "distance")  # fails early on a bad name

    @property
    def _distance(self):
        return distances_lib.get(self.distance, "distance")

    @property
    def _sign(self):
        return -1.0 if self._distance.larger_is_closer else 1.0

    def __call__(self, labels, embeddings, reference_embeddings=None, reference_labels=None):
        """Mines a batch: a `Mined` of (B, B) masks, or (B, R) against a reference set.

        Args:
          labels: integer labels, shape (B,) or (B, 1).
          embeddings: float embeddings, shape (B, D).
          reference_embeddings, reference_labels: optional (R, D) / (R,) reference set; the
            pairs are then (batch row, reference row), none excluded.
        """
        embeddings = check_embeddings(embeddings, "embeddings")
        labels = check_labels(labels, embeddings.shape[0], "labels")
        if (reference_embeddings is None) != (reference_labels is None):
            raise ValueError(
                "`reference_embeddings` and `reference_labels` must be given together."
            )
        index = ops.arange(ops.shape(embeddings)[0], dtype="int32")
        if reference_embeddings is None:
            positives, negatives = mining.label_masks(labels)
            order = mining.PositiveOrder(mining.column_ranks(labels), mining.column_ranks(labels))
            state = self.batch_state(
                _blocks.mining_rows(self, labels, embeddings, labels, embeddings)
            )
            return self.mine_rows(
                embeddings, embeddings, index, positives, negatives, order, state, index
            )
        reference = check_embeddings(reference_embeddings, "reference_embeddings")
        reference_labels = check_labels(reference_labels, reference.shape[0], "reference_labels")
        positives, negatives = mining.label_masks(labels, reference_labels)
        order = mining.PositiveOrder(mining.column_ranks(reference_labels))
        state = self.batch_state(
            _blocks.mining_rows(self, labels, embeddings, reference_labels, reference, same=False)
        )
        return self.mine_rows(
            embeddings, reference, None, positives, negatives, order, state, index
        )

    def gaps(self, query, reference, self_index=None):
        """(b, R) rows of the miner's distance matrix, larger farther, without gradient."""
        gaps = self._distance.matrix(query, reference, self_index=self_index)
        return ops.stop_gradient(gaps * self._sign)

    def batch_state(self, rows: BatchRows):
        """Figures of the whole batch that the selection needs, computed from `rows` (a
        `BatchRows`) before any block is mined (or a random miner's seed of the call: the
        same in every block); None for most row-local miners."""
        return None

    def mine_rows(
        self,
        query,
        reference,
        self_index,
        positives,
        negatives,
        order=None,
        state=None,
        index=None,
    ):
        """The `Mined` of a block of anchor rows (the hook of the losses' row driver).

        Args:
          query: (b, D) anchors (checked float tensors), `reference[self_index]` when the batch
            is compared with itself.
          reference: (R, D) rows the anchors are compared with.
          self_index: int32 (b,) positions of the anchors in `reference`, or None.
          positives, negatives: bool (b, R) label masks (an example with itself in neither).
          order: optional `deepmetric.mining.PositiveOrder` of the positives.
          state: for a miner that is not `row_local`, its `batch_state` of the batch.
          index: int32 (b,) positions of the block's rows in the batch, consecutive (for a
            miner that is not `row_local`).
        """
        gaps = self.gaps(query, reference, self_index)
        if self.row_local:
            return self._select(gaps, positives, negatives, order)
        return self._select_with(gaps, positives, negatives, order, state, index)

    def _select(self, gaps, positives, negatives, order):
        raise NotImplementedError

    def _select_with(self, gaps, positives, negatives, order, state, index):
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {"distance": distances_lib.serialize(self.distance)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "distance" in config:
            config["distance"] = distances_lib.deserialize(config["distance"])
        return cls(**config)

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "distance")
        return f"{type(self).__name__}({items})"

    def __eq__(self, other):
        return (
            type(self) is type(other)
            and repr(self) == repr(other)
            and (distances_lib.get(self.distance) == distances_lib.get(other.distance))
        )

    def __hash__(self):
        return hash(repr(self))


def _row_counts(bins, mask, num_bins):
    """float32 (b, num_bins): per row, how many entries of `mask` fall in each bin, `bins`
    int32 (b, R) in [0, num_bins): one scatter-add (`ops.segment_sum`), exact (<= R a row)."""
    rows_n = ops.shape(bins)[0]
    row = ops.expand_dims(ops.arange(rows_n, dtype="int32"), 1)
    segment = ops.reshape(row * num_bins + bins, (-1,))
    weight = ops.reshape(ops.cast(mask, "float32"), (-1,))
    counts = ops.segment_sum(weight, segment, num_segments=rows_n * num_bins)
    return ops.reshape(counts, (rows_n, num_bins))


def _order_keys(values):
    """int32 keys in the order of the float32 `values` (-0.0 taken as 0.0): the bits, with
    those of negative numbers flipped so that more negative is smaller."""
    values = ops.where(ops.equal(values, 0.0), 0.0, ops.cast(values, "float32"))
    bits = ops.view(values, "int32")
    return ops.where(ops.less(bits, 0), ops.bitwise_xor(bits, 0x7FFFFFFF), bits)


def _from_order_key(key):
    """The float32 value of an `_order_keys` key."""
    bits = ops.where(ops.less(key, 0), ops.bitwise_xor(key, 0x7FFFFFFF), key)
    return ops.view(bits, "float32")


def _kth_largest(rows, ks):
    """The ks[0]-th largest gap of the positive pairs and the ks[1]-th largest minus-gap of
    the negative pairs of `rows` (a `BatchRows`), exactly, by a radix selection.

    Four passes, most significant byte first: each counts, per row, the byte of the keys
    (`_order_keys`) whose higher bytes equal those chosen so far, in a (rows, 256)
    histogram; the byte of the k-th largest is the largest whose count from the top reaches
    k, and k becomes its rank among the keys of that byte. A k below 1 (no pair of the kind)
    is taken as 1; the caller keeps nothing then.
    """
    ks = [ops.maximum(k, 1) for k in ks]
    chosen = [ops.zeros((), "int32"), ops.zeros((), "int32")]  # key, bytes below unset
    for shift in (24, 16, 8, 0):

        def histograms(gaps, positives, negatives, shift=shift, prefix=tuple(chosen)):
            out = []
            for values, mask, key_prefix in zip(
                (gaps, -gaps), (positives, negatives), prefix, strict=True
            ):
                key = _order_keys(values)
                byte = ops.bitwise_and(ops.right_shift(key, shift), 255)
                if shift == 24:  # the sign byte: flip its top bit to order it from 0 to 255
                    byte = ops.bitwise_xor(byte, 128)
                else:
                    same = ops.equal(
                        ops.right_shift(key, shift + 8), ops.right_shift(key_prefix, shift + 8)
                    )
                    mask = ops.logical_and(mask, same)
                out.append(_row_counts(byte, mask, 256))
            return tuple(out)

        per_row = rows.map(histograms)
        for kind in (0, 1):
            hist = ops.sum(ops.cast(per_row[kind], "int32"), axis=0)  # (256,)
            from_top = ops.flip(ops.cumsum(ops.flip(hist, 0)), 0)  # keys with byte >= d
            reach = ops.greater_equal(from_top, ks[kind])
            byte = ops.max(ops.where(reach, ops.arange(256, dtype="int32"), 0))
            above = ops.take(from_top, byte) - ops.take(hist, byte)
            ks[kind] = ks[kind] - above
            if shift == 24:
                chosen[kind] = (byte - 128) * (1 << 24)
            else:
                chosen[kind] = chosen[kind] + byte * (1 << shift)
    return [_from_order_key(key) for key in chosen]


def _row_min(gaps, mask):
    """(b, 1) row minimum of `gaps` within `mask`; `_BIG` for an empty row."""
    return ops.min(ops.where(mask, gaps, _BIG), axis=1, keepdims=True)


def _row_max(gaps, mask):
    """(b, 1) row maximum of `gaps` within `mask`; `-_BIG` for an empty row."""
    return ops.max(ops.where(mask, gaps, -_BIG), axis=1, keepdims=True)


@export
class MultiSimilarityMiner(Miner):
    r"""The pair mining of the multi-similarity loss (Wang et al., 2019).

    On the cosine similarity (default), a positive pair (a, p) is kept when
    $s_{ap} - \epsilon < \max_n s_{an}$ and a negative pair (a, n) when
    $s_{an} + \epsilon > \min_p s_{ap}$ (the hardest pair of the other kind, relaxed by
    $\epsilon$); with a distance the inequalities turn around. An anchor without negatives
    keeps no positive, one without positives no negative. Equals
    `pytorch_metric_learning.miners.MultiSimilarityMiner(epsilon)`; its recommended pairing is
    `MultiSimilarityLoss(miner=MultiSimilarityMiner())`. Paper: "Multi-Similarity Loss with
    General Pair Weighting for Deep Metric Learning", CVPR 2019, arXiv:1904.06627.

    Args:
      epsilon: the relaxation $\epsilon$, a finite number >= 0.
      distance: a `deepmetric.distances` name or `Distance` (default: cosine similarity).
    """

    default_distance = staticmethod(lambda: distances_lib.CosineSimilarity())

    def __init__(self, epsilon=0.1, distance=None):
        super().__init__(distance)
        self.epsilon = check_number("epsilon", epsilon, NON_NEGATIVE)

    def _select(self, gaps, positives, negatives, order):
        keep_positives = ops.logical_and(
            positives, ops.greater(gaps + self.epsilon, _row_min(gaps, negatives))
        )
        keep_negatives = ops.logical_and(
            negatives, ops.less(gaps - self.epsilon, _row_max(gaps, positives))
        )
        keep_positives = ops.logical_and(keep_positives, ops.any(negatives, axis=1, keepdims=True))
        keep_negatives = ops.logical_and(keep_negatives, ops.any(positives, axis=1, keepdims=True))
        return Mined(keep_positives, keep_negatives)

    def get_config(self):
        return {"epsilon": self.epsilon, **super().get_config()}


@export
class PairMarginMiner(Miner):
    """Keeps the positive pairs farther than `pos_margin` and the negative pairs closer than
    `neg_margin` (for a similarity: positives below `pos_margin`, negatives above `neg_margin`).

    Equals `pytorch_metric_learning.miners.PairMarginMiner(pos_margin, neg_margin)`; default
    distance: `LpDistance()` (Euclidean distance of the L2-normalised embeddings).

    Args:
      pos_margin: positive pairs beyond it are kept (any finite number: a distance, or a
        similarity for a similarity).
      neg_margin: negative pairs within it are kept (any finite number).
      distance: a `deepmetric.distances` name or `Distance`.
    """

    def __init__(self, pos_margin=0.2, neg_margin=0.8, distance=None):
        super().__init__(distance)
        self.pos_margin = check_number("pos_margin", pos_margin)
        self.neg_margin = check_number("neg_margin", neg_margin)

    def _select(self, gaps, positives, negatives, order):
        sign = self._sign
        return Mined(
            ops.logical_and(positives, ops.greater(gaps, sign * self.pos_margin)),
            ops.logical_and(negatives, ops.less(gaps, sign * self.neg_margin)),
        )

    def get_config(self):
        return {
            "pos_margin": self.pos_margin,
            "neg_margin": self.neg_margin,
            **super().get_config(),
        }


TYPES_OF_TRIPLETS = ("all", "hard", "semihard", "easy")


@export
class TripletMarginMiner(Miner):
    r"""Keeps the triplets by their margin $t = d_{an} - d_{ap}$ (for a similarity
    $s_{ap} - s_{an}$) against `margin`.

    `type_of_triplets`: "all" keeps $t \le m$ (the triplets that violate the margin), "hard"
    $t \le \min(m, 0)$ (the negative is closer than the positive), "semihard" $0 < t \le m$,
    "easy" $t > m$. Equals `pytorch_metric_learning.miners.TripletMarginMiner(margin,
    type_of_triplets)`; default distance `LpDistance()`. The triplets are not listed: the
    `Mined` holds the rule, which `TripletLoss` evaluates per anchor and positive, and the
    number of kept triplets of each pair (for the pair losses).

    Args:
      margin: the margin m, a finite number >= 0.
      type_of_triplets: "all", "hard", "semihard" or "easy".
      distance: a `deepmetric.distances` name or `Distance`.
    """

    def __init__(self, margin=0.2, type_of_triplets="all", distance=None):
        super().__init__(distance)
        self.margin = check_number("margin", margin, NON_NEGATIVE)
        self.type_of_triplets = check_choice(
            "type_of_triplets", type_of_triplets, TYPES_OF_TRIPLETS
        )

    def bounds(self):
        """(low, high): a triplet is kept when low < t <= high."""
        inf, m = float("inf"), self.margin
        return {
            "all": (-inf, m),
            "hard": (-inf, min(m, 0.0)),
            "semihard": (0.0, m),
            "easy": (m, inf),
        }[self.type_of_triplets]

    def _select(self, gaps, positives, negatives, order):
        rule = mining.TripletRule(gaps, *self.bounds())
        return Mined.of_rule(rule, positives, negatives, order)

    def get_config(self):
        return {
            "margin": self.margin,
            "type_of_triplets": self.type_of_triplets,
            **super().get_config(),
        }


STRATEGIES = ("hard", "semihard", "easy", "all")


def _in_range(gaps, allowed, sign):
    """bool (b, R): the values of the miner's own matrix (`gaps * sign`) inside `allowed`."""
    if allowed is None:
        return True
    values = gaps * sign
    return ops.logical_and(
        ops.greater_equal(values, allowed[0]), ops.less_equal(values, allowed[1])
    )


def _one_hot_rows(index, keep, num_columns):
    """bool (b, R): True at column `index[a]` of each row a with `keep[a]`."""
    columns = ops.arange(num_columns, dtype="int32")
    hit = ops.equal(ops.expand_dims(index, 1), ops.expand_dims(columns, 0))
    return ops.logical_and(hit, ops.expand_dims(keep, 1))


@export
class BatchEasyHardMiner(Miner):
    """One positive and one negative per anchor, each the easiest, the hardest or semi-hard;
    or all of one kind (Xuan et al., 2020).

    Positives: "hard" is the farthest, "easy" the closest, "semihard" the farthest that is
    still closer than the anchor's chosen negative; negatives: "hard" is the closest, "easy"
    the farthest, "semihard" the closest that is still farther than the anchor's chosen
    positive; "all" keeps all pairs of that kind. Candidates outside `allowed_pos_range` /
    `allowed_neg_range` (on the miner's distance or similarity) are skipped. An anchor keeps its
    triplet only when it has both picks. Equals
    `pytorch_metric_learning.miners.BatchEasyHardMiner` with the same arguments (the same
    errors for "semihard" with "semihard" or with "all"); default distance `LpDistance()`.
    Paper: "Improved Embeddings with Easy Positive Triplet Mining", WACV 2020,
    arXiv:1904.04370.

    Args:
      pos_strategy, neg_strategy: "hard", "semihard", "easy" or "all".
      allowed_pos_range, allowed_neg_range: None or (low, high).
      distance: a `deepmetric.distances` name or `Distance`.
    """

    def __init__(
        self,
        pos_strategy="easy",
        neg_strategy="semihard",
        allowed_pos_range=None,
        allowed_neg_range=None,
        distance=None,
    ):
        super().__init__(distance)
        self.pos_strategy = check_choice("pos_strategy", pos_strategy, STRATEGIES)
        self.neg_strategy = check_choice("neg_strategy", neg_strategy, STRATEGIES)
        if pos_strategy == neg_strategy == "semihard":
            raise ValueError(
                '`pos_strategy` and `neg_strategy` cannot both be "semihard". Received: '
                f"pos_strategy={pos_strategy!r}, neg_strategy={neg_strategy!r}"
            )
        if "semihard" in (pos_strategy, neg_strategy) and "all" in (pos_strategy, neg_strategy):
            raise ValueError(
                '"semihard" cannot be used in combination with "all". Received: '
                f"pos_strategy={pos_strategy!r}, neg_strategy={neg_strategy!r}"
            )
        self.allowed_pos_range = _range("allowed_pos_range", allowed_pos_range)
        self.allowed_neg_range = _range("allowed_neg_range", allowed_neg_range)

    def _pick(self, gaps, mask, farthest, threshold=None, beyond=None):
        """Per row: the column of the farthest (or closest) entry of `mask`, and whether any.

        With `threshold` ((b, 1)), only entries beyond it count: farther when `beyond` is
        "farther", closer otherwise.
        """
        if threshold is not None:
            side = ops.greater if beyond == "farther" else ops.less
            mask = ops.logical_and(mask, side(gaps, threshold))
        pick = mining.masked_argmax if farthest else mining.masked_argmin
        return pick(gaps, mask)

    def _select(self, gaps, positives, negatives, order):
        sign, num_columns = self._sign, ops.shape(gaps)[1]
        pos_pool = ops.logical_and(positives, _in_range(gaps, self.allowed_pos_range, sign))
        neg_pool = ops.logical_and(negatives, _in_range(gaps, self.allowed_neg_range, sign))
        pos_farthest = self.pos_strategy in ("hard", "semihard")
        neg_farthest = self.neg_strategy == "easy"

        def value(index):
            return ops.take_along_axis(gaps, ops.expand_dims(index, 1), axis=1)

        pos_index = pos_keep = neg_index = neg_keep = None
        if self.pos_strategy == "semihard":
            neg_index, neg_keep = self._pick(gaps, neg_pool, neg_farthest)
            pos_index, pos_keep = self._pick(
                gaps, pos_pool, True, value(neg_index), beyond="closer"
            )
            pos_keep = ops.logical_and(pos_keep, neg_keep)
        elif self.neg_strategy == "semihard":
            pos_index, pos_keep = self._pick(gaps, pos_pool, pos_farthest)
            neg_index, neg_keep = self._pick(
                gaps, neg_pool, False, value(pos_index), beyond="farther"
            )
            neg_keep = ops.logical_and(neg_keep, pos_keep)
        else:
            if self.pos_strategy != "all":
                pos_index, pos_keep = self._pick(gaps, pos_pool, pos_farthest)
            if self.neg_strategy != "all":
                neg_index, neg_keep = self._pick(gaps, neg_pool, neg_farthest)
        if pos_index is not None and neg_index is not None:
            keep = ops.logical_and(pos_keep, neg_keep)
            return Mined(
                _one_hot_rows(pos_index, keep, num_columns),
                _one_hot_rows(neg_index, keep, num_columns),
                triplets=self._triplets,
            )
        kept_positives = (
            positives if pos_index is None else _one_hot_rows(pos_index, pos_keep, num_columns)
        )
        kept_negatives = (
            negatives if neg_index is None else _one_hot_rows(neg_index, neg_keep, num_columns)
        )
        return Mined(kept_positives, kept_negatives)

    _triplets = False

    def get_config(self):
        return {
            "pos_strategy": self.pos_strategy,
            "neg_strategy": self.neg_strategy,
            "allowed_pos_range": self.allowed_pos_range,
            "allowed_neg_range": self.allowed_neg_range,
            **super().get_config(),
        }


@export
class BatchHardMiner(BatchEasyHardMiner):
    """Batch-hard mining (Hermans et al., 2017): per anchor its farthest positive and its
    closest negative, one triplet per anchor that has both.

    Equals `pytorch_metric_learning.miners.BatchHardMiner()`; default distance `LpDistance()`.
    Paper: "In Defense of the Triplet Loss for Person Re-Identification", arXiv:1703.07737.

    Args:
      allowed_pos_range, allowed_neg_range: None or (low, high) on the miner's distance.
      distance: a `deepmetric.distances` name or `Distance`.
    """

    _triplets = True

    def __init__(self, allowed_pos_range=None, allowed_neg_range=None, distance=None):
        super().__init__("hard", "hard", allowed_pos_range, allowed_neg_range, distance)

    def get_config(self):
        config = super().get_config()
        del config["pos_strategy"], config["neg_strategy"]
        return config


@export
class HDCMiner(Miner):
    """The mining of Hard-Aware Deeply Cascaded embeddings (Yuan et al., 2017): the hardest
    `filter_percentage` of the batch's positive pairs (the farthest) and of its negative pairs
    (the closest).

    `k = ceil(filter_percentage * number of pairs)` of each kind are kept, over the whole batch
    (not per anchor). The k-th value is found without sorting the batch's pairs: a radix
    selection on the float32 bits, four passes over the blocks of rows, each counting one
    byte of the values that share the bytes chosen so far in a (rows, 256) histogram; the
    blocks are then mined with the two thresholds. Memory stays O(block * R), where a sort of
    all pairs needs several (B, R) arrays.
    Equals `pytorch_metric_learning.miners.HDCMiner(filter_percentage)` except at ties: pairs
    tied with the k-th are all kept, where PML's `topk` keeps exactly k. In a batch compared
    with itself every pair ties with its mirror ((a, p) and (p, a)), so for an odd k this keeps
    one pair more than PML, whose choice between the two depends on `topk`'s order. `k` is
    computed in float32, the pairs counted in int32: a batch of more than 2^31 - 1 pairs
    (B x R) is refused with a ValueError. Default distance `LpDistance()`. Paper: "Hard-Aware
    Deeply Cascaded Embedding", ICCV 2017, arXiv:1611.05720.

    Args:
      filter_percentage: the fraction of the pairs of each kind kept, in (0, 1].
      distance: a `deepmetric.distances` name or `Distance`.
    """

    row_local = False

    def __init__(self, filter_percentage=0.5, distance=None):
        super().__init__(distance)
        self.filter_percentage = check_number(
            "filter_percentage", filter_percentage, Bounds(0.0, 1.0, exclusive_minimum=True)
        )

    def batch_state(self, rows):
        """(threshold, kept anything) of the positive pairs (the farthest) and of the
        negative pairs (the closest, as minus their gaps): the k-th largest value of each."""

        def counts(gaps, positives, negatives):
            return ops.sum(ops.cast(positives, "int32"), 1), ops.sum(
                ops.cast(negatives, "int32"), 1
            )

        totals = [ops.sum(c) for c in rows.map(counts)]
        ks = [
            ops.cast(ops.ceil(self.filter_percentage * ops.cast(t, "float32")), "int32")
            for t in totals
        ]
        thresholds = _kth_largest(rows, ks)
        return tuple(
            (threshold, ops.greater(total, 0))
            for threshold, total in zip(thresholds, totals, strict=True)
        )

    def _select_with(self, gaps, positives, negatives, order, state, index):
        (pos_threshold, pos_any), (neg_threshold, neg_any) = state
        keep_pos = ops.logical_and(positives, ops.greater_equal(gaps, pos_threshold))
        keep_neg = ops.logical_and(negatives, ops.greater_equal(-gaps, neg_threshold))
        return Mined(ops.logical_and(keep_pos, pos_any), ops.logical_and(keep_neg, neg_any))

    def get_config(self):
        return {"filter_percentage": self.filter_percentage, **super().get_config()}


@export
class AngularMiner(Miner):
    r"""Keeps the triplets whose angle at the negative is larger than `angle` (degrees):
    $rctanig(\|x_a - x_p\| / (2 \|x_n - c\|)ig) > 	ext{angle}$ with
    $c = (x_a + x_p) / 2$ (Wang et al., 2017), on the embeddings as given.

    Equals `pytorch_metric_learning.miners.AngularMiner(angle)` (whose only allowed distance is
    `LpDistance()`, and whose angle is computed on the embeddings as given, with
    `torch.nn.functional.pairwise_distance`). The triplets are a rule
    (`deepmetric.mining.AngleRule`) evaluated by `TripletLoss` per anchor and positive. Paper:
    "Deep Metric Learning with Angular Loss", ICCV 2017, arXiv:1708.01682.

    Args:
      angle: the threshold in degrees, in [0, 180].
      distance: must be `LpDistance()` (PML's restriction), the default.
    """

    def __init__(self, angle=20, distance=None):
        super().__init__(distance)
        if distances_lib.get(self.distance) != distances_lib.LpDistance():
            raise ValueError(
                "`distance` of AngularMiner must be LpDistance() (as in pytorch-metric-learning). "
                f"Received: distance={self.distance!r}"
            )
        self.angle = check_number("angle", angle, Bounds(0.0, 180.0))

    def mine_rows(
        self, query, reference, self_index, positives, negatives, order=None, state=None, index=None
    ):
        rule = mining.AngleRule(query, reference, math.radians(self.angle))
        return Mined.of_rule(rule, positives, negatives, order)

    def get_config(self):
        return {"angle": self.angle, **super().get_config()}


def _check_count(name, value):
    """A positive int option (a count), or a TypeError / ValueError naming it."""
    number = check_number(name, value, Bounds(1.0))
    if not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int. Received: {name}={value!r}")
    return int(number)


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"`seed` must be None or an int. Received: seed={seed!r}")
    return seed


# murmur3's 32-bit finalizer and the golden ratio, as int32 (two's complement).
_GOLDEN = 0x9E3779B9 - (1 << 32)
_MIX1 = 0x85EBCA6B - (1 << 32)
_MIX2 = 0xC2B2AE35 - (1 << 32)


def _shift_right(x, bits):
    """Logical right shift of int32 `x` (`ops.right_shift` is arithmetic on signed ints)."""
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _hashed_uniform(rows, num_columns, seed):
    """float32 (b, R) numbers in [0, 1), 24 random bits each, from (row, column, seed) alone:
    murmur3's finalizer of row * R + column + seed * golden ratio (int32, wrapping). The
    same row, column and seed give the same number in whatever block they are computed."""
    columns = ops.arange(num_columns, dtype="int32")
    h = ops.expand_dims(ops.cast(rows, "int32") * num_columns, 1) + ops.expand_dims(columns, 0)
    h = h + seed * _GOLDEN
    h = ops.bitwise_xor(h, _shift_right(h, 16)) * _MIX1
    h = ops.bitwise_xor(h, _shift_right(h, 13)) * _MIX2
    h = ops.bitwise_xor(h, _shift_right(h, 16))
    return ops.cast(_shift_right(h, 8), "float32") * (1.0 / (1 << 24))


def _bisect_rows(weights, uniform, num_columns):
    """int32 (b, R): per row, the number of cumulative weights below each `uniform` times
    the row's total, by bisection (a loop, so one set of (b, R) buffers is reused)."""
    cdf = ops.cumsum(weights, axis=1)
    u = uniform * cdf[:, -1:]

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        below = ops.less(ops.take_along_axis(cdf, ops.minimum(middle, num_columns - 1), axis=1), u)
        below = ops.logical_and(below, ops.less(middle, high))
        return ops.where(below, middle + 1, low), ops.where(below, high, middle)

    low, _ = ops.fori_loop(
        0,
        num_columns.bit_length(),
        halve,
        (ops.zeros(ops.shape(u), "int32"), ops.full(ops.shape(u), num_columns, "int32")),
    )
    return ops.minimum(low, num_columns - 1)


def _sample_rows(weights, uniform):
    """int32 (b, R): R independent draws per row from the categorical of its `weights`, from
    the (b, R) `uniform` numbers in [0, 1).

    Inverse-CDF sampling without a (b, R, R) comparison: the draw of a uniform u is the
    number of the row's cumulative weights below u times the row's total, found by bisection
    (`_bisect_rows`; or, where R is unknown while tracing, by sorting the row's scaled
    uniforms together with its cumulative weights: one joint argsort and its inverse per
    row), in O(b * R) memory.
    A zero-weight column is never drawn (up to a uniform tied exactly with a cumulative sum);
    a row whose weights are all zero gives arbitrary columns (the caller drops it).
    """
    num_columns = ops.shape(weights)[1]
    if isinstance(num_columns, int):
        return _bisect_rows(weights, uniform, num_columns)
    cdf = ops.cumsum(weights, axis=1)
    u = uniform * cdf[:, -1:]
    perm = ops.argsort(ops.concatenate([cdf, ops.cast(u, cdf.dtype)], axis=1), axis=1)
    below = ops.cumsum(ops.cast(ops.less(perm, num_columns), "int32"), axis=1)
    position = ops.argsort(perm, axis=1)[:, num_columns:]
    drawn = ops.take_along_axis(below, position, axis=1)
    return ops.minimum(drawn, num_columns - 1)


class SampledNegativeRule(NamedTuple):
    """The triplets of `DistanceWeightedMiner`: (a, p, n) is kept when `n == choice[a, p]`,
    the negative drawn for the positive pair (a, p) (a `TripletRule`-like rule)."""

    choice: Any

    def keeps(self, selected, negatives):
        picked = ops.sum(ops.where(selected, self.choice, 0), axis=1)
        has = ops.any(selected, axis=1)
        return ops.logical_and(negatives, _one_hot_rows(picked, has, ops.shape(negatives)[1]))


@export
class DistanceWeightedMiner(Miner):
    r"""Distance-weighted sampling of negatives (Wu et al., 2017): every positive pair (a, p)
    gets one negative n drawn with probability proportional to
    $w_{an} = d^{2-n} \left[1 - d^2/4\right]^{(3-n)/2}$, $d = \max(d_{an}, \text{cutoff})$,
    $n$ the embedding dimension, and $w_{an} = 0$ for $d_{an} \ge$ `nonzero_loss_cutoff`
    (the inverse of the density of distances between points uniform on the unit sphere).

    The triplets (a, p, n) are a rule (`SampledNegativeRule`) evaluated by `TripletLoss`;
    a pair loss uses the pairs (a, p) and (a, n) of the triplets. An anchor whose weights are
    all zero keeps nothing. Follows `pytorch_metric_learning.miners.DistanceWeightedMiner`
    (same weights, same errors for a distance other than `LpDistance()`), with two
    differences: PML draws as many positives per anchor as its class has members, uniformly
    with replacement, where this keeps every positive pair once; and the weights are
    normalised per row (PML subtracts one batch-wide maximum before the exponential, which can
    underflow a whole row to zero). Draws come from a `keras.random.SeedGenerator(seed)`
    (whose state does not advance inside a JAX `model.fit` step: see docs/losses.md).
    Paper: "Sampling Matters in Deep Embedding Learning", ICCV 2017, arXiv:1706.07567.

    Args:
      cutoff: the distance below which the weights are clipped, > 0.
      nonzero_loss_cutoff: negatives at this distance or farther are never drawn, > 0.
      seed: None or an int, the seed of the draws.
      distance: must be `LpDistance()` (PML's restriction), the default.
    """

    def __init__(self, cutoff=0.5, nonzero_loss_cutoff=1.4, seed=None, distance=None):
        super().__init__(distance)
        if distances_lib.get(self.distance) != distances_lib.LpDistance():
            raise ValueError(
                "`distance` of DistanceWeightedMiner must be LpDistance() (as in "
                f"pytorch-metric-learning). Received: distance={self.distance!r}"
            )
        self.cutoff = check_number("cutoff", cutoff, POSITIVE)
        self.nonzero_loss_cutoff = check_number(
            "nonzero_loss_cutoff", nonzero_loss_cutoff, POSITIVE
        )
        self.seed = _check_seed(seed)
        self._seed_generator = keras.random.SeedGenerator(seed)

    def batch_state(self, rows):
        """The seed of this call's draws (int32), drawn once before the blocks."""
        return keras.random.randint((), 0, 2**31 - 1, seed=self._seed_generator, dtype="int32")

    def weights(self, gaps, negatives, dim):
        """float32 (b, R) unnormalised sampling weights of the negatives (row maximum 1)."""
        d = ops.maximum(ops.cast(gaps, "float32"), self.cutoff)
        log_w = (2.0 - dim) * ops.log(d) - ((dim - 3.0) / 2.0) * ops.log(1.0 - 0.25 * d * d)
        valid = ops.logical_and(negatives, ops.isfinite(log_w))
        valid = ops.logical_and(
            valid, ops.less(ops.cast(gaps, "float32"), self.nonzero_loss_cutoff)
        )
        top = ops.max(ops.where(valid, log_w, -_BIG), axis=1, keepdims=True)
        return ops.where(valid, ops.exp(ops.where(valid, log_w - top, 0.0)), 0.0)

    def mine_rows(
        self, query, reference, self_index, positives, negatives, order=None, state=None, index=None
    ):
        dim = float(query.shape[1])
        num_columns = ops.shape(reference)[0]
        # The uniforms come from (batch row, column, seed) through a hash, not from the
        # generator: a loss's blocks of rows run as one traced step of a scan on JAX, where
        # the generator would give every block the same numbers, and as a loop elsewhere,
        # where it would draw afresh for each block. The seed is drawn once a call, before
        # the blocks (`batch_state`), so the draws do not depend on the blocks.
        seed = self.batch_state(None) if state is None else state
        if index is None:
            index = ops.arange(ops.shape(query)[0], dtype="int32")

        def draw(_, query, negatives, positives, rows, *rest):
            # Each block computes its own rows of the distances (LpDistance: larger is
            # farther): the (B, R) matrix is never whole here.
            own, reference = rest if len(rest) == 2 else (None, rest[0])
            gaps = self.gaps(query, reference, own)
            weights = self.weights(gaps, negatives, dim)
            uniform = _hashed_uniform(rows, num_columns, seed)
            choice = _sample_rows(weights, ops.cast(uniform, weights.dtype))
            kept = ops.logical_and(positives, ops.any(ops.greater(weights, 0.0), 1, keepdims=True))
            # per_negative[a, n]: how many kept positives of a drew n; a scatter, not (b, R, R).
            # The mask of the drawn negatives is its own scatter, of booleans (a quarter of
            # the counts' memory; a triplet loss reads only the mask, and the compiler drops
            # the counts): the pairs not kept write to one extra entry, dropped.
            shape = ops.shape(gaps)
            size = shape[0] * shape[1]
            flat = ops.expand_dims(ops.arange(shape[0], dtype="int32") * num_columns, 1)
            flat = ops.reshape(flat + ops.cast(choice, "int32"), (-1, 1))
            drawn = ops.scatter_update(
                ops.zeros((size + 1,), "bool"),
                ops.where(ops.reshape(kept, (-1, 1)), flat, size),
                ops.ones((size,), "bool"),
            )
            per_negative = ops.scatter(flat, ops.reshape(ops.cast(kept, "float32"), (-1,)), (size,))
            return (
                choice,
                kept,
                ops.reshape(drawn[:size], shape),
                ops.reshape(per_negative, shape),
            )

        inputs = [query, negatives, positives, index]
        if self_index is not None:
            inputs.append(self_index)
        if isinstance(num_columns, int):  # in row blocks (no gradient: nothing recomputed)
            choice, kept, drawn, per_negative = _blocks.map_rows(
                draw,
                inputs,
                (reference,),
                max_entries=_blocks.MINING_ENTRIES,
                num_references=num_columns,
            )
        else:
            choice, kept, drawn, per_negative = draw(None, *inputs, reference)
        return Mined(
            kept,
            drawn,
            SampledNegativeRule(choice),
            ops.cast(kept, "float32"),
            per_negative,
            triplets=True,
        )

    def get_config(self):
        return {
            "cutoff": self.cutoff,
            "nonzero_loss_cutoff": self.nonzero_loss_cutoff,
            "seed": self.seed,
            **super().get_config(),
        }


@export
class UniformHistogramMiner(Miner):
    """Pairs spread evenly over their distances: the positive pairs of the batch are put in
    `num_bins` equal-width bins between their smallest and largest distance, and from each
    non-empty bin `pos_per_bin` pairs are drawn uniformly with replacement; likewise the
    negative pairs with `neg_per_bin`.

    A pair drawn k times counts k times (`Mined.positive_counts` / `negative_counts`). The
    bins span the whole batch, so the draws are made first, in passes over the blocks of rows
    (the smallest and largest distance; each row's count per bin; a draw's rank in its bin,
    the pairs taken in row-major order, gives its row, and a pass over the drawn rows its
    column); then each block keeps its rows' draws. Memory stays O(block * R).
    Equals `pytorch_metric_learning.miners.UniformHistogramMiner` in distribution (the bin
    edges are computed as `floor((d - min) / (max - min) * num_bins)`, PML's as a
    `linspace`, which can differ at an edge by rounding). Default distance `LpDistance()`;
    draws come from a `keras.random.SeedGenerator(seed)`. The pairs are counted in int32: a
    batch of more than 2^31 - 1 pairs (B x R) is refused with a ValueError.

    Args:
      num_bins, pos_per_bin, neg_per_bin: ints >= 1.
      seed: None or an int, the seed of the draws.
      distance: a `deepmetric.distances` name or `Distance`.
    """

    row_local = False

    def __init__(self, num_bins=100, pos_per_bin=10, neg_per_bin=10, seed=None, distance=None):
        super().__init__(distance)
        self.num_bins = _check_count("num_bins", num_bins)
        self.pos_per_bin = _check_count("pos_per_bin", pos_per_bin)
        self.neg_per_bin = _check_count("neg_per_bin", neg_per_bin)
        self.seed = _check_seed(seed)
        self._seed_generator = keras.random.SeedGenerator(seed)

    def batch_state(self, rows):
        """The draws of the batch: for the positive and the negative pairs, (rows, columns,
        valid) of the `num_bins * per_bin` drawn pairs, in three passes over the blocks of
        rows (the range of the distances; each row's count per bin; the drawn rows again, to
        find each draw's column)."""

        def ranges(gaps, positives, negatives):
            return (
                ops.min(ops.where(positives, gaps, _BIG), 1),
                ops.max(ops.where(positives, gaps, -_BIG), 1),
                ops.min(ops.where(negatives, gaps, _BIG), 1),
                ops.max(ops.where(negatives, gaps, -_BIG), 1),
            )

        mins_maxes = rows.map(ranges)
        edges = [
            (ops.min(mins_maxes[0]), ops.max(mins_maxes[1])),
            (ops.min(mins_maxes[2]), ops.max(mins_maxes[3])),
        ]
        nb = self.num_bins

        def bin_counts(gaps, positives, negatives):
            return tuple(
                _row_counts(self._bins(gaps, low, high), mask, nb)
                for mask, (low, high) in zip((positives, negatives), edges, strict=True)
            )

        per_row = rows.map(bin_counts)
        state = []
        for kind, per_bin in ((0, self.pos_per_bin), (1, self.neg_per_bin)):
            row_counts = ops.cast(per_row[kind], "int32")  # (B, nb)
            state.append(self._draws(rows, kind, row_counts, per_bin, edges[kind]))
        return tuple(state)

    def _bins(self, gaps, low, high):
        """int32 bin of each gap: `num_bins` equal-width bins between low and high."""
        nb = self.num_bins
        width = high - low
        gaps = ops.cast(gaps, "float32")
        scaled = ops.where(
            ops.greater(width, 0.0), (gaps - low) / ops.where(width > 0, width, 1.0) * nb, nb - 1.0
        )
        return ops.cast(ops.clip(ops.floor(scaled), 0.0, nb - 1.0), "int32")

    def _draws(self, rows, kind, row_counts, per_bin, edges):
        """(rows, columns, valid) of `per_bin` draws with replacement from each bin.

        A draw is a rank in its bin's pairs in row-major order: its row comes from the
        running counts of the bin over the rows, its column from a pass over the drawn rows
        (the first column where the row's count of the bin passes the rank within the row).
        """
        nb = self.num_bins
        num_rows = ops.shape(row_counts)[0]
        counts = ops.sum(row_counts, axis=0)  # (nb,)
        u = keras.random.uniform((nb, per_bin), seed=self._seed_generator)
        rank = ops.cast(ops.floor(u * ops.cast(counts[:, None], "float32")), "int32")
        rank = ops.minimum(rank, ops.maximum(counts[:, None] - 1, 0))
        valid = ops.reshape(ops.broadcast_to(counts[:, None] > 0, (nb, per_bin)), (-1,))
        bins = ops.reshape(
            ops.broadcast_to(ops.arange(nb, dtype="int32")[:, None], (nb, per_bin)), (-1,)
        )
        rank = ops.reshape(rank, (-1,))
        # The rows' running counts of every bin side by side, bin after bin: one non-decreasing
        # sequence (at most B * R, an int32), searched for each draw's rank in its bin.
        running = ops.cumsum(row_counts, axis=0)  # (B, nb), inclusive
        before = ops.cumsum(counts) - counts  # pairs in the bins below
        sequence = ops.reshape(ops.transpose(running + before[None, :]), (-1,))
        target = ops.take(before, bins) + rank
        found = ops.cast(ops.searchsorted(sequence, target, side="right"), "int32")
        row = ops.clip(found - bins * num_rows, 0, num_rows - 1)
        earlier = ops.take(ops.reshape(running - row_counts, (-1,)), row * nb + bins)
        within = rank - earlier  # rank of the draw among its row's pairs of the bin
        low, high = edges

        def columns(gaps, positives, negatives, draw_bin, draw_within):
            mask = (positives, negatives)[kind]
            member = ops.logical_and(
                mask, ops.equal(self._bins(gaps, low, high), draw_bin[:, None])
            )
            running_row = ops.cumsum(ops.cast(member, "int32"), axis=1)
            passed = ops.greater(running_row, draw_within[:, None])
            return (ops.cast(ops.argmax(ops.cast(passed, "int32"), axis=1), "int32"),)

        (column,) = rows.map(columns, positions=row, per_row=(bins, within))
        return row, column, valid

    def _select_with(self, gaps, positives, negatives, order, state, index):
        block_rows, num_columns = ops.shape(gaps)[0], ops.shape(gaps)[1]
        counts = []
        for row, column, valid in state:
            local = row - index[0]  # the block's rows are consecutive
            inside = ops.logical_and(valid, ops.logical_and(local >= 0, local < block_rows))
            at = ops.stack([ops.clip(local, 0, block_rows - 1), column], axis=1)
            counts.append(ops.scatter(at, ops.cast(inside, "float32"), (block_rows, num_columns)))
        per_positive, per_negative = counts
        return Mined(
            ops.greater(per_positive, 0.0),
            ops.greater(per_negative, 0.0),
            None,
            per_positive,
            per_negative,
        )

    def get_config(self):
        return {
            "num_bins": self.num_bins,
            "pos_per_bin": self.pos_per_bin,
            "neg_per_bin": self.neg_per_bin,
            "seed": self.seed,
            **super().get_config(),
        }


def get(identifier):
    """A miner from None, a `Miner`, or a Keras config dict (`deepmetric.miners` classes)."""
    if identifier is None or isinstance(identifier, Miner):
        return identifier
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Miner):
            return obj
    raise TypeError(
        "`miner` must be None or a `deepmetric.miners` miner (for example "
        f"`deepmetric.miners.MultiSimilarityMiner()`). Received: {identifier!r}"
    )


def serialize(miner):
    """The config entry of a `miner` argument."""
    return None if miner is None else keras.saving.serialize_keras_object(miner)
