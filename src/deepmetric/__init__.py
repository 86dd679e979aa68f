"""deepmetric: deep metric learning for Keras 3 on JAX, TensorFlow and PyTorch."""

from deepmetric import (
    callbacks,
    distances,
    evaluation,
    heads,
    layers,
    losses,
    metrics,
    mining,
    optimizers,
    samplers,
    schedules,
    xbm,
)

__version__ = "0.1.0"

__all__ = [
    "callbacks",
    "distances",
    "evaluation",
    "heads",
    "layers",
    "losses",
    "metrics",
    "mining",
    "optimizers",
    "samplers",
    "schedules",
    "xbm",
    "__version__",
]
