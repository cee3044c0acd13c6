r"""Meta-gradient estimators behind one interface (first part of the MAML family).

An *estimator* maps meta-parameters, a task batch (leading task axis) and hyperparameters to
``(meta_loss, meta_gradient, metrics)``; ``make_estimator_step`` wraps any estimator and any optax
optimiser into a pure, jittable ``step(state, tasks, **hyper) -> (state, metrics)``.

* ``maml`` — second order through the inner scan, or first order (FOMAML): Finn, Abbeel & Levine
  (2017), Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks.
* ``reptile`` — the direction θ − φ_k averaged over tasks, k SGD steps on all of a task's data:
  Nichol, Achiam & Schulman (2018), On First-Order Meta-Learning Algorithms.
* ``meta_sgd`` — a learned inner rate per parameter (a tree shaped like θ), meta-learned with θ:
  Li, Zhou, Chen & Li (2017), Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.
* ``anil`` — only the parameters a mask selects adapt in the inner loop (by default the last layer):
  Raghu, Raghu, Bengio & Vinyals (2020), Rapid Learning or Feature Reuse?

ANIL is MAML with a per-leaf inner rate of α on the selected leaves and 0 on the others, so every
estimator here is the same ``adapt`` with a different rate tree or gradient; MAML++ and iMAML are
not in this module yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmaml._checks import check_num_steps, check_rate, check_task_batch
from jmaml.inner import adapt
from jmaml.meta import TrainState, batched_objective, maml_value_and_grad, tree_norm
from jmaml.types import Batch, LossFn, Params, Task

Estimator = Callable[..., tuple[jax.Array, Params, dict[str, jax.Array]]]


class MetaSGDParams(NamedTuple):
    """Meta-SGD's meta-parameters: the initialisation θ and a per-parameter inner rate tree."""

    params: Params
    inner_lr: Params


def maml(loss_fn: LossFn, *, num_inner_steps: int, first_order: bool = False, reduction: str = "mean",
         **adapt_kwargs) -> Estimator:
    """MAML (second order) or FOMAML (``first_order=True``); ``estimate(params, tasks, *, inner_lr)``."""
    def estimate(params: Params, tasks: Task, *, inner_lr: Any):
        loss, grads, per_task = maml_value_and_grad(loss_fn, params, tasks, inner_lr=inner_lr,
                                                    num_inner_steps=num_inner_steps, reduction=reduction,
                                                    first_order=first_order, **adapt_kwargs)
        return loss, grads, {"task_losses": per_task}

    return estimate


def _all_data(task: Task) -> Batch:
    return Batch(jnp.concatenate([task.support.x, task.query.x]), jnp.concatenate([task.support.y, task.query.y]))


def reptile(loss_fn: LossFn, *, num_inner_steps: int, **adapt_kwargs) -> Estimator:
    r"""Reptile: the "gradient" :math:`\theta - \frac{1}{T}\sum_j \varphi^{(k)}_j`.

    Each task's :math:`\varphi^{(k)}_j` is k SGD steps from θ on all of its data (support and query
    together). Fed to ``optax.sgd(β)`` this is Reptile's update :math:`\theta \leftarrow \theta +
    \beta(\bar\varphi - \theta)`; any other optax optimiser may use the same direction. The reported
    loss is the mean loss on each task's data after adaptation.
    """
    check_num_steps(num_inner_steps, "num_inner_steps")
    if num_inner_steps < 1:
        raise ValueError(f"num_inner_steps must be >= 1 for Reptile, got {num_inner_steps}")

    def estimate(params: Params, tasks: Task, *, inner_lr: Any):
        check_task_batch(tasks, "tasks")

        def one(task):
            data = _all_data(task)
            phi = adapt(loss_fn, params, data, inner_lr=inner_lr, num_steps=num_inner_steps, **adapt_kwargs)
            return phi, loss_fn(phi, data)

        phis, per_task = jax.vmap(one)(tasks)
        direction = jax.tree.map(lambda p, f: p - jnp.mean(f, axis=0), params, phis)
        return jnp.mean(per_task), direction, {"task_losses": per_task}

    return estimate


def meta_sgd_init(params: Params, inner_lr: float) -> MetaSGDParams:
    """Meta-SGD's initial meta-parameters: θ and every inner rate equal to ``inner_lr``."""
    return MetaSGDParams(params, jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params))


def meta_sgd(loss_fn: LossFn, *, num_inner_steps: int, reduction: str = "mean", **adapt_kwargs) -> Estimator:
    """Meta-SGD: MAML whose inner rates (a tree like θ, in the meta-parameters) are meta-learned.

    ``estimate(meta_params: MetaSGDParams, tasks)``; the gradient is a ``MetaSGDParams`` too.
    """
    def estimate(meta_params: MetaSGDParams, tasks: Task, **_):
        check_rate(meta_params.inner_lr, "inner_lr")  # concrete rates only; traced ones pass

        def objective(mp: MetaSGDParams):
            return batched_objective(loss_fn, mp.params, tasks, inner_lr=mp.inner_lr,
                                     num_inner_steps=num_inner_steps, reduction=reduction,
                                     return_per_task=True, **adapt_kwargs)

        (loss, per_task), grads = jax.value_and_grad(objective, has_aux=True)(meta_params)
        return loss, grads, {"task_losses": per_task}

    return estimate


def last_layer_mask(params: Params) -> Params:
    """ANIL's default mask: True on the leaves of the last element of a list of layers."""
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError("last_layer_mask needs params as a non-empty list of layers (as jmaml.models.mlp "
                         f"makes); got {type(params).__name__}. Pass an explicit mask instead.")
    last = len(params) - 1
    return [jax.tree.map(lambda _, on=(i == last): on, layer) for i, layer in enumerate(params)]


def anil(loss_fn: LossFn, *, num_inner_steps: int, mask: Params | Callable[[Params], Params] | None = None,
         reduction: str = "mean", **adapt_kwargs) -> Estimator:
    """ANIL: only the leaves ``mask`` selects adapt in the inner loop; the meta-gradient flows to all.

    Args:
      mask: a tree of bools shaped like the parameters, or a function ``params -> such a tree``
        (default ``last_layer_mask``).

    Raises:
      ValueError: if the mask selects no parameter or does not match the parameters' structure.
    """
    make_mask = mask if callable(mask) else (lambda _: mask) if mask is not None else last_layer_mask

    def rates(params: Params, inner_lr: Any) -> Params:
        m = make_mask(params)
        if jax.tree.structure(m) != jax.tree.structure(params):
            raise ValueError(f"mask must have the structure of the parameters: got {jax.tree.structure(m)}, "
                             f"expected {jax.tree.structure(params)}")
        if not any(bool(v) for v in jax.tree.leaves(m)):
            raise ValueError("mask selects no parameters: ANIL would not adapt anything in the inner loop")
        return jax.tree.map(lambda p, on: jnp.asarray(inner_lr if on else 0.0, p.dtype), params, m)

    def estimate(params: Params, tasks: Task, *, inner_lr: Any):
        loss, grads, per_task = maml_value_and_grad(loss_fn, params, tasks, inner_lr=rates(params, inner_lr),
                                                    num_inner_steps=num_inner_steps, reduction=reduction,
                                                    **adapt_kwargs)
        return loss, grads, {"task_losses": per_task}

    return estimate


def make_estimator_step(optimiser: optax.GradientTransformation, estimator: Estimator, **default_hyper):
    """A pure, jittable ``step(state, tasks, **hyper) -> (state, metrics)`` for any estimator.

    ``default_hyper`` (e.g. ``inner_lr=0.01``) are passed to the estimator unless overridden per call.
    """
    if not isinstance(optimiser, optax.GradientTransformation):
        raise TypeError(f"optimiser must be an optax.GradientTransformation, got {optimiser!r}")

    def step(state: TrainState, tasks: Task, **hyper):
        loss, grads, metrics = estimator(state.params, tasks, **{**default_hyper, **hyper})
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return (TrainState(params, opt_state, state.step + 1, state.key),
                {"meta_loss": loss, "grad_norm": tree_norm(grads), **metrics})

    return step
