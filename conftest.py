"""Test configuration: the backend comes from KERAS_BACKEND (the Makefile runs each)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with the float32 policy, whatever the previous test set."""
    yield
    if keras.config.dtype_policy().name != "float32":
        keras.config.set_dtype_policy("float32")
