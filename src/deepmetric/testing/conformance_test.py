"""Every labels-and-embeddings loss of `deepmetric.losses` and every proxy head of
`deepmetric.heads` through the invariants of `deepmetric.testing.invariants`.

A loss exported from `deepmetric.losses` (a subclass of its `MetricLoss`) or a head that
`deepmetric.heads.get` finds gets these tests by being there.
"""

import pytest

from deepmetric import testing

# The losses whose formulas keep the terms of one kind of pair in a batch without the other
# kind (multi-similarity and online contrastive keep the negative pairs' terms in a batch
# without a positive pair): in their degenerate batches only the batch of one example is 0.
ONE_SIDED = {
    "GeneralizedLiftedStructureLoss",
    "IntraPairVarianceLoss",
    "MultiSimilarityLoss",
    "OnlineContrastiveLoss",
    "RankedListLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "ThresholdConsistentMarginLoss",
    "SmoothAPLoss",  # the anchor ranks itself: an anchor alone in its class has AP < 1
}

# Checks that compare two calls of one loss object, which a stateful loss cannot pass: each
# call of `DynamicSoftMarginLoss` advances its histogram, so the second call weighs by another
# CDF. Its `momentum=1.0` variant (each call's histogram is its own batch's) runs them below,
# and `losses/dynamic_soft_margin_test.py` runs them on the pure function with a fixed histogram.
STATEFUL_SKIPS = {
    "DynamicSoftMarginLoss": {
        "large_labels",
        "bfloat16_labels",
        "eager_equals_compiled",
        "permutation",
        "relabelling",
    },
}

LOSSES = testing.metric_losses()
HEADS = testing.proxy_heads()

# Options other than the defaults, through the invariants that do not compile (the defaults
# go through all of them): the mining choices of `TripletLoss`, the soft and angular
# batch-hard loss, and one non-default setting of every other option family.
VARIANTS: dict[str, list[dict[str, object]]] = {
    "TripletLoss": [
        {"negative_mining": "semi-hard"},
        {"negative_mining": "hard", "positive_mining": "hard", "distance": "cosine"},
        {"negative_mining": "easy", "positive_mining": "easy", "soft_margin": True},
        {"average_nonzero": True, "margin": 0.5},
    ],
    "TripletHardLoss": [{"soft": True}, {"margin": 0.2, "distance_metric": "angular"}],
    "TripletSemiHardLoss": [{"margin": 0.3, "distance_metric": "squared-L2"}],
    "TripletBatchAllLoss": [{"margin": 0.3, "squared": True}],
    "LiftedStructLoss": [{"margin": 0.5}],
    "MultiSimilarityLoss": [{"alpha": 1.5, "beta": 20.0, "base": 0.3}],
    "CircleLoss": [{"margin": 0.25, "gamma": 32.0}],
    "SupConLoss": [{"temperature": 0.5}],
    "NTXentLoss": [{"temperature": 0.2}],
    "OnlineContrastiveLoss": [{"pos_margin": 0.1, "neg_margin": 1.2}],
    "NCALoss": [{"softmax_scale": 4.0}],
    "SignalToNoiseRatioContrastiveLoss": [{"pos_margin": 0.2, "neg_margin": 0.8}],
    "GeneralizedLiftedStructureLoss": [{"neg_margin": 0.5, "pos_margin": 0.1}],
    "LiftedStructureLoss": [{"neg_margin": 0.5, "pos_margin": 0.1}],
    "IntraPairVarianceLoss": [{"pos_eps": 0.05, "neg_eps": 0.1}],
    "TupletMarginLoss": [{"margin": 10.0, "scale": 16.0}],
    "AngularLoss": [{"alpha": 30.0}],
    "MarginLoss": [{"margin": 0.1, "beta": 0.8, "num_classes": 3}],
    "ThresholdConsistentMarginLoss": [{"margin_plus": 0.2, "margin_minus": -0.2}],
    "PNPLoss": [
        {"variant": "Dq", "alpha": 2.0, "anneal": 0.1},
        {"variant": "Ib", "b": 3.0, "anneal": 0.1},
    ],
    "DynamicSoftMarginLoss": [{"momentum": 1.0, "num_bins": 7, "min_val": -2.5}],
    "RankedListLoss": [{"margin": 0.6, "Tn": 3.0, "imbalance": 0.3, "alpha": 1.3, "Tp": 2.0}],
    "FastAPLoss": [{"num_bins": 4}],
    "HistogramLoss": [{"n_bins": 10}, {"delta": 0.3}],
    "SmoothAPLoss": [{"temperature": 0.1}],
}
VARIANT_CHECKS = [
    "large_labels",
    "bfloat16_labels",
    "permutation",
    "relabelling",
    "config_round_trip",
    "keras_save_load",
]


def test_the_suite_finds_every_loss_and_head():
    names = {cls.__name__ for cls in LOSSES}
    assert {"TripletSemiHardLoss", "TripletLoss", "LiftedStructLoss", "CircleLoss"} <= names
    assert "NpairsLoss" not in names and len(names) >= 10
    assert len({cls.__name__ for cls in HEADS}) == len(testing.invariants.HEAD_NAMES)


@pytest.mark.parametrize("check", list(testing.LOSS_CHECKS))
@pytest.mark.parametrize("cls", LOSSES, ids=lambda cls: cls.__name__)
def test_loss_invariant(cls, check):
    if check in STATEFUL_SKIPS.get(cls.__name__, ()):
        pytest.skip("each call advances the loss's state; see STATEFUL_SKIPS")
    testing.check_loss(cls, checks=[check], one_sided=cls.__name__ in ONE_SIDED)


@pytest.mark.parametrize("check", list(testing.HEAD_CHECKS))
@pytest.mark.parametrize("cls", HEADS, ids=lambda cls: cls.__name__)
def test_head_invariant(cls, check):
    testing.check_head(cls, checks=[check])


def test_every_variant_names_an_exported_loss():
    assert set(VARIANTS) <= {cls.__name__ for cls in LOSSES}


@pytest.mark.parametrize(
    "cls, options",
    [(cls, options) for cls in LOSSES for options in VARIANTS.get(cls.__name__, [])],
    ids=lambda v: v.__name__ if isinstance(v, type) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_loss_invariants_with_options(cls, options):
    testing.check_loss(cls(**options), checks=VARIANT_CHECKS)
