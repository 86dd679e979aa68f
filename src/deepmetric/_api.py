"""One decorator that marks a name public and registers it for serialization."""

import keras

PACKAGE = "deepmetric"


def export(obj):
    """Registers `obj` with Keras under the `deepmetric>` prefix.

    A model that uses a registered loss, layer, optimizer or schedule saves to
    `.keras` and loads back with `keras.saving.load_model(path)` in safe mode,
    without `custom_objects`, once `deepmetric` has been imported.
    """
    return keras.saving.register_keras_serializable(package=PACKAGE)(obj)
