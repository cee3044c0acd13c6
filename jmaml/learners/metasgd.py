"""Meta-SGD: Li, Zhou, Chen & Li (2017), Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.

A learned inner rate per parameter (a tree like θ), meta-learned with θ; the meta-parameters are
``MetaSGDParams(params, inner_lr)``. At test time: SGD steps at the learned rates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jmaml.core import estimators
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn
from jmaml.learners._common import Option, rate_rule


def _check_rate_lr(value, name):
    from jmaml.core._checks import check_rate

    if value is not None:
        check_rate(value, name)
    return value


# Shared by the learners whose inner rates are meta-parameters (Meta-SGD, MAML++).
RATE_META_LR = Option("rate_meta_lr", None, "meta rate of the learned inner rates (default: the meta rate); "
                      "e.g. 1e-5 keeps Adam from moving them by about the meta rate per step",
                      check=_check_rate_lr, meta_optimiser=True)
OPTIONS = (RATE_META_LR,)


def meta_sgd(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, reduction: str = "mean",
             unroll: int | bool = 1, remat: bool = False) -> MetaLearner:
    """Meta-SGD; ``inner_lr`` is the initial value of every learned rate."""
    est = estimators.meta_sgd(loss_fn, num_inner_steps=num_inner_steps, reduction=reduction, unroll=unroll,
                              remat=remat)

    def estimate(meta_params, tasks, meta_step=None):
        return est(meta_params, tasks, meta_step=meta_step)

    rates = lambda mp, n: jax.tree.map(lambda r: jnp.broadcast_to(r, (n, *r.shape)), mp.inner_lr)
    model_params = lambda mp: mp.params
    return MetaLearner(init=lambda params: estimators.meta_sgd_init(params, inner_lr), estimate=estimate,
                       adapt=rate_rule(loss_fn, rates, model_params=model_params), name="metasgd", label="Meta-SGD",
                       model_params=model_params, reduction=reduction)
