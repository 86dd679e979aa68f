"""Tests of `deepmetric.callbacks.RetrievalEvaluation`."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

from deepmetric.callbacks import RetrievalEvaluation
from deepmetric.evaluation import retrieval_metrics
from deepmetric.losses import TripletSemiHardLoss

KEYS = ("precision_at_1", "r_precision", "map_at_r", "mrr", "recall_at_1")


def data(n=48, classes=4, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = (rng.normal(size=(classes, dim))[y] + 0.5 * rng.normal(size=(n, dim))).astype("float32")
    return x, y


def tiny_model():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=TripletSemiHardLoss())
    return model


def test_keys_in_history_and_csv(tmp_path):
    x, y = data()
    path = tmp_path / "log.csv"
    callback = RetrievalEvaluation(x, y, batch_size=16, recall_at=(1, 2))
    model = tiny_model()
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0,
        callbacks=[callback, keras.callbacks.CSVLogger(str(path))],
    )  # fmt: skip
    for key in (*KEYS, "recall_at_2"):
        values = history.history["val_" + key]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert float(rows[-1]["val_map_at_r"]) == pytest.approx(history.history["val_map_at_r"][-1])
    # The logged values are the metrics of the final model.
    expected = retrieval_metrics(model.predict(x, verbose=0), y, recall_at=(1, 2),
                                 clustering=False)  # fmt: skip
    assert history.history["val_map_at_r"][-1] == pytest.approx(expected["map_at_r"], abs=1e-6)


def test_every_reference_set_and_prefix(tmp_path):
    x, y = data()
    path = tmp_path / "log.csv"
    callback = RetrievalEvaluation(
        x[:16], y[:16], reference_x=x[16:], reference_y=y[16:], every=2, prefix="ret_",
        clustering=True,
    )  # fmt: skip
    history = tiny_model().fit(
        x, y, batch_size=16, epochs=4, verbose=0,
        callbacks=[callback, keras.callbacks.CSVLogger(str(path))],
    )  # fmt: skip
    # Evaluated after epochs 1 (the first), 2 and 4.
    assert len(history.history["ret_map_at_r"]) == 3
    assert len(history.history["ret_nmi"]) == 3
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [row["ret_map_at_r"] == "NA" for row in rows] == [False, False, True, False]


def test_verbose_prints(capsys):
    x, y = data()
    tiny_model().fit(x, y, batch_size=16, epochs=1, verbose=0,
                     callbacks=[RetrievalEvaluation(x, y, verbose=1)])  # fmt: skip
    assert "val_precision_at_1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reference_x": np.zeros((2, 5))}, "reference_x` and `reference_y"),
        ({"every": 0}, "every"),
        ({"batch_size": -1}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, y = data()
    with pytest.raises(ValueError, match=match):
        RetrievalEvaluation(x, y, **kwargs)


class _Inputs(keras.utils.PyDataset):
    """Inputs only, in batches of 10, as `model.predict` takes them."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def __len__(self):
        return -(-len(self.x) // 10)

    def __getitem__(self, i):
        return self.x[i * 10 : (i + 1) * 10]


def test_dataset_inputs():
    x, y = data()
    model = tiny_model()
    callback = RetrievalEvaluation(_Inputs(x), y, batch_size=7)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    direct = RetrievalEvaluation(x, y)
    direct.set_model(model)
    assert callback.last_metrics == pytest.approx(direct.evaluate())


def test_embedding_model_of_a_head_trainer():
    """With a head trainer (labels as a second input), the callback embeds with the embedder."""
    from deepmetric.heads import CosFace

    x, y = data()
    embedder = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    images, labels = keras.Input((5,)), keras.Input((), dtype="int32")
    trainer = keras.Model([images, labels], CosFace(4, scale=8.0)([embedder(images), labels]))
    trainer.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    callback = RetrievalEvaluation(x, y, embedding_model=embedder)
    history = trainer.fit((x, y), y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    expected = retrieval_metrics(embedder.predict(x, verbose=0), y)
    assert history.history["val_map_at_r"][0] == pytest.approx(expected["map_at_r"])
