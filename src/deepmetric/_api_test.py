"""`get()` of the losses and heads: names, config dicts, instances, errors."""

import keras
import pytest

import deepmetric
from deepmetric._api import normalize_name


@pytest.mark.parametrize(
    "text",
    [
        "triplet_semihard",
        "TripletSemiHardLoss",
        "triplet-semihard-loss",
        "deepmetric>TripletSemiHardLoss",
    ],
)
def test_names_normalize_to_one_key(text):
    assert normalize_name(text) == "tripletsemihard"


@pytest.mark.parametrize(
    "name", ["multi_similarity", "MultiSimilarityLoss", "multi_similarity_loss"]
)
def test_losses_get_by_name_gives_default_instance(name):
    loss = deepmetric.losses.get(name)
    assert isinstance(loss, deepmetric.losses.MultiSimilarityLoss)
    assert loss.get_config()["alpha"] == 2.0


def test_losses_get_config_and_instance():
    loss = deepmetric.losses.get({"class_name": "triplet_semihard", "config": {"margin": 0.2}})
    assert isinstance(loss, deepmetric.losses.TripletSemiHardLoss)
    assert loss.get_config()["margin"] == 0.2
    assert deepmetric.losses.get(loss) is loss
    assert deepmetric.losses.get(None) is None


def test_every_public_loss_class_is_found():
    for name in deepmetric.losses.__all__:
        obj = getattr(deepmetric.losses, name)
        if isinstance(obj, type) and issubclass(obj, keras.losses.Loss):
            assert deepmetric.losses.get(name) is not None


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown loss 'nope'.*TripletSemiHardLoss"):
        deepmetric.losses.get("nope")
    with pytest.raises(ValueError, match="Unknown head 'nope'.*ArcFace"):
        deepmetric.heads.get("nope")
    with pytest.raises(TypeError, match="loss identifier"):
        deepmetric.losses.get(3)
    with pytest.raises(ValueError, match="class_name"):
        deepmetric.losses.get({"config": {}})


@pytest.mark.parametrize(
    "name, cls",
    [
        ("arcface", "ArcFace"),
        ("cosface", "CosFace"),
        ("sub_center_arcface", "SubCenterArcFace"),
        ("normalized_softmax", "NormalizedSoftmax"),
        ("proxy_nca", "ProxyNCA"),
        ("proxy_anchor", "ProxyAnchor"),
    ],
)
def test_heads_get(name, cls):
    assert deepmetric.heads.get(name) is getattr(deepmetric.heads, cls)
    head = deepmetric.heads.get({"class_name": cls, "config": {"num_classes": 3}})
    assert isinstance(head, getattr(deepmetric.heads, cls)) and head.num_classes == 3
