"""iMAML: Rajeswaran, Finn, Kakade & Levine (2019), Meta-Learning with Implicit Gradients.

The inner problem carries a proximal term λ/2‖φ − θ‖²; the meta-gradient solves (I + H/λ) v =
∇L_Q(φ) by conjugate gradient on Hessian-vector products (an approximation of the gradient of the
query loss at the inner problem's minimiser, so ``exact_gradient`` is False). At test time: k
proximal gradient steps at α with the same λ.
"""

from __future__ import annotations

from typing import Any

from jmaml.core import estimators
from jmaml.core._checks import check_positive_finite, check_positive_int
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn
from jmaml.learners._common import Option, fixed_rates, rate_rule

OPTIONS = (
    Option("imaml_lambda", 1.0, "proximal strength lambda (default 1)", arg="lam", check=check_positive_finite),
    Option("imaml_cg_iters", 5, "conjugate-gradient iterations (default 5)", type=int, arg="cg_iters",
           check=check_positive_int),
)


def imaml(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, lam: float = 1.0, cg_iters: int = 5,
          reduction: str = "mean", unroll: int | bool = 1, remat: bool = False) -> MetaLearner:
    """iMAML with proximal strength ``lam`` and ``cg_iters`` conjugate-gradient iterations."""
    if remat:
        raise ValueError("remat is not available for algo 'imaml': iMAML keeps nothing per inner step anyway")
    est = estimators.imaml(loss_fn, num_inner_steps=num_inner_steps, lam=lam, cg_iters=cg_iters,
                           reduction=reduction, unroll=unroll)

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr):
        return est(params, tasks, inner_lr=inner_lr, meta_step=meta_step)

    rates = lambda _, n, inner_lr=inner_lr: fixed_rates(inner_lr, n)
    return MetaLearner(reduction=reduction, init=lambda params: params, estimate=estimate,
                       adapt=rate_rule(loss_fn, rates, prox_lambda=float(lam)), name="imaml", label="iMAML",
                       exact_gradient=False, hyper={"inner_lr": inner_lr})
