"""Benchmark helpers shared by ``scripts/bench.py`` and the scripts in this folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def chunk_runner(config: Any, chunk_len: int, chunk: Callable | None = None) -> Callable[[], float]:
    """``run() -> seconds`` for one compiled chunk of ``chunk_len`` meta-steps of a ``TrainConfig``'s
    meta-learner (``jmaml.train.make_chunk``, or ``chunk`` built for it), each call continuing from the
    last call's state."""
    import jax

    from jmaml import train

    chunk = chunk or train.make_chunk(config)
    state = {"s": train.initial_state(config)}

    def run() -> float:
        t0 = time.perf_counter()
        s, m = chunk(state["s"], chunk_len)
        jax.block_until_ready(m["meta_loss"])
        state["s"] = s
        return time.perf_counter() - t0

    return run
