"""Rollouts on the device and the returns, baselines and advantages of policy gradients.

``rollout`` is a ``lax.scan`` over an episode's steps, vmapped over episodes; the learner vmaps it over
tasks, all inside the compiled training loop. Its data carries no gradient: every gradient goes through
``log_probs`` of the sampled actions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from jmaml.rl.envs import Env
from jmaml.rl.policies import Policy


class Trajectories(NamedTuple):
    """Episodes of one task: leading axes ``(episodes, horizon)``.

    Attributes:
      obs: the observation each action was taken in.
      actions: the actions.
      rewards: the rewards (0 after an episode is done).
      mask: 1 while the episode runs, 0 after it is done.
    """

    obs: Any
    actions: Any
    rewards: Any
    mask: Any


def rollout(env: Env, policy: Policy, params: Any, task: Any, key: jax.Array, num_episodes: int) -> Trajectories:
    """``num_episodes`` episodes of ``env``'s ``task`` under ``policy`` at ``params`` (no gradient flows)."""
    params = jax.lax.stop_gradient(params)

    def episode(key):
        k_reset, k_steps = jax.random.split(key)
        obs, state = env.reset(k_reset, task)

        def body(carry, k):
            obs, state, alive = carry
            k_act, k_env = jax.random.split(k)
            action = policy.sample(params, obs, k_act)
            next_obs, next_state, reward, done = env.step(k_env, state, action, task)
            reward = jnp.asarray(reward)
            return (next_obs, next_state, alive & ~done), (obs, action, jnp.where(alive, reward, 0), alive)

        _, (o, a, r, m) = jax.lax.scan(body, (obs, state, jnp.ones((), bool)), jax.random.split(k_steps, env.horizon))
        return Trajectories(o, a, r, m.astype(r.dtype))

    return jax.vmap(episode)(jax.random.split(key, num_episodes))


def log_probs(policy: Policy, params: Any, traj: Trajectories) -> jax.Array:
    """``log π(a_t | s_t)`` of every step, shape ``(episodes, horizon)``, masked after an episode ends."""
    lp = jax.vmap(jax.vmap(policy.log_prob, (None, 0, 0)), (None, 0, 0))(params, traj.obs, traj.actions)
    return lp * traj.mask


def returns_to_go(rewards: jax.Array, gamma: float) -> jax.Array:
    """``G_t = Σ_{t' ≥ t} γ^{t'-t} r_t'`` along the last axis."""
    def back(acc, r):
        acc = r + gamma * acc
        return acc, acc

    _, out = jax.lax.scan(back, jnp.zeros(rewards.shape[:-1], rewards.dtype), jnp.moveaxis(rewards, -1, 0),
                          reverse=True)
    return jnp.moveaxis(out, 0, -1)


def discounted_return(rewards: jax.Array, gamma: float) -> jax.Array:
    """``Σ_t γ^t r_t`` along the last axis."""
    weights = gamma ** jnp.arange(rewards.shape[-1], dtype=rewards.dtype)
    return jnp.sum(rewards * weights.reshape((1,) * (rewards.ndim - 1) + weights.shape), axis=-1)


def _features(traj: Trajectories) -> jax.Array:
    """rllab's linear feature baseline's features: the observation, its square, t, t^2, t^3 (t in hundreds of
    steps) and 1."""
    episodes, horizon = traj.rewards.shape
    obs = jnp.clip(traj.obs.reshape(episodes, horizon, -1).astype(traj.rewards.dtype), -10, 10)
    t = jnp.broadcast_to((jnp.arange(horizon, dtype=obs.dtype) / 100.0)[None, :, None], (episodes, horizon, 1))
    return jnp.concatenate([obs, obs ** 2, t, t ** 2, t ** 3, jnp.ones_like(t)], axis=-1)


BASELINE_SOLVERS = ("cholesky", "lstsq")
REFINEMENT_STEPS = 2  # iterative refinement of the Cholesky solve: more accurate than the SVD's in float32


def fit_linear_baseline(traj: Trajectories, returns: jax.Array, reg: float = 1e-5,
                        solver: str = "cholesky") -> jax.Array:
    """The weights of the linear feature baseline: a ridge (``reg``) least-squares regression of the
    returns-to-go on ``_features`` over the episodes' live steps, ``(FᵀF + reg·I) w = Fᵀy``.

    ``solver="cholesky"`` (default): those normal equations, scaled to a unit diagonal (the features' scales
    differ by orders of magnitude), with a relative jitter of ``10·k·eps`` so the factorisation exists when
    features are collinear (a pendulum's cos² + sin² = 1 is the constant feature; there the normal
    equations alone are singular and an unguarded solve gives NaN), then ``REFINEMENT_STEPS`` steps of
    iterative refinement against the unjittered system, residuals computed from F itself. An 8×8 factorisation
    per task instead of an SVD of the (episodes·horizon)×8 matrix: 1.6× faster meta-steps at the paper's
    navigation settings, and predictions closer to float64's than the SVD's in float32 (see BENCHMARKS.md).
    ``solver="lstsq"``: the ridge problem as an SVD least squares of ``[F; √reg·I] w ≈ [y; 0]``."""
    if solver not in BASELINE_SOLVERS:
        raise ValueError(f"solver must be one of {BASELINE_SOLVERS}, got {solver!r}")
    feats = _features(traj) * traj.mask[..., None]
    k = feats.shape[-1]
    f = feats.reshape(-1, k)
    y = (returns * traj.mask).reshape(-1).astype(f.dtype)
    eye = jnp.eye(k, dtype=f.dtype)
    if solver == "lstsq":
        target = jnp.concatenate([y, jnp.zeros((k,), f.dtype)])
        return jnp.linalg.lstsq(jnp.concatenate([f, jnp.sqrt(jnp.asarray(reg, f.dtype)) * eye]), target)[0]
    gram = f.T @ f + reg * eye
    diag = jnp.diag(gram)
    scale = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)  # a dead feature: 1
    jitter = 10 * k * jnp.finfo(f.dtype).eps
    chol = jnp.linalg.cholesky(scale[:, None] * gram * scale[None, :] + jitter * eye)

    def solve(r):
        return scale * jax.scipy.linalg.cho_solve((chol, True), scale * r)

    w = solve(f.T @ y)
    for _ in range(REFINEMENT_STEPS):
        w = w + solve(f.T @ (y - f @ w) - reg * w)
    return w


def predict_linear_baseline(traj: Trajectories, weights: jax.Array) -> jax.Array:
    """The fitted baseline's value at every step of ``traj`` (0 after an episode ends)."""
    return (_features(traj) @ weights) * traj.mask


def linear_baseline(traj: Trajectories, returns: jax.Array, reg: float = 1e-5,
                    solver: str = "cholesky") -> jax.Array:
    """The MAML paper's baseline: a linear regression of the returns-to-go on ``_features``, fitted to the
    task's own episodes (ridge ``reg``; ``solver`` as ``fit_linear_baseline``'s), evaluated at every step."""
    return predict_linear_baseline(traj, fit_linear_baseline(traj, returns, reg, solver))


def advantages(traj: Trajectories, gamma: float, *, baseline: str | None = "linear", gae_lambda: float = 1.0,
               normalize: bool = False) -> jax.Array:
    """Advantages of every step, shape ``(episodes, horizon)``, constants for the gradient.

    ``baseline``: ``"linear"`` (``linear_baseline``) or None (the returns-to-go themselves). ``gae_lambda``
    below 1: GAE(λ) with the baseline as the value function (λ = 1: returns-to-go minus the baseline).
    ``normalize``: to mean 0 and standard deviation 1 over the task's steps."""
    rewards = traj.rewards
    returns = returns_to_go(rewards, gamma)
    if baseline is None:
        adv = returns
    else:
        values = linear_baseline(traj, returns)
        if gae_lambda == 1.0:
            adv = returns - values
        else:
            next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
            deltas = rewards + gamma * next_values - values
            adv = returns_to_go(deltas, gamma * gae_lambda)
    adv = adv * traj.mask
    if normalize:
        count = jnp.maximum(jnp.sum(traj.mask), 1.0)
        mean = jnp.sum(adv) / count
        std = jnp.sqrt(jnp.sum(jnp.square(adv - mean) * traj.mask) / count)
        adv = (adv - mean) / (std + 1e-8) * traj.mask
    return jax.lax.stop_gradient(adv)
