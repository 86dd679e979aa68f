"""deepmetric's losses: TFA-compatible, batch-all, explicit triplets, modern batch losses."""

from deepmetric.losses.explicit import TripletMarginLoss, triplet_margin_with_distance_loss
from deepmetric.losses.general import TripletLoss, triplet_loss
from deepmetric.losses.modern import (
    CircleLoss,
    MultiSimilarityLoss,
    NTXentLoss,
    OnlineContrastiveLoss,
    SupConLoss,
    circle_loss,
    multi_similarity_loss,
    nt_xent_loss,
    online_contrastive_loss,
    sup_con_loss,
)
from deepmetric.losses.pairs import (
    ContrastiveLoss,
    LiftedStructLoss,
    NpairsLoss,
    NpairsMultilabelLoss,
    contrastive_loss,
    lifted_struct_loss,
    npairs_loss,
    npairs_multilabel_loss,
)
from deepmetric.losses.triplet import (
    TripletBatchAllLoss,
    TripletHardLoss,
    TripletSemiHardLoss,
    triplet_batch_all_loss,
    triplet_hard_loss,
    triplet_semihard_loss,
)

__all__ = [
    "CircleLoss",
    "ContrastiveLoss",
    "LiftedStructLoss",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "NpairsLoss",
    "NpairsMultilabelLoss",
    "OnlineContrastiveLoss",
    "SupConLoss",
    "TripletBatchAllLoss",
    "TripletHardLoss",
    "TripletLoss",
    "TripletMarginLoss",
    "TripletSemiHardLoss",
    "circle_loss",
    "contrastive_loss",
    "lifted_struct_loss",
    "multi_similarity_loss",
    "npairs_loss",
    "npairs_multilabel_loss",
    "nt_xent_loss",
    "online_contrastive_loss",
    "sup_con_loss",
    "triplet_batch_all_loss",
    "triplet_hard_loss",
    "triplet_loss",
    "triplet_margin_with_distance_loss",
    "triplet_semihard_loss",
]
