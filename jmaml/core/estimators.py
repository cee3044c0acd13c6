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
* ``mamlpp`` — learned per-step, per-layer inner rates (LSLR), the multi-step loss with weights
  annealed towards the last step, and derivative-order annealing: Antoniou, Edwards & Storkey
  (2019), How to train your MAML.
* ``imaml`` — implicit MAML: the inner problem carries a proximal term λ/2‖φ − θ‖², and the
  meta-gradient solves (I + H/λ) v = ∇L_Q(φ) by conjugate gradient on Hessian-vector products, so
  memory does not grow with k: Rajeswaran, Finn, Kakade & Levine (2019), Meta-Learning with
  Implicit Gradients.

ANIL is MAML with a per-leaf inner rate of α on the selected leaves and 0 on the others, and
Meta-SGD and MAML++ are MAML with learned rate trees (one per step for MAML++), so all but Reptile
and iMAML differentiate the same inner SGD steps.

Every ``estimate`` accepts ``meta_step`` (the state's step count, passed by
``make_estimator_step``); only MAML++ uses it, for its annealing schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmaml.core._checks import (
    check_nonnegative_int,
    check_num_steps,
    check_positive_finite,
    check_positive_int,
    check_rate,
    check_task_batch,
)
from jmaml.core._util import default_float
from jmaml.core.diagnostics import hvp
from jmaml.core.inner import adapt, inner_step
from jmaml.core.meta import (  # noqa: F401 - make_estimator_step is re-exported here for existing users
    _check_reduction,
    batched_objective,
    make_estimator_step,
    maml_estimator,
    maml_value_and_grad,
    pre_adapt_loss,
    tree_norm,
)
from jmaml.core.types import Batch, LossFn, Params, Task

Estimator = Callable[..., tuple[jax.Array, Params, dict[str, jax.Array]]]


class MetaSGDParams(NamedTuple):
    """Meta-SGD's meta-parameters: the initialisation θ and a per-parameter inner rate tree."""

    params: Params
    inner_lr: Params


# MAML and FOMAML: the estimator ``jmaml.make_step`` uses too, defined beside it in ``jmaml.meta``.
maml = maml_estimator


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

    def estimate(params: Params, tasks: Task, *, inner_lr: Any, meta_step: Any = None):
        check_task_batch(tasks, "tasks")

        def one(task):
            data = _all_data(task)
            phi = adapt(loss_fn, params, data, inner_lr=inner_lr, num_steps=num_inner_steps, **adapt_kwargs)
            return phi, loss_fn(phi, data)

        phis, per_task = jax.vmap(one)(tasks)
        direction = jax.tree.map(lambda p, f: p - jnp.mean(f, axis=0), params, phis)
        return jnp.mean(per_task), direction, {"task_losses": per_task,
                                               "pre_adapt_loss": pre_adapt_loss(loss_fn, params, tasks, data=_all_data)}

    return estimate


def meta_sgd_init(params: Params, inner_lr: float) -> MetaSGDParams:
    """Meta-SGD's initial meta-parameters: θ and every inner rate equal to ``inner_lr``."""
    return MetaSGDParams(params, jax.tree.map(lambda p: jnp.full_like(p, inner_lr), params))


def meta_sgd(loss_fn: LossFn, *, num_inner_steps: int, reduction: str = "mean", **adapt_kwargs) -> Estimator:
    """Meta-SGD: MAML whose inner rates (a tree like θ, in the meta-parameters) are meta-learned.

    ``estimate(meta_params: MetaSGDParams, tasks)``; the gradient is a ``MetaSGDParams`` too.
    """
    def estimate(meta_params: MetaSGDParams, tasks: Task, *, inner_lr: Any = None, meta_step: Any = None):
        # inner_lr is accepted (and ignored) so that every estimator takes the same keywords: the
        # rates are meta-parameters here.
        check_rate(meta_params.inner_lr, "inner_lr")  # concrete rates only; traced ones pass

        def objective(mp: MetaSGDParams):
            return batched_objective(loss_fn, mp.params, tasks, inner_lr=mp.inner_lr,
                                     num_inner_steps=num_inner_steps, reduction=reduction,
                                     return_per_task=True, **adapt_kwargs)

        (loss, per_task), grads = jax.value_and_grad(objective, has_aux=True)(meta_params)
        return loss, grads, {"task_losses": per_task,
                             "pre_adapt_loss": pre_adapt_loss(loss_fn, meta_params.params, tasks, reduction)}

    return estimate


def last_layer_mask(params: Params) -> Params:
    """ANIL's default mask: True on the leaves of the last layer, for any params pytree.

    The "last layer" is found by descending from the root while a node has a single child holding
    arrays (an Equinox ``MLP``'s ``layers`` field, a ``{"params": ...}`` wrapper) and taking the last
    child, in the tree's flatten order, of the first node with several: the last element of a list of
    layers (``jmaml.models.mlp``), the last field or the last key in sorted order (Flax's ``Dense_2``
    of three; beware ``Dense_10`` sorting before ``Dense_2``: pass an explicit mask then).
    """
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not paths:
        raise ValueError(f"last_layer_mask: the parameters hold no arrays ({type(params).__name__})")
    prefix: tuple = ()
    while True:
        keys = list(dict.fromkeys(p[len(prefix)] for p in paths if p[:len(prefix)] == prefix and len(p) > len(prefix)))
        if not keys:
            break
        prefix += (keys[-1],)
        if len(keys) > 1:
            break
    return jax.tree_util.tree_map_with_path(lambda path, _: path[:len(prefix)] == prefix, params)


MaskSpec = Params | Callable[[Params], Params] | None


def anil_rates(params: Params, inner_lr: Any, mask: MaskSpec = None) -> Params:
    """ANIL's per-leaf inner rates: ``inner_lr`` on the leaves ``mask`` selects, 0 on the others.

    Args:
      mask: a tree of bools shaped like the parameters (any pytree, an Equinox module of bools
        too), or a function ``params -> such a tree`` (default ``last_layer_mask``).

    Raises:
      ValueError: if the mask selects no parameter or does not match the parameters' structure.
    """
    if mask is None:
        m = last_layer_mask(params)
    elif jax.tree.structure(mask) == jax.tree.structure(params):  # type: ignore[operator]  # a tree of bools (an Equinox module too)
        m = mask
    elif callable(mask):
        m = mask(params)
    else:
        m = mask
    if jax.tree.structure(m) != jax.tree.structure(params):  # type: ignore[operator]
        raise ValueError(f"mask must have the structure of the parameters: got {jax.tree.structure(m)}, "
                         f"expected {jax.tree.structure(params)}")
    if not any(bool(v) for v in jax.tree.leaves(m)):
        raise ValueError("mask selects no parameters: ANIL would not adapt anything in the inner loop")
    return jax.tree.map(lambda p, on: jnp.asarray(inner_lr if on else 0.0, p.dtype), params, m)


def anil(loss_fn: LossFn, *, num_inner_steps: int, mask: MaskSpec = None, reduction: str = "mean",
         **adapt_kwargs) -> Estimator:
    """ANIL: only the leaves ``mask`` selects adapt in the inner loop; the meta-gradient flows to all.

    Args:
      mask: see ``anil_rates`` (default: the last layer).

    Raises:
      ValueError: if the mask selects no parameter or does not match the parameters' structure.
    """
    def estimate(params: Params, tasks: Task, *, inner_lr: Any, meta_step: Any = None):
        loss, grads, per_task = maml_value_and_grad(loss_fn, params, tasks,
                                                    inner_lr=anil_rates(params, inner_lr, mask),
                                                    num_inner_steps=num_inner_steps, reduction=reduction,
                                                    **adapt_kwargs)
        return loss, grads, {"task_losses": per_task,
                             "pre_adapt_loss": pre_adapt_loss(loss_fn, params, tasks, reduction)}

    return estimate


# ---- MAML++ ------------------------------------------------------------------------------------

class MAMLPPParams(NamedTuple):
    """MAML++'s meta-parameters: θ and learned inner rates, one per step and parameter tensor (LSLR).

    Each leaf of ``inner_lr`` has shape ``(num_inner_steps,)``: the rate of the matching leaf of
    ``params`` at each inner step.
    """

    params: Params
    inner_lr: Params


def mamlpp_init(params: Params, inner_lr: float, num_inner_steps: int) -> MAMLPPParams:
    """MAML++'s initial meta-parameters: θ and every per-step, per-tensor rate equal to ``inner_lr``."""
    k = check_positive_int(num_inner_steps, "num_inner_steps")
    check_rate(inner_lr, "inner_lr")
    return MAMLPPParams(params, jax.tree.map(lambda p: jnp.full((k,), inner_lr, jnp.result_type(p)), params))


def msl_weights(num_inner_steps: int, meta_step: Any, anneal_steps: int) -> jax.Array:
    """MAML++'s multi-step-loss weights at a meta-step: uniform at step 0, annealed to the last step.

    As in the paper's code (``get_per_step_loss_importance_vector``, with meta-steps for epochs):
    every weight but the last decays by ``1/(k·anneal_steps)`` per meta-step down to ``0.03/k``;
    the last grows by the same total, so the weights always sum to 1 and reach
    ``(0.03/k, ..., 1 − 0.03(k−1)/k)`` after about ``anneal_steps`` meta-steps.
    ``meta_step`` may be traced.
    """
    k = check_positive_int(num_inner_steps, "num_inner_steps")
    anneal_steps = check_positive_int(anneal_steps, "anneal_steps")
    if k == 1:
        return jnp.ones((1,), default_float())
    decay, floor = 1.0 / k / anneal_steps, 0.03 / k
    t = jnp.asarray(meta_step, default_float())
    early = jnp.maximum(1.0 / k - t * decay, floor)
    last = jnp.minimum(1.0 / k + t * (k - 1) * decay, 1.0 - (k - 1) * floor)
    return jnp.concatenate([jnp.full((k - 1,), early), last[None]])


def _per_step_rates(rates: Params, t: Any) -> Params:
    return jax.tree.map(lambda r: r[t], rates)


def mamlpp(loss_fn: LossFn, *, num_inner_steps: int, multi_step_loss: bool = True,
           msl_anneal_steps: int | None = None, msl_schedule: Any = None, first_order_steps: int = 0,
           reduction: str = "mean", unroll: int | bool = True) -> Estimator:
    r"""MAML++: LSLR, the multi-step loss and derivative-order annealing.

    ``estimate(meta_params: MAMLPPParams, tasks, *, meta_step)``. Step t of the inner loop uses the
    rates ``inner_lr[leaf][t]``. The objective per task is :math:`\sum_t w_t\,\mathcal{L}_Q(\varphi^{(t)})`
    over steps t = 1..k with the multi-step loss, or :math:`\mathcal{L}_Q(\varphi^{(k)})` without it.

    Args:
      num_inner_steps: k >= 1 (static).
      multi_step_loss: use the multi-step loss.
      msl_anneal_steps: meta-steps over which the weights anneal from uniform towards the last step
        (``msl_weights``); required with the multi-step loss unless ``msl_schedule`` is given.
      msl_schedule: fixed weights instead, shape ``(k,)`` (or a function ``meta_step -> (k,) array``).
      first_order_steps: derivative-order annealing: first-order gradients for meta-steps
        ``< first_order_steps``, second order after (0: always second order).
      unroll: as in ``jmaml.adapt`` (default: straight-line steps).

    Raises:
      ValueError: k < 1, a schedule of the wrong length, a missing or non-positive anneal length, a
        negative ``first_order_steps``.
    """
    k = check_num_steps(num_inner_steps, "num_inner_steps")
    if k < 1:
        raise ValueError(f"num_inner_steps must be >= 1 for MAML++ (its rates are per step), got {k}")
    _check_reduction(reduction)
    check_nonnegative_int(first_order_steps, "first_order_steps")
    if msl_schedule is not None and not callable(msl_schedule):
        fixed = jnp.asarray(msl_schedule)
        if fixed.shape != (k,):
            raise ValueError(f"msl_schedule must have one weight per inner step, shape ({k},); got shape "
                             f"{fixed.shape}")
        msl_schedule = lambda _, w=fixed: w
    if multi_step_loss and msl_schedule is None:
        if msl_anneal_steps is None:
            raise ValueError("the multi-step loss needs msl_anneal_steps (meta-steps to anneal over) or "
                             "an explicit msl_schedule")
        check_positive_int(msl_anneal_steps, "msl_anneal_steps")
        msl_schedule = lambda t: msl_weights(k, t, msl_anneal_steps)

    # unroll=True: a scan unrolled k times (as MAML++ and iMAML always ran: their trajectories stay
    # bitwise), not adapt's straight-line code
    scan_unroll = k if unroll is True else unroll

    def task_losses(mp: MAMLPPParams, task: Task, first_order: bool) -> jax.Array:
        """Query losses after steps 1..k (multi-step loss) or after step k only, shape (k,) or (1,)."""
        if multi_step_loss:  # the query loss after every step: the one inner loop, observing it
            _, seen = adapt(loss_fn, mp.params, task.support, inner_lr=mp.inner_lr, num_steps=k, per_step=True,
                            first_order=first_order, unroll=scan_unroll, observe=lambda phi: loss_fn(phi, task.query),
                            observe_after=True)
            return seen
        phi = adapt(loss_fn, mp.params, task.support, inner_lr=mp.inner_lr, num_steps=k, per_step=True,
                    first_order=first_order, unroll=scan_unroll)
        return loss_fn(phi, task.query)[None]

    def objective(mp: MAMLPPParams, tasks: Task, weights: jax.Array, first_order: bool):
        per_step = jax.vmap(lambda task: task_losses(mp, task, first_order))(tasks)
        per_task = per_step @ weights
        total = jnp.sum(per_task) if reduction == "sum" else jnp.mean(per_task)
        return total, (per_task, per_step[:, -1])

    def estimate(meta_params: MAMLPPParams, tasks: Task, *, inner_lr: Any = None, meta_step: Any = None):
        check_task_batch(tasks, "tasks")
        bad = [leaf.shape for leaf in jax.tree.leaves(meta_params.inner_lr) if leaf.shape != (k,)]
        if not isinstance(meta_params, MAMLPPParams) or bad:
            raise ValueError(f"meta_params must be MAMLPPParams whose rates have shape ({k},) per tensor "
                             "(see mamlpp_init)" + (f"; got rate shapes {bad}" if bad else ""))
        t = jnp.zeros((), jnp.int32) if meta_step is None else meta_step
        weights = msl_schedule(t) if multi_step_loss else jnp.ones((1,), default_float())

        def grad_fn(first_order):
            return lambda mp: jax.value_and_grad(objective, has_aux=True)(mp, tasks, weights, first_order)

        if first_order_steps == 0:
            (loss, (per_task, final)), grads = grad_fn(False)(meta_params)
        else:
            (loss, (per_task, final)), grads = jax.lax.cond(t < first_order_steps, grad_fn(True), grad_fn(False),
                                                            meta_params)
        return loss, grads, {"task_losses": per_task, "final_query_loss": final,
                             "pre_adapt_loss": pre_adapt_loss(loss_fn, meta_params.params, tasks, reduction)}

    return estimate


# ---- iMAML -------------------------------------------------------------------------------------

def _tree_vdot(a: Params, b: Params) -> jax.Array:
    return optax.tree_utils.tree_vdot(a, b)


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, num_iters: int,
                       tol: float = 0.0) -> tuple[Params, jax.Array]:
    """At most ``num_iters`` iterations of conjugate gradient for ``A x = b`` from x = 0 (A symmetric positive
    definite, given as ``matvec``; x and b are trees). Returns ``(x, ‖b − A x‖ / ‖b‖)``.

    ``tol = 0``: exactly ``num_iters`` iterations (a ``lax.fori_loop``, differentiable and vmapped at a fixed
    cost); an exactly solved system (zero residual) stops moving instead of dividing 0 by 0. ``tol > 0``:
    also stops once the relative residual ``‖r‖ / ‖b‖`` is at most ``tol`` (a ``lax.while_loop``, as the
    TRPO references' CG stops on a residual tolerance; not reverse-differentiable).
    """
    num_iters = check_positive_int(num_iters, "cg_iters")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"cg tol must be a finite number >= 0, got {tol!r}")
    zeros = jax.tree.map(jnp.zeros_like, b)
    rs0 = _tree_vdot(b, b)

    def body(carry):
        x, r, p, rs = carry
        ap = matvec(p)
        pap = _tree_vdot(p, ap)
        alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = jax.tree.map(lambda xi, pi: xi + alpha * pi, x, p)
        r = jax.tree.map(lambda ri, api: ri - alpha * api, r, ap)
        rs_new = _tree_vdot(r, r)
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        p = jax.tree.map(lambda ri, pi: ri + beta * pi, r, p)
        return x, r, p, rs_new

    if tol == 0:
        x, _, _, _ = jax.lax.fori_loop(0, num_iters, lambda _, c: body(c), (zeros, b, b, rs0))
    else:
        bound = tol ** 2 * rs0

        def running(carry):
            i, (_, _, _, rs) = carry
            return (i < num_iters) & (rs > bound)

        _, (x, _, _, _) = jax.lax.while_loop(running, lambda c: (c[0] + 1, body(c[1])),
                                             (jnp.zeros((), jnp.int32), (zeros, b, b, rs0)))
    residual = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(x))
    return x, jnp.sqrt(_tree_vdot(residual, residual) / jnp.where(rs0 > 0, rs0, 1.0))


def proximal_step(loss_fn: LossFn, phi: Params, anchor: Params, batch: Batch, *, inner_lr: Any,
                  lam: float) -> Params:
    r"""One gradient step on iMAML's inner objective
    :math:`\mathcal{L}(\varphi) + \frac{\lambda}{2}\|\varphi - \theta\|^2` (θ is ``anchor``).

    ``lam`` is a Python number; ``lam = 0`` is a plain SGD step (no proximal term is added at all).
    ``inner_lr`` is a scalar or a tree like the parameters."""
    return inner_step(loss_fn, phi, batch, inner_lr=inner_lr, prox_lambda=lam, anchor=anchor)


def imaml(loss_fn: LossFn, *, num_inner_steps: int, lam: float, cg_iters: int = 5, reduction: str = "mean",
          unroll: int | bool = 1) -> Estimator:
    r"""iMAML: the implicit meta-gradient of the proximal inner problem.

    Per task, φ is ``num_inner_steps`` gradient steps (rate ``inner_lr``) from θ on
    :math:`\mathcal{L}_S(\varphi) + \frac{\lambda}{2}\|\varphi - \theta\|^2`, with no gradient
    recorded through them. At the minimiser φ*(θ) of that problem,
    :math:`d\varphi^*/d\theta = (I + H/\lambda)^{-1}` with H the support loss's Hessian at φ*, so the
    task's meta-gradient is the v solving :math:`(I + H/\lambda)\,v = \nabla\mathcal{L}_Q(\varphi)`,
    found by ``cg_iters`` conjugate-gradient iterations on Hessian-vector products. Nothing is kept per
    inner step, so memory does not grow with k.

    ``estimate(params, tasks, *, inner_lr)``; metrics add ``cg_residual`` (per task, relative) and
    ``inner_grad_norm`` (per task, the proximal objective's gradient norm at φ: how far from the
    minimiser the inner solve stopped).

    Raises:
      ValueError: λ <= 0 or not finite, ``cg_iters`` < 1, k < 1.
    """
    lam = check_positive_finite(lam, "lam (iMAML's proximal strength λ)")
    check_positive_int(cg_iters, "cg_iters")
    k = check_num_steps(num_inner_steps, "num_inner_steps")
    if k < 1:
        raise ValueError(f"num_inner_steps must be >= 1 for iMAML, got {k}")
    _check_reduction(reduction)

    def one(theta: Params, task: Task, inner_lr: Any):
        anchor = jax.lax.stop_gradient(theta)

        # unroll=True: a scan unrolled k times, as iMAML always ran (bitwise)
        phi = adapt(loss_fn, anchor, task.support, inner_lr=inner_lr, num_steps=k,
                    unroll=k if unroll is True else unroll, prox_lambda=lam)
        phi = jax.lax.stop_gradient(phi)
        query_loss, g_query = jax.value_and_grad(loss_fn)(phi, task.query)
        g_support = jax.grad(loss_fn)(phi, task.support)
        matvec = lambda v: jax.tree.map(lambda vi, hv: vi + hv / lam, v, hvp(loss_fn, phi, task.support, v))
        v, residual = conjugate_gradient(matvec, g_query, cg_iters)
        prox_grad = jax.tree.map(lambda g, p, a: g + lam * (p - a), g_support, phi, anchor)
        return query_loss, v, residual, tree_norm(prox_grad)

    def estimate(params: Params, tasks: Task, *, inner_lr: Any, meta_step: Any = None):
        check_task_batch(tasks, "tasks")
        check_rate(inner_lr, "inner_lr")
        per_task, grads, residual, inner_norm = jax.vmap(lambda task: one(params, task, inner_lr))(tasks)
        reduce = jnp.sum if reduction == "sum" else jnp.mean
        grads = jax.tree.map(lambda g: reduce(g, axis=0), grads)
        return reduce(per_task), grads, {"task_losses": per_task,
                                         "pre_adapt_loss": pre_adapt_loss(loss_fn, params, tasks, reduction),
                                         "cg_residual": residual, "inner_grad_norm": inner_norm}

    return estimate
