"""Small internal helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def enable_x64(enabled: bool = True) -> Iterator[None]:
    """Scopes ``jax_enable_x64`` and always restores the previous value."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
