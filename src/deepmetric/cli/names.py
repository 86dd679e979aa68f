"""The names `--loss`, `--optimizer` and `--schedule` accept, without importing keras.

The command line checks its arguments before keras is imported, so the names it offers are
written here rather than read from the library; `names_test.py` checks that they are exactly
what `deepmetric.losses.get`, `deepmetric.heads.get`, `deepmetric.optimizers.build` and
`deepmetric.schedules.build` offer.
"""

from __future__ import annotations

from deepmetric._api import normalize_name

# The losses of deepmetric.losses that take labels and embeddings (every `MetricLoss` but
# `NpairsLoss`, which takes a similarity matrix), by command-line name: the snake_case class
# name without `Loss`.
LOSSES = {
    "angular": "AngularLoss",
    "circle": "CircleLoss",
    "dynamic_soft_margin": "DynamicSoftMarginLoss",
    "fast_ap": "FastAPLoss",
    "generalized_lifted_structure": "GeneralizedLiftedStructureLoss",
    "histogram": "HistogramLoss",
    "intra_pair_variance": "IntraPairVarianceLoss",
    "lifted_struct": "LiftedStructLoss",
    "lifted_structure": "LiftedStructureLoss",
    "margin": "MarginLoss",
    "multi_similarity": "MultiSimilarityLoss",
    "nca": "NCALoss",
    "nt_xent": "NTXentLoss",
    "online_contrastive": "OnlineContrastiveLoss",
    "pnp": "PNPLoss",
    "ranked_list": "RankedListLoss",
    "signal_to_noise_ratio_contrastive": "SignalToNoiseRatioContrastiveLoss",
    "smooth_ap": "SmoothAPLoss",
    "sup_con": "SupConLoss",
    "threshold_consistent_margin": "ThresholdConsistentMarginLoss",
    "triplet": "TripletLoss",
    "triplet_batch_all": "TripletBatchAllLoss",
    "triplet_hard": "TripletHardLoss",
    "triplet_semihard": "TripletSemiHardLoss",
    "tuplet_margin": "TupletMarginLoss",
}

# The heads of deepmetric.heads, trained on top of the embedding model.
HEADS = {
    "arcface": "ArcFace",
    "cosface": "CosFace",
    "large_margin_softmax": "LargeMarginSoftmax",
    "normalized_softmax": "NormalizedSoftmax",
    "p2sgrad": "P2SGrad",
    "proxy_anchor": "ProxyAnchor",
    "proxy_nca": "ProxyNCA",
    "soft_triple": "SoftTriple",
    "sphereface": "SphereFace",
    "sub_center_arcface": "SubCenterArcFace",
}

# The heads with a `margin` option; the others refuse --margin.
HEADS_WITH_MARGIN = (
    "arcface",
    "cosface",
    "large_margin_softmax",
    "proxy_anchor",
    "soft_triple",
    "sphereface",
    "sub_center_arcface",
)

# The margin used when --margin is not given, for losses on L2-normalised embeddings whose
# TFA default (1.0, meant for unnormalised embeddings) trains worse: distances between unit
# vectors lie in [0, 2]. Tuned on the digits (docs/cli.md). Other losses keep their defaults.
DEFAULT_MARGINS = {
    "triplet_semihard": 0.2,
    "triplet_hard": 0.2,
    "triplet_batch_all": 0.2,
    "triplet": 0.2,
}

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "adabelief")
SCHEDULES = ("constant", "cosine", "cosine-restarts", "exponential")


def resolve(text: str) -> tuple[str, bool]:
    """(command-line name, is a head) of the loss or head `text` names; ValueError if none.

    >>> resolve("TripletSemiHardLoss")
    ('triplet_semihard', False)
    >>> resolve("proxy-anchor")
    ('proxy_anchor', True)
    """
    wanted = normalize_name(text)
    for table, is_head in ((LOSSES, False), (HEADS, True)):
        for name, class_name in table.items():
            if wanted in (normalize_name(name), normalize_name(class_name)):
                return name, is_head
    raise ValueError(
        f"unknown loss {text!r}; valid names: {', '.join(LOSSES)}; heads: {', '.join(HEADS)}"
    )


def check_head_margin(name: str, margin: float | None) -> None:
    """ValueError if --margin is given for a head without one (a batch loss only notes it).

    A head without a margin (normalised softmax, Proxy-NCA) has no margin in its logits to
    set, and the scale or temperature that stands in for one is another quantity.
    """
    if margin is not None and name in HEADS and name not in HEADS_WITH_MARGIN:
        raise ValueError(
            f"--margin: the {name} head has no margin "
            f"(heads with one: {', '.join(HEADS_WITH_MARGIN)})"
        )
