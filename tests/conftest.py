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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Frees every compiled executable after each test file. Each executable holds its own memory mappings,
    and one worker process running hundreds of files' programs passed the kernel's limit of 65,530 mappings
    (vm.max_map_count): XLA's compiler then crashed with a segmentation fault (seen twice, in CI and here)."""
    yield
    jax.clear_caches()
