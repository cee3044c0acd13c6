"""MAML++: Antoniou, Edwards & Storkey (2019), How to train your MAML.

Learned per-step, per-tensor inner rates (LSLR), the multi-step loss with weights annealed towards
the last step, and derivative-order annealing. At test time: step t uses the learned rates of
step t (the last trained step's beyond k).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jmaml.core import estimators
from jmaml.core._checks import check_nonnegative_int, check_positive_int
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn
from jmaml.learners._common import Option, rate_rule
from jmaml.learners.metasgd import RATE_META_LR


def _check_anneal(value, name):
    return value if value is None else check_positive_int(value, name)


OPTIONS = (
    Option("mamlpp_msl", True, "the multi-step loss (else the query loss after the last step only)", type=bool,
           arg="multi_step_loss"),
    Option("mamlpp_msl_anneal_steps", None, "meta-steps over which the multi-step-loss weights anneal to the last "
           "step (default: a tenth of the run's steps)", type=int, arg="msl_anneal_steps", check=_check_anneal,
           run_default=lambda steps: max(1, steps // 10)),
    Option("mamlpp_first_order_steps", 0, "derivative-order annealing: first-order gradients before this meta-step "
           "(default 0: second order throughout)", type=int, arg="first_order_steps", check=check_nonnegative_int),
    RATE_META_LR,
)


def mamlpp(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, multi_step_loss: bool = True,
           msl_anneal_steps: int | None = None, first_order_steps: int = 0, reduction: str = "mean",
           unroll: int | bool = True, remat: bool = False) -> MetaLearner:
    """MAML++ (see ``jmaml.estimators.mamlpp``); ``inner_lr`` initialises every learned rate."""
    if remat:
        raise ValueError("remat is not available for algo 'mamlpp': MAML++ unrolls its per-step rates")
    est = estimators.mamlpp(loss_fn, num_inner_steps=num_inner_steps, multi_step_loss=multi_step_loss,
                            msl_anneal_steps=msl_anneal_steps, first_order_steps=first_order_steps,
                            reduction=reduction, unroll=unroll)

    def estimate(meta_params, tasks, meta_step=None):
        return est(meta_params, tasks, meta_step=meta_step)

    last = num_inner_steps - 1
    rates = lambda mp, n: jax.tree.map(lambda r: r[jnp.minimum(jnp.arange(n), last)], mp.inner_lr)
    model_params = lambda mp: mp.params
    return MetaLearner(init=lambda params: estimators.mamlpp_init(params, inner_lr, num_inner_steps),
                       estimate=estimate, adapt=rate_rule(loss_fn, rates, model_params=model_params), name="mamlpp",
                       label="MAML++", exact_gradient=first_order_steps == 0, model_params=model_params,
                       reduction=reduction)
