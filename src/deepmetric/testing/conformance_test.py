"""Every labels-and-embeddings loss of `deepmetric.losses` and every proxy head of
`deepmetric.heads` through the invariants of `deepmetric.testing.invariants`.

A loss exported from `deepmetric.losses` (a subclass of its `MetricLoss`) or a head that
`deepmetric.heads.get` finds gets these tests by being there.
"""

import pytest

from deepmetric import testing

# The losses whose formulas keep the terms of one kind of pair in a batch without the other
# kind (multi-similarity and online contrastive keep the negative pairs' terms in a batch
# without a positive pair): in their degenerate batches only the batch of one example is 0.
ONE_SIDED = {"MultiSimilarityLoss", "OnlineContrastiveLoss"}

LOSSES = testing.metric_losses()
HEADS = testing.proxy_heads()


def test_the_suite_finds_every_loss_and_head():
    names = {cls.__name__ for cls in LOSSES}
    assert {"TripletSemiHardLoss", "TripletLoss", "LiftedStructLoss", "CircleLoss"} <= names
    assert "NpairsLoss" not in names and len(names) >= 10
    assert len({cls.__name__ for cls in HEADS}) == len(testing.invariants.HEAD_NAMES)


@pytest.mark.parametrize("check", list(testing.LOSS_CHECKS))
@pytest.mark.parametrize("cls", LOSSES, ids=lambda cls: cls.__name__)
def test_loss_invariant(cls, check):
    testing.check_loss(cls, checks=[check], one_sided=cls.__name__ in ONE_SIDED)


@pytest.mark.parametrize("check", list(testing.HEAD_CHECKS))
@pytest.mark.parametrize("cls", HEADS, ids=lambda cls: cls.__name__)
def test_head_invariant(cls, check):
    testing.check_head(cls, checks=[check])
