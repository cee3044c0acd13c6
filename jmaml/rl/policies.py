"""Policies as pure functions: ``Policy(init, sample, log_prob)``.

``log_prob(params, obs, action)`` is what every gradient goes through (the policy-gradient losses,
the score of the sampled trajectories); ``sample`` draws the actions of a rollout, whose data carries no
gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml import models
from jmaml._checks import check_positive_int
from jmaml._util import default_float


class Policy(NamedTuple):
    """A stochastic policy.

    Attributes:
      init: ``init(key) -> params``.
      sample: ``sample(params, obs, key) -> action`` for one observation.
      log_prob: ``log_prob(params, obs, action) -> scalar`` for one observation and action.
      action_shape: the shape of one action (``()`` for a discrete one).
      num_actions: a discrete policy's number of actions; None for a continuous one.
      observation_shape: the observation shape it reads.
    """

    init: Callable[..., Any]
    sample: Callable[..., Any]
    log_prob: Callable[..., Any]
    action_shape: tuple[int, ...]
    num_actions: int | None
    observation_shape: tuple[int, ...]


def gaussian_mlp(obs_dim: int, action_dim: int, hidden: Sequence[int] = (100, 100), activation: str = "relu",
                 init_std: float = 1.0) -> Policy:
    """A diagonal Gaussian whose mean is an MLP of the observation and whose log standard deviation is a
    learned vector (the MAML paper's policy: two hidden layers of 100 ReLU units)."""
    obs_dim, action_dim = check_positive_int(obs_dim, "obs_dim"), check_positive_int(action_dim, "action_dim")
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std!r}")
    net = models.mlp([obs_dim, *hidden, action_dim], activation)

    def init(key):
        return {"mean": net.init(key), "log_std": jnp.full((action_dim,), jnp.log(init_std), default_float())}

    def mean(params, obs):
        return net.apply(params["mean"], obs[None])[0]

    def sample(params, obs, key):
        noise = jax.random.normal(key, (action_dim,), params["log_std"].dtype)
        return mean(params, obs) + jnp.exp(params["log_std"]) * noise

    def log_prob(params, obs, action):
        log_std = params["log_std"]
        z = (action - mean(params, obs)) * jnp.exp(-log_std)
        return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi))

    return Policy(init, sample, log_prob, (action_dim,), None, (obs_dim,))


def tabular_softmax(num_states: int, num_actions: int) -> Policy:
    """A softmax over a table of logits, one row per state; the observation is a one-hot state vector.
    Initialised at zero (uniform)."""
    num_states = check_positive_int(num_states, "num_states")
    num_actions = check_positive_int(num_actions, "num_actions")

    def init(key):
        return jnp.zeros((num_states, num_actions), default_float())

    def logits(params, obs):
        return obs @ params

    def sample(params, obs, key):
        return jax.random.categorical(key, logits(params, obs))

    def log_prob(params, obs, action):
        return jax.nn.log_softmax(logits(params, obs))[action]

    return Policy(init, sample, log_prob, (), num_actions, (num_states,))
