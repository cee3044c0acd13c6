r"""Differentiable inner optimisers: the inner loop's update rule as an optax transformation.

``jmaml.adapt(..., inner_optimiser=opt)`` runs any ``optax.GradientTransformation`` in the inner
loop: its state is initialised per task and lives in the ``lax.scan`` carry, and second-order
meta-gradients flow through the updates and the state. The factories here build the usual ones with
two things a meta-learner needs that plain optax does not give:

* **Hyperparameters in the state, of any shape.** Every factory is wrapped by ``injectable``, so its
  hyperparameters (rate, momentum, β₁, β₂ ...) sit in ``state.hyperparams`` where a learner can set
  them per task — traced, swept or meta-learned — as scalars, per-parameter trees (Meta-SGD) or with
  a leading axis of one value per inner step (``per_step=True``, MAML++'s per-step rates).
* **Safe second order.** Adam's and RMSprop's √ν has an infinite derivative at ν = 0 (a parameter
  whose gradient is still zero), which makes the second-order meta-gradient NaN; here ``adam`` adds
  ``eps_root = 1e-12`` under the root by default and ``rmsprop`` puts its ``eps`` under the root.

With ``sgd(α)`` the inner loop computes what jmaml's built-in SGD step does (``p + (−α·g)``, which
equals ``p − α·g`` exactly in floating point).

References:
  Finn, Abbeel & Levine (2017) for the inner loop; Li et al. (2017) Meta-SGD and Antoniou et al.
  (2019) MAML++ for learned per-parameter and per-step rates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmaml.core._checks import check_rate, concrete_or_none


class InjectableState(NamedTuple):
    """An ``injectable`` transformation's state: its hyperparameters and its inner state."""

    hyperparams: dict[str, Any]
    inner_state: Any
    count: jax.Array  # type: ignore[assignment]  # shape=(), int32: steps taken (indexes per-step hyperparameters)


def injectable(factory: Callable[..., optax.GradientTransformation],
               **hyperparams: Any) -> optax.GradientTransformation:
    """Like ``optax.inject_hyperparams``, for hyperparameters that may be pytrees: the transformation
    ``factory(**hyperparams)`` is rebuilt from ``state.hyperparams`` at every update, so changing them
    in the state (``set_hyperparams``) changes the rule, and gradients reach them.

    ``factory`` receives the step count as the keyword ``count`` if it takes one (per-step values).
    """
    takes_count = "count" in inspect.signature(factory).parameters

    def build(hyper, count):
        return factory(**hyper, count=count) if takes_count else factory(**hyper)

    def init(params):
        hyper = {k: jax.tree.map(jnp.asarray, v) for k, v in hyperparams.items()}
        return InjectableState(hyper, build(hyper, jnp.zeros((), jnp.int32)).init(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        new_updates, inner = build(state.hyperparams, state.count).update(updates, state.inner_state, params)
        return new_updates, InjectableState(state.hyperparams, inner, state.count + 1)

    return optax.GradientTransformation(init, update)


def set_hyperparams(state: Any, hyper: dict[str, Any]) -> Any:
    """``state`` with some hyperparameters replaced (an ``injectable`` or ``optax.inject_hyperparams``
    state). Raises TypeError naming a hyperparameter that is not injectable."""
    if not hyper:
        return state
    current = getattr(state, "hyperparams", None)
    if not isinstance(current, dict):
        raise TypeError(f"hyperparameters {sorted(hyper)} are not injectable into this inner optimiser: build it "
                        "with jmaml.inner_optimisers (or optax.inject_hyperparams)")
    unknown = sorted(set(hyper) - set(current))
    if unknown:
        raise TypeError(f"hyperparameters {unknown} are not injectable into this inner optimiser; it has "
                        f"{sorted(current)}")
    return state._replace(hyperparams={**current, **hyper})


def _rate(rate: Any, count: Any, per_step: bool) -> Any:
    return jax.tree.map(lambda r: r[count], rate) if per_step else rate


def _scale_by_rate(rate: Any) -> optax.GradientTransformation:
    """``updates ↦ −rate ⊙ updates`` with ``rate`` a scalar or a tree like the updates."""
    def update(updates, state, params=None):
        if jax.tree.structure(rate) == jax.tree.structure(updates):
            return jax.tree.map(lambda u, r: (-r * u).astype(u.dtype), updates, rate), state
        return jax.tree.map(lambda u: (-rate * u).astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _check(name: str, value: Any, *, allow_zero: bool = True, below_one: bool = False) -> None:
    check_rate(value, name, allow_zero=allow_zero)
    if below_one:  # a decay rate (momentum, β₁, β₂, ρ): 1 or more makes the average grow without bound
        for leaf in jax.tree.leaves(value):
            arr = concrete_or_none(leaf)
            if arr is not None and np.any(np.asarray(arr) >= 1):
                raise ValueError(f"{name} must be in [0, 1) (a decay rate), got {value!r}")


def _leafwise(h: Any, updates: Any) -> Any:
    """``h`` as a tree like ``updates``: itself when it is one (per-parameter values), else broadcast."""
    same = jax.tree.structure(h) == jax.tree.structure(updates)  # type: ignore[operator]
    return h if same else jax.tree.map(lambda _: h, updates)


def _is_scalar(h: Any) -> bool:
    leaves = jax.tree.leaves(h)
    return len(leaves) == 1 and jnp.ndim(leaves[0]) == 0


def _trace(decay: Any, nesterov: bool) -> optax.GradientTransformation:
    """``optax.trace`` for a decay that may be a tree like the parameters (a per-parameter momentum); the
    same state, so the two are interchangeable when a learned scalar becomes per-parameter."""
    def update(updates, state, params=None):
        mu = _leafwise(decay, updates)
        velocity = jax.tree.map(lambda g, v, m: g + m * v, updates, state.trace, mu)
        out = jax.tree.map(lambda g, v, m: g + m * v, updates, velocity, mu) if nesterov else velocity
        return out, state._replace(trace=velocity)

    return optax.GradientTransformation(optax.trace(decay=0.0, nesterov=nesterov).init, update)


def _scale_by_adam(b1: Any, b2: Any, eps: Any, eps_root: Any) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` for hyperparameters that may be trees like the parameters (same state)."""
    def update(updates, state, params=None):
        h = [_leafwise(x, updates) for x in (b1, b2, eps, eps_root)]
        count = state.count + 1
        mu = jax.tree.map(lambda g, m, a: a * m + (1 - a) * g, updates, state.mu, h[0])
        nu = jax.tree.map(lambda g, n, b: b * n + (1 - b) * jnp.square(g), updates, state.nu, h[1])

        def step(m, n, a, b, e, r):
            m_hat, n_hat = m / (1 - a ** count), n / (1 - b ** count)
            return m_hat / (jnp.sqrt(n_hat + r) + e)

        return jax.tree.map(step, mu, nu, *h), state._replace(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(optax.scale_by_adam().init, update)


def sgd(learning_rate: Any, *, per_step: bool = False) -> optax.GradientTransformation:
    """Plain gradient steps ``p ← p − α ⊙ g``; ``learning_rate`` a scalar, a tree like the parameters
    (per-parameter rates) or, with ``per_step``, either with a leading axis of one value per step."""
    _check("learning_rate", learning_rate)

    def factory(learning_rate, count):
        return _scale_by_rate(_rate(learning_rate, count, per_step))

    return injectable(factory, learning_rate=learning_rate)


def momentum(learning_rate: Any, momentum: float = 0.9, *, nesterov: bool = False,
             per_step: bool = False) -> optax.GradientTransformation:
    r"""Heavy-ball momentum :math:`v ← g + μv,\ p ← p − αv` (Nesterov's with ``nesterov``)."""
    _check("learning_rate", learning_rate)
    _check("momentum", momentum, below_one=True)

    def factory(learning_rate, momentum, count):
        trace = optax.trace(decay=momentum, nesterov=nesterov) if _is_scalar(momentum) else \
            _trace(momentum, nesterov)  # per-parameter values (learned per parameter)
        return optax.chain(trace, _scale_by_rate(_rate(learning_rate, count, per_step)))

    return injectable(factory, learning_rate=learning_rate, momentum=momentum)


_heavy_ball = momentum  # the parameter named momentum shadows the function inside nesterov


def nesterov(learning_rate: Any, momentum: float = 0.9, *, per_step: bool = False) -> optax.GradientTransformation:
    """Nesterov momentum (``momentum(..., nesterov=True)``)."""
    return _heavy_ball(learning_rate, momentum, nesterov=True, per_step=per_step)


def adam(learning_rate: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 1e-12, *,
         per_step: bool = False) -> optax.GradientTransformation:
    r"""Adam with ``eps_root > 0`` by default: :math:`\hat m / (\sqrt{\hat v + ε_{root}} + ε)`, so the
    second-order meta-gradient stays finite where a gradient is zero (√ν's derivative is infinite at 0).

    Raises:
      ValueError: ``eps_root`` <= 0 (the second-order meta-gradient would be NaN).
    """
    _check("learning_rate", learning_rate)
    _check("b1", b1, below_one=True)
    _check("b2", b2, below_one=True)
    _check("eps", eps)
    _check("eps_root", eps_root, allow_zero=False)

    def factory(learning_rate, b1, b2, eps, eps_root, count):
        scalar = all(_is_scalar(h) for h in (b1, b2, eps, eps_root))
        scale = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root) if scalar else \
            _scale_by_adam(b1, b2, eps, eps_root)  # per-parameter values (learned per parameter)
        return optax.chain(scale, _scale_by_rate(_rate(learning_rate, count, per_step)))

    return injectable(factory, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)


def _scale_by_rms(decay: Any, eps: Any) -> optax.GradientTransformation:
    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, nu, params=None):
        rho, e = _leafwise(decay, updates), _leafwise(eps, updates)
        nu = jax.tree.map(lambda n, g, r: r * n + (1 - r) * jnp.square(g), nu, updates, rho)
        return jax.tree.map(lambda g, n, ee: g / jnp.sqrt(n + ee), updates, nu, e), nu

    return optax.GradientTransformation(init, update)


def rmsprop(learning_rate: Any, decay: float = 0.9, eps: float = 1e-8, *,
            per_step: bool = False) -> optax.GradientTransformation:
    r"""RMSprop :math:`ν ← ρν + (1−ρ)g²,\ p ← p − α g/\sqrt{ν + ε}` (ε under the root: finite second order).

    Raises:
      ValueError: ``eps`` <= 0.
    """
    _check("learning_rate", learning_rate)
    _check("decay", decay, below_one=True)
    _check("eps", eps, allow_zero=False)

    def factory(learning_rate, decay, eps, count):
        return optax.chain(_scale_by_rms(decay, eps), _scale_by_rate(_rate(learning_rate, count, per_step)))

    return injectable(factory, learning_rate=learning_rate, decay=decay, eps=eps)


# name -> (factory, its settings besides the rate, with defaults): what --inner-optimiser offers
REGISTRY: dict[str, tuple[Callable[..., optax.GradientTransformation], dict[str, float]]] = {
    "sgd": (sgd, {}),
    "momentum": (momentum, {"momentum": 0.9}),
    "nesterov": (nesterov, {"momentum": 0.9}),
    "adam": (adam, {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 1e-12}),
    "rmsprop": (rmsprop, {"decay": 0.9, "eps": 1e-8}),
}


def make(name: str, learning_rate: Any, /, **settings: Any) -> optax.GradientTransformation:
    """The registered inner optimiser ``name`` at ``learning_rate`` with its settings.

    Raises:
      ValueError: an unknown name or setting (naming the choices).
    """
    if name not in REGISTRY:
        raise ValueError(f"inner_optimiser must be one of {', '.join(REGISTRY)}; got {name!r}")
    factory, defaults = REGISTRY[name]
    if "learning_rate" in settings:
        raise ValueError(f"inner optimiser {name!r}: learning_rate is the inner rate, set by inner_lr (--inner-lr), "
                         "not by its settings")
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"inner optimiser {name!r} takes settings {sorted(defaults) or 'none'}; got {unknown}")
    return factory(learning_rate, **{**defaults, **settings})
