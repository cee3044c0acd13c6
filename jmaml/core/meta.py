r"""The MAML meta-objective, its gradient, and a pure, jittable meta-training step.

Per task (the seed's Eqs. 9-10 and 24): the query loss after adapting on the support set,
:math:`\mathcal{L}_{Q_j}(W^{(k)}_j(\theta))`. Over a task batch (leading task axis) the
objective is ``vmap``-ed and reduced by ``sum`` (the seed's Eq. 9) or ``mean`` (the paper's).
The meta-gradient is ``jax.grad`` through the inner ``lax.scan`` (exact second order), or
first order (FOMAML) with ``first_order=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jmaml.core._checks import check_task, check_task_batch
from jmaml.core.inner import adapt
from jmaml.core.types import LossFn, Params, PRNGKey, Task

REDUCTIONS = ("mean", "sum")


class TrainState(NamedTuple):
    """Everything a meta-training run carries from step to step.

    Attributes:
      params: the (meta-)parameters.
      opt_state: the optax meta-optimiser's state.
      step: meta-steps taken (int32 scalar).
      key: the PRNG key the next meta-batch of tasks is drawn from.
      model_state: a model's state (batch norm's running statistics), or None.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jmaml import init_state
      >>> init_state(jnp.zeros(2), optax.sgd(0.1), jax.random.key(0))._fields
      ('params', 'opt_state', 'step', 'key', 'model_state')
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array  # shape=(), int32
    key: PRNGKey
    # A model's state (batch norm's running statistics), never differentiated; None (no leaves, so
    # checkpoints of stateless runs are unchanged) for a stateless model.
    model_state: Any = None


def tree_norm(tree: Params) -> jax.Array:
    """Global L2 norm of a tree of arrays (``optax.tree_utils.tree_norm``)."""
    return optax.tree_utils.tree_norm(tree)


def init_state(params: Params, optimiser: optax.GradientTransformation,
               key: PRNGKey, model_state: Any = None) -> TrainState:
    """Builds the initial ``TrainState`` for ``params`` and an optax meta-optimiser (and a model's
    state, for a model with state).

    Args:
      params: the initial (meta-)parameters.
      optimiser: the optax meta-optimiser (its state is initialised here).
      key: the PRNG key the run's task stream starts from.
      model_state: a model's state (``Model.init_state()``), or None.

    Returns:
      ``TrainState(params, opt_state, step=0, key, model_state)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jmaml import init_state
      >>> state = init_state(jnp.zeros(3), optax.adam(1e-3), jax.random.key(0))
      >>> int(state.step), state.params.shape
      (0, (3,))
    """
    return TrainState(params, optimiser.init(params), jnp.zeros((), jnp.int32), key, model_state)


def task_objective(loss_fn: LossFn, params: Params, task: Task, *, inner_lr: Any,
                   num_inner_steps: Any, max_inner_steps: int | None = None,
                   first_order: bool = False, unroll: int | bool = 1,
                   remat: bool = False, model_state: Any = None, inner_optimiser: Any = None,
                   inner_hyper: Any = None) -> Any:
    r"""MAML's objective for one task: query loss at the parameters adapted on the support set.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: meta-parameters θ.
      task: one ``Task`` (no task axis).
      inner_lr, num_inner_steps, max_inner_steps, first_order, unroll, remat, model_state,
        inner_optimiser, inner_hyper: as in ``jmaml.adapt`` (``num_steps``, ``max_steps``).

    Returns:
      :math:`\mathcal{L}_Q(W^{(k)}(\theta))`, a scalar; with ``model_state``, ``(loss, new_state)``
      (the state after the support steps and the query pass).

    Example:
      >>> import jax.numpy as jnp
      >>> from jmaml import Batch, Task, make_loss, models, task_objective
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> task = Task(Batch(jnp.array([1.0]), jnp.array([2.0])), Batch(jnp.array([2.0]), jnp.array([3.0])))
      >>> round(float(task_objective(loss, jnp.array(1.0), task, inner_lr=0.1, num_inner_steps=1)), 4)
      0.36

    Raises:
      ValueError/TypeError: a ``task`` that is not a ``Task`` of batches, or bad inner settings (named).
    """
    check_task(task, "task")
    out = adapt(loss_fn, params, task.support, inner_lr=inner_lr, num_steps=num_inner_steps,
                max_steps=max_inner_steps, first_order=first_order, unroll=unroll,
                remat=remat, model_state=model_state, inner_optimiser=inner_optimiser, inner_hyper=inner_hyper)
    if model_state is None:
        return loss_fn(out, task.query)
    adapted, state = out
    loss, state = loss_fn(adapted, task.query, state)
    return loss, jax.lax.stop_gradient(state)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def batched_objective(loss_fn: LossFn, params: Params, tasks: Task, *, inner_lr: Any,
                      num_inner_steps: Any, reduction: str = "mean",
                      return_per_task: bool = False, **adapt_kwargs):
    """The meta-objective over a task batch: ``vmap`` of ``task_objective``, then reduced.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: meta-parameters θ (shared by all tasks).
      tasks: a ``Task`` whose leaves have a leading task axis.
      inner_lr: α (scalar, possibly traced; shared by all tasks).
      num_inner_steps: k.
      reduction: ``"sum"`` over tasks (the seed's Eq. 9) or ``"mean"`` (the paper's).
      return_per_task: also return the per-task query losses, shape ``(num_tasks,)``
        (usable as ``aux`` with ``jax.value_and_grad(..., has_aux=True)``).
      **adapt_kwargs: ``max_inner_steps``, ``first_order``, ``unroll``, ``remat``, ``model_state``.

    Returns:
      The scalar objective, or ``(objective, per_task_losses)``; with ``model_state`` the new state
      (the mean over tasks of each task's updated state) is appended.

    Example:
      >>> import jax.numpy as jnp
      >>> from jmaml import Batch, Task, batched_objective, make_loss, models
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> tasks = Task(Batch(jnp.ones((2, 1)), jnp.full((2, 1), 2.0)), Batch(jnp.ones((2, 1)), jnp.full((2, 1), 2.0)))
      >>> round(float(batched_objective(loss, jnp.array(1.0), tasks, inner_lr=0.1, num_inner_steps=1)), 4)
      0.64

    Raises:
      ValueError/TypeError: ``tasks`` without a common task axis, an unknown ``reduction``, or bad
        inner settings (named).
    """
    check_task_batch(tasks, "tasks")
    _check_reduction(reduction)
    out = jax.vmap(lambda task: task_objective(
        loss_fn, params, task, inner_lr=inner_lr, num_inner_steps=num_inner_steps,
        **adapt_kwargs))(tasks)
    per_task, states = out if adapt_kwargs.get("model_state") is not None else (out, None)
    total = jnp.sum(per_task) if reduction == "sum" else jnp.mean(per_task)
    result = (total, per_task) if return_per_task else (total,)
    if states is not None:  # each task updated the state from the same start: their mean carries on
        result = (*result, jax.tree.map(lambda a: jnp.mean(a, axis=0).astype(a.dtype), states))
    return result if len(result) > 1 else total


def maml_value_and_grad(loss_fn: LossFn, params: Params, tasks: Task, *, inner_lr: Any,
                        num_inner_steps: Any, reduction: str = "mean", **adapt_kwargs):
    """Meta-loss, meta-gradient and per-task query losses for a task batch.

    Second order (``jax.grad`` through the inner scan) unless ``first_order=True`` is passed,
    in which case the gradient is FOMAML's: the query gradient at the adapted parameters.

    Returns:
      ``(meta_loss, meta_grads, per_task_losses)``; with ``model_state=`` in ``adapt_kwargs``,
      ``(meta_loss, meta_grads, per_task_losses, new_model_state)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: meta-parameters θ.
      tasks: a ``Task`` batch (leading task axis).
      inner_lr: α.
      num_inner_steps: k.
      reduction: ``"mean"`` over tasks (the paper's) or ``"sum"`` (the seed's Eq. 9).
      **adapt_kwargs: ``first_order``, ``max_inner_steps``, ``unroll``, ``remat``, ``model_state``,
        ``inner_optimiser``, ``inner_hyper`` (as in ``jmaml.adapt``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jmaml import Batch, Task, make_loss, maml_value_and_grad, models
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> tasks = Task(Batch(jnp.ones((1, 1)), jnp.full((1, 1), 2.0)), Batch(jnp.ones((1, 1)), jnp.full((1, 1), 2.0)))
      >>> value, grad, per_task = maml_value_and_grad(loss, jnp.array(1.0), tasks, inner_lr=0.1, num_inner_steps=1)
      >>> round(float(value), 4), round(float(grad), 4), per_task.shape
      (0.64, -1.28, (1,))
    """
    def objective(p):
        total, *aux = batched_objective(loss_fn, p, tasks, inner_lr=inner_lr, num_inner_steps=num_inner_steps,
                                        reduction=reduction, return_per_task=True, **adapt_kwargs)
        return total, tuple(aux)

    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return (loss, grads, *aux)


def make_step(optimiser: optax.GradientTransformation, loss_fn: LossFn, *, inner_lr: Any,
              num_inner_steps: Any, max_inner_steps: int | None = None,
              first_order: bool = False, reduction: str = "mean", unroll: int | bool = 1,
              remat: bool = False) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Builds a pure meta-training step ``step(state, tasks) -> (state, metrics)``.

    The step is not jitted: wrap it in ``jax.jit`` (or a ``lax.scan`` over steps) at the
    outermost level. ``inner_lr`` (and, with ``max_inner_steps``, ``num_inner_steps``) can be
    overridden per call as keyword arguments, as traced arrays, so that whole runs can be
    vmapped over them.

    Args:
      optimiser: any optax ``GradientTransformation`` (the meta-optimiser, rate β).
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      inner_lr: default α.
      num_inner_steps: default k.
      max_inner_steps: static scan length for a traced k (see ``jmaml.adapt``).
      first_order: FOMAML instead of second-order MAML.
      reduction: ``"mean"`` or ``"sum"`` over the task axis.
      unroll, remat: as in ``jmaml.adapt``.

    Returns:
      ``step(state, tasks, *, inner_lr=None, num_inner_steps=None)``; metrics hold
      ``meta_loss`` (scalar), ``grad_norm`` (global norm of the meta-gradient),
      ``task_losses`` (per-task query losses, shape ``(num_tasks,)``) and ``pre_adapt_loss``
      (the query loss at θ before adaptation, reduced like the meta-loss).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jmaml import init_state, make_loss, make_step, models, tasks
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> step = make_step(optax.sgd(0.5), loss, inner_lr=0.1, num_inner_steps=1,
      ...                  reduction="sum")
      >>> state = init_state(jnp.array(1.0), optax.sgd(0.5), jax.random.key(0))
      >>> state, metrics = jax.jit(step)(state, tasks.seed.meta_tasks())
      >>> round(float(state.params), 3)
      -1515.48

    Raises:
      ValueError/TypeError: bad inner settings or an unknown ``reduction`` (named).
    """
    _check_reduction(reduction)
    estimate = maml_estimator(loss_fn, num_inner_steps=num_inner_steps, first_order=first_order, reduction=reduction,
                              max_inner_steps=max_inner_steps, unroll=unroll, remat=remat)
    return make_estimator_step(optimiser, estimate, inner_lr=inner_lr)


def maml_estimator(loss_fn: LossFn, *, num_inner_steps: Any, first_order: bool = False, reduction: str = "mean",
                   **adapt_kwargs) -> Callable[..., Any]:
    """MAML (second order) or FOMAML (``first_order=True``); ``estimate(params, tasks, *, inner_lr)``.

    ``num_inner_steps`` may be overridden per call (traced, with ``max_inner_steps`` in ``adapt_kwargs``).
    With ``model_state=`` (a model with state; ``loss_fn(params, batch, state) -> (loss, state)``) it also
    returns the updated state, as a fourth value."""
    default_k = num_inner_steps

    def estimate(params: Params, tasks: Task, *, inner_lr: Any, meta_step: Any = None, num_inner_steps: Any = None,
                 model_state: Any = None):
        k = default_k if num_inner_steps is None else num_inner_steps
        extra = {} if model_state is None else {"model_state": model_state}
        loss, grads, per_task, *new_state = maml_value_and_grad(
            loss_fn, params, tasks, inner_lr=inner_lr, num_inner_steps=k, reduction=reduction,
            first_order=first_order, **adapt_kwargs, **extra)
        metrics = {"task_losses": per_task,
                   "pre_adapt_loss": pre_adapt_loss(loss_fn, params, tasks, reduction, model_state)}
        return (loss, grads, metrics, *new_state)

    return estimate


PRE_ADAPT_TASKS = 8  # at least this many tasks of a meta-batch (or block) have their un-adapted loss measured


def pre_adapt_stride(num_tasks: int) -> int:
    """Every how many tasks of a meta-batch of ``num_tasks`` the un-adapted loss is measured."""
    return max(1, num_tasks // PRE_ADAPT_TASKS)


def pre_adapt_loss(loss_fn: LossFn, params: Params, tasks: Task, reduction: str = "mean",
                   model_state: Any = None, data: Callable[[Task], Any] | None = None) -> jax.Array:
    """The query loss at the un-adapted parameters, reduced over tasks: the reference against which
    an exploding inner loop shows (adapted loss >> un-adapted loss).

    It is measured on every ``pre_adapt_stride(n)``-th task of a meta-batch of n -- between
    ``PRE_ADAPT_TASKS`` and twice as many, all of them in a small batch. The tasks are independent draws,
    so this is an unbiased estimate of the whole batch's value (a sum is scaled by the batch's size over
    the subsample's), at a fixed cost however large the meta-batch: a metric the host reads once per chunk
    does not deserve a forward pass of every task on every step. Evenly spaced tasks stay on their devices
    when the batch is sharded. The divergence check loses nothing by it: the adapted loss it compares
    against covers every task, and a non-finite value anywhere shows in the per-task losses.
    ``data(task)`` picks the batch measured (default: the query set)."""
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    stride = pre_adapt_stride(num_tasks)
    sub = tasks if stride == 1 else jax.tree.map(lambda a: a[::stride], tasks)
    batches = jax.vmap(data)(sub) if data is not None else sub.query
    if model_state is not None:
        pre = jax.vmap(lambda batch: loss_fn(params, batch, model_state)[0])(batches)
    else:
        pre = jax.vmap(loss_fn, in_axes=(None, 0))(params, batches)
    if reduction != "sum":
        return jnp.mean(pre)
    return jnp.sum(pre) if stride == 1 else jnp.sum(pre) * (num_tasks / pre.shape[0])


def make_estimator_step(optimiser: optax.GradientTransformation, estimator: Callable[..., Any], **default_hyper):
    """A pure, jittable ``step(state, tasks, **hyper) -> (state, metrics)`` for any estimator: the one
    meta-step every learner shares.

    ``estimator(params, tasks, **hyper, meta_step=...) -> (loss, grads, metrics)`` (for a state with a
    ``model_state``: called with ``model_state=`` and returning it updated as a fourth value); ``default_hyper``
    (e.g. ``inner_lr=0.01``) are passed to it unless overridden per call, ``meta_step`` is the state's
    step count (MAML++'s schedules read it). Metrics are the estimator's plus ``meta_loss`` and
    ``grad_norm`` (the global L2 norm of the meta-gradient).

    Args:
      optimiser: the optax meta-optimiser.
      estimator: the estimator described above (``jmaml.estimators`` has MAML's family's).
      **default_hyper: the estimator's per-call hyperparameters and their defaults.

    Returns:
      ``step(state, tasks, **hyper) -> (state, metrics)``, pure and jittable.

    Raises:
      ValueError: (from ``step``) an estimator whose metrics lack ``task_losses``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jmaml import Batch, Task, init_state, make_estimator_step, make_loss, models
      >>> from jmaml.meta import maml_estimator
      >>> loss = make_loss(models.linear().apply, "sse")
      >>> step = make_estimator_step(optax.sgd(0.5), maml_estimator(loss, num_inner_steps=1), inner_lr=0.1)
      >>> tasks = Task(Batch(jnp.ones((1, 1)), jnp.full((1, 1), 2.0)), Batch(jnp.ones((1, 1)), jnp.full((1, 1), 2.0)))
      >>> state, metrics = step(init_state(jnp.array(1.0), optax.sgd(0.5), jax.random.key(0)), tasks)
      >>> round(float(state.params), 4), round(float(metrics["meta_loss"]), 4)
      (1.64, 0.64)
    """
    if not isinstance(optimiser, optax.GradientTransformation):
        raise TypeError(f"optimiser must be an optax.GradientTransformation, got {optimiser!r}")

    def step(state: TrainState, tasks: Task, **hyper):
        hyper = {**default_hyper, **{k: v for k, v in hyper.items() if v is not None}}
        model_state = state.model_state
        if model_state is None:
            loss, grads, metrics = estimator(state.params, tasks, **hyper, meta_step=state.step)
        else:  # a model with state: the estimator takes it and returns its update
            loss, grads, metrics, model_state = estimator(state.params, tasks, **hyper, meta_step=state.step,
                                                          model_state=model_state)
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return (TrainState(params, opt_state, state.step + 1, state.key, model_state),
                {"meta_loss": loss, "grad_norm": tree_norm(grads), **metrics})

    return step
