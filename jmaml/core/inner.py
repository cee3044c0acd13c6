r"""The inner loop: one SGD step on a task's support set, and ``adapt`` for k steps.

The seed's Eq. 7 (one step) and Eq. 21 (k steps):

.. math::
   \varphi^{(t+1)} = \varphi^{(t)} - \alpha \nabla_\varphi \mathcal{L}_S(\varphi^{(t)}),
   \qquad \varphi^{(0)} = \theta .

``adapt`` runs the k steps with ``lax.scan`` so that ``jax.grad`` through it is the exact
second-order MAML gradient (the chain rule of the seed's Eq. 28). Everything here works on
one task (no task axis); ``jmaml.meta`` vmaps it over tasks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jmaml.core._checks import check_batch, check_num_steps, check_rate, concrete_or_none
from jmaml.core.inner_optimisers import set_hyperparams
from jmaml.core.types import Batch, LossFn, Params


def _sgd_update(params: Params, grads: Params, inner_lr: Any) -> Params:
    """``params - inner_lr * grads``; ``inner_lr`` is a scalar or a tree shaped like params."""
    if jax.tree.structure(inner_lr) == jax.tree.structure(params):  # type: ignore[operator]
        return jax.tree.map(lambda p, g, lr: (p - lr * g).astype(p.dtype), params, grads, inner_lr)
    return jax.tree.map(lambda p, g: (p - inner_lr * g).astype(p.dtype), params, grads)


def _value_and_grad(loss_fn: LossFn, params: Params, batch: Batch, has_aux: bool):
    if has_aux:
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    else:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    return loss, grads


def _step(loss_fn: LossFn, p: Params, batch: Batch, rate: Any, *, first_order: bool, has_aux: bool,
          prox_lambda: float, anchor: Params, model_state: Any = None, opt: Any = None, opt_state: Any = None):
    """The inner update, written once: the support loss's gradient at ``p`` (the model state's forward
    pass updating it, without gradient), optionally stopped (first order), plus the proximal term
    ``prox_lambda * (p - anchor)``, then an SGD step at ``rate`` (scalar or tree) or the inner
    optimiser's update. Returns ``(loss, new_p, new_model_state, new_opt_state)``."""
    if model_state is not None:
        (loss, new_s), grads = jax.value_and_grad(lambda q: loss_fn(q, batch, model_state), has_aux=True)(p)
        new_s = jax.lax.stop_gradient(new_s)
    else:
        (loss, grads), new_s = _value_and_grad(loss_fn, p, batch, has_aux), None
    if first_order:
        grads = jax.lax.stop_gradient(grads)
    if prox_lambda:
        grads = jax.tree.map(lambda g, q, a: g + prox_lambda * (q - a), grads, p, anchor)
    if opt is None:
        return loss, _sgd_update(p, grads, rate), new_s, None
    updates, new_o = opt.update(grads, opt_state, p)
    return loss, jax.tree.map(lambda a, u: (a + u).astype(a.dtype), p, updates), new_s, new_o


def inner_step(loss_fn: LossFn, params: Params, batch: Batch, *, inner_lr: Any,
               first_order: bool = False, has_aux: bool = False, prox_lambda: float = 0.0,
               anchor: Params | None = None) -> Params:
    r"""One SGD step on ``batch``: :math:`\varphi = \theta - \alpha \nabla_\theta \mathcal{L}(\theta)`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      params: the parameters to step from.
      batch: the data of one task (no task axis).
      inner_lr: the step size α: a scalar (Python number or array, possibly traced) or a
        tree shaped like ``params`` (per-parameter rates, as in Meta-SGD).
      first_order: stop the gradient through the inner gradient (FOMAML).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is discarded.
      prox_lambda, anchor: add iMAML's proximal term ``prox_lambda * (params - anchor)`` to the
        gradient (a Python number; 0 adds nothing).

    Returns:
      The updated parameters, with the dtypes of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jmaml import Batch, inner_step, make_loss, models
      >>> loss = make_loss(models.linear().apply, "sse")  # the seed's f(x) = theta x, sum of squares
      >>> new = inner_step(loss, jnp.array(1.0), Batch(jnp.array([1.0]), jnp.array([2.0])), inner_lr=0.1)
      >>> round(float(new), 4)
      1.2

    Raises:
      ValueError: the rates' tree does not match ``params``.
    """
    check_batch(batch, "batch")
    check_rate(inner_lr, "inner_lr")
    if prox_lambda and anchor is None:
        raise ValueError("prox_lambda needs the anchor the proximal term pulls towards")
    return _step(loss_fn, params, batch, inner_lr, first_order=first_order, has_aux=has_aux,
                 prox_lambda=prox_lambda, anchor=anchor)[1]


def _check_unroll(unroll) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, numbers.Integral) or unroll < 1:
        raise ValueError(f"unroll must be a bool or an int >= 1, got {unroll!r}")


def adapt(loss_fn: LossFn, params: Params, batch: Batch, *, inner_lr: Any, num_steps: Any,
          max_steps: int | None = None, first_order: bool = False, return_losses: bool = False,
          unroll: int | bool = 1, remat: bool = False, has_aux: bool = False, model_state: Any = None,
          inner_optimiser: optax.GradientTransformation | None = None, inner_hyper: dict[str, Any] | None = None,
          per_step: bool = False, prox_lambda: float = 0.0, observe: Callable[..., Any] | None = None,
          observe_after: bool = False):
    r"""Adapts ``params`` to ``batch`` with ``num_steps`` SGD steps (the seed's Eq. 21).

    Called eagerly (outside ``jax.jit``), every call traces and compiles its loop anew, and each compiled
    program holds memory until ``jax.clear_caches()``; over many tasks, ``jax.vmap`` it over a task axis, or
    wrap the per-task computation in ``jax.jit`` once and call that.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      params: the initial parameters θ.
      batch: the support set of one task (no task axis).
      inner_lr: the step size α (scalar, possibly traced, or a tree shaped like params).
      num_steps: k. A static Python int >= 0; ``0`` returns ``params`` unchanged. With
        ``max_steps`` it may be a traced integer in ``[0, max_steps]``.
      max_steps: if given, run a masked ``lax.scan`` of this static length in which steps
        ``t >= num_steps`` leave the parameters unchanged, so k can vary (be traced or
        vmapped) without recompiling. The result equals the plain scan with k steps.
      first_order: stop gradients through the inner gradients (FOMAML).
      return_losses: also return the support loss evaluated before each step, shape
        ``(scan_length,)``. With ``max_steps``, entries past k repeat the loss at the
        adapted parameters.
      unroll: passed to ``lax.scan`` (an int: steps per loop iteration). ``True`` unrolls
        fully, as straight-line code without a scan: the backward pass then needs no stacked
        per-step residual buffers, measured 1.1-1.5x faster per meta-step for short inner loops
        on CPU (and the usual advice on GPU), while compilation time grows with k.
      remat: rematerialise the inner loop on the backward pass, so second-order gradients
        through long inner loops fit in memory. Policy: nested ``jax.checkpoint`` with the
        default (save-nothing) policy — the k steps run as nested blocks (two levels of ~√k up
        to k = 64, three of ~k^(1/3) beyond), so the backward pass keeps O(k^(1/3)) parameter
        copies instead of k copies plus every step's activations, for one extra forward pass
        of the inner loop per level (``_nested_remat_scan``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is discarded.
      model_state: the state of a model with state (``Model.init_state``): ``loss_fn`` is then
        ``loss_fn(params, batch, state) -> (loss, new_state)``, each step's forward pass updates the
        state (batch norm's running statistics), and no gradient flows through it.
      inner_optimiser: any optax ``GradientTransformation`` as the inner update rule instead of SGD at
        ``inner_lr`` (which must then be None): its state is initialised here, per task, and carried by
        the scan, and second-order gradients flow through the updates and the state
        (``jmaml.inner_optimisers`` has momentum, Nesterov, Adam and RMSprop with safe second order).
      inner_hyper: hyperparameters to set in the inner optimiser's fresh state (traced, swept or
        meta-learned; see ``jmaml.inner_optimisers.set_hyperparams``).
      per_step: ``inner_lr`` holds one rate per step: a leading axis of length ``num_steps`` on every
        leaf (MAML++'s learned per-step rates, a learner's test-time schedule). Its values are not
        checked (learned rates may be negative).
      prox_lambda: iMAML's proximal term: each step's gradient adds ``prox_lambda * (φ - θ)`` (a
        Python number; 0 adds nothing).
      observe: ``observe(φ) -> values`` (e.g. the query loss): also return it at the parameters before
        each step and after the last, stacked (leading axis ``num_steps + 1``); it is differentiable
        (MAML++'s multi-step loss) and used by every learner's test-time curve.
      observe_after: observe after each step instead (leading axis ``num_steps``: no value at θ), as
        MAML++'s multi-step loss weighs them.

        With ``model_state``, ``observe(φ, state)`` also receives the model state of that moment (the
        state the support steps so far have threaded: a batch-norm model's per-step statistics), and
        the return is ``(φ⁽ᵏ⁾, values)`` (test-time curves keep no state).

    Returns:
      The adapted parameters φ⁽ᵏ⁾, or ``(φ⁽ᵏ⁾, losses)`` with ``return_losses``; with
      ``model_state``, ``(φ⁽ᵏ⁾, state)`` (``(φ⁽ᵏ⁾, state, losses)`` with ``return_losses``); with
      ``observe``, ``(φ⁽ᵏ⁾, values)``.

    Raises:
      TypeError/ValueError: for a malformed batch, k < 0 or not an int, k > max_steps,
        or a negative or non-finite (concrete) ``inner_lr``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jmaml import Batch, adapt, make_loss, models
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> support = Batch(jnp.array([2., 3.]), jnp.array([4., 1.]))
      >>> round(float(adapt(loss, jnp.array(1.0), support, inner_lr=0.1, num_steps=1)), 6)
      0.6

    References:
      Finn, Abbeel & Levine (2017), Model-Agnostic Meta-Learning for Fast Adaptation of
      Deep Networks, ICML. The seed document, Eqs. 7 and 21.
    """
    check_batch(batch, "batch")
    if observe is not None and return_losses:
        raise ValueError("observe returns (params, values); it does not combine with return_losses")
    if inner_optimiser is None:
        if not per_step:
            check_rate(inner_lr, "inner_lr")
        if inner_hyper:
            raise ValueError("inner_hyper sets an inner optimiser's hyperparameters; no inner_optimiser was given")
    else:
        if not isinstance(inner_optimiser, optax.GradientTransformation):
            raise TypeError(f"inner_optimiser must be an optax.GradientTransformation, got {inner_optimiser!r}")
        if inner_lr is not None:
            raise ValueError("give inner_lr or inner_optimiser, not both: the inner optimiser holds its own rate "
                             f"(got inner_lr={inner_lr!r})")
    _check_unroll(unroll)
    if max_steps is None:
        length = check_num_steps(num_steps, "num_steps")
        masked = False
    else:
        length = check_num_steps(max_steps, "max_steps")
        masked = True
        k = concrete_or_none(num_steps)
        if isinstance(num_steps, bool) or (k is not None and (
                k.ndim != 0 or not jnp.issubdtype(k.dtype, jnp.integer))):
            raise TypeError(f"num_steps must be an integer scalar, got {num_steps!r}")
        if k is not None and not 0 <= int(k) <= length:
            raise ValueError(f"num_steps must be in [0, max_steps={length}], got {int(k)}")

    if per_step:
        bad = {jnp.shape(r)[:1] for r in jax.tree.leaves(inner_lr)} - {(length,)}
        if bad:
            raise ValueError(f"per-step inner_lr needs a leading axis of num_steps={length} on every leaf; got "
                             f"leading shapes {sorted(bad)}")
    stateful = model_state is not None
    look = (lambda p, s: observe(p, s)) if stateful else (lambda p, s: observe(p))  # type: ignore[misc]
    if length == 0:
        if observe is not None:
            return params, jax.tree.map(lambda v: jnp.asarray(v)[None], look(params, model_state))
        out = (params, model_state) if stateful else (params,)
        return (*out, jnp.zeros((0,))) if return_losses else (out if stateful else params)

    bound = num_steps if masked else length
    opt = inner_optimiser

    def body(carry, t):
        p, s, o = carry  # parameters, model state, inner-optimiser state (None when unused)
        rate = jax.tree.map(lambda r: r[t], inner_lr) if per_step else inner_lr
        loss, new, new_s, new_o = _step(loss_fn, p, batch, rate, first_order=first_order, has_aux=has_aux,
                                        prox_lambda=prox_lambda, anchor=params, model_state=s, opt=opt,
                                        opt_state=o)
        if masked or remat:  # remat pads the scan to whole blocks; padded steps are no-ops
            active = t < bound
            keep = lambda new_tree, old_tree: jax.tree.map(lambda a, b: jnp.where(active, a, b), new_tree, old_tree)
            new, new_s, new_o = keep(new, p), keep(new_s, s), keep(new_o, o)
        seen = None if observe is None else (look(new, new_s) if observe_after else look(p, s))
        return (new, new_s, new_o), (loss if observe is None else (loss, seen))

    opt_state = None if opt is None else set_hyperparams(opt.init(params), inner_hyper or {})
    start = (params, model_state, opt_state)
    if unroll is True and not remat:
        # Straight-line code, no scan: the backward pass then needs no stacked (k, ...) residual
        # buffers (a copy of every saved activation per step), which is measurably faster for
        # short inner loops on CPU and GPU; compilation time grows with k instead.
        carry, step_losses = start, []
        for t in range(length):
            carry, loss = body(carry, t)
            step_losses.append(loss)
        losses = jax.tree.map(lambda *v: jnp.stack(v), *step_losses)
    elif not remat:
        carry, losses = jax.lax.scan(body, start, jnp.arange(length), unroll=unroll)
    else:
        carry, losses = _nested_remat_scan(body, start, length, unroll)
    adapted, state, _ = carry
    if observe is not None:
        seen = losses[1]
        if observe_after:
            return adapted, seen
        return adapted, jax.tree.map(lambda v, last: jnp.concatenate([v, jnp.asarray(last)[None]]), seen,
                                     look(adapted, state))
    out = (adapted, state) if stateful else (adapted,)
    if return_losses:
        return (*out, losses)
    return out if stateful else adapted


def _remat_block_sizes(length: int) -> list[int]:
    """Steps per nesting level, outermost first: 1 level up to 4 steps, 2 up to 64, then 3."""
    levels = 1 if length <= 4 else 2 if length <= 64 else 3
    sizes = []
    remaining = length
    for level in range(levels, 0, -1):
        b = max(1, math.ceil(remaining ** (1.0 / level) - 1e-9))
        sizes.append(b)
        remaining = -(-remaining // b)
    return sizes


def _nested_remat_scan(body, params, length: int, unroll):
    """``lax.scan(body, params, arange(length))`` with nested rematerialisation.

    The k steps run as nested scans of checkpointed blocks (``_remat_block_sizes``: e.g. k = 1000
    as 10 blocks of 10 blocks of 10 steps), each level under ``jax.checkpoint``. The backward pass
    keeps one parameter carry per block of each level — about 3·k^(1/3) carries for k > 64,
    2·√k for k <= 64 — instead of k carries plus every step's activations, for about one extra
    forward pass per level. Steps past ``length`` (padding to whole blocks) are masked no-ops.
    """
    sizes = _remat_block_sizes(length)
    step = jax.checkpoint(body)

    def run(p, first_t, sizes):
        if len(sizes) == 1:
            return jax.lax.scan(step, p, first_t + jnp.arange(sizes[0]), unroll=unroll)
        inner_total = math.prod(sizes[1:])

        @jax.checkpoint
        def block(q, i):
            return run(q, first_t + i * inner_total, sizes[1:])

        q, losses = jax.lax.scan(block, p, jnp.arange(sizes[0]))
        return q, jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), losses)

    adapted, losses = run(params, 0, sizes)
    return adapted, jax.tree.map(lambda v: v[:length], losses)
