"""What `--loss` names: a loss on the embeddings, or a head trained on top of the embedder.

A loss compiles into the embedding model itself, which trains on the P x K batches
`(x, y)`. A head holds one trainable proxy per training class and needs the labels in its
forward pass, so it trains in a trainer `keras.Model([images, labels],
head([embedder(images), labels]))` on the batches `((x, class index), class index)`: with
`SparseCategoricalCrossentropy(from_logits=True)` on its logits, or, for a head that adds
its own loss (`adds_loss`), with `loss=None` on `((x, class index),)`. Either way the run
saves the embedding model.
"""

from __future__ import annotations

import keras
import numpy as np

from deepmetric import heads, losses
from deepmetric.cli import names
from deepmetric.cli.parser import CliError, note
from deepmetric.samplers import ClassIndexBatches


class Objective:
    """The loss or head called `name` (any spelling `names.resolve` accepts), with `margin`.

    `margin` is the --margin given, or None: a loss then takes `names.DEFAULT_MARGINS` or its
    own default, a head its own default. CliError for an unknown name or a margin the head
    does not take.
    """

    def __init__(self, name: str, margin: float | None):
        try:
            self.name, self.is_head = names.resolve(name)
            names.check_head_margin(self.name, margin)
        except ValueError as e:
            raise CliError(str(e)) from None
        self.margin = margin
        table = names.HEADS if self.is_head else names.LOSSES
        self.class_name = table[self.name]

    @property
    def adds_loss(self) -> bool:
        """A head that adds its loss itself (compiled with `loss=None`, no targets)."""
        return self.is_head and bool(getattr(heads.get(self.class_name), "adds_loss", False))

    def head(self, num_classes: int) -> keras.layers.Layer:
        """The head with `num_classes` proxies and --margin; CliError if it rejects the margin."""
        config: dict = {"num_classes": num_classes}
        if self.margin is not None:
            config["margin"] = self.margin
        try:
            return heads.get(self.class_name)(**config)
        except ValueError as e:
            raise CliError(f"--margin: {e}") from None

    def loss(self) -> keras.losses.Loss:
        """The loss with --margin (else the default margin), if it has one; a note if it has
        none and --margin was given."""
        margin = self.margin if self.margin is not None else names.DEFAULT_MARGINS.get(self.name)
        loss = losses.get(self.class_name)
        if margin is not None and "margin" in loss.get_config():
            return losses.get({"class_name": self.class_name, "config": {"margin": margin}})
        if self.margin is not None:
            note(f"--margin ignored: {self.class_name} has no margin")
        return loss

    def trainer(self, embedder: keras.Model, num_classes: int) -> keras.Model:
        """The model `fit` trains: the embedder for a loss, the head's trainer for a head."""
        if not self.is_head:
            return embedder
        head = self.head(num_classes)
        images = keras.Input(tuple(embedder.inputs[0].shape[1:]), name="images")
        labels = keras.Input((), dtype="int32", name="labels")
        return keras.Model([images, labels], head([embedder(images), labels]), name="head_trainer")

    def compile(self, trainer: keras.Model, optimizer) -> None:
        if not self.is_head:
            trainer.compile(optimizer=optimizer, loss=self.loss())
        elif self.adds_loss:
            trainer.compile(optimizer=optimizer, loss=None)
        else:
            trainer.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )

    def batches(self, sampler, classes: np.ndarray):
        """The sampler's batches as the trainer takes them (labels as indices into `classes`
        for a head)."""
        if not self.is_head:
            return sampler
        return ClassIndexBatches(sampler, classes, with_targets=not self.adds_loss)
