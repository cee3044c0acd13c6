r"""Environment families as pure functions: a task is a setting of the environment's parameters.

An ``Env`` is gymnax-style -- ``reset(key, task) -> (obs, state)`` and ``step(key, state, action, task) ->
(obs, state, reward, done)`` -- plus ``sample_task(key) -> task``, the distribution over task parameters
(goals, physical constants). Everything is a pure JAX function, so rollouts are a ``lax.scan`` over time,
vmapped over episodes and tasks, inside the compiled training loop.

Families:

* ``navigation2d`` -- the MAML paper's 2D navigation (§5.3): a point agent starts at the origin, the goal
  is uniform in ``[-0.5, 0.5]^2``, the reward is minus the distance to the goal, actions are clipped to
  ``±0.1``, horizon 100; with ``goal_tolerance=0.01`` an episode ends at the goal, as in the reference code.
* ``pendulum`` -- gymnax's ``Pendulum-v1`` dynamics with a sampled mass and length per task (swing up
  and hold; reward ``-(θ^2 + 0.1 θ'^2 + 0.001 u^2)``).
* ``cartpole`` -- gymnax's ``CartPole-v1`` with the pole's length and mass per task (``jmaml.rl.gymnax``, which
  makes any gymnax environment a family; the optional extra ``jmaml[gymnax]``).
* ``bandit`` -- a two-armed (``num_arms``) bandit played for ``horizon`` pulls, arm rewards a task's own
  (deterministic, so every expectation is a finite sum): the exact oracle of the meta-gradient tests.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml.core._checks import check_positive_finite, check_positive_int


class Env(NamedTuple):
    """A family of environments (a task: one setting of its parameters), as pure functions.

    Attributes:
      reset: ``reset(key, task) -> (obs, state)``.
      step: ``step(key, state, action, task) -> (obs, state, reward, done)``; ``reward`` a scalar, ``done``
        a bool (an episode that is done stops counting: later rewards and actions are masked).
      sample_task: ``sample_task(key) -> task``: one task's parameters (a pytree of arrays).
      observation_shape: the shape of one observation.
      action_shape: the shape of one action (``()`` for a discrete action).
      num_actions: the number of actions of a discrete environment; None for continuous actions.
      horizon: the steps of an episode.
      name: a short name for messages and result files.
    """

    reset: Callable[..., Any]
    step: Callable[..., Any]
    sample_task: Callable[..., Any]
    observation_shape: tuple[int, ...]
    action_shape: tuple[int, ...]
    num_actions: int | None
    horizon: int
    name: str


def _check_range(value: Any, name: str, *, positive: bool = True) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers, ``low <= high`` (and ``low > 0`` where ``positive``)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) for v in value)
    if not ok or value[0] > value[1] or (positive and value[0] <= 0):
        bound = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers with {bound}, got {value!r}")
    return float(value[0]), float(value[1])


def navigation2d(horizon: int = 100, max_action: float = 0.1, goal_range: float = 0.5,
                 goal_tolerance: float | None = None, normalized_actions: bool = False) -> Env:
    """The MAML paper's 2D navigation: observation the position, action a velocity clipped to
    ``±max_action``, reward ``-‖position - goal‖`` after each move, goals uniform in
    ``[-goal_range, goal_range]^2``.

    ``goal_tolerance``: the episode ends once both coordinates are within this distance of the goal's
    (cbfinn/maml_rl's point environment: ``|x - gx| < 0.01 and |y - gy| < 0.01``); the step that reaches it
    still counts, later steps are masked, so returns, baselines and gradients stay exact. None: the episode
    never ends early.

    ``normalized_actions``: the policy acts in units of ``max_action`` (the move is ``clip(max_action * a,
    ±max_action)``), as cbfinn/maml_rl's point environment does under rllab's ``normalize`` wrapper; a unit
    Gaussian policy then explores within the box instead of saturating it. False: the action is the velocity."""
    horizon = check_positive_int(horizon, "horizon")
    max_action = check_positive_finite(max_action, "max_action")
    goal_range = check_positive_finite(goal_range, "goal_range")
    if goal_tolerance is not None:
        goal_tolerance = check_positive_finite(goal_tolerance, "goal_tolerance")
    if not isinstance(normalized_actions, bool):
        raise TypeError(f"normalized_actions must be True or False, got {normalized_actions!r}")

    def reset(key, goal):
        pos = jnp.zeros((2,), goal.dtype)
        return pos, pos

    def step(key, pos, action, goal):
        pos = pos + jnp.clip(action, -max_action, max_action).astype(pos.dtype)
        distance = jnp.sqrt(jnp.sum(jnp.square(pos - goal)))
        done = jnp.zeros((), bool) if goal_tolerance is None else jnp.all(jnp.abs(pos - goal) < goal_tolerance)
        return pos, pos, -distance, done

    def step_in_units(key, pos, action, goal):  # rllab's normalize: a in [-1, 1] is a move of max_action * a
        return step(key, pos, max_action * action, goal)

    def sample_task(key):
        return jax.random.uniform(key, (2,), minval=-goal_range, maxval=goal_range)

    return Env(reset, step_in_units if normalized_actions else step, sample_task, (2,), (2,), None, horizon,
               "navigation2d")


class PendulumTask(NamedTuple):
    """A pendulum's physical constants."""

    mass: jax.Array
    length: jax.Array


def pendulum(horizon: int = 100, mass_range: tuple[float, float] = (0.5, 1.5),
             length_range: tuple[float, float] = (0.5, 1.5)) -> Env:
    """gymnax's ``Pendulum-v1`` (max speed 8, max torque 2, dt 0.05, g 10) with the mass and the length
    drawn uniformly per task; it starts at a uniform angle in ``[-π, π]`` and speed in ``[-1, 1]``.
    Observation ``(cos θ, sin θ, θ')``, action a torque clipped to ``±2``."""
    horizon = check_positive_int(horizon, "horizon")
    mass_range = _check_range(mass_range, "mass_range")
    length_range = _check_range(length_range, "length_range")
    max_speed, max_torque, dt, g = 8.0, 2.0, 0.05, 10.0

    def obs_of(state):
        theta, speed = state[0], state[1]
        return jnp.stack([jnp.cos(theta), jnp.sin(theta), speed])

    def reset(key, task):
        high = jnp.asarray([jnp.pi, 1.0])
        state = jax.random.uniform(key, (2,), minval=-high, maxval=high)
        return obs_of(state), state

    def step(key, state, action, task):
        theta, speed = state[0], state[1]
        u = jnp.clip(jnp.reshape(action, ()), -max_torque, max_torque)
        angle = ((theta + jnp.pi) % (2 * jnp.pi)) - jnp.pi
        reward = -(angle ** 2 + 0.1 * speed ** 2 + 0.001 * u ** 2)
        m, length = task.mass, task.length
        speed = speed + (3 * g / (2 * length) * jnp.sin(theta) + 3.0 / (m * length ** 2) * u) * dt
        speed = jnp.clip(speed, -max_speed, max_speed)
        state = jnp.stack([theta + speed * dt, speed])
        return obs_of(state), state, reward, jnp.zeros((), bool)

    def sample_task(key):
        k1, k2 = jax.random.split(key)
        return PendulumTask(jax.random.uniform(k1, (), minval=mass_range[0], maxval=mass_range[1]),
                            jax.random.uniform(k2, (), minval=length_range[0], maxval=length_range[1]))

    return Env(reset, step, sample_task, (3,), (1,), None, horizon, "pendulum")


def bandit(num_arms: int = 2, horizon: int = 2) -> Env:
    """A ``num_arms``-armed bandit pulled ``horizon`` times; a task is the arms' rewards (uniform in
    [0, 1], deterministic). The observation is the pull's index as a one-hot vector, so a tabular policy
    has a row per pull."""
    num_arms = check_positive_int(num_arms, "num_arms")
    horizon = check_positive_int(horizon, "horizon")

    def reset(key, rewards):
        return jax.nn.one_hot(0, horizon, dtype=rewards.dtype), jnp.zeros((), jnp.int32)

    def step(key, t, action, rewards):
        reward = rewards[action]
        t = t + 1
        return jax.nn.one_hot(t, horizon, dtype=rewards.dtype), t, reward, jnp.zeros((), bool)

    def sample_task(key):
        return jax.random.uniform(key, (num_arms,))

    return Env(reset, step, sample_task, (horizon,), (), num_arms, horizon, "bandit")


def cartpole(horizon: int = 100) -> Env:
    """gymnax's ``CartPole-v1`` with the pole's half-length in [0.25, 1] and mass in [0.05, 0.3] drawn per task
    (``jmaml.rl.gymnax``; needs ``pip install 'jmaml[gymnax]'``). Discrete actions; an episode ends when the pole
    falls or the cart leaves the track."""
    import importlib

    # loaded by name: jmaml.rl.gymnax builds on this module's Env (an optional extra, so not imported here)
    return importlib.import_module("jmaml.rl.gymnax").named("cartpole", horizon)


def _locomotion(name: str) -> Callable[..., Env]:
    def make(horizon: int = 200) -> Env:
        import importlib

        # loaded by name: jmaml.rl.brax builds on this module's Env (an optional extra, so not imported here)
        return importlib.import_module("jmaml.rl.brax").family(name, horizon)

    make.__doc__ = f"brax's {name.replace('_', ' goal ')} (jmaml.rl.brax; pip install 'jmaml[brax]')."
    return make


LOCOMOTION = ("halfcheetah_velocity", "halfcheetah_direction", "ant_velocity", "ant_direction")
ENVS: dict[str, Callable[..., Env]] = {"navigation2d": navigation2d, "pendulum": pendulum, "bandit": bandit,
                                       "cartpole": cartpole, **{n: _locomotion(n) for n in LOCOMOTION}}
