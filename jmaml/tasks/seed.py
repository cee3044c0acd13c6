"""The seed document's datasets (``../shared/seed``, Tables 1 and 2).

* ``conventional_batch()``: D̂ of Table 1, x = (1, 2, 3), y = (2, 4, 1).
* ``meta_tasks()``: D1 and D2 of Table 2 stacked on a leading task axis:
  S1 = {(2, 4), (3, 1)}, Q1 = {(1, 2)}, S2 = {(5, 3), (6, 0)}, Q2 = {(4, 1)}.

Arrays are NumPy float64; JAX keeps float64 only with ``jax_enable_x64`` on, as the
walk-through (``jmaml seed``) does.
"""

from __future__ import annotations

import numpy as np

from jmaml.core.types import Batch, Task

CONVENTIONAL_X = (1.0, 2.0, 3.0)
CONVENTIONAL_Y = (2.0, 4.0, 1.0)
# (support x, support y, query x, query y) for D1 and D2.
TASKS = (
    ((2.0, 3.0), (4.0, 1.0), (1.0,), (2.0,)),
    ((5.0, 6.0), (3.0, 0.0), (4.0,), (1.0,)),
)
# The seed's constants: initial weights, inner and meta rates.
THETA0 = 1.0
ALPHA = 0.1
BETA = 0.5


def _arr(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def conventional_batch() -> Batch:
    """D̂ of the seed's Table 1."""
    return Batch(_arr(CONVENTIONAL_X), _arr(CONVENTIONAL_Y))


def task_list() -> list[Task]:
    """D1 and D2 as separate tasks (no task axis)."""
    return [Task(Batch(_arr(xs), _arr(ys)), Batch(_arr(xq), _arr(yq))) for xs, ys, xq, yq in TASKS]


def meta_tasks() -> Task:
    """D1 and D2 stacked on a leading task axis: support (2, 2), query (2, 1)."""
    tasks = task_list()
    return Task(
        Batch(np.stack([t.support.x for t in tasks]), np.stack([t.support.y for t in tasks])),
        Batch(np.stack([t.query.x for t in tasks]), np.stack([t.query.y for t in tasks])),
    )
