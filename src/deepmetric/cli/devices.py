"""`deepmetric train --devices N` and `--grad-cache-chunk C`: where and how the steps run.

`Devices(config)` checks that N local devices exist (CliError naming the available ones
otherwise, before the data loads) and gives `train` three hooks: `scope()` around the whole
run (TensorFlow: `MirroredStrategy`, which must hold the model's creation), `trainer(model)`
(the model, or `deepmetric.gradcache.GradCacheModel` around it with --grad-cache-chunk) and
`fit(trainer, callbacks)` around `fit` (JAX: `keras.distribution.DataParallel`, with the
callbacks' predictions run outside it). The backend-specific parts are in
`deepmetric._backend`. One process trains and writes the run directory on every backend;
torch refuses N > 1 before keras loads (see `deepmetric.cli.parser.prepare_devices` and
docs/cli.md for torchrun).
"""

from __future__ import annotations

import contextlib

import keras

from deepmetric import _backend
from deepmetric.cli.parser import CliError
from deepmetric.gradcache import GradCacheModel


class Devices:
    """The devices of a run and its gradient-caching chunk (see the module docstring)."""

    def __init__(self, config: dict):
        self.count = config["devices"]
        self.chunk = config["grad_cache_chunk"]
        self.devices: list[str] = []
        if self.count > 1:
            _backend.split_host_cpu(self.count)
            available = _backend.local_devices()
            if len(available) < self.count:
                shown = ", ".join(available) or "none"
                raise CliError(
                    f"--devices {self.count}: the {keras.backend.backend()} backend has "
                    f"{len(available)} device(s) ({shown})"
                    + (
                        "; start Python with XLA_FLAGS=--xla_force_host_platform_device_count"
                        f"={self.count} for host CPUs"
                        if keras.backend.backend() == "jax"
                        else ""
                    )
                )
            self.devices = available[: self.count]

    def scope(self):
        """The whole run: the models are created and compiled in it."""
        return _backend.data_parallel_scope(self.devices)

    def trainer(self, model):
        """`model`, wrapped for gradient caching with --grad-cache-chunk (new runs)."""
        if self.chunk is None or isinstance(model, GradCacheModel):
            return model
        return GradCacheModel(model, self.chunk, name="grad_cache")

    @contextlib.contextmanager
    def fit(self, trainer, global_batch: int):
        """Around `trainer.fit`; CliError if the batch does not split over the devices."""
        if self.count > 1 and global_batch % self.count:
            raise CliError(
                f"--devices {self.count}: the batch of P x K = {global_batch} samples must be "
                "a multiple of the number of devices"
            )
        with _backend.data_parallel_fit(trainer, self.devices):
            yield

    def callbacks(self, callbacks: list) -> list:
        """`callbacks`, each run outside the training distribution (their predictions)."""
        if len(self.devices) < 2 or keras.backend.backend() != "jax":
            return callbacks
        return [_OutsideDistribution(c) for c in callbacks]


class _OutsideDistribution(keras.callbacks.Callback):
    """Runs the epoch hooks of `callback` outside `keras.distribution` (jax)."""

    def __init__(self, callback):
        super().__init__()
        self.callback = callback

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.callback.set_params(params)

    def on_train_begin(self, logs=None):
        with _backend.outside_distribution():
            self.callback.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        with _backend.outside_distribution():
            self.callback.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        with _backend.outside_distribution():
            self.callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        with _backend.outside_distribution():
            self.callback.on_train_end(logs)

    def on_train_batch_end(self, batch, logs=None):
        self.callback.on_train_batch_end(batch, logs)  # no prediction: inside is fine
