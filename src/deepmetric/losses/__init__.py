"""deepmetric's losses, one module per family, on one shared base.

- `base`: the shared layer: `MetricLoss` (the base of every labels-and-embeddings loss, with
  its option table), `Option` and its builders, the number / choice / input / reference-mask
  checks, `masked_logsumexp`, Keras' reduction.
- `triplet`: TFA's online-mined triplet losses (semi-hard, hard) and Moindrot's batch-all.
- `triplet_composable`: `TripletLoss`, any distance with composable positive / negative mining.
- `triplet_explicit`: explicit (anchor, positive, negative) triplets, torch semantics.
- `contrastive`: TFA's pair-distance contrastive loss, the all-pairs `OnlineContrastiveLoss`,
  and TFA's lifted structured loss.
- `softmax`: log-sum-exp / soft-max losses on cosine similarities: multi-similarity, circle,
  SupCon, NT-Xent.
- `pair`: pytorch-metric-learning's pair and triplet losses on the B x B matrix: NCA,
  signal-to-noise-ratio contrastive, generalized lifted structure, intra-pair variance, tuplet
  margin, angular, margin, threshold-consistent margin.
- `ranking`: pytorch-metric-learning's ranked list loss.
- `pnp`: pytorch-metric-learning's PNP loss (negatives before positives, over triplets).
- `dynamic_soft_margin`: pytorch-metric-learning's dynamic soft margin loss (a histogram as state).
- `ap`: pytorch-metric-learning's average-precision and histogram losses: FastAP, histogram,
  Smooth-AP.
- `self_supervised`: two-view losses on `y_pred` of shape (B, 2, D): VICReg and the
  `SelfSupervisedLoss` wrapper.
- `npairs`: N-pairs losses on a given similarity matrix (TFA).
- `proxy`: the losses of the proxy heads (Proxy-Anchor, Proxy-NCA) on given proxies; the
  trainable heads are in `deepmetric.heads`.

Every public loss function and class is registered with Keras under `deepmetric>`, so
`compile(loss=deepmetric.losses.contrastive_loss)` saves and reloads in safe mode, and
`keras.losses.get({"class_name": "deepmetric>TripletSemiHardLoss", "config": {}})` resolves.
"""

import keras

from deepmetric._api import lookup
from deepmetric.losses.ap import (
    FastAPLoss,
    HistogramLoss,
    SmoothAPLoss,
    fast_ap_loss,
    histogram_loss,
    smooth_ap_loss,
)
from deepmetric.losses.contrastive import (
    ContrastiveLoss,
    LiftedStructLoss,
    OnlineContrastiveLoss,
    contrastive_loss,
    lifted_struct_loss,
    online_contrastive_loss,
)
from deepmetric.losses.dynamic_soft_margin import (
    DynamicSoftMarginLoss,
    dynamic_soft_margin_loss,
)
from deepmetric.losses.npairs import (
    NpairsLoss,
    NpairsMultilabelLoss,
    npairs_loss,
    npairs_multilabel_loss,
)
from deepmetric.losses.pair import (
    AngularLoss,
    GeneralizedLiftedStructureLoss,
    IntraPairVarianceLoss,
    LiftedStructureLoss,
    MarginLoss,
    NCALoss,
    SignalToNoiseRatioContrastiveLoss,
    ThresholdConsistentMarginLoss,
    TupletMarginLoss,
    angular_loss,
    generalized_lifted_structure_loss,
    intra_pair_variance_loss,
    lifted_structure_loss,
    margin_loss,
    nca_loss,
    signal_to_noise_ratio_contrastive_loss,
    threshold_consistent_margin_loss,
    tuplet_margin_loss,
)
from deepmetric.losses.pnp import PNPLoss, pnp_loss
from deepmetric.losses.proxy import proxy_anchor_loss, proxy_nca_loss
from deepmetric.losses.ranking import RankedListLoss, ranked_list_loss
from deepmetric.losses.self_supervised import SelfSupervisedLoss, VICRegLoss, vicreg_loss
from deepmetric.losses.softmax import (
    CircleLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
    circle_loss,
    multi_similarity_loss,
    nt_xent_loss,
    sup_con_loss,
)
from deepmetric.losses.triplet import (
    TripletBatchAllLoss,
    TripletHardLoss,
    TripletSemiHardLoss,
    triplet_batch_all_loss,
    triplet_hard_loss,
    triplet_semihard_loss,
)
from deepmetric.losses.triplet_composable import TripletLoss, triplet_loss
from deepmetric.losses.triplet_explicit import TripletMarginLoss, triplet_margin_with_distance_loss

__all__ = [
    "get",
    "AngularLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "DynamicSoftMarginLoss",
    "FastAPLoss",
    "GeneralizedLiftedStructureLoss",
    "HistogramLoss",
    "IntraPairVarianceLoss",
    "LiftedStructLoss",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NCALoss",
    "NTXentLoss",
    "NpairsLoss",
    "NpairsMultilabelLoss",
    "OnlineContrastiveLoss",
    "PNPLoss",
    "RankedListLoss",
    "SelfSupervisedLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SmoothAPLoss",
    "SupConLoss",
    "ThresholdConsistentMarginLoss",
    "TripletBatchAllLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "TripletSemiHardLoss",
    "TupletMarginLoss",
    "VICRegLoss",
    "angular_loss",
    "circle_loss",
    "contrastive_loss",
    "dynamic_soft_margin_loss",
    "fast_ap_loss",
    "generalized_lifted_structure_loss",
    "histogram_loss",
    "intra_pair_variance_loss",
    "lifted_struct_loss",
    "lifted_structure_loss",
    "margin_loss",
    "multi_similarity_loss",
    "nca_loss",
    "npairs_loss",
    "npairs_multilabel_loss",
    "nt_xent_loss",
    "online_contrastive_loss",
    "pnp_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "ranked_list_loss",
    "signal_to_noise_ratio_contrastive_loss",
    "smooth_ap_loss",
    "sup_con_loss",
    "threshold_consistent_margin_loss",
    "triplet_batch_all_loss",
    "triplet_hard_loss",
    "triplet_loss",
    "triplet_margin_with_distance_loss",
    "triplet_semihard_loss",
    "tuplet_margin_loss",
    "vicreg_loss",
]


def get(identifier):
    """A deepmetric loss from its name, a Keras config dict, or an instance (Keras style).

    Names are the snake_case names of the command line (`"triplet_semihard"`,
    `"multi_similarity"`), the class names (`"TripletSemiHardLoss"`), with or without
    `deepmetric>` or a `_loss` suffix; a name gives the loss with its default options. A config
    `{"class_name": "MultiSimilarityLoss", "config": {"alpha": 1.0}}` gives the loss with those
    options. Unknown names raise a ValueError that lists the valid ones.

    >>> get("multi_similarity").get_config()["alpha"]
    2.0
    >>> type(get({"class_name": "TripletSemiHardLoss", "config": {"margin": 0.2}})).__name__
    'TripletSemiHardLoss'
    """
    classes = [
        obj
        for name in __all__
        if isinstance(obj := globals()[name], type) and issubclass(obj, keras.losses.Loss)
    ]
    return lookup(identifier, classes, "loss", instantiate=True)
