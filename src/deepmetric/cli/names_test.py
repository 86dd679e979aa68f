"""The names the command line offers are exactly what the library offers."""

import inspect

import keras
import pytest

from deepmetric import heads, losses, optimizers, schedules
from deepmetric.cli import names


def _metric_loss_base():
    """`MetricLoss`, wherever the losses package defines it."""
    return next(c for c in losses.TripletLoss.__mro__ if c.__name__ == "MetricLoss")


def test_losses_table_is_every_labels_and_embeddings_loss():
    base = _metric_loss_base()
    exported = {
        name
        for name in losses.__all__
        if inspect.isclass(obj := getattr(losses, name)) and issubclass(obj, base)
    }
    assert exported - {"NpairsLoss"} == set(names.LOSSES.values())


@pytest.mark.parametrize("name", sorted(names.LOSSES))
def test_every_loss_name_resolves(name):
    loss = losses.get(name)
    assert type(loss).__name__ == names.LOSSES[name]
    assert losses.get(names.LOSSES[name]).__class__ is type(loss)


def test_heads_table_is_every_head():
    """Every public layer defined in deepmetric.heads, each of which heads.get finds, but
    `MarginBeta` (it holds the margin loss's learned betas and returns the embeddings, not
    logits: not a classification head)."""
    defined = {
        name
        for name, obj in vars(heads).items()
        if not name.startswith("_")
        and inspect.isclass(obj)
        and issubclass(obj, keras.layers.Layer)
        and obj.__module__.startswith("deepmetric.heads")
        and obj is not heads.MarginBeta
    }
    assert defined == set(names.HEADS.values())
    assert all(heads.get(name).__name__ == name for name in defined)


@pytest.mark.parametrize("name", sorted(names.HEADS))
def test_every_head_name_resolves_and_margins_match(name):
    cls = heads.get(name)
    assert cls.__name__ == names.HEADS[name]
    has_margin = "margin" in cls(num_classes=2).get_config()
    assert has_margin == (name in names.HEADS_WITH_MARGIN)


def test_optimizer_and_schedule_names():
    assert names.OPTIMIZERS == optimizers.OPTIMIZER_NAMES
    assert names.SCHEDULES == schedules.SCHEDULE_NAMES
