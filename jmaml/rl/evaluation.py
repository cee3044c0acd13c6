"""Evaluation as the MAML paper reports meta-RL: the average return on held-out tasks after 0, 1, 2, ...
policy-gradient steps, with a 95% confidence interval over tasks."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmaml._checks import check_num_steps, check_positive_int
from jmaml.protocols import MetaLearner
from jmaml.rl import rollouts
from jmaml.rl.envs import Env
from jmaml.rl.learner import RLTask, task_distribution
from jmaml.rl.policies import Policy


def returns_after_steps(learner: MetaLearner, env: Env, policy: Policy, params: Any, *, key: Any = 0,
                        num_tasks: int = 40, num_steps: int = 3, eval_episodes: int = 20,
                        inner_lr: Any = None) -> np.ndarray:
    """Per held-out task, the mean return of ``eval_episodes`` episodes of the policy after 0..``num_steps``
    of the learner's own test-time policy-gradient steps (``learner.adapt``); shape ``(num_tasks,
    num_steps + 1)``. Every step's policy is scored on the same evaluation keys (common random numbers)."""
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    num_steps = check_num_steps(num_steps, "num_steps")
    eval_episodes = check_positive_int(eval_episodes, "eval_episodes")
    key = jax.random.key(key) if isinstance(key, int) else key
    heldout = task_distribution(env).heldout
    assert heldout is not None
    tasks = heldout(key, num_tasks)
    hyper = {} if inner_lr is None else {"inner_lr": inner_lr}

    def one(task):
        k_adapt, k_eval = jax.random.split(task.key)

        def observe(phi):
            traj = rollouts.rollout(env, policy, phi, task.params, k_eval, eval_episodes)
            return jnp.mean(jnp.sum(traj.rewards, axis=1))

        _, values = learner.adapt(params, RLTask(task.params, k_adapt), num_steps, observe=observe, **hyper)
        return values

    return np.asarray(jax.jit(jax.vmap(one))(tasks))


def summarize(returns: np.ndarray) -> dict:
    """Mean and 95% confidence half-width (normal, over tasks: axis 0) per step."""
    returns = np.asarray(returns, np.float64)
    n = returns.shape[0]
    sd = returns.std(axis=0, ddof=1) if n > 1 else np.full(returns.shape[1:], math.nan)
    return {"mean": returns.mean(axis=0).tolist(), "ci95": (1.96 * sd / math.sqrt(n)).tolist(), "num_tasks": n}
