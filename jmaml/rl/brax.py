"""The MAML paper's locomotion tasks on brax: half-cheetah and ant with a goal velocity or a goal direction per
task (Finn et al. 2017, §5.3), as jmaml ``Env`` families -- brax's physics inside the compiled step, vmapped over
episodes and tasks like every jmaml environment. Needs ``pip install 'jmaml[brax]'``.

The rewards are the reference environments' (cbfinn/maml_rl's ``half_cheetah_env_rand``,
``half_cheetah_env_rand_direc``, ``ant_env_rand_goal``-style velocity and ``ant_env_rand_direc``), computed from
brax's forward velocity of the torso and the action:

* half-cheetah, velocity ``v*`` ~ U[0, 2]: ``-|v - v*| - 0.05 Σ a²``; direction ``d`` ∈ {-1, +1}:
  ``d v - 0.05 Σ a²``; episodes never end early.
* ant, velocity ``v*`` ~ U[0, 3]: ``-|v - v*| - 0.005 Σ a² + 0.05``; direction: ``d v - 0.005 Σ a² + 0.05``;
  an episode ends when the torso leaves brax's healthy height range (0.2, 1.0), as the reference's ``done``.
  The reference's contact cost (0.5e-3 Σ clip(contact forces)²) is left out: brax's ant does not compute
  contact forces by default; written down here as the one difference.

``backend``: brax's physics pipeline -- ``"mjx"`` (MuJoCo's own, as the paper's MuJoCo; the default),
``"generalized"``, ``"positional"`` or ``"spring"`` (cheaper approximations).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmaml.core._checks import check_positive_int
from jmaml.core._util import default_float
from jmaml.rl.envs import Env

ROBOTS = ("halfcheetah", "ant")
GOALS = ("velocity", "direction")
BACKENDS = ("mjx", "generalized", "positional", "spring")
# per robot: the goal velocities' range, the control cost's weight, the survival bonus
_REFERENCE = {"halfcheetah": ((0.0, 2.0), 0.05, 0.0), "ant": ((0.0, 3.0), 0.005, 0.05)}


def _brax_envs():
    try:
        from brax import envs
    except ImportError:
        raise ImportError("the locomotion tasks need brax: pip install 'jmaml[brax]'") from None
    return envs


def locomotion(robot: str = "halfcheetah", goal: str = "velocity", horizon: int = 200, backend: str = "mjx") -> Env:
    """A family of ``robot`` ("halfcheetah", "ant") tasks, each a goal ``velocity`` or ``direction`` (see the
    module's docstring for the rewards); ``horizon`` steps per episode (the paper's: 200).

    Raises: ImportError without brax; ValueError naming an unknown robot, goal or backend."""
    if robot not in ROBOTS:
        raise ValueError(f"robot must be one of {ROBOTS}, got {robot!r}")
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    horizon = check_positive_int(horizon, "horizon")
    # brax broadcasts by rank promotion internally: allowed inside its calls, whatever the caller's setting
    with jax.numpy_rank_promotion("allow"):
        env = _brax_envs().get_environment(robot, backend=backend)
    (low, high), ctrl_weight, survive = _REFERENCE[robot]
    dtype = default_float()

    def reset(key, task):
        with jax.numpy_rank_promotion("allow"):
            state = env.reset(key)
        return state.obs.astype(dtype), state

    def step(key, state, action, task):
        with jax.numpy_rank_promotion("allow"):
            state = env.step(state, action)
        velocity = state.metrics["x_velocity"]
        forward = -jnp.abs(velocity - task) if goal == "velocity" else task * velocity
        reward = forward - ctrl_weight * jnp.sum(jnp.square(action)) + survive
        return state.obs.astype(dtype), state, reward.astype(dtype), state.done > 0

    def sample_task(key):
        if goal == "velocity":
            return jax.random.uniform(key, (), dtype, minval=low, maxval=high)
        return jnp.where(jax.random.bernoulli(key), 1.0, -1.0).astype(dtype)

    return Env(reset, step, sample_task, (env.observation_size,), (env.action_size,), None, horizon,
               f"{robot}_{goal}")


def family(name: str, horizon: int = 200, backend: str = "mjx") -> Env:
    """``"halfcheetah_velocity"``, ``"halfcheetah_direction"``, ``"ant_velocity"`` or ``"ant_direction"``."""
    robot, _, goal = name.partition("_")
    return locomotion(robot, goal, horizon, backend)


FAMILIES = tuple(f"{r}_{g}" for r in ROBOTS for g in GOALS)

