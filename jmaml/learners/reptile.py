"""Reptile: Nichol, Achiam & Schulman (2018), On First-Order Meta-Learning Algorithms.

The "gradient" is θ − mean_j φ_j, with φ_j k SGD steps from θ on all of task j's data (support and
query together): not the gradient of any loss, so ``exact_gradient`` is False. At test time: k SGD
steps at α on the support set.
"""

from __future__ import annotations

from typing import Any

from jmaml.core import estimators
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn
from jmaml.learners._common import fixed_rates, rate_rule

OPTIONS = ()


def reptile(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, unroll: int | bool = 1,
            remat: bool = False, reduction: str = "mean") -> MetaLearner:
    """Reptile (``num_inner_steps`` >= 1); ``estimate(params, tasks, meta_step, *, inner_lr)``.

    ``reduction`` is accepted for a uniform signature; Reptile always averages its directions.
    """
    del reduction
    est = estimators.reptile(loss_fn, num_inner_steps=num_inner_steps, unroll=unroll, remat=remat)

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr):
        return est(params, tasks, inner_lr=inner_lr, meta_step=meta_step)

    rates = lambda _, n, inner_lr=inner_lr: fixed_rates(inner_lr, n)
    return MetaLearner(init=lambda params: params, estimate=estimate, adapt=rate_rule(loss_fn, rates),
                       name="reptile", label="Reptile", exact_gradient=False, hyper={"inner_lr": inner_lr})
