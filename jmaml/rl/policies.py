"""Policies as pure functions: ``Policy(init, sample, log_prob, ..., kl)``.

``log_prob(params, obs, action)`` is what every gradient goes through (the policy-gradient losses,
the score of the sampled trajectories); ``sample`` draws the actions of a rollout, whose data carries no
gradient; ``kl(old, new, obs)`` is the analytic KL divergence between the action distributions of two
parameter settings at one observation, the trust region of TRPO (as rllab, garage, ProMP and
pytorch-maml-rl define it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml.core import models
from jmaml.core._checks import check_positive_finite, check_positive_int
from jmaml.core._util import default_float


class Policy(NamedTuple):
    """A stochastic policy.

    Attributes:
      init: ``init(key) -> params``.
      sample: ``sample(params, obs, key) -> action`` for one observation.
      log_prob: ``log_prob(params, obs, action) -> scalar`` for one observation and action.
      action_shape: the shape of one action (``()`` for a discrete one).
      num_actions: a discrete policy's number of actions; None for a continuous one.
      observation_shape: the observation shape it reads.
      kl: ``kl(old_params, new_params, obs) -> scalar``: the analytic ``KL(π_old(·|obs) ‖ π_new(·|obs))``
        (TRPO's constraint and Fisher metric); None for a policy without one (TRPO then refuses it).
    """

    init: Callable[..., Any]
    sample: Callable[..., Any]
    log_prob: Callable[..., Any]
    action_shape: tuple[int, ...]
    num_actions: int | None
    observation_shape: tuple[int, ...]
    kl: Callable[..., Any] | None = None


def gaussian_mlp(obs_dim: int, action_dim: int, hidden: Sequence[int] = (100, 100), activation: str = "relu",
                 init_std: float = 1.0) -> Policy:
    """A diagonal Gaussian whose mean is an MLP of the observation and whose log standard deviation is a
    learned vector (the MAML paper's policy: two hidden layers of 100 ReLU units)."""
    obs_dim, action_dim = check_positive_int(obs_dim, "obs_dim"), check_positive_int(action_dim, "action_dim")
    init_std = check_positive_finite(init_std, "init_std")
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

    def kl(old, new, obs):
        """Σ_i log(σ1/σ0) + (σ0² + (μ0 − μ1)²) / (2 σ1²) − 1/2, the diagonal Gaussians' KL."""
        ls0, ls1 = old["log_std"], new["log_std"]
        diff = mean(old, obs) - mean(new, obs)
        return jnp.sum(ls1 - ls0 + (jnp.exp(2 * ls0) + diff ** 2) * jnp.exp(-2 * ls1) / 2 - 0.5)

    return Policy(init, sample, log_prob, (action_dim,), None, (obs_dim,), kl)


def categorical_mlp(obs_dim: int, num_actions: int, hidden: Sequence[int] = (100, 100),
                    activation: str = "relu") -> Policy:
    """A softmax over ``num_actions`` discrete actions whose logits are an MLP of the observation (the policy of
    a discrete environment such as gymnax's CartPole, ``jmaml.rl.gymnax``)."""
    obs_dim, num_actions = check_positive_int(obs_dim, "obs_dim"), check_positive_int(num_actions, "num_actions")
    net = models.mlp([obs_dim, *hidden, num_actions], activation)

    def log_softmax(params, obs):
        return jax.nn.log_softmax(net.apply(params, obs[None])[0])

    def sample(params, obs, key):
        return jax.random.categorical(key, log_softmax(params, obs))

    def log_prob(params, obs, action):
        return log_softmax(params, obs)[action]

    def kl(old, new, obs):
        """Σ_a p_old(a) (log p_old(a) − log p_new(a))."""
        lp0, lp1 = log_softmax(old, obs), log_softmax(new, obs)
        return jnp.sum(jnp.exp(lp0) * (lp0 - lp1))

    return Policy(net.init, sample, log_prob, (), num_actions, (obs_dim,), kl)


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

    def kl(old, new, obs):
        """Σ_a p_old(a) (log p_old(a) − log p_new(a))."""
        lp0, lp1 = jax.nn.log_softmax(logits(old, obs)), jax.nn.log_softmax(logits(new, obs))
        return jnp.sum(jnp.exp(lp0) * (lp0 - lp1))

    return Policy(init, sample, log_prob, (), num_actions, (num_states,), kl)
