"""deepmetric's losses: TFA-compatible batch losses, batch-all, and explicit triplets."""

from deepmetric.losses.explicit import TripletMarginLoss, triplet_margin_with_distance_loss
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
    "ContrastiveLoss",
    "LiftedStructLoss",
    "NpairsLoss",
    "NpairsMultilabelLoss",
    "TripletBatchAllLoss",
    "TripletHardLoss",
    "TripletMarginLoss",
    "TripletSemiHardLoss",
    "contrastive_loss",
    "lifted_struct_loss",
    "npairs_loss",
    "npairs_multilabel_loss",
    "triplet_batch_all_loss",
    "triplet_hard_loss",
    "triplet_margin_with_distance_loss",
    "triplet_semihard_loss",
]
