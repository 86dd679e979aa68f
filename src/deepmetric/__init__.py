"""deepmetric: deep metric learning for Keras 3 on JAX, TensorFlow and PyTorch.

`import deepmetric` imports every module below, so that every deepmetric class is registered
with Keras and `keras.saving.load_model(path)` loads a model that uses one. With the
environment variable `DEEPMETRIC_LAZY_IMPORT=1` at import time, the modules are imported
when first used instead (`deepmetric.losses` on first access); the command line uses that
to check its arguments before keras is imported (see `deepmetric.cli`).
"""

import importlib as _importlib
import os as _os

__version__ = "0.1.0"

__all__ = [
    "callbacks",
    "distances",
    "distributed",
    "evaluation",
    "export",
    "gradcache",
    "heads",
    "index",
    "layers",
    "losses",
    "metrics",
    "miners",
    "mining",
    "optimizers",
    "samplers",
    "schedules",
    "xbm",
    "__version__",
]

_MODULES = tuple(name for name in __all__ if name != "__version__")

if _os.environ.get("DEEPMETRIC_LAZY_IMPORT") == "1":

    def __getattr__(name):
        if name in _MODULES:
            return _importlib.import_module(f"deepmetric.{name}")
        raise AttributeError(f"module 'deepmetric' has no attribute {name!r}")

else:
    from deepmetric import (
        callbacks,
        distances,
        distributed,
        evaluation,
        export,
        gradcache,
        heads,
        index,
        layers,
        losses,
        metrics,
        miners,
        mining,
        optimizers,
        samplers,
        schedules,
        xbm,
    )
