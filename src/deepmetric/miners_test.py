"""Miners against loops written from their definitions (every backend) and against
pytorch-metric-learning 2.9 (torch only), alone and inside the losses."""

import itertools
import re

import keras
import numpy as np
import pytest
from keras import ops

from deepmetric import _backend, _blocks, losses, miners

TORCH_ONLY = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="pytorch-metric-learning runs on torch only"
)


def batch(seed, b=14, d=5, classes=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, b), rng.normal(size=(b, d)).astype("float32")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


# --- References written from the definitions, in float64. ---


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lp(x):
    """PML's LpDistance(): Euclidean distance of the normalised rows."""
    u = _unit(x)
    return np.sqrt(np.maximum(((u[:, None] - u[None]) ** 2).sum(-1), 0.0))


def cosine(x):
    u = _unit(x)
    return u @ u.T


def label_pairs(labels):
    same = labels[:, None] == labels[None, :]
    positives = same & ~np.eye(len(labels), dtype=bool)
    return positives, ~same


def ref_multi_similarity(labels, x, epsilon=0.1):
    s = cosine(x)
    pos, neg = label_pairs(labels)
    keep_pos, keep_neg = np.zeros_like(pos), np.zeros_like(neg)
    for a in range(len(labels)):
        if pos[a].any() and neg[a].any():
            keep_pos[a] = pos[a] & (s[a] - epsilon < s[a][neg[a]].max())
            keep_neg[a] = neg[a] & (s[a] + epsilon > s[a][pos[a]].min())
    return keep_pos, keep_neg


def ref_triplet_margin(labels, x, margin=0.2, type_of_triplets="all"):
    """The kept triplets (a, p, n), listed."""
    d = lp(x)
    pos, neg = label_pairs(labels)
    kept = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if pos[a, p] and neg[a, n]:
            t = d[a, n] - d[a, p]
            keep = {
                "all": t <= margin,
                "hard": t <= margin and t <= 0,
                "semihard": 0 < t <= margin,
                "easy": t > margin,
            }[type_of_triplets]
            if keep:
                kept.append((a, p, n))
    return kept


def _pick(row, candidates, farthest):
    """The farthest (or closest) of `candidates` by `row`, or None if there is none."""
    if not len(candidates):
        return None
    return candidates[np.argmax(row[candidates]) if farthest else np.argmin(row[candidates])]


def ref_batch_easy_hard(labels, x, pos_strategy, neg_strategy):
    """(positives, negatives) masks of Xuan et al.'s per-anchor picks, on LpDistance."""
    d = lp(x)
    pos, neg = label_pairs(labels)
    keep_pos, keep_neg = np.zeros_like(pos), np.zeros_like(neg)
    for a in range(len(labels)):
        ps, ns = np.flatnonzero(pos[a]), np.flatnonzero(neg[a])

        pos_far = pos_strategy in ("hard", "semihard")
        neg_far = neg_strategy == "easy"

        if pos_strategy == "semihard":
            n = _pick(d[a], ns, neg_far)
            p = None if n is None else _pick(d[a], ps[d[a, ps] < d[a, n]], pos_far)
        elif neg_strategy == "semihard":
            p = _pick(d[a], ps, pos_far)
            n = None if p is None else _pick(d[a], ns[d[a, ns] > d[a, p]], neg_far)
        else:
            p = _pick(d[a], ps, pos_far) if pos_strategy != "all" else None
            n = _pick(d[a], ns, neg_far) if neg_strategy != "all" else None
        if pos_strategy == "all":
            keep_pos[a] = pos[a]
            if n is not None:
                keep_neg[a, n] = True
        elif neg_strategy == "all":
            keep_neg[a] = neg[a]
            if p is not None:
                keep_pos[a, p] = True
        elif p is not None and n is not None:
            keep_pos[a, p] = keep_neg[a, n] = True
    return keep_pos, keep_neg


# --- Each miner against its definition. ---


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_multi_similarity_miner_matches_definition(epsilon):
    labels, x = batch(0)
    mined = miners.MultiSimilarityMiner(epsilon=epsilon)(labels, x)
    keep_pos, keep_neg = ref_multi_similarity(labels, x, epsilon)
    np.testing.assert_array_equal(_np(mined.positives), keep_pos)
    np.testing.assert_array_equal(_np(mined.negatives), keep_neg)
    assert keep_pos.any() and not keep_pos.all()  # the test can fail both ways


def test_pair_margin_miner_matches_definition():
    labels, x = batch(1)
    d = lp(x)
    pos, neg = label_pairs(labels)
    mined = miners.PairMarginMiner(pos_margin=0.9, neg_margin=1.2)(labels, x)
    np.testing.assert_array_equal(_np(mined.positives), pos & (d > 0.9))
    np.testing.assert_array_equal(_np(mined.negatives), neg & (d < 1.2))
    # On a similarity the inequalities turn around.
    s = cosine(x)
    mined = miners.PairMarginMiner(0.3, 0.1, distance="cosine")(labels, x)
    np.testing.assert_array_equal(_np(mined.positives), pos & (s < 0.3))
    np.testing.assert_array_equal(_np(mined.negatives), neg & (s > 0.1))


@pytest.mark.parametrize("type_of_triplets", miners.TYPES_OF_TRIPLETS)
def test_triplet_margin_miner_counts_its_triplets(type_of_triplets):
    """The pair counts of the rule equal those of the listed triplets."""
    labels, x = batch(2)
    mined = miners.TripletMarginMiner(margin=0.3, type_of_triplets=type_of_triplets)(labels, x)
    kept = ref_triplet_margin(labels, x, 0.3, type_of_triplets)
    per_positive, per_negative = np.zeros((2, len(labels), len(labels)))
    for a, p, n in kept:
        per_positive[a, p] += 1
        per_negative[a, n] += 1
    assert kept
    np.testing.assert_array_equal(_np(mined.positive_counts), per_positive)
    np.testing.assert_array_equal(_np(mined.negative_counts), per_negative)
    np.testing.assert_array_equal(_np(mined.positives), per_positive > 0)
    assert mined.triplets and mined.rule is not None


def ref_angular(labels, x, angle):
    """The kept triplets of the angular miner, with torch's pairwise_distance (+1e-6)."""
    x = np.asarray(x, np.float64)
    pos, neg = label_pairs(labels)

    def dist(u, v):
        return np.linalg.norm(u - v + 1e-6)

    kept = []
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if pos[a, p] and neg[a, n]:
            ratio = dist(x[a], x[p]) / (2 * dist(x[n], (x[a] + x[p]) / 2))
            if np.arctan(ratio) > np.radians(angle):
                kept.append((a, p, n))
    return kept


@pytest.mark.parametrize("angle", [20, 45])
def test_angular_miner_counts_its_triplets(angle):
    labels, x = batch(15)
    mined = miners.AngularMiner(angle)(labels, x)
    per_positive, per_negative = np.zeros((2, len(labels), len(labels)))
    for a, p, n in ref_angular(labels, x, angle):
        per_positive[a, p] += 1
        per_negative[a, n] += 1
    pos, neg = label_pairs(labels)
    assert 0 < per_positive.sum() < (pos.sum(1) * neg.sum(1)).sum()  # some kept, some not
    np.testing.assert_array_equal(_np(mined.positive_counts), per_positive)
    np.testing.assert_array_equal(_np(mined.negative_counts), per_negative)


def ref_hdc(labels, x, fraction):
    """The k = ceil(fraction * count) farthest positive pairs and closest negative pairs."""
    d = lp(x)
    kept = []
    for mask, sign in zip(label_pairs(labels), (1.0, -1.0), strict=True):
        values = sign * d[mask]
        k = int(np.ceil(np.float32(fraction) * np.float32(mask.sum())))
        threshold = np.sort(values)[::-1][k - 1]
        kept.append(mask & (sign * d >= threshold))
    return kept


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_hdc_miner_matches_definition(fraction):
    labels, x = batch(16)
    mined = miners.HDCMiner(fraction)(labels, x)
    keep_pos, keep_neg = ref_hdc(labels, x, fraction)
    np.testing.assert_array_equal(_np(mined.positives), keep_pos)
    np.testing.assert_array_equal(_np(mined.negatives), keep_neg)


COMBINATIONS = [
    ("hard", "hard"),
    ("easy", "semihard"),
    ("semihard", "easy"),
    ("easy", "easy"),
    ("hard", "semihard"),
    ("all", "hard"),
    ("easy", "all"),
]


@pytest.mark.parametrize("pos_strategy, neg_strategy", COMBINATIONS)
def test_batch_easy_hard_miner_matches_definition(pos_strategy, neg_strategy):
    labels, x = batch(3)
    mined = miners.BatchEasyHardMiner(pos_strategy, neg_strategy)(labels, x)
    keep_pos, keep_neg = ref_batch_easy_hard(labels, x, pos_strategy, neg_strategy)
    np.testing.assert_array_equal(_np(mined.positives), keep_pos)
    np.testing.assert_array_equal(_np(mined.negatives), keep_neg)


def test_batch_hard_miner_is_hard_hard_and_allowed_ranges_filter():
    labels, x = batch(4)
    hard = miners.BatchHardMiner()(labels, x)
    keep_pos, keep_neg = ref_batch_easy_hard(labels, x, "hard", "hard")
    np.testing.assert_array_equal(_np(hard.positives), keep_pos)
    np.testing.assert_array_equal(_np(hard.negatives), keep_neg)
    # A range that excludes every negative keeps no triplet.
    none = miners.BatchHardMiner(allowed_neg_range=(5.0, 6.0))(labels, x)
    assert not _np(none.positives).any() and not _np(none.negatives).any()


def test_reference_set_and_compiled():
    """Against a reference set no pair is excluded; compiled mining equals eager mining."""
    labels, x = batch(5)
    miner = miners.MultiSimilarityMiner()
    mined = miner(labels, x, reference_embeddings=x, reference_labels=labels)
    same = labels[:, None] == labels[None, :]
    s = cosine(x)
    expected = same & (s - 0.1 < np.where(~same, s, -np.inf).max(1, keepdims=True))
    np.testing.assert_array_equal(_np(mined.positives), expected)
    compiled = _backend.compiled(lambda lab, v: miner(lab, v).positives, labels, x)
    np.testing.assert_array_equal(_np(compiled(labels, x)), _np(miner(labels, x).positives))


# --- Losses with a miner against loops over the mined pairs or triplets. ---


def ref_triplet_loss(labels, x, triplets, margin, smooth=False, swap=False):
    """PML's TripletMarginLoss over the given triplets on LpDistance, AvgNonZero."""
    d = lp(x)
    costs = []
    for a, p, n in triplets:
        an = min(d[a, n], d[p, n]) if swap else d[a, n]
        gap = d[a, p] - an + margin
        costs.append(np.logaddexp(0.0, gap) if smooth else max(gap, 0.0))
    costs = [c for c in costs if c > 0]
    return float(np.mean(costs)) if costs else 0.0


def ref_multi_similarity_loss(labels, x, keep_pos, keep_neg, alpha=2.0, beta=50.0, base=0.5):
    s = cosine(x)
    if keep_pos.sum() <= 1 and keep_neg.sum() <= 1:
        return 0.0
    total = 0.0
    for a in range(len(labels)):
        total += np.log1p(np.exp(-alpha * (s[a][keep_pos[a]] - base)).sum()) / alpha
        total += np.log1p(np.exp(beta * (s[a][keep_neg[a]] - base)).sum()) / beta
    return total / len(labels)


def _value_and_grad(loss, labels, x, compiled=False):
    return _backend.value_and_grad(lambda v, lab: loss(lab, v), x, labels, compiled=compiled)


def _fd_grad(fn, x, h=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap"])
@pytest.mark.parametrize("type_of_triplets", ["all", "semihard"])
def test_triplet_loss_with_triplet_margin_miner_matches_loop(type_of_triplets, swap):
    labels, x = batch(6, b=10, classes=3)
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets=type_of_triplets)
    loss = losses.TripletLoss(
        margin=0.1, distance="lp", average_nonzero=True, swap=swap, miner=miner
    )
    triplets = ref_triplet_margin(labels, x, 0.3, type_of_triplets)
    expected = ref_triplet_loss(labels, x, triplets, 0.1, swap=swap)
    # The triplets are fixed by the mining (no gradient): differentiate with them fixed.
    grad = _fd_grad(lambda v: ref_triplet_loss(labels, v, triplets, 0.1, swap=swap), x)
    value, ours = _value_and_grad(loss, labels, x)
    assert float(value) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(ours, grad, rtol=2e-3, atol=2e-4)


def test_triplet_loss_with_batch_hard_miner_is_one_triplet_per_anchor():
    labels, x = batch(7, b=10, classes=3)
    keep_pos, keep_neg = ref_batch_easy_hard(labels, x, "hard", "hard")
    triplets = [
        (a, int(np.flatnonzero(keep_pos[a])[0]), int(np.flatnonzero(keep_neg[a])[0]))
        for a in range(len(labels))
        if keep_pos[a].any()
    ]
    loss = losses.TripletLoss(
        margin=0.4,
        distance="lp",
        average_nonzero=True,
        smooth_loss=True,
        miner=miners.BatchHardMiner(),
    )
    value, _ = _value_and_grad(loss, labels, x)
    assert float(value) == pytest.approx(ref_triplet_loss(labels, x, triplets, 0.4, True), rel=1e-5)


def test_multi_similarity_loss_with_its_miner_matches_loop():
    labels, x = batch(8)
    keep_pos, keep_neg = ref_multi_similarity(labels, x)
    loss = losses.MultiSimilarityLoss(miner=miners.MultiSimilarityMiner())
    expected = ref_multi_similarity_loss(labels, x, keep_pos, keep_neg)
    grad = _fd_grad(lambda v: ref_multi_similarity_loss(labels, v, keep_pos, keep_neg), x)
    value, ours = _value_and_grad(loss, labels, x)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(ours, grad, rtol=2e-3, atol=2e-4)


def test_one_pair_of_each_kind_gives_zero_as_in_pml():
    """PML's pair losses return 0 when the miner keeps at most one pair of each kind.

    Labels [0, 0, 1]: anchors 0 and 1 have one positive and the negative 2, at distance 0.1
    from anchor 0 and 1.34 from anchor 1; a negative range up to 0.5 keeps one triplet.
    """
    labels = np.array([0, 0, 1])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], "float32")
    one = miners.BatchHardMiner(allowed_neg_range=(0.0, 0.5))
    two = miners.BatchHardMiner(allowed_neg_range=(0.0, 2.0))
    assert int(_np(one(labels, x).positives).sum()) == 1
    for loss in (losses.MultiSimilarityLoss, losses.CircleLoss, losses.OnlineContrastiveLoss):
        assert float(_np(loss(miner=one)(labels, x))) == 0.0
        assert float(_np(loss(miner=two)(labels, x))) > 0.0


BLOCKED_LOSSES = {
    "triplet": lambda: losses.TripletLoss(distance="lp", miner=miners.TripletMarginMiner()),
    "multi_similarity": lambda: losses.MultiSimilarityLoss(miner=miners.MultiSimilarityMiner()),
    "contrastive": lambda: losses.OnlineContrastiveLoss(miner=miners.TripletMarginMiner()),
    # The miners that need the whole batch: passes over the blocks first.
    "hdc": lambda: losses.OnlineContrastiveLoss(miner=miners.HDCMiner(0.3)),
    "hdc_triplet": lambda: losses.TripletLoss(distance="lp", miner=miners.HDCMiner(0.5)),
    "uniform_histogram": lambda: losses.OnlineContrastiveLoss(
        miner=miners.UniformHistogramMiner(5, 2, 3, seed=4)
    ),
    "uniform_histogram_triplet": lambda: losses.TripletLoss(
        distance="lp", miner=miners.UniformHistogramMiner(4, 3, 2, seed=7)
    ),
    # Random draws per row: each block draws its rows' numbers, none shared between blocks.
    "distance_weighted": lambda: losses.TripletLoss(
        distance="lp", miner=miners.DistanceWeightedMiner(seed=5)
    ),
    "distance_weighted_contrastive": lambda: losses.OnlineContrastiveLoss(
        miner=miners.DistanceWeightedMiner(seed=6)
    ),
}


@pytest.mark.parametrize("name", sorted(BLOCKED_LOSSES))
def test_blocks_equal_one_block(name, monkeypatch):
    """A loss computed in blocks of rows mines as over the whole batch: row-local miners
    each block alone, the others with figures of the batch computed over the blocks first
    (a fresh miner each time, so that the random one draws from the same seed state).

    The rows have four entries of +-1/2 and a zero: unit norm and dot products in quarters,
    exact in float32, so every distance has the same bits in a block as in the whole matrix
    (TensorFlow's matrix product rounds differently for a block's shape, which moves a pair
    at HDC's threshold across it)."""
    labels, _ = batch(9, b=12)
    rng = np.random.default_rng(9)
    x = rng.choice([-0.5, 0.5], size=(12, 5)).astype("float32")
    x[np.arange(12), rng.integers(0, 5, 12)] = 0.0
    whole = _value_and_grad(BLOCKED_LOSSES[name](), labels, x)
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 5 * 12)  # blocks of 5, 5 and 2 rows
    blocks = _value_and_grad(BLOCKED_LOSSES[name](), labels, x)
    assert float(whole[0]) > 0.0
    assert float(blocks[0]) == pytest.approx(float(whole[0]), rel=1e-5)
    np.testing.assert_allclose(blocks[1], whole[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mask_rank", [1, 2])
@pytest.mark.parametrize(
    "build",
    [lambda: miners.HDCMiner(0.4), lambda: miners.UniformHistogramMiner(4, 2, 3, seed=2)],
    ids=["hdc", "uniform_histogram"],
)
def test_whole_batch_miners_in_blocks_with_a_reference_set(build, mask_rank, monkeypatch):
    """Against a reference set with a mask, the blocked passes give the one-block loss."""
    labels, x = batch(4, b=10)
    ref_labels, ref = batch(5, b=13)
    rng = np.random.default_rng(0)
    mask = rng.random(13 if mask_rank == 1 else (10, 13)) > 0.2

    def run():
        miner = build()

        def fn(v, lab):
            return ops.mean(
                losses.online_contrastive_loss(
                    lab,
                    v,
                    miner=miner,
                    reference_embeddings=ref,
                    reference_labels=ref_labels,
                    reference_mask=mask,
                )
            )

        return _backend.value_and_grad(fn, x, labels)

    whole = run()
    assert float(whole[0]) > 0.0
    monkeypatch.setattr(_blocks, "BLOCK_ENTRIES", 4 * 13)
    blocks = run()
    assert float(blocks[0]) == pytest.approx(float(whole[0]), rel=1e-5)
    np.testing.assert_allclose(blocks[1], whole[1], rtol=1e-4, atol=1e-6)


def test_kth_largest_is_exact_on_ties_and_signs():
    """The radix selection of HDC's thresholds equals a sort: negative values, zeros of
    both signs, repeated values, k from 1 to all, the rows taken in blocks."""
    rng = np.random.default_rng(1)
    gaps = rng.choice(np.float32([-3.5, -1e-20, -0.0, 0.0, 1e-30, 0.25, 7.0, 3e38]), (9, 11))
    gaps[2:4] = rng.standard_normal((2, 11)).astype("float32")
    positives = rng.random((9, 11)) > 0.4
    negatives = ~positives & (rng.random((9, 11)) > 0.3)

    def map_positions(fn, positions, per_row):
        outs = [
            fn(*(ops.convert_to_tensor(a[start : start + 4]) for a in (gaps, positives, negatives)))
            for start in range(0, 9, 4)
        ]
        return tuple(ops.concatenate(parts, axis=0) for parts in zip(*outs, strict=True))

    rows = miners.BatchRows(map_positions, 9)
    pos_values = np.sort(gaps[positives])[::-1]
    neg_values = np.sort(-gaps[negatives])[::-1]
    for kp, kn in [(1, 1), (3, 7), (len(pos_values), len(neg_values)), (17, 2)]:
        found = miners._kth_largest(rows, [ops.convert_to_tensor(kp), ops.convert_to_tensor(kn)])
        assert float(_np(found[0])) == pos_values[kp - 1]
        assert float(_np(found[1])) == neg_values[kn - 1]


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="torch runs eagerly")
@pytest.mark.parametrize("name", ["triplet", "multi_similarity"])
def test_eager_equals_compiled(name):
    labels, x = batch(10)
    loss = {
        "triplet": losses.TripletLoss(distance="lp", swap=True, miner=miners.TripletMarginMiner()),
        "multi_similarity": losses.MultiSimilarityLoss(miner=miners.MultiSimilarityMiner()),
    }[name]
    eager = _value_and_grad(loss, labels, x)
    compiled = _value_and_grad(loss, labels, x, compiled=True)
    assert float(compiled[0]) == pytest.approx(float(eager[0]), rel=1e-5)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-4, atol=1e-6)


# --- Pair losses with a distance of their own. ---


def ref_contrastive(labels, m, pos_margin, neg_margin, closer):
    """PML's ContrastiveLoss on the matrix `m`: the mean of the non-zero hinges of each kind."""
    pos, neg = label_pairs(labels)
    if closer:  # a similarity: PML's margin(x, y) = y - x
        pos_loss, neg_loss = np.maximum(pos_margin - m, 0), np.maximum(m - neg_margin, 0)
    else:
        pos_loss, neg_loss = np.maximum(m - pos_margin, 0), np.maximum(neg_margin - m, 0)
    total = 0.0
    for loss, mask in ((pos_loss, pos), (neg_loss, neg)):
        values = loss[mask]
        total += values[values > 0].mean() if (values > 0).any() else 0.0
    return total


def test_contrastive_loss_with_a_similarity_matches_loop():
    labels, x = batch(13)
    loss = losses.OnlineContrastiveLoss(pos_margin=0.8, neg_margin=0.2, distance="cosine")
    expected = ref_contrastive(labels, cosine(x), 0.8, 0.2, closer=True)
    grad = _fd_grad(lambda v: ref_contrastive(labels, cosine(v), 0.8, 0.2, True), x)
    value, ours = _value_and_grad(loss, labels, x)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(ours, grad, rtol=2e-3, atol=2e-4)


def test_multi_similarity_loss_with_a_distance_matches_loop():
    """On a distance the exponents turn around: e^{alpha (d - base)}, e^{-beta (d - base)}."""
    labels, x = batch(14)

    def reference(v):
        d, (pos, neg) = lp(v), label_pairs(labels)
        total = np.log1p((np.exp(2.0 * (d - 0.5)) * pos).sum(1)) / 2.0
        total += np.log1p((np.exp(-50.0 * (d - 0.5)) * neg).sum(1)) / 50.0
        return total.mean()

    value, ours = _value_and_grad(losses.MultiSimilarityLoss(distance="lp"), labels, x)
    assert float(value) == pytest.approx(reference(x), rel=1e-5)
    np.testing.assert_allclose(ours, _fd_grad(reference, x), rtol=2e-3, atol=2e-4)


@TORCH_ONLY
@pytest.mark.parametrize(
    "loss_name, distance",
    [
        ("MultiSimilarityLoss", "LpDistance"),
        ("MultiSimilarityLoss", "DotProductSimilarity"),
        ("ContrastiveLoss", "CosineSimilarity"),
        ("ContrastiveLoss", "LpDistance_power2"),
        ("ContrastiveLoss", "SNRDistance"),
        ("MultiSimilarityLoss", "SNRDistance"),
    ],
)
def test_pair_loss_distance_equals_pml(loss_name, distance):
    pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    from deepmetric import distances

    ours_distance, pml_distance = {
        "LpDistance": (distances.LpDistance(), pml_distances.LpDistance()),
        "DotProductSimilarity": (
            distances.DotProductSimilarity(),
            pml_distances.DotProductSimilarity(normalize_embeddings=False),
        ),
        "CosineSimilarity": (distances.CosineSimilarity(), pml_distances.CosineSimilarity()),
        "LpDistance_power2": (distances.LpDistance(power=2), pml_distances.LpDistance(power=2)),
        "SNRDistance": (distances.SNRDistance(), pml_distances.SNRDistance()),
    }[distance]
    ours_loss = {
        "MultiSimilarityLoss": losses.MultiSimilarityLoss,
        "ContrastiveLoss": losses.OnlineContrastiveLoss,
    }[loss_name](distance=ours_distance)
    pml_loss = getattr(pml_losses, loss_name)(distance=pml_distance)
    labels, x = batch(15, b=16)
    x = x * 0.3  # inner products of moderate size for the unnormalised dot product
    ours = _value_and_grad(ours_loss, labels, x)
    theirs = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab), x, labels)
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=1e-5, abs=1e-6)
    scale = max(float(np.abs(theirs[1]).max()), 1e-3)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-4 * scale)


# --- Configuration, saving and errors. ---

ALL_MINERS = [
    miners.HDCMiner(0.3),
    miners.AngularMiner(30),
    miners.MultiSimilarityMiner(epsilon=0.2),
    miners.PairMarginMiner(0.1, 0.5, distance="cosine"),
    miners.TripletMarginMiner(0.1, "semihard"),
    miners.BatchEasyHardMiner("hard", "easy", allowed_pos_range=(0.0, 1.5)),
    miners.BatchHardMiner(),
    miners.DistanceWeightedMiner(0.4, 1.2, seed=3),
    miners.UniformHistogramMiner(20, 5, 6, seed=4, distance="cosine"),
]


@pytest.mark.parametrize("miner", ALL_MINERS, ids=lambda m: type(m).__name__)
def test_miner_config_round_trip(miner):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(miner))
    assert type(restored) is type(miner) and restored.get_config() == miner.get_config()
    assert restored == miner


def test_a_loss_with_a_miner_saves_in_a_keras_file(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    loss = losses.MultiSimilarityLoss(miner=miners.MultiSimilarityMiner(epsilon=0.3))
    model.compile(optimizer="sgd", loss=loss)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.loss.get_config() == loss.get_config()
    assert loaded.loss.miner == miners.MultiSimilarityMiner(epsilon=0.3)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: miners.TripletMarginMiner(type_of_triplets="medium"), ValueError, "one of 'all'"),
        (lambda: miners.MultiSimilarityMiner(epsilon="0.1"), TypeError, "`epsilon` must be a"),
        (lambda: miners.PairMarginMiner(distance="manhattan"), ValueError, "Unknown `distance`"),
        (
            lambda: miners.BatchEasyHardMiner("semihard", "semihard"),
            ValueError,
            'cannot both be "semihard"',
        ),
        (lambda: miners.BatchEasyHardMiner("all", "semihard"), ValueError, 'with "all"'),
        (lambda: miners.BatchHardMiner(allowed_pos_range=(2, 1)), ValueError, "low <= high"),
        (lambda: losses.CircleLoss(miner="ms"), TypeError, "`miner` must be None or a"),
        (
            lambda: miners.HDCMiner(0.0),
            ValueError,
            r"`filter_percentage` must be a finite number in \(0, 1\]",
        ),
        (lambda: miners.AngularMiner(distance="cosine"), ValueError, "must be LpDistance"),
        (lambda: miners.DistanceWeightedMiner(distance="cosine"), ValueError, "LpDistance"),
        (lambda: miners.UniformHistogramMiner(num_bins=2.5), TypeError, "`num_bins` must be"),
        (lambda: miners.UniformHistogramMiner(seed="1"), TypeError, "`seed` must be None"),
    ],
)
def test_bad_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    "miner, option, bad, allowed",
    [
        (miners.MultiSimilarityMiner, "epsilon", -0.1, ">= 0"),
        (miners.PairMarginMiner, "pos_margin", None, ""),
        (miners.PairMarginMiner, "neg_margin", None, ""),
        (miners.TripletMarginMiner, "margin", -0.1, ">= 0"),
        (miners.HDCMiner, "filter_percentage", 1.5, "in (0, 1]"),
        (miners.AngularMiner, "angle", 181.0, "in [0, 180]"),
        (miners.DistanceWeightedMiner, "cutoff", 0.0, "> 0"),
        (miners.DistanceWeightedMiner, "nonzero_loss_cutoff", -1.0, "> 0"),
        (miners.UniformHistogramMiner, "num_bins", 0, ">= 1"),
        (miners.UniformHistogramMiner, "pos_per_bin", 0, ">= 1"),
        (miners.UniformHistogramMiner, "neg_per_bin", -3, ">= 1"),
    ],
)
def test_numeric_options_refuse_nonfinite_and_out_of_range(miner, option, bad, allowed):
    """Every numeric option of a miner: NaN, +-inf and a value outside its documented range
    are a ValueError naming the option and the range (the rule of the losses' options)."""
    expected = re.escape(f"`{option}` must be a finite number{' ' + allowed if allowed else ''}.")
    for value in [float("nan"), float("inf"), float("-inf"), *([bad] if bad is not None else [])]:
        with pytest.raises(ValueError, match=expected):
            miner(**{option: value})


# --- pytorch-metric-learning 2.9. ---


def _pml_masks(indices, n):
    """PML's index tuple as (positive counts, negative counts) matrices."""
    indices = [i.numpy() for i in indices]
    a1, p, a2, neg = (
        indices if len(indices) == 4 else (indices[0], indices[1], indices[0], indices[2])
    )
    pos_counts, neg_counts = np.zeros((2, n, n))
    np.add.at(pos_counts, (a1, p), 1)
    np.add.at(neg_counts, (a2, neg), 1)
    return pos_counts, neg_counts


PAIRS = [
    ("MultiSimilarityMiner", {}),
    ("MultiSimilarityMiner", {"epsilon": 0.4}),
    ("PairMarginMiner", {}),
    ("TripletMarginMiner", {}),
    ("TripletMarginMiner", {"margin": 0.1, "type_of_triplets": "hard"}),
    ("TripletMarginMiner", {"type_of_triplets": "semihard"}),
    ("TripletMarginMiner", {"type_of_triplets": "easy"}),
    ("BatchHardMiner", {}),
    ("BatchEasyHardMiner", {}),
    ("BatchEasyHardMiner", {"pos_strategy": "semihard", "neg_strategy": "hard"}),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "easy"}),
    ("AngularMiner", {}),
    ("AngularMiner", {"angle": 45}),
]


@TORCH_ONLY
@pytest.mark.parametrize("name, kwargs", PAIRS, ids=lambda v: str(v))
def test_miner_equals_pml(name, kwargs):
    pml = pytest.importorskip("pytorch_metric_learning.miners")
    import torch  # backend-specific test: PML runs on torch

    labels, x = batch(11, b=16)
    mined = getattr(miners, name)(**kwargs)(labels, x)
    pos_counts, neg_counts = _pml_masks(
        getattr(pml, name)(**kwargs)(torch.tensor(x), torch.tensor(labels)), len(labels)
    )
    np.testing.assert_array_equal(_np(mined.positives), pos_counts > 0)
    np.testing.assert_array_equal(_np(mined.negatives), neg_counts > 0)
    ours_pos, ours_neg = mined.pair_counts()
    np.testing.assert_array_equal(_np(ours_pos), pos_counts)
    np.testing.assert_array_equal(_np(ours_neg), neg_counts)


LOSSES = {
    # deepmetric loss (built with the miner), PML loss.
    "multi_similarity": (lambda m: losses.MultiSimilarityLoss(miner=m), "MultiSimilarityLoss", {}),
    "circle": (lambda m: losses.CircleLoss(miner=m), "CircleLoss", {}),
    "contrastive": (lambda m: losses.OnlineContrastiveLoss(miner=m), "ContrastiveLoss", {}),
    "triplet": (
        lambda m: losses.TripletLoss(margin=0.05, distance="lp", average_nonzero=True, miner=m),
        "TripletMarginLoss",
        {},
    ),
    "triplet_swap_smooth": (
        lambda m: losses.TripletLoss(
            margin=0.2, distance="lp", average_nonzero=True, swap=True, smooth_loss=True, miner=m
        ),
        "TripletMarginLoss",
        {"margin": 0.2, "swap": True, "smooth_loss": True},
    ),
}


@TORCH_ONLY
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("name, kwargs", PAIRS, ids=lambda v: str(v))
def test_loss_with_miner_equals_pml(loss_name, name, kwargs):
    """deepmetric's `Loss(miner=M)` is PML's `loss(embeddings, labels, M(embeddings, labels))`:
    value and gradient."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    build, pml_name, pml_kwargs = LOSSES[loss_name]
    labels, x = batch(12, b=16)
    ours = _value_and_grad(build(getattr(miners, name)(**kwargs)), labels, x)
    pml_miner = getattr(pml_miners, name)(**kwargs)
    pml_loss = getattr(pml_losses, pml_name)(**pml_kwargs)
    theirs = _backend.value_and_grad(lambda v, lab: pml_loss(v, lab, pml_miner(v, lab)), x, labels)
    assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=1e-5, abs=1e-6)
    scale = max(float(np.abs(theirs[1]).max()), 1e-3)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-3, atol=1e-4 * scale)


@TORCH_ONLY
@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_hdc_miner_equals_pml_up_to_mirror_ties(fraction):
    """PML keeps exactly k pairs; a pair ties with its mirror, so PML may keep one fewer."""
    pml = pytest.importorskip("pytorch_metric_learning.miners")
    import torch  # backend-specific test: PML runs on torch

    labels, x = batch(17, b=16)
    mined = miners.HDCMiner(fraction)(labels, x)
    counts = _pml_masks(pml.HDCMiner(fraction)(torch.tensor(x), torch.tensor(labels)), 16)
    for ours, theirs in zip((mined.positives, mined.negatives), counts, strict=True):
        ours, theirs = _np(ours), theirs > 0
        assert not (theirs & ~ours).any() and (ours & ~theirs).sum() <= 1
        np.testing.assert_array_equal(ours | ours.T, theirs | theirs.T)


# --- The random miners against their distributions. ---
# Fixed seeds make every test deterministic; the bounds are the 1 - 1e-4 quantiles of the
# chi-square law of the statistic under the target distribution, for the number of draws made.

CHI2_LEVEL = 1e-4


def _chi2_bound(dof):
    scipy_stats = pytest.importorskip("scipy.stats")
    return float(scipy_stats.chi2.ppf(1.0 - CHI2_LEVEL, dof))


def _chi2(observed, expected):
    """Pearson's statistic and its degrees of freedom over groups of cells: `observed` and
    `expected` are lists of 1-D arrays (one multinomial each), expected > 0."""
    stat = sum(float(((o - e) ** 2 / e).sum()) for o, e in zip(observed, expected, strict=True))
    return stat, sum(len(e) - 1 for e in expected)


def ref_distance_weights(labels, x, cutoff=0.5, nonzero_loss_cutoff=1.4):
    """(B, B) sampling probabilities of the negatives per anchor, from the paper's density."""
    n = x.shape[1]
    dist = lp(x)
    d = np.maximum(dist, cutoff)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = d ** (2.0 - n) * (1.0 - d * d / 4.0) ** ((3.0 - n) / 2.0)
    _, negatives = label_pairs(labels)
    w = np.where(negatives & (dist < nonzero_loss_cutoff) & np.isfinite(w), w, 0.0)
    total = w.sum(1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


@pytest.mark.slow
@pytest.mark.parametrize("cutoff, nonzero", [(0.5, 1.4), (0.9, 1.2)])
def test_distance_weighted_miner_draws_negatives_from_the_weights(cutoff, nonzero):
    labels, x = batch(5, b=12, d=6, classes=3)
    target = ref_distance_weights(labels, x, cutoff, nonzero)
    positives, _ = label_pairs(labels)
    miner = miners.DistanceWeightedMiner(cutoff, nonzero, seed=7)
    draws = 150
    counts = np.zeros_like(target)
    for _ in range(draws):
        mined = miner(labels, x)
        kept = _np(mined.positives)
        expected_kept = positives & (target.sum(1, keepdims=True) > 0)
        np.testing.assert_array_equal(kept, expected_kept)
        np.testing.assert_array_equal(_np(mined.positive_counts), expected_kept)
        counts += _np(mined.negative_counts)
    assert not counts[target == 0].any()
    rows = [a for a in range(len(labels)) if target[a].sum() > 0]
    assert rows
    per_anchor = draws * positives.sum(1)
    observed = [counts[a][target[a] > 0] for a in rows]
    expected = [per_anchor[a] * target[a][target[a] > 0] for a in rows]
    stat, dof = _chi2(observed, expected)
    assert stat < _chi2_bound(dof), (stat, dof)


def test_distance_weighted_triplets_pair_each_positive_with_its_drawn_negative():
    labels, x = batch(6, b=10, d=5, classes=3)
    mined = miners.DistanceWeightedMiner(seed=2)(labels, x)
    choice, kept = _np(mined.rule.choice), _np(mined.positives)
    expected_neg = np.zeros(kept.shape)
    for a, p in zip(*np.nonzero(kept), strict=True):
        expected_neg[a, choice[a, p]] += 1
        selected = np.zeros(kept.shape, bool)
        selected[a, p] = True
        keeps = _np(mined.rule.keeps(ops.convert_to_tensor(selected), _np(mined.negatives)))
        assert np.array_equal(np.nonzero(keeps), ([a], [choice[a, p]]))
    np.testing.assert_array_equal(_np(mined.negative_counts), expected_neg)


def _reference_bins(values, mask, num_bins):
    low, high = values[mask].min(), values[mask].max()
    if high == low:
        return np.where(mask, num_bins - 1, -1)
    bins = np.clip(np.floor((values - low) / (high - low) * num_bins), 0, num_bins - 1)
    return np.where(mask, bins, -1).astype(int)


@pytest.mark.slow
@pytest.mark.parametrize("num_bins, per_bin", [(4, 3), (10, 2)])
def test_uniform_histogram_miner_draws_uniformly_per_bin(num_bins, per_bin):
    labels, x = batch(8, b=12, d=4, classes=3)
    positives, negatives = label_pairs(labels)
    miner = miners.UniformHistogramMiner(num_bins, per_bin, per_bin + 1, seed=11)
    dist = _np(miner._distance.matrix(ops.convert_to_tensor(x), ops.convert_to_tensor(x)))
    draws = 80
    for mask, per, attr in [
        (positives, per_bin, "positive_counts"),
        (negatives, per_bin + 1, "negative_counts"),
    ]:
        bins = _reference_bins(dist.astype(np.float64), mask, num_bins)
        total = np.zeros(mask.shape)
        for _ in range(draws):
            counts = _np(getattr(miner(labels, x), attr))
            assert not counts[~mask].any()
            for b in range(num_bins):  # exactly `per` draws from each non-empty bin
                assert counts[bins == b].sum() == (per if (bins == b).any() else 0)
            total += counts
        observed, expected = [], []
        for b in range(num_bins):
            cells = bins == b
            if cells.sum() > 1:
                observed.append(total[cells])
                expected.append(np.full(cells.sum(), draws * per / cells.sum()))
        stat, dof = _chi2(observed, expected)
        assert stat < _chi2_bound(dof), (attr, stat, dof)


@pytest.mark.parametrize(
    "build",
    [
        lambda seed: miners.DistanceWeightedMiner(seed=seed),
        lambda seed: miners.UniformHistogramMiner(8, 2, 2, seed=seed),
    ],
    ids=["distance_weighted", "uniform_histogram"],
)
def test_random_miners_are_reproduced_by_their_seed(build):
    labels, x = batch(9, b=12, d=5, classes=3)

    def run(seed):
        miner = build(seed)
        return [np.concatenate([_np(c) for c in miner(labels, x).pair_counts()]) for _ in range(3)]

    first, again, other = run(5), run(5), run(6)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(first[0], first[1])  # successive calls draw afresh


@TORCH_ONLY
def test_random_miners_have_pml_support_and_sizes():
    """PML's draws fall where ours may (the same zero-weight negatives, the same bins), and
    the histogram miner keeps as many pairs (per_bin times the non-empty bins)."""
    pml = pytest.importorskip("pytorch_metric_learning.miners")
    import torch  # backend-specific test: PML runs on torch

    labels, x = batch(5, b=12, d=6, classes=3)
    target = ref_distance_weights(labels, x)
    torch.manual_seed(0)
    for _ in range(20):
        _, neg = _pml_masks(
            pml.DistanceWeightedMiner()(torch.tensor(x), torch.tensor(labels)), len(labels)
        )
        assert not neg[target == 0].any()
    ours = miners.UniformHistogramMiner(6, 3, 4, seed=1)(labels, x)
    pos, neg = _pml_masks(
        pml.UniformHistogramMiner(6, 3, 4)(torch.tensor(x), torch.tensor(labels)), len(labels)
    )
    assert _np(ours.positive_counts).sum() == pos.sum()
    assert _np(ours.negative_counts).sum() == neg.sum()


@pytest.mark.parametrize("loss_name", ["TripletLoss", "OnlineContrastiveLoss"])
def test_losses_take_the_random_miners(loss_name):
    """A loss with a random miner equals the loss with the masks that miner drew (same seed)."""
    labels, x = batch(3, b=12, d=5, classes=3)
    for build in (
        lambda: miners.DistanceWeightedMiner(seed=4),
        lambda: miners.UniformHistogramMiner(5, 2, 3, seed=4),
    ):
        value = float(getattr(losses, loss_name)(miner=build())(labels, x))
        again = float(getattr(losses, loss_name)(miner=build())(labels, x))
        assert np.isfinite(value) and value == again


def test_distance_weighted_draws_by_bisection_in_row_blocks(monkeypatch):
    """Each draw is the number of the row's cumulative weights below u times the row's total
    (numpy's searchsorted), zero-weight columns included; row blocks draw the same."""
    rng = np.random.default_rng(2)
    weights = rng.random((7, 9)).astype("float32")
    weights[weights < 0.3] = 0.0
    uniform = rng.random((7, 9)).astype("float32")
    tensor = ops.convert_to_tensor(weights)
    drawn = _np(miners._bisect_rows(tensor, ops.convert_to_tensor(uniform), 9))
    cdf = np.cumsum(weights, axis=1, dtype=np.float32)
    want = [np.searchsorted(c, u * c[-1], side="left") for c, u in zip(cdf, uniform, strict=True)]
    np.testing.assert_array_equal(drawn, np.minimum(want, 8))
    assert not (weights[np.arange(7)[:, None], drawn] == 0).any()

    labels, x = batch(6, b=12, d=5, classes=3)
    whole = miners.DistanceWeightedMiner(seed=3)(labels, x)
    monkeypatch.setattr(_blocks, "MINING_ENTRIES", 2 * 12)  # blocks of two rows
    blocks = miners.DistanceWeightedMiner(seed=3)(labels, x)
    for got, want in zip(blocks.pair_counts(), whole.pair_counts(), strict=True):
        assert _np(want).sum() > 0
        np.testing.assert_array_equal(_np(got), _np(want))
    blocks, whole = _np(blocks.rule.choice), _np(whole.rule.choice)
    np.testing.assert_array_equal(blocks, whole)


def test_hashed_uniforms_are_murmur3_of_row_and_column():
    """The distance-weighted draws' numbers: murmur3's finalizer of row * R + column + seed *
    golden ratio in uint32 arithmetic (numpy), top 24 bits; the same on every backend, and
    uniform (a chi-square bound over 20 bins)."""
    rows, columns, seed = np.array([0, 1, 7, 4095]), 37, 123456789
    h = (rows[:, None].astype(np.uint64) * columns + np.arange(columns)).astype(np.uint64)
    h = (h + seed * 0x9E3779B9) & 0xFFFFFFFF
    for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, 1)):
        h = ((h ^ (h >> shift)) * factor) & 0xFFFFFFFF
    want = (h >> 8).astype(np.float64) / 2**24
    got = _np(
        miners._hashed_uniform(
            ops.convert_to_tensor(rows, "int32"), columns, ops.convert_to_tensor(seed, "int32")
        )
    )
    np.testing.assert_array_equal(got, want.astype(np.float32))
    many = _np(
        miners._hashed_uniform(ops.arange(400, dtype="int32"), 250, ops.convert_to_tensor(9))
    )
    counts = np.histogram(many, bins=20, range=(0.0, 1.0))[0]
    expected = np.full(20, many.size / 20)
    stat, dof = _chi2([counts], [expected])
    assert 0.0 <= many.min() and many.max() < 1.0 and stat < _chi2_bound(dof)


def test_whole_batch_miners_refuse_more_pairs_than_int32_counts():
    """HDC and the uniform histogram count the batch's pairs in int32: past 2^31 - 1 pairs
    (46,341 rows compared with themselves) a clear error, not a wrapped count. Symbolic
    inputs: only the shapes are read."""
    for rows, fails in ((46340, False), (46341, True)):
        labels = keras.KerasTensor((rows,), dtype="int32")
        x = keras.KerasTensor((rows, 4))
        for miner in (miners.HDCMiner(), miners.UniformHistogramMiner()):
            if fails:
                with pytest.raises(ValueError, match=r"2\^31 - 1 pairs .*B=46341, R=46341"):
                    _blocks.mining_rows(miner, labels, x, labels, x)
            else:
                assert _blocks.mining_rows(miner, labels, x, labels, x).num_rows == rows
        # A row-local miner needs no batch-wide count.
        assert _blocks.mining_rows(miners.BatchHardMiner(), labels, x, labels, x) is not None
