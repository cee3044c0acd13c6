r"""Stability diagnostics: the curvature of a task's support loss and the inner step size it allows.

Gradient descent on a loss with Hessian eigenvalue :math:`\lambda > 0` multiplies the error along
that eigenvector by :math:`1 - \alpha\lambda` per step, so it diverges once :math:`\alpha > 2/\lambda_{max}`.
For the seed's single neuron with the sum-of-squares loss, :math:`\lambda = 2\sum x^2` and the
bound is the seed's :math:`|1 - 2\alpha\sum x^2| < 1`, i.e. :math:`\alpha < 1/\sum x^2`.

:math:`\lambda_{max}` is found by power iteration on Hessian-vector products (forward-over-reverse
``jax.jvp`` of ``jax.grad``), never forming the Hessian, so it works for any model size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jmaml.core._checks import check_batch, check_positive_int, check_task_batch
from jmaml.core.types import Batch, LossFn, Params, PRNGKey, Task


def hvp(loss_fn: LossFn, params: Params, batch: Batch, vector: Params) -> Params:
    """Hessian-vector product of ``loss_fn(·, batch)`` at ``params`` with ``vector`` (a params-shaped tree)."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (vector,))[1]


def hessian_max_eigenvalue(loss_fn: LossFn, params: Params, batch: Batch, *, num_iters: int = 30,
                           key: PRNGKey | None = None) -> jax.Array:
    r"""The dominant (largest-magnitude) eigenvalue of the Hessian of ``loss_fn(·, batch)``.

    Power iteration from a random unit vector; returns the Rayleigh quotient :math:`v^\top H v`
    of the final iterate (its sign is kept: a negative value means the dominant curvature is
    negative, where no step size makes SGD contract).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: where to take the Hessian.
      batch: one task's data (no task axis).
      num_iters: power iterations (static, >= 1).
      key: for the starting vector (default ``jax.random.key(0)``).
    """
    check_batch(batch, "batch")
    num_iters = check_positive_int(num_iters, "num_iters")
    flat, unravel = ravel_pytree(params)
    key = jax.random.key(0) if key is None else key
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def matvec(v):
        return ravel_pytree(hvp(loss_fn, params, batch, unravel(v)))[0]

    def body(_, v):
        w = matvec(v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

    v = jax.lax.fori_loop(0, num_iters, body, v0)
    return jnp.vdot(v, matvec(v))


def step_size_bound(lambda_max: jax.Array) -> jax.Array:
    """The largest stable SGD step size 2/λ_max (``inf`` where λ_max <= 0)."""
    return jnp.where(lambda_max > 0, 2.0 / jnp.where(lambda_max > 0, lambda_max, 1.0), jnp.inf)


def support_curvature(loss_fn: LossFn, params: Params, tasks: Task, *, num_iters: int = 30,
                      key: PRNGKey | None = None) -> dict[str, Any]:
    """λ_max of each task's support loss at ``params`` and the step-size bound 2/λ_max.

    Args:
      tasks: a ``Task`` batch with a leading task axis.

    Returns:
      ``{"lambda_max": (num_tasks,), "alpha_bound": (num_tasks,)}``.
    """
    check_task_batch(tasks, "tasks")
    lam = jax.vmap(lambda s: hessian_max_eigenvalue(loss_fn, params, s, num_iters=num_iters,
                                                    key=key))(tasks.support)
    return {"lambda_max": lam, "alpha_bound": step_size_bound(lam)}
