"""deepmetric: deep metric learning for Keras 3 on JAX, TensorFlow and PyTorch."""

from deepmetric import distances, heads, losses, metrics, mining, optimizers, schedules

__version__ = "0.1.0"

__all__ = [
    "distances",
    "heads",
    "losses",
    "metrics",
    "mining",
    "optimizers",
    "schedules",
    "__version__",
]
