"""Strict JAX settings for the whole suite, and a float64 fixture that always restores."""

import jax
import pytest

from jmaml._util import enable_x64

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled, restoring the previous setting afterwards."""
    with enable_x64():
        yield
