"""Core types: data batches, tasks and models as PyTrees (NamedTuples).

Everything numerical in jmaml is a pure function of these. A single task has no
task axis; a *task batch* is the same NamedTuple with a leading task axis on every
leaf (what ``jax.vmap`` maps over).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Params = Any  # A PyTree of arrays.
PRNGKey = jax.Array
ArrayLike = jax.typing.ArrayLike


class Batch(NamedTuple):
    """A set of labelled points: inputs ``x`` and targets ``y``.

    Attributes:
      x: inputs, shape ``(num_points, ...)``.
      y: targets, shape ``(num_points, ...)``; same leading size as ``x``.
    """

    x: jax.Array
    y: jax.Array


class Task(NamedTuple):
    """One few-shot task: a support set to adapt on and a query set to score on.

    The seed's Definition 1.1: ``D_j = {S_j, Q_j}``.
    """

    support: Batch
    query: Batch


class Model(NamedTuple):
    """A model as a pair of pure functions.

    Attributes:
      init: ``init(key) -> params``.
      apply: ``apply(params, x) -> predictions`` for a batch of inputs.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[[Params, jax.Array], jax.Array]


LossFn = Callable[[Params, Batch], jax.Array]
