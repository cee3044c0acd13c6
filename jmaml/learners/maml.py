"""MAML and FOMAML: Finn, Abbeel & Levine (2017), Model-Agnostic Meta-Learning for Fast Adaptation
of Deep Networks, ICML.

The meta-gradient is ``jax.grad`` through the inner ``lax.scan`` (exact second order), or the
query gradient at the adapted parameters (first order, FOMAML). At test time: k SGD steps at α.
"""

from __future__ import annotations

from typing import Any

from jmaml import estimators
from jmaml.learners._common import Option, fixed_rates, gradient_adapt, rate_rule
from jmaml.protocols import MetaLearner
from jmaml.types import LossFn

OPTIONS = (Option("first_order", False, "first-order MAML (FOMAML): no gradient through the inner gradients",
                  type=bool),)


def maml(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, first_order: bool = False,
         reduction: str = "mean", unroll: int | bool = 1, remat: bool = False,
         max_inner_steps: int | None = None) -> MetaLearner:
    """MAML (second order) or, with ``first_order``, FOMAML.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_lr: α, the default of the per-call hyperparameter ``inner_lr`` (may be traced).
      num_inner_steps: k. With ``max_inner_steps`` (static) it is a per-call hyperparameter too, and
        may be traced (``jmaml.adapt``'s masked scan): sweeps vmap runs over k.
      first_order: FOMAML.
      reduction, unroll, remat: as in ``jmaml.make_step``.

    A model with state (``Model.init_state``) works with a stateful loss (``make_loss(...,
    stateful=True)``): ``estimate`` and ``adapt`` then take ``model_state=`` and ``estimate`` returns
    the updated state as a fourth value (``jmaml.fit(..., model_state=...)`` threads it).

    Returns:
      A ``MetaLearner``; ``estimate(params, tasks, meta_step, *, inner_lr, num_inner_steps, model_state)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jmaml import learners, make_loss, models, tasks
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> learner = learners.maml(loss, inner_lr=0.1, num_inner_steps=1, reduction="sum")
      >>> _, grad, _ = learner.estimate(jnp.array(1.0), tasks.seed.meta_tasks())
      >>> round(float(grad), 2)  # the seed's dL_Q1/dθ + dL_Q2/dθ = 4.48 + 3028.48
      3032.96
    """
    est = estimators.maml(loss_fn, num_inner_steps=num_inner_steps, first_order=first_order, reduction=reduction,
                          unroll=unroll, remat=remat, max_inner_steps=max_inner_steps)

    def estimate(params, tasks, meta_step=None, *, inner_lr=inner_lr, num_inner_steps=None, model_state=None):
        if max_inner_steps is None and num_inner_steps is not None:
            raise ValueError("num_inner_steps can be given per call only to a learner built with max_inner_steps")
        return est(params, tasks, inner_lr=inner_lr, meta_step=meta_step, num_inner_steps=num_inner_steps,
                   model_state=model_state)

    rates = lambda _, n, inner_lr=inner_lr: fixed_rates(inner_lr, n)
    stateless_adapt = rate_rule(loss_fn, rates)

    def adapt(params, support, num_steps, *, observe=None, inner_lr=inner_lr, model_state=None):
        if model_state is None:
            return stateless_adapt(params, support, num_steps, observe=observe, inner_lr=inner_lr)
        # a model with state: test-time steps use the trained state as it is (no update)
        frozen = lambda p, batch: loss_fn(p, batch, model_state)[0]
        return gradient_adapt(frozen, params, support, fixed_rates(inner_lr, num_steps), observe=observe)

    name = "fomaml" if first_order else "maml"
    return MetaLearner(init=lambda params: params, estimate=estimate, adapt=adapt, name=name,
                       label="FOMAML" if first_order else "MAML", exact_gradient=not first_order,
                       hyper={"inner_lr": inner_lr})


def fomaml(loss_fn: LossFn, **kwargs) -> MetaLearner:
    """First-order MAML: ``maml(..., first_order=True)``."""
    return maml(loss_fn, first_order=True, **kwargs)
