r"""Sinusoid few-shot regression (Finn, Abbeel & Levine 2017, Section 5.1).

Each task is :math:`y = A \sin(x - \varphi)` with :math:`A \sim U[0.1, 5]`,
:math:`\varphi \sim U[0, \pi]` and inputs :math:`x \sim U[-5, 5]`. Everything is a pure
``jax.random`` function, so tasks are sampled on the device inside a jitted step.
Inputs and targets have shape ``(num_tasks, num_points, 1)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmaml._checks import check_positive_int
from jmaml.types import Batch, PRNGKey, Task

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidParams(NamedTuple):
    """The parameters of a batch of sinusoid tasks."""

    amplitude: jax.Array  # shape=(num_tasks,)
    phase: jax.Array  # shape=(num_tasks,)


def sample_params(key: PRNGKey, num_tasks: int) -> SinusoidParams:
    """Draws amplitudes ~ U[0.1, 5] and phases ~ U[0, π] for ``num_tasks`` tasks."""
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    key_a, key_p = jax.random.split(key)
    amplitude = jax.random.uniform(key_a, (num_tasks,), minval=AMPLITUDE_RANGE[0],
                                   maxval=AMPLITUDE_RANGE[1])
    phase = jax.random.uniform(key_p, (num_tasks,), minval=PHASE_RANGE[0], maxval=PHASE_RANGE[1])
    return SinusoidParams(amplitude, phase)


def evaluate(params: SinusoidParams, x: jax.Array) -> jax.Array:
    """The true function of each task at inputs ``x`` of shape ``(num_tasks, n, 1)``."""
    return params.amplitude[:, None, None] * jnp.sin(x - params.phase[:, None, None])


def sample_points(key: PRNGKey, params: SinusoidParams, num_points: int) -> Batch:
    """Draws ``num_points`` inputs ~ U[-5, 5] per task and labels them with the true function."""
    num_points = check_positive_int(num_points, "num_points")
    num_tasks = params.amplitude.shape[0]
    x = jax.random.uniform(key, (num_tasks, num_points, 1), minval=INPUT_RANGE[0],
                           maxval=INPUT_RANGE[1])
    return Batch(x, evaluate(params, x))


def sample_tasks(key: PRNGKey, num_tasks: int, *, num_support: int = 10,
                 num_query: int = 10) -> Task:
    """Samples a batch of sinusoid tasks with K support and K_query query points each.

    Args:
      key: a ``jax.random`` key; the same key gives the same tasks.
      num_tasks: tasks in the batch (the meta-batch size).
      num_support: K, points in each support set.
      num_query: points in each query set.

    Returns:
      A ``Task`` with a leading task axis: x and y of shape ``(num_tasks, K, 1)``.
    """
    num_support = check_positive_int(num_support, "num_support")
    num_query = check_positive_int(num_query, "num_query")
    key_params, key_support, key_query = jax.random.split(key, 3)
    params = sample_params(key_params, num_tasks)
    return Task(sample_points(key_support, params, num_support),
                sample_points(key_query, params, num_query))
