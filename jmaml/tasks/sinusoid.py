r"""Sinusoid few-shot regression (Finn, Abbeel & Levine 2017, Section 5.1).

Each task is :math:`y = A \sin(x - \varphi)` with :math:`A \sim U[0.1, 5]`,
:math:`\varphi \sim U[0, \pi]` and inputs :math:`x \sim U[-5, 5]`. Everything is a pure
``jax.random`` function, so tasks are sampled on the device inside a jitted step.
Inputs and targets have shape ``(num_tasks, num_points, 1)``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmaml.core._checks import check_positive_int
from jmaml.core.protocols import TaskDistribution
from jmaml.core.types import Batch, PRNGKey, Task

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


def heldout(key: PRNGKey, num_tasks: int, *, num_support: int = 20, num_query: int = 100) -> Task:
    """Held-out tasks for evaluation: ``num_support`` support and ``num_query`` query points each.

    The support sets are nested across shots: the first K of them are what K-shot evaluation uses.
    """
    key_p, key_s, key_q = jax.random.split(key, 3)
    params = sample_params(key_p, num_tasks)
    return Task(sample_points(key_s, params, num_support), sample_points(key_q, params, num_query))


def mse_metric(apply):
    """The paper's evaluation metric for a model's ``apply``: the query MSE."""
    from jmaml.core.losses import make_loss

    return make_loss(apply, "mse")


def distribution(*, num_support: int = 10, num_query: int = 10, eval_support: int = 20,
                 eval_query: int = 100) -> TaskDistribution:
    """Sinusoid regression as a ``TaskDistribution`` (the paper's: K = 10 support, 10 query points
    for training; held-out tasks with 20 nested support and 100 query points, scored by MSE).

    Args:
      num_support, num_query: points per training task (K and the query size).
      eval_support, eval_query: points per held-out task (their first K support points are the
        K-shot evaluation sets).

    Returns:
      The ``TaskDistribution`` (``name="sinusoid"``, MSE metric).

    Raises:
      ValueError/TypeError: a non-positive count.

    Example:
      >>> import jax
      >>> tasks = distribution()
      >>> tasks.sample(jax.random.key(0), 25).support.x.shape
      (25, 10, 1)
    """
    num_support = check_positive_int(num_support, "num_support")
    num_query = check_positive_int(num_query, "num_query")
    eval_support = check_positive_int(eval_support, "eval_support")
    eval_query = check_positive_int(eval_query, "eval_query")
    return TaskDistribution(
        sample=functools.partial(sample_tasks, num_support=num_support, num_query=num_query),
        heldout=functools.partial(heldout, num_support=eval_support, num_query=eval_query),
        make_metric=mse_metric, name="sinusoid", metric_name="mse", higher_is_better=False,
        task_shapes=Task(Batch((num_support, 1), (num_support, 1)), Batch((num_query, 1), (num_query, 1))))


# ---- the family, for TrainConfig and the CLI ---------------------------------------------------

EVAL_SEED = 20_170_306  # held-out test tasks
NUM_EVAL_QUERY = 100
SHOTS = (5, 10, 20)
MAX_EVAL_STEPS = 10


def _family_distribution(config) -> TaskDistribution:
    return distribution(num_support=config.num_support, num_query=config.num_query, eval_support=max(SHOTS),
                        eval_query=NUM_EVAL_QUERY)


def _family_model(config, extra_inputs: int = 0):
    from jmaml.core.models import mlp

    return mlp([1 + extra_inputs, *config.hidden, 1], config.activation)


def _family_validate(config) -> None:
    if config.data_dir is not None:
        raise ValueError("data_dir applies to the image tasks (omniglot, miniimagenet, tieredimagenet, cifarfs, "
                         "fc100), not sinusoid")
    if config.cache_dir is not None:
        raise ValueError("cache_dir applies to the image tasks (their decoded-image cache), not sinusoid")
    if config.ways != 5:
        raise ValueError(f"ways applies to the image tasks (N classes per episode), not sinusoid (got {config.ways})")
    if config.backbone != "conv4":
        raise ValueError(f"backbone applies to the image tasks, not sinusoid (got {config.backbone!r}; the "
                         "sinusoid model is the MLP of hidden)")
    if config.loss not in ("mse", "sse"):
        raise ValueError(f"loss must be 'mse' or 'sse' for regression, got {config.loss!r}")


def _family_protocol(config):
    from jmaml.tasks.family import EvalProtocol

    return EvalProtocol(shots=SHOTS, num_steps=config.eval_inner_steps, describe={
        "held_out_tasks": None, "eval_seed": EVAL_SEED, "query_points": NUM_EVAL_QUERY, "shots": list(SHOTS),
        "steps": config.eval_inner_steps, "metric": "query MSE, mean and 95% CI",
        "batch_norm": "none (the MLP has no batch norm)"})


def _family_examples(num_tasks: int, shots: int):
    key_p, key_s, _ = jax.random.split(jax.random.key(EVAL_SEED), 3)
    params = sample_params(key_p, num_tasks)
    support = sample_points(key_s, params, shots)
    grid = jnp.linspace(INPUT_RANGE[0], INPUT_RANGE[1], 200)[None, :, None].repeat(num_tasks, axis=0)
    return support, grid, evaluate(params, grid)


def family():
    """Sinusoid regression for ``TrainConfig``: the paper's MLP, MSE/SSE, the pretrained baseline."""
    from jmaml.tasks.family import TaskFamily

    return TaskFamily(distribution=_family_distribution, model=_family_model, loss=lambda config: config.loss,
                      validate=_family_validate, protocol=_family_protocol, baseline=True,
                      examples=_family_examples)
