r"""CAVIA: Zintgraf, Shiarlis, Kurin, Hofmann & Whiteson (2019), Fast Context Adaptation via
Meta-Learning, ICML.

The network θ is shared by all tasks and meta-learned; a small *context* vector c, fed to the
network as extra inputs, is the only thing adapted in the inner loop, starting from c = 0 for every
task:

.. math::  c_j = 0 - \alpha \nabla_c \mathcal{L}_{S_j}(\theta, c)\big|_{c=0} \ (\text{k steps}), \qquad
           \min_\theta \sum_j \mathcal{L}_{Q_j}(\theta, c_j(\theta))

with the exact second-order gradient through the context steps. The meta-parameters are
``CAVIAParams(params, context)``; the context stays at zero (its meta-gradient is zero by
construction), so test-time adaptation starts from zero as in the paper.

Any model fits that takes the context as its last ``num_context`` input features:
``with_context(model, num_context)`` turns it into a model of ``CAVIAParams`` that appends the
context to every input itself, so the data stays as the task distribution makes it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jmaml.core._checks import check_positive_int
from jmaml.core._util import default_float
from jmaml.core.inner import adapt as sgd_adapt
from jmaml.core.meta import _check_reduction, pre_adapt_loss
from jmaml.core.protocols import MetaLearner
from jmaml.core.types import LossFn, Model, Params
from jmaml.learners._common import Option, gradient_adapt

OPTIONS = (Option("cavia_num_context", 4, "context parameters adapted per task (default 4); the model gets them "
                  "as extra input features", type=int, arg="num_context", check=check_positive_int),)


class CAVIAParams(NamedTuple):
    """The shared network's parameters and the (task-specific, adapted) context vector."""

    params: Params
    context: jax.Array  # shape=(num_context,)


def with_context(model: Model, num_context: int) -> Model:
    """A model of ``CAVIAParams`` from one whose inputs carry ``num_context`` extra last features.

    ``init(key)`` gives the network's parameters and a zero context; ``apply(p, x)`` appends
    ``p.context`` to every input row of ``x`` (shape ``(..., d)``) and calls ``model.apply``.
    """
    num_context = check_positive_int(num_context, "num_context")

    def init(key):
        return CAVIAParams(model.init(key), jnp.zeros((num_context,)))

    def apply(p: CAVIAParams, x: jax.Array) -> jax.Array:
        context = jnp.broadcast_to(p.context.astype(x.dtype), (*x.shape[:-1], num_context))
        return model.apply(p.params, jnp.concatenate([x, context], axis=-1))

    return Model(init, apply)


def cavia(loss_fn: LossFn, *, inner_lr: Any, num_inner_steps: int, num_context: int = 4,
          reduction: str = "mean", unroll: int | bool = 1, remat: bool = False) -> MetaLearner:
    """CAVIA on ``loss_fn(CAVIAParams, batch)`` (a loss of a ``with_context`` model).

    Args:
      loss_fn: the loss of a model of ``CAVIAParams``.
      inner_lr: α of the context steps (the per-call hyperparameter ``inner_lr``).
      num_inner_steps: k context steps per task.
      num_context: the context's size.
      reduction, unroll, remat: as in ``jmaml.make_step``.

    Returns:
      A ``MetaLearner``: ``init(params)`` accepts the network's parameters or ``CAVIAParams``
      (the context is set to zero either way).
    """
    num_context = check_positive_int(num_context, "num_context")
    _check_reduction(reduction)

    def init(params):
        network = params.params if isinstance(params, CAVIAParams) else params
        dtype = jnp.result_type(*jax.tree.leaves(network)) if jax.tree.leaves(network) else default_float()
        return CAVIAParams(network, jnp.zeros((num_context,), dtype))  # in the network's precision

    def check(meta_params):
        if not isinstance(meta_params, CAVIAParams):
            raise TypeError(f"CAVIA's meta-parameters must be CAVIAParams(params, context) (see learner.init), "
                            f"got {type(meta_params).__name__}")

    def adapt_context(mp: CAVIAParams, support, k, lr):
        context_loss = lambda c, batch: loss_fn(mp._replace(context=c), batch)
        return sgd_adapt(context_loss, jnp.zeros_like(mp.context), support, inner_lr=lr, num_steps=k, unroll=unroll,
                         remat=remat)

    def estimate(meta_params: CAVIAParams, tasks, meta_step=None, *, inner_lr=inner_lr):
        check(meta_params)

        def objective(network):
            mp = CAVIAParams(network, meta_params.context)

            def one(task):
                context = adapt_context(mp, task.support, num_inner_steps, inner_lr)
                return loss_fn(mp._replace(context=context), task.query)

            per_task = jax.vmap(one)(tasks)
            reduce = jnp.sum if reduction == "sum" else jnp.mean
            return reduce(per_task), per_task

        (loss, per_task), grads = jax.value_and_grad(objective, has_aux=True)(meta_params.params)
        grads = CAVIAParams(grads, jnp.zeros_like(meta_params.context))
        start = meta_params._replace(context=jnp.zeros_like(meta_params.context))
        return loss, grads, {"task_losses": per_task, "pre_adapt_loss": pre_adapt_loss(loss_fn, start, tasks,
                                                                                       reduction)}

    def adapt(meta_params: CAVIAParams, support, num_steps: int, *, observe=None, inner_lr=inner_lr):
        check(meta_params)
        start = meta_params._replace(context=jnp.zeros_like(meta_params.context))
        rates = CAVIAParams(jax.tree.map(lambda _: jnp.zeros((num_steps,), default_float()), start.params),
                            jnp.full((num_steps,), inner_lr, default_float()))
        return gradient_adapt(loss_fn, start, support, rates, observe=observe)

    return MetaLearner(reduction=reduction, init=init, estimate=estimate, adapt=adapt, name="cavia", label="CAVIA",
                       hyper={"inner_lr": inner_lr}, model_params=lambda mp: mp)
