"""Any gymnax environment as a family of tasks: its ``EnvParams`` (a pytree of physical constants) is the task.

``family(env, ranges={...})`` (or ``sample_params=``) turns a gymnax environment into jmaml's ``Env``: ``reset``
and ``step`` are gymnax's own dynamics at the task's parameters (``reset_env``/``step_env``: no automatic reset;
the steps after an episode ends are masked, as every jmaml environment's), ``sample_task`` draws the parameters.
Discrete actions (CartPole, Acrobot, MountainCar) take ``policies.categorical_mlp``, continuous ones (Pendulum,
MountainCarContinuous) ``policies.gaussian_mlp`` (``policy_for``). Needs ``pip install 'jmaml[gymnax]'``.

    >>> from jmaml.rl import gymnax as gx
    >>> env = gx.family("CartPole-v1", ranges={"length": (0.25, 0.75)}, horizon=50)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jmaml.core._checks import check_positive_int
from jmaml.core._util import default_float
from jmaml.rl.envs import Env
from jmaml.rl.policies import Policy, categorical_mlp, gaussian_mlp


def _cartpole_physics(params: Any) -> Any:
    """CartPole's fields derived from the drawn ones (gymnax's step reads them, not the masses)."""
    return params.replace(total_mass=params.masscart + params.masspole,
                          polemass_length=params.masspole * params.length)


# The families `jmaml rl --env` offers: a gymnax environment, the physics each task draws (uniform ranges around
# gymnax's defaults: CartPole's pole half-length 0.5 and mass 0.1) and the fields derived from them
FAMILIES: dict[str, tuple[str, dict[str, tuple[float, float]], Callable[[Any], Any]]] = {
    "cartpole": ("CartPole-v1", {"length": (0.25, 1.0), "masspole": (0.05, 0.3)}, _cartpole_physics),
}


def _gymnax():
    try:
        import gymnax
    except ImportError:
        raise ImportError("gymnax environments need the gymnax package: pip install 'jmaml[gymnax]'") from None
    return gymnax


def family(env: Any, *, ranges: Mapping[str, tuple[float, float]] | None = None,
           sample_params: Callable[[jax.Array, Any], Any] | None = None, derive: Callable[[Any], Any] | None = None,
           horizon: int | None = None, params: Any = None, name: str | None = None) -> Env:
    """A gymnax environment as jmaml's ``Env`` family.

    Args:
      env: a gymnax environment id (``"CartPole-v1"``) or a ``gymnax`` environment object.
      ranges: ``{field: (low, high)}``: each task draws these ``EnvParams`` fields uniformly, the others keep
        their defaults. Or ``sample_params(key, default_params) -> params``. One of the two.
      derive: ``derive(params) -> params``: recomputes fields that depend on the drawn ones (CartPole's
        ``total_mass`` and ``polemass_length``, which its dynamics read).
      horizon: steps per episode (default: the environment's ``max_steps_in_episode``); an episode also ends
        when gymnax says it is done.
      params: the default ``EnvParams`` (default: the environment's).
      name: for messages and result files (default: the environment's id).

    Raises:
      ImportError: gymnax is not installed. ValueError: an unknown id or field, a bad range, both or neither of
      ``ranges`` and ``sample_params``.
    """
    gymnax = _gymnax()
    if isinstance(env, str):
        if env not in gymnax.registered_envs:
            raise ValueError(f"env {env!r} is not a gymnax environment; gymnax has {sorted(gymnax.registered_envs)}")
        env_id = env
        env, default = gymnax.make(env)
    else:
        env_id = getattr(env, "name", type(env).__name__)
        default = env.default_params
    default = default if params is None else params
    if (ranges is None) == (sample_params is None):
        raise ValueError("give ranges={field: (low, high)} or sample_params(key, default_params), one of the two")
    if ranges is not None:
        sample_params = _uniform(default, ranges)
    assert sample_params is not None
    draw = sample_params if derive is None else (lambda key, p: derive(sample_params(key, p)))
    steps = getattr(default, "max_steps_in_episode", None) if horizon is None else horizon
    horizon = check_positive_int(steps, "horizon")
    obs_shape = tuple(env.observation_space(default).shape)
    space = env.action_space(default)
    discrete = hasattr(space, "n")
    dtype = default_float()

    def reset(key, task):
        obs, state = env.reset_env(key, task)
        return jnp.asarray(obs, dtype).reshape(obs_shape), state

    def step(key, state, action, task):
        obs, state, reward, done, _ = env.step_env(key, state, action, task)
        return jnp.asarray(obs, dtype).reshape(obs_shape), state, jnp.asarray(reward, dtype), jnp.asarray(done, bool)

    def sample_task(key):
        return draw(key, default)

    return Env(reset, step, sample_task, obs_shape, () if discrete else tuple(space.shape),
               int(space.n) if discrete else None, horizon, name or env_id)


def _uniform(default: Any, ranges: Mapping[str, tuple[float, float]]) -> Callable[[jax.Array, Any], Any]:
    known = {f for f in getattr(default, "__dataclass_fields__", {})}
    for field, bounds in ranges.items():
        if field not in known:
            raise ValueError(f"ranges: {field!r} is not a field of {type(default).__name__}; it has {sorted(known)}")
        ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(
            not isinstance(b, bool) and isinstance(b, numbers.Real) and math.isfinite(b) for b in bounds)
        if not ok or bounds[0] > bounds[1]:
            raise ValueError(f"ranges[{field!r}] must be a pair (low, high) of finite numbers, low <= high, "
                             f"got {bounds!r}")
    names = sorted(ranges)

    def sample(key, params):
        keys = jax.random.split(key, len(names))
        drawn = {f: jax.random.uniform(k, (), minval=ranges[f][0], maxval=ranges[f][1]) for f, k in zip(names, keys)}
        return params.replace(**drawn)

    return sample


def named(name: str, horizon: int = 100) -> Env:
    """One of ``FAMILIES`` (``"cartpole"``: CartPole-v1 with the pole's length and mass drawn per task)."""
    env_id, ranges, derive = FAMILIES[name]
    return family(env_id, ranges=ranges, derive=derive, horizon=horizon, name=name)


def policy_for(env: Env, hidden: tuple[int, ...] = (100, 100)) -> Policy:
    """The MLP policy that fits ``env``: a softmax over its actions, or a diagonal Gaussian."""
    if env.num_actions is not None:
        return categorical_mlp(env.observation_shape[0], env.num_actions, hidden)
    return gaussian_mlp(env.observation_shape[0], env.action_shape[0], hidden)
