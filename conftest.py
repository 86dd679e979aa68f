"""Test configuration: the backend comes from KERAS_BACKEND (the Makefile runs each)."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with float32, no mixed-precision policy, a fresh session."""
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
