"""ANIL: Raghu, Raghu, Bengio & Vinyals (2020), Rapid Learning or Feature Reuse?

Only the parameters a mask selects adapt in the inner loop (by default the last layer); the
meta-gradient flows to all of them. At test time: k SGD steps at α on the selected parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jmaml.core import estimators
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn
from jmaml.learners._common import rate_rule

OPTIONS = ()


def anil(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, mask: estimators.MaskSpec = None,
         reduction: str = "mean", unroll: int | bool = 1, remat: bool = False) -> MetaLearner:
    """ANIL; ``mask`` is a tree of bools like the parameters or a function ``params -> mask``
    (default ``jmaml.estimators.last_layer_mask``: the last of a list of layers)."""
    est = estimators.anil(loss_fn, num_inner_steps=num_inner_steps, mask=mask, reduction=reduction,
                          unroll=unroll, remat=remat)

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr):
        return est(params, tasks, inner_lr=inner_lr, meta_step=meta_step)

    def rates(params, n, inner_lr=inner_lr):
        return jax.tree.map(lambda r: jnp.broadcast_to(r, (n,)), estimators.anil_rates(params, inner_lr, mask))

    return MetaLearner(init=lambda params: params, estimate=estimate, adapt=rate_rule(loss_fn, rates), name="anil",
                       label="ANIL", hyper={"inner_lr": inner_lr}, reduction=reduction)
