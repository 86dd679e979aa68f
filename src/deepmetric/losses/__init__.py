"""deepmetric's losses: TFA-compatible, batch-all, explicit triplets, modern batch losses."""

import keras

from deepmetric._api import lookup
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
    "get",
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
