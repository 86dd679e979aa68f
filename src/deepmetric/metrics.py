"""Keras metrics that watch metric-learning training."""

from __future__ import annotations

import keras
from keras import ops

from deepmetric._api import export
from deepmetric._labels import check_embeddings, check_labels, check_nonempty
from deepmetric.losses.base import NON_NEGATIVE, check_number, nonfinite_to_nan
from deepmetric.losses.triplet import _batch_all_terms


@export
class FractionPositiveTriplets(keras.metrics.Mean):
    """Fraction of the batch's valid triplets whose batch-all loss is positive.

    Moindrot's `fraction_positive_triplets`: how many (anchor, positive,
    negative) triplets still violate the margin. Averaged over the batches of
    an epoch; use the margin (a finite number >= 0) and `squared` of the
    `TripletBatchAllLoss`. A batch with a non-finite embedding gives NaN.

    ```python
    model.compile(loss=TripletBatchAllLoss(margin=0.5),
                  metrics=[FractionPositiveTriplets(margin=0.5)])
    ```
    """

    def __init__(self, margin=1.0, squared=False, name="fraction_positive_triplets", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.margin = check_number("margin", margin, NON_NEGATIVE)
        self.squared = bool(squared)

    def update_state(self, y_true, y_pred, sample_weight=None):
        embeddings = check_nonempty(check_embeddings(y_pred, "y_pred"), "y_pred")
        labels = check_labels(y_true, embeddings.shape[0], "y_true")
        _, num_active, num_valid = _batch_all_terms(labels, embeddings, self.margin, self.squared)
        fraction = nonfinite_to_nan(ops.divide_no_nan(num_active, num_valid), embeddings)
        return super().update_state(fraction)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "squared": self.squared}
