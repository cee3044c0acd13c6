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

    The fields are typed ``Any``: a batch holds JAX or NumPy arrays, tracers inside a transform,
    or -- in ``TaskDistribution.task_shapes`` -- shape tuples.

    Example:
      >>> import jax.numpy as jnp
      >>> Batch(jnp.zeros((5, 1)), jnp.ones((5, 1))).x.shape
      (5, 1)
    """

    x: Any
    y: Any


class Task(NamedTuple):
    """One few-shot task: a support set to adapt on and a query set to score on.

    The seed's Definition 1.1: ``D_j = {S_j, Q_j}``.

    Attributes:
      support: the ``Batch`` (or any pytree) the learner adapts on.
      query: the ``Batch`` the adapted parameters are scored on.

    Example:
      >>> import jax.numpy as jnp
      >>> task = Task(Batch(jnp.ones((5, 1)), jnp.ones((5, 1))), Batch(jnp.ones((10, 1)), jnp.ones((10, 1))))
      >>> task.query.x.shape
      (10, 1)
    """

    support: Batch
    query: Batch


class Model(NamedTuple):
    """A model as a pair of pure functions, with optional model state.

    Attributes:
      init: ``init(key) -> params``.
      apply: ``apply(params, x) -> predictions`` for a batch of inputs; for a model with state,
        ``apply(params, x, state) -> (predictions, new_state)``.
      init_state: None for a stateless model; else ``init_state() -> state``: what the model keeps
        besides its parameters and never differentiates (batch norm's running statistics). The
        inner loop threads it, the engine carries it in ``TrainState.model_state`` and checkpoints it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> line = Model(init=lambda key: {"a": jax.random.normal(key, ())}, apply=lambda p, x: p["a"] * x)
      >>> line.apply({"a": jnp.asarray(2.0)}, jnp.arange(3.0)).tolist()
      [0.0, 2.0, 4.0]
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[..., Any]
    init_state: Callable[[], Any] | None = None


# loss_fn(params, batch) -> scalar; a stateful loss (make_loss(..., stateful=True)) takes the model
# state third and returns (loss, new_state).
LossFn = Callable[..., Any]
