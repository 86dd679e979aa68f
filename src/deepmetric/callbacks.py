"""Callbacks for metric learning: retrieval metrics of held-out data during training.

The loss of a metric-learning model says little about how well it retrieves.
`RetrievalEvaluation` embeds a validation set at the end of an epoch and adds
precision@1, R-precision, MAP@R, MRR and recall@k (`deepmetric.evaluation`) to
the epoch's logs, where `History`, the progress bar, `CSVLogger`,
`EarlyStopping` and `ModelCheckpoint` see them like any other metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from deepmetric.evaluation import retrieval_metrics

__all__ = ["RetrievalEvaluation"]


class RetrievalEvaluation(keras.callbacks.Callback):
    """Adds retrieval metrics of a held-out set to the logs at the end of epochs.

    At the end of the first epoch, of every `every`-th epoch and of the last
    epoch, the callback embeds `x` with `self.model.predict`, computes
    `deepmetric.evaluation.retrieval_metrics` (the queries search each other,
    leave-one-out, or search `reference_x` when given), and writes each value
    into the epoch's `logs` under `prefix + name`, e.g. `val_precision_at_1`,
    `val_r_precision`, `val_map_at_r`, `val_mrr`, `val_recall_at_1`. The values
    then appear in `History.history`, the progress bar and every callback that
    comes after this one in the `callbacks` list.

    Order matters: Keras hands one `logs` dict to the callbacks in list order,
    so put `RetrievalEvaluation` before `CSVLogger`, `EarlyStopping`,
    `ModelCheckpoint` or `ReduceLROnPlateau` that should see its keys (Keras
    adds `History` and the progress bar last, so they always see them).
    `CSVLogger` fixes its columns at the first epoch; evaluating the first
    epoch puts the keys there, and epochs that are not evaluated get "NA".

    Args:
        x: inputs of the query set, anything `model.predict` accepts (arrays,
            a `keras.utils.PyDataset` or `tf.data.Dataset` of inputs).
        y: class labels of the query set, shape (N,) or (N, 1), integers or strings.
        reference_x: optional inputs of a reference set to search.
        reference_y: labels of the reference set; required with `reference_x`.
        every: evaluate every `every` epochs (and the first and last epoch).
        batch_size: batch size of `model.predict`.
        prefix: prefix of the keys written into the logs.
        recall_at: the k of the `recall_at_{k}` metrics.
        clustering: also compute `nmi` and `ami` (k-means; slower).
        verbose: 1 prints the metrics after each evaluation.
        embedding_model: the model that embeds `x` (default: the model being
            fitted). Set it when `fit` trains a wrapper around the embedder, such
            as a trainer with a `deepmetric.heads` head that takes labels as a
            second input.

    Example:

    ```python
    model.fit(
        PKSampler(x_train, y_train, 8, 4),
        epochs=20,
        callbacks=[
            RetrievalEvaluation(x_val, y_val, every=2),
            keras.callbacks.CSVLogger("log.csv"),
            keras.callbacks.EarlyStopping("val_map_at_r", mode="max", patience=4),
        ],
    )
    ```

    >>> callback = RetrievalEvaluation(np.zeros((4, 2)), [0, 0, 1, 1], every=2)
    >>> callback.every, callback.prefix
    (2, 'val_')
    """

    def __init__(
        self,
        x,
        y,
        *,
        reference_x=None,
        reference_y=None,
        every: int = 1,
        batch_size: int = 256,
        prefix: str = "val_",
        recall_at: Sequence[int] = (1,),
        clustering: bool = False,
        verbose: int = 0,
        embedding_model=None,
    ):
        super().__init__()
        if (reference_x is None) != (reference_y is None):
            raise ValueError(
                "`reference_x` and `reference_y` must be given together. Received: "
                f"reference_x is {'None' if reference_x is None else 'given'}, "
                f"reference_y is {'None' if reference_y is None else 'given'}"
            )
        for name, value in (("every", every), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string. Received: prefix={prefix!r}")
        self.x, self.y = x, y
        self.reference_x, self.reference_y = reference_x, reference_y
        self.every = int(every)
        self.batch_size = int(batch_size)
        self.prefix = prefix
        self.recall_at = tuple(recall_at)
        self.clustering = bool(clustering)
        self.verbose = verbose
        self.embedding_model = embedding_model
        self.last_metrics: dict[str, float] | None = None

    def _due(self, epoch: int) -> bool:
        last = (self.params or {}).get("epochs")
        return epoch == 0 or (epoch + 1) % self.every == 0 or epoch + 1 == last

    def evaluate(self) -> dict[str, float]:
        """Embeds the data with the current model and returns the prefixed metrics."""
        query = self._embed(self.x)
        reference = None if self.reference_x is None else self._embed(self.reference_x)
        metrics = retrieval_metrics(
            query,
            self.y,
            reference,
            self.reference_y,
            recall_at=self.recall_at,
            clustering=self.clustering,
        )
        return {self.prefix + name: value for name, value in metrics.items()}

    def _embed(self, x):
        # Keras refuses `batch_size` for data sets and generators, which batch themselves.
        batch_size = (
            self.batch_size if hasattr(x, "shape") or isinstance(x, (list, tuple, dict)) else None
        )
        model = self.model if self.embedding_model is None else self.embedding_model
        return model.predict(x, batch_size=batch_size, verbose=0)

    def on_epoch_end(self, epoch, logs=None):
        if not self._due(epoch):
            return
        metrics = self.evaluate()
        self.last_metrics = metrics
        if logs is not None:
            logs.update(metrics)
        if self.verbose:
            shown = " - ".join(f"{k}: {v:.4f}" for k, v in metrics.items())
            print(f"Epoch {epoch + 1}: {shown}")
