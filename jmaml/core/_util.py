"""Small internal helpers."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import jax


def x64_enabled() -> bool:
    """Whether JAX runs with 64-bit floats (``jax_enable_x64``)."""
    return bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]


def default_float() -> Any:
    """The floating dtype of a Python float in JAX right now: float64 under ``jax_enable_x64``, else
    float32. Constants jmaml builds itself (rates, loss weights, schedules) take it, so a float64 run
    stays float64 end to end and a float32 run is unchanged."""
    return jax.dtypes.canonicalize_dtype(jax.numpy.float64)


@contextlib.contextmanager
def enable_x64(enabled: bool = True) -> Iterator[None]:
    """Scopes ``jax_enable_x64`` and always restores the previous value."""
    previous = x64_enabled()
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark and result files."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_description() -> str:
    """One line naming the CPU, core count, OS, Python, JAX and its platform (for RESULTS files)."""
    return (f"{cpu_name()}, {os.cpu_count()} cores visible, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, JAX {jax.__version__} on {jax.devices()[0].platform.upper()}")
