"""Evaluation as the MAML paper reports meta-RL: the average return on held-out tasks after 0, 1, 2, ...
policy-gradient steps, with a 95% confidence interval over tasks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmaml.core._checks import check_num_steps, check_positive_int
from jmaml.core.protocols import MetaLearner
from jmaml.rl import rollouts
from jmaml.rl.envs import Env
from jmaml.rl.learner import task_distribution
from jmaml.rl.policies import Policy


def return_metric(env: Env, policy: Policy, episodes: int = 20):
    """``metric(policy_params, query) -> scalar``: the mean undiscounted return of ``episodes`` episodes of the
    policy on a task's ``query`` (an ``RLTask``) -- the metric ``jmaml.evaluate.evaluate`` takes for an RL
    task distribution (higher is better)::

        evaluate(learner, params, rl.task_distribution(env), metric=rl.return_metric(env, policy))
    """
    episodes = check_positive_int(episodes, "episodes")

    def metric(phi, query):
        traj = rollouts.rollout(env, policy, phi, query.params, query.key, episodes)
        return jnp.mean(jnp.sum(traj.rewards, axis=1))

    return metric


def returns_after_steps(learner: MetaLearner, env: Env, policy: Policy, params: Any, *, key: Any = 0,
                        num_tasks: int = 40, num_steps: int = 3, eval_episodes: int = 20,
                        inner_lr: Any = None) -> np.ndarray:
    """Per held-out task, the mean return of ``eval_episodes`` episodes of the policy after 0..``num_steps``
    of the learner's own test-time policy-gradient steps (``learner.adapt``); shape ``(num_tasks,
    num_steps + 1)``. Every step's policy is scored on the same evaluation keys (common random numbers).
    The curves are ``jmaml.evaluate.learner_curves``'s, as ``jmaml.evaluate.evaluate`` computes them."""
    from jmaml.engine.evaluation import learner_curves

    num_tasks = check_positive_int(num_tasks, "num_tasks")
    num_steps = check_num_steps(num_steps, "num_steps")
    metric = return_metric(env, policy, eval_episodes)
    key = jax.random.key(key) if isinstance(key, int) else key
    heldout = task_distribution(env).heldout
    assert heldout is not None
    hyper = None if inner_lr is None else {"inner_lr": inner_lr}
    curves = jax.jit(lambda p, tasks: learner_curves(learner, p, tasks, metric, num_steps, hyper=hyper))
    return np.asarray(curves(params, heldout(key, num_tasks)))


def summarize(returns: np.ndarray) -> dict:
    """``jmaml.evaluate.summarize`` for returns: per step the mean and 95% confidence half-width (1.96
    standard errors over tasks, axis 0), and the rest of its summary; no task is dropped for its size."""
    from jmaml.engine.evaluation import summarize as summarize_scores

    return summarize_scores(returns, None, higher_is_better=True)
