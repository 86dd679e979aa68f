"""deepmetric: deep metric learning for Keras 3 on JAX, TensorFlow and PyTorch."""

from deepmetric import distances, losses, metrics, mining

__version__ = "0.1.0"

__all__ = ["distances", "losses", "metrics", "mining", "__version__"]
