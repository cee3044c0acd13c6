"""Benchmark helpers shared by ``scripts/bench.py`` and the scripts in this folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed_chunk(chunk: Callable, state: Any, chunk_len: int) -> Callable[[], float]:
    """``run() -> seconds`` for one call of a compiled ``chunk(state, length)`` of ``chunk_len`` meta-steps,
    each call continuing from the last call's state."""
    import jax

    holder = {"s": state}

    def run() -> float:
        t0 = time.perf_counter()
        s, m = chunk(holder["s"], chunk_len)
        jax.block_until_ready(m["meta_loss"])
        holder["s"] = s
        return time.perf_counter() - t0

    return run


def chunk_runner(config: Any, chunk_len: int, chunk: Callable | None = None) -> Callable[[], float]:
    """``timed_chunk`` for a ``TrainConfig``'s meta-learner (``jmaml.train.make_chunk``, or ``chunk`` built
    for it) from the config's initial state."""
    from jmaml.run import train

    return timed_chunk(chunk or train.make_chunk(config), train.initial_state(config), chunk_len)


def write_result(result: dict, prefix: str, markdown: str) -> None:
    """``prefix``.json (the result) and ``prefix``.md (its table), and the table on stdout."""
    import json

    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
