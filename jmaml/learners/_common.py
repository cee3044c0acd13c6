r"""What several learners share: their options' declaration, and the test-time rule of the
gradient-step learners written once.

The gradient-step rule (MAML, FOMAML, Reptile, ANIL, Meta-SGD, MAML++, iMAML) is, per test step t,

.. math::  \varphi \leftarrow \varphi - r_t \odot (\nabla\mathcal{L}_S(\varphi) + \lambda(\varphi - \theta))

with per-step rate trees :math:`r_t` and a proximal strength λ (0 for all but iMAML): each learner
module says which rates, this module runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jmaml.core._util import default_float
from jmaml.core.inner import adapt
from jmaml.core.types import LossFn, Params


@dataclasses.dataclass(frozen=True)
class Option:
    """One option a learner owns: its name (in ``TrainConfig.algo_options``, run dirs and, with
    ``_`` as ``-``, the CLI flag ``--NAME``), the factory's keyword argument, default, type and help.

    ``check(value, name)`` validates a value (raising ValueError/TypeError naming ``name``);
    ``run_default(steps)`` resolves a ``None`` default from the run's length; ``meta_optimiser``
    marks an option of the meta-optimiser rather than of the factory (e.g. ``rate_meta_lr``).
    """

    name: str
    default: Any
    help: str
    type: type = float
    arg: str | None = None
    check: Callable[[Any, str], Any] | None = None
    run_default: Callable[[int], Any] | None = None
    meta_optimiser: bool = False

    @property
    def kwarg(self) -> str:
        return self.arg or self.name


def fixed_rates(inner_lr: Any, num_steps: int) -> jax.Array:
    """One scalar rate per test step."""
    return jnp.full((num_steps,), inner_lr, default_float())


def gradient_adapt(loss_fn: LossFn, params: Params, support: Any, step_rates: Any, *, prox_lambda: float = 0.0,
                   observe: Callable[..., Any] | None = None, model_state: Any = None):
    """Adapts one task's ``params`` by one (proximal) gradient step per leading entry of ``step_rates``
    (``jmaml.adapt`` with per-step rates: the one inner loop).

    Returns the adapted parameters, or with ``observe`` ``(params, values)``: ``observe`` at the
    parameters before each step and after the last, stacked (leading axis ``num_steps + 1``). With
    ``model_state`` (a stateful loss), the state is threaded through the steps as in training and
    ``observe(params, state)`` sees it; without ``observe`` the return is ``(params, state)``.
    """
    num_steps = int(jax.tree.leaves(step_rates)[0].shape[0])
    return adapt(loss_fn, params, support, inner_lr=step_rates, num_steps=num_steps, per_step=True,
                 prox_lambda=prox_lambda, observe=observe, model_state=model_state)


def rate_rule(loss_fn: LossFn, step_rates: Callable[..., Any], *, prox_lambda: float = 0.0,
              model_params: Callable[[Any], Params] = lambda mp: mp):
    """A learner's ``adapt`` from its rule: ``step_rates(meta_params, num_steps, **hyper)`` gives
    the rate tree of each step (leading axis ``num_steps``)."""
    def adapt(meta_params: Any, support: Any, num_steps: int, *, observe=None, **hyper):
        return gradient_adapt(loss_fn, model_params(meta_params), support, step_rates(meta_params, num_steps, **hyper),
                              prox_lambda=prox_lambda, observe=observe)

    return adapt
