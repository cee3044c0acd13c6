r"""Evaluation as a library: a learner's adaptation curves on held-out tasks, summarised per step.

``evaluate(learner, meta_params, tasks)`` adapts the learner by its own test-time rule
(``learner.adapt``) on each held-out task's support set and scores the distribution's metric on the
query set after 0..num_steps steps, as the mean and 95% confidence interval (1.96 standard errors)
over tasks, with diverged tasks of a loss counted and set aside (``summarize``);
``pretrained_baseline`` trains and fine-tunes the paper's "pretrained" baseline for any task family;
``adaptation_curve`` is the plain-SGD curve of any loss. Nothing here reads or writes a run folder:
that, and the MAML paper's sinusoid protocol, are ``jmaml.evaluate``'s.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jmaml.core._checks import check_num_steps, check_positive_int
from jmaml.core.inner import adapt
from jmaml.core.meta import TrainState
from jmaml.core.models import batch_norm_label
from jmaml.core.protocols import MetaLearner, TaskDistribution, metric_higher_is_better
from jmaml.core.types import Batch, LossFn, Params
from jmaml.engine.loop import check_distribution, check_learner
from jmaml.learners import BASELINE
from jmaml.tasks import sinusoid

EVAL_SEED = sinusoid.EVAL_SEED  # held-out test tasks
VALIDATION_SEED = 7_919  # separate tasks for choosing the baseline's fine-tuning rate
NUM_EVAL_TASKS = 600
MAX_EVAL_STEPS = sinusoid.MAX_EVAL_STEPS
FINETUNE_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def _per_step(inner_lr: Any, num_steps: int) -> Any:
    """A rate (scalar, or tree like the parameters) repeated for each of ``num_steps`` steps."""
    return jax.tree.map(lambda r: jnp.broadcast_to(r, (num_steps, *jnp.shape(r))), inner_lr)


def _curve_one(loss_fn: LossFn, params: Params, support: Batch, query: Batch, step_rates: Any,
               prox_lambda: float):
    """One task's query loss before each test-time step and after the last: ``jmaml.adapt``, the inner
    loop training differentiates, observing the query loss."""
    num_steps = int(jax.tree.leaves(step_rates)[0].shape[0])
    return adapt(loss_fn, params, support, inner_lr=step_rates, num_steps=num_steps, per_step=True,
                 prox_lambda=prox_lambda, observe=lambda p: loss_fn(p, query))[1]


def adaptation_curve(loss_fn: LossFn, params: Params, support: Batch, query: Batch, *,
                     inner_lr: Any, num_steps: int = MAX_EVAL_STEPS, per_step: bool = False,
                     prox_lambda: float = 0.0) -> jax.Array:
    """Query loss after 0..num_steps test-time steps on the support set, for each task.

    Args:
      loss_fn: ``loss_fn(params, batch)``.
      params: the starting parameters (shared by all tasks).
      support, query: Batches with a leading task axis.
      inner_lr: the step size (may be traced): a scalar or a tree like ``params``; with
        ``per_step``, either with a leading axis of length ``num_steps`` (one rate per step, as
        MAML++ learns them).
      num_steps: the last step count (static).
      prox_lambda: iMAML's proximal strength λ (0: plain SGD).

    Returns:
      Array of shape ``(num_tasks, num_steps + 1)``.
    """
    num_steps = check_num_steps(num_steps, "num_steps")
    rates = inner_lr if per_step else _per_step(inner_lr, num_steps)
    bad = {jnp.shape(r)[:1] for r in jax.tree.leaves(rates)} - {(num_steps,)}
    if bad:
        raise ValueError(f"inner_lr with per_step=True needs a leading axis of num_steps={num_steps}; "
                         f"got leading shapes {sorted(bad)}")
    return jax.vmap(lambda s, q: _curve_one(loss_fn, params, s, q, rates, prox_lambda))(support, query)


def _take_shots(batch: Batch, k: int) -> Batch:
    return Batch(batch.x[:, :k], batch.y[:, :k])


MAX_EVAL_TASKS = 10_000_000  # evaluate() refuses more held-out tasks than this
DIVERGED_RATIO = 1000.0  # as TrainConfig.max_loss_ratio: an adapted loss this many times the un-adapted one


def _diverged_ratio(diverged_ratio: float | None, higher_is_better: bool) -> float:
    """The ratio past which a task's loss has diverged: ``DIVERGED_RATIO`` by default; a score takes None
    or inf (its tasks are never dropped). ValueError for a finite ratio with a score, or a ratio <= 0 or NaN."""
    if higher_is_better:
        if diverged_ratio is not None and np.isfinite(diverged_ratio):
            raise ValueError(f"diverged_ratio={diverged_ratio!r} applies to a loss; this metric is a score "
                             "(higher is better), whose tasks are never dropped: pass None")
        return float("inf")
    ratio = DIVERGED_RATIO if diverged_ratio is None else float(diverged_ratio)
    if not ratio > 0:  # also NaN
        raise ValueError(f"diverged_ratio must be a positive number (inf: never), got {diverged_ratio!r}")
    return ratio


def summarize(values: np.ndarray, diverged_ratio: float | None = DIVERGED_RATIO, *,
              higher_is_better: bool = False) -> dict[str, Any]:
    """Per step: the mean over every task (``mean_all``), and the mean, 95% CI half-width (1.96
    standard errors) and median over the tasks that did not diverge, with their count (``diverged``).

    ``values`` has shape ``(num_tasks, num_steps + 1)``, column 0 before adaptation. A task has
    diverged at a step when its value there is non-finite, or — for a loss (``higher_is_better``
    False) — more than ``diverged_ratio`` times its value before adaptation (an exploding inner loop,
    like the seed's −1515.48, long before it overflows). A score (an accuracy) is never dropped for
    its size: only a non-finite one is counted, so ``mean`` and ``mean_all`` agree for any finite
    scores. Reporting both for a loss keeps one exploding task from turning the column into NaN or
    10²⁰ without hiding it: ``mean_all`` is what every task gives. With one task left the interval
    is NaN (undefined), never 0.
    """
    values = np.asarray(values, dtype=np.float64)
    ratio = _diverged_ratio(diverged_ratio, higher_is_better)
    if higher_is_better:
        exploded = np.zeros(values.shape, bool)
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            exploded = values > ratio * np.abs(values[:, :1])
    mean, mean_all, ci, median, diverged = [], [], [], [], []
    with np.errstate(invalid="ignore", over="ignore"):
        for column, bad in zip(values.T, exploded.T):
            ok = column[np.isfinite(column) & ~bad]
            diverged.append(int(column.size - ok.size))
            mean_all.append(float(column.mean()))
            mean.append(float(ok.mean()) if ok.size else float("nan"))
            median.append(float(np.median(ok)) if ok.size else float("nan"))
            ci.append(float(1.96 * ok.std(ddof=1) / np.sqrt(ok.size)) if ok.size > 1 else float("nan"))
    return {"mean": mean, "ci95": ci, "median": median, "diverged": diverged, "mean_all": mean_all,
            "num_tasks": int(values.shape[0])}


def _take(tree: Any, k: int) -> Any:
    """The first ``k`` points (axis 1, behind the task axis) of every leaf of a task batch's support."""
    return jax.tree.map(lambda a: a[:, :k], tree)


def _check_evaluable(learner: MetaLearner, tasks_: TaskDistribution) -> None:
    check_learner(learner)
    check_distribution(tasks_)
    if tasks_.heldout is None:
        raise ValueError(f"task distribution {tasks_.name!r} has no held-out tasks (its heldout is None); "
                         "evaluate needs them")


def learner_curves(learner: MetaLearner, meta_params: Any, batch: Any, metric: Callable[[Params, Any], Any],
                   num_steps: int, *, hyper: dict[str, Any] | None = None, model_state: Any = None) -> jax.Array:
    """Each task's ``metric`` on its query set before each of ``num_steps`` steps of the learner's own
    test-time rule (``learner.adapt``) and after the last: shape ``(num_tasks, num_steps + 1)``. Not
    jitted: ``evaluate`` and sweeps jit it around their own arguments."""
    extra = {**(hyper or {}), **({} if model_state is None else {"model_state": model_state})}

    def one(task):
        if model_state is None:
            observe = lambda p: metric(p, task.query)
        else:  # the metric sees the model state of that step (batch norm's statistics, its mode)
            observe = lambda p, s: metric(p, task.query, s)
        _, values = learner.adapt(meta_params, task.support, num_steps, observe=observe, **extra)
        return values

    return jax.vmap(one)(batch)


def evaluate(learner: MetaLearner, meta_params: Any, tasks: TaskDistribution, *, apply: Any = None,
             metric: Any = None, num_tasks: int = NUM_EVAL_TASKS, num_steps: int = MAX_EVAL_STEPS,
             shots: Sequence[int] | None = None, key: Any = EVAL_SEED, batch_size: int | None = None,
             diverged_ratio: float | None = None, label: str = "all", hyper: dict[str, Any] | None = None,
             model_state: Any = None, higher_is_better: bool | None = None,
             progress: bool | None = None) -> dict[str, Any]:
    """The paper's protocol for any learner and task distribution: held-out tasks adapted by the
    learner's own test-time rule, scored after 0..``num_steps`` steps; per step the mean over all
    tasks, and the mean, 95% CI and median over the tasks that did not diverge, with their count.

    The metric's kind decides what "diverged" means (``summarize``): for a loss, non-finite or
    ``diverged_ratio`` times its un-adapted value; for a score such as an accuracy (the
    distribution's ``higher_is_better``, or its ``metric_name``), only non-finite — a task is never
    dropped for scoring 0 before adapting.

    Args:
      learner: the ``MetaLearner`` (its ``adapt`` is the test-time rule).
      meta_params: its trained meta-parameters.
      tasks: the ``TaskDistribution``; its ``heldout(key, n)`` gives the tasks.
      apply: the model's ``apply``, for the distribution's metric (``tasks.make_metric(apply)``).
      metric: ``metric(params, query) -> scalar`` instead (default: the distribution's metric for
        ``apply``, or without ``apply`` the learner's training loss is not known here: pass one).
      num_tasks: held-out tasks (the same on every call with the same ``key``); at least 2 (a 95%
        interval needs two), at most ``MAX_EVAL_TASKS``.
      num_steps: the last number of test-time steps.
      shots: evaluate each K on the first K support points of the same tasks (results keyed by K);
        None: the support sets as sampled (results keyed by ``label``).
      key: the held-out tasks' key or int seed.
      batch_size: tasks per compiled call (bounds memory); each chunk's tasks come from
        ``heldout(fold_in(key, i), batch_size)``. None: all tasks in one call.
      diverged_ratio: for a loss, see ``summarize`` (None: ``DIVERGED_RATIO``); a score takes None
        or ``inf`` (its tasks are never dropped).
      hyper: per-call hyperparameters for the learner's ``adapt`` (e.g. a swept ``inner_lr``).
      model_state: a model's state (for a learner of a model with state), passed to ``adapt`` and
        threaded through the test-time steps; a custom ``metric`` is then called ``metric(params,
        query, state)``. A batch-norm model's test-time mode is the state's
        (``jmaml.models.batch_norm_mode``: transductive, running or per-step statistics), and each
        result records it (``"batch_norm"``).
      higher_is_better: the metric's kind, when ``metric`` measures something other than the
        distribution's metric (None: ``protocols.metric_higher_is_better(tasks)``).
      progress: a progress line with the time left on stderr between chunks (None: when there are
        more than 10 chunks).

    Returns:
      ``{str(K) or label: {"metric": name, "higher_is_better": bool, **summarize(...)}}``.

    Raises:
      ValueError/TypeError: no metric (neither ``metric`` nor ``apply``), a distribution without
        held-out tasks, or bad counts (named).

    Example:
      >>> import jax
      >>> from jmaml import learners, make_loss, models, tasks
      >>> model = models.mlp([1, 8, 1])
      >>> learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
      >>> report = evaluate(learner, model.init(jax.random.key(0)), tasks.sinusoid.distribution(), apply=model.apply,
      ...                   num_tasks=20, num_steps=2, shots=[5])
      >>> sorted(report), len(report["5"]["mean"])
      (['5'], 3)
    """
    setup = _Setup.make(learner, tasks, apply=apply, metric=metric, num_tasks=num_tasks, num_steps=num_steps,
                        key=key, batch_size=batch_size, diverged_ratio=diverged_ratio, model_state=model_state,
                        higher_is_better=higher_is_better)
    # hyperparameters are arguments, not constants: a rate search compiles once for all its candidates
    curves = jax.jit(lambda meta_params, batch, hyper: learner_curves(learner, meta_params, batch, setup.metric,
                                                                      num_steps, hyper=hyper, model_state=model_state))
    values = setup.collect(curves, meta_params, dict(hyper or {}), shots=shots, label=label, progress=progress)
    return {name: setup.summary(v) for name, v in values.items()}


class _Setup(NamedTuple):
    """What ``evaluate`` and ``evaluate_population`` check and share: the metric, its kind, the plan of
    held-out chunks; ``collect`` runs a compiled curve function over them."""

    tasks: TaskDistribution
    metric: Any
    higher_is_better: bool
    diverged_ratio: float | None
    plan: list[tuple[Any, int]]
    model_state: Any

    @staticmethod
    def make(learner: MetaLearner, tasks: TaskDistribution, *, apply: Any, metric: Any, num_tasks: int,
             num_steps: int, key: Any, batch_size: int | None, diverged_ratio: float | None, model_state: Any,
             higher_is_better: bool | None) -> _Setup:
        _check_evaluable(learner, tasks)
        check_num_steps(num_steps, "num_steps")
        num_tasks = check_positive_int(num_tasks, "num_tasks")
        if num_tasks < 2:
            raise ValueError(f"num_tasks={num_tasks}: a mean with a 95% confidence interval needs at least 2 "
                             "held-out tasks")
        if num_tasks > MAX_EVAL_TASKS:
            raise ValueError(f"num_tasks={num_tasks} is more than MAX_EVAL_TASKS={MAX_EVAL_TASKS:,}: the interval "
                             "would be far narrower than any difference worth reporting, at hours of compute; "
                             "evaluate fewer tasks")
        if higher_is_better is None:
            higher_is_better = metric_higher_is_better(tasks)
        elif not isinstance(higher_is_better, bool):
            raise TypeError(f"higher_is_better must be True, False or None, got {higher_is_better!r}")
        if metric is None:
            if apply is None or tasks.make_metric is None:
                raise ValueError("evaluate needs the metric: pass metric=fn(params, query) -> scalar, or apply= the "
                                 "model's apply for a distribution with make_metric")
            make = tasks.make_metric
            metric = make(apply) if model_state is None else \
                (lambda p, q, s: make(lambda pp, x: apply(pp, x, s)[0])(p, q))  # a stateful apply: (pred, state)
        _diverged_ratio(diverged_ratio, higher_is_better)  # refused before anything compiles
        key = jax.random.key(key) if isinstance(key, int) else key
        if batch_size is None:
            plan = [(key, num_tasks)]
        else:
            batch_size = check_positive_int(batch_size, "batch_size")
            plan = [(jax.random.fold_in(key, i), min(batch_size, num_tasks - start))
                    for i, start in enumerate(range(0, num_tasks, batch_size))]
        return _Setup(tasks, metric, higher_is_better, diverged_ratio, plan, model_state)

    def collect(self, curves: Callable, meta_params: Any, hyper: Any, *, shots: Sequence[int] | None, label: str,
                progress: bool | None) -> dict[str, np.ndarray]:
        """``curves(meta_params, batch, hyper)`` over every chunk of held-out tasks, for each K of ``shots``;
        the chunks' curves joined along the task axis (the last but one)."""
        tasks = self.tasks

        def draw(k, n):
            return tasks.heldout(k, n) if tasks.heldout_data is None else tasks.heldout(k, n, tasks.heldout_data)

        keys = [label] if shots is None else [str(k) for k in shots]
        values: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        show = len(self.plan) > 10 if progress is None else bool(progress)
        start = time.perf_counter()
        for i, (chunk_key, n) in enumerate(self.plan):  # one chunk's tasks at a time: memory bounded by batch_size
            chunk = draw(chunk_key, n)
            for name, k in zip(keys, [None] if shots is None else shots):
                values[name].append(np.asarray(curves(meta_params, chunk if k is None else
                                                      chunk._replace(support=_take(chunk.support, k)), hyper)))
            if show:
                done, spent = i + 1, time.perf_counter() - start
                left = spent / done * (len(self.plan) - done)
                print(f"\revaluate: {done}/{len(self.plan)} chunks, {sum(m for _, m in self.plan[:done])} tasks, "
                      f"~{left:.0f}s left", end="" if done < len(self.plan) else "\n", file=sys.stderr, flush=True)
        return {name: np.concatenate(v, axis=-2) for name, v in values.items()}

    def summary(self, values: np.ndarray, model_state: Any = None) -> dict[str, Any]:
        """One result: the metric's kind and ``summarize`` of a (tasks, steps + 1) array."""
        state = self.model_state if model_state is None else model_state
        kind = {"metric": self.tasks.metric_name, "higher_is_better": self.higher_is_better,
                **({} if state is None else {"batch_norm": batch_norm_label(state)})}
        return {**kind, **summarize(values, self.diverged_ratio, higher_is_better=self.higher_is_better)}


def evaluate_population(learner: MetaLearner, population: Any, tasks: TaskDistribution,
                        points: Mapping[str, Sequence[Any]] | None = None, *, apply: Any = None, metric: Any = None,
                        num_tasks: int = NUM_EVAL_TASKS, num_steps: int = MAX_EVAL_STEPS,
                        shots: Sequence[int] | None = None, key: Any = EVAL_SEED, batch_size: int | None = None,
                        diverged_ratio: float | None = None, label: str = "all", higher_is_better: bool | None = None,
                        progress: bool | None = None) -> list[dict[str, Any]]:
    """``evaluate`` for every point of a population at once: one compiled program, vmapped over the
    points, on the same held-out tasks -- not one compile per point.

    Args:
      learner: the population's learner (its ``adapt`` is the test-time rule).
      population: ``fit_population``'s ``PopulationState`` (a diverged point is scored from the last good
        state it was frozen at), or a ``TrainState`` whose leaves have a leading point axis.
      tasks: the ``TaskDistribution``.
      points: the population's table (name -> one value per point), as given to ``fit_population``: the
        learner's per-call hyperparameters in it (a swept ``inner_lr``, ``num_inner_steps``,
        ``inner_hyper.NAME``) are each point's at test time too; ``seed`` and ``meta_lr`` only shaped
        training. A point's ``inner_lr`` may also be a schedule, one rate per test-time step (for a learner
        whose ``adapt`` takes one, as ``jmaml.rl.maml_rl``'s). None: the learner's own hyperparameters for
        every point.
      apply, metric, num_tasks, num_steps, shots, key, batch_size, diverged_ratio, label, higher_is_better,
        progress: as ``evaluate``'s.

    Returns:
      One ``evaluate`` result per point, in the points' order; with a ``PopulationState``, each also has
      ``"train_diverged_at"`` (the step the point diverged at in training, or None).

    Example:
      >>> import jax, optax
      >>> from jmaml import fit_population, learners, make_loss, models, tasks, Logging
      >>> model = models.mlp([1, 8, 1])
      >>> learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
      >>> points = {"inner_lr": [0.01, 0.03], "seed": [0, 1]}
      >>> pop = fit_population(learner, tasks.sinusoid.distribution(), optax.adam(1e-3), model.init, points,
      ...                      steps=10, meta_batch_size=4, log=Logging(every=10, progress=False))
      >>> results = evaluate_population(learner, pop, tasks.sinusoid.distribution(), points, apply=model.apply,
      ...                               num_tasks=20, num_steps=2)
      >>> len(results), len(results[0]["all"]["mean"]), results[1]["train_diverged_at"]
      (2, 3, None)
    """
    from jmaml.engine import population as population_mod

    state = population.points if isinstance(population, population_mod.PopulationState) else population
    if not isinstance(state, TrainState):
        raise TypeError(f"population must be fit_population's PopulationState or a TrainState with a leading point "
                        f"axis, got {type(population).__name__}")
    if np.ndim(state.step) != 1:
        raise ValueError(f"population's TrainState has no point axis (its step has shape {np.shape(state.step)}): "
                         "for one run use evaluate")
    size = int(np.shape(state.step)[0])
    hyper: dict[str, Any] = {}
    if points is not None:
        n, values = population_mod.point_values(points, schedules=True)
        if n != size:
            raise ValueError(f"points has {n} values per name but the population has {size} points")
        plain, inner = population_mod.split_hyper(learner, values)
        hyper = {name: population_mod.as_array(name, values[name]) for name in plain}
        if inner:
            hyper["inner_hyper"] = {name: population_mod.as_array(name, values[population_mod.INNER_HYPER + name])
                                    for name in inner}
    model_state = state.model_state
    setup = _Setup.make(learner, tasks, apply=apply, metric=metric, num_tasks=num_tasks, num_steps=num_steps,
                        key=key, batch_size=batch_size, diverged_ratio=diverged_ratio,
                        model_state=None if model_state is None else jax.tree.map(lambda a: a[0], model_state),
                        higher_is_better=higher_is_better)

    def one(meta_params, state_i, batch, h):
        return learner_curves(learner, meta_params, batch, setup.metric, num_steps, hyper=h, model_state=state_i)

    curves = jax.jit(lambda meta, batch, h: jax.vmap(one, in_axes=(0, 0, None, 0))(meta[0], meta[1], batch, h))
    values_by_k = setup.collect(curves, (state.params, model_state), hyper, shots=shots, label=label,
                                progress=progress)
    diverged = (np.asarray(population.diverged_at) if isinstance(population, population_mod.PopulationState)
                else None)
    out = []
    for i in range(size):
        state_i = None if model_state is None else jax.tree.map(lambda a, i=i: a[i], model_state)
        result: dict[str, Any] = {name: setup.summary(v[i], state_i) for name, v in values_by_k.items()}
        if diverged is not None:
            result["train_diverged_at"] = int(diverged[i]) if diverged[i] >= 0 else None
        out.append(result)
    return out


def pretrained_baseline(loss_fn: LossFn, tasks: TaskDistribution, params: Params, *, steps: int,
                        meta_batch_size: int, optimiser: Any = None, key: Any = 0, apply: Any = None,
                        metric: Any = None, candidates: Sequence[float] = FINETUNE_LRS,
                        num_tasks: int = NUM_EVAL_TASKS, num_validation_tasks: int | None = None,
                        num_steps: int = MAX_EVAL_STEPS, shots: Sequence[int] | None = None,
                        batch_size: int | None = None, run: Any = None, log: Any = None) -> dict[str, Any]:
    """The paper's "pretrained" comparison for any task distribution: one model trained on tasks from
    the whole distribution by plain regression (its loss on each task's query set, no adaptation:
    MAML with k = 0, trained by ``jmaml.fit``), then fine-tuned at test time by SGD at a step size
    chosen on validation tasks (a key separate from the test tasks'), and scored by ``evaluate``.

    Args:
      loss_fn: the model's training loss ``loss_fn(params, batch)``.
      tasks: the ``TaskDistribution`` (its ``heldout`` gives validation and test tasks).
      params: the model's initial parameters.
      steps, meta_batch_size, key: the training run's (``jmaml.fit``).
      optimiser: its optimiser (default ``optax.adam(1e-3)``).
      apply, metric: the evaluation metric, as for ``evaluate``.
      candidates: fine-tuning rates to choose from: the one with the best metric averaged over steps
        1..``num_steps`` on the validation tasks (lowest for a loss, highest for a score); a rate that
        diverges on a validation task scores worst.
      num_tasks: test tasks; num_validation_tasks: validation tasks (default: as many).
      num_steps, shots, batch_size: as for ``evaluate``.
      run, log: the training run's ``jmaml.RunDir``/path and ``jmaml.Logging`` (checkpoints, resume).

    Returns:
      ``{"params", "inner_lr": the chosen rate, "scores": {rate: validation score}, "results":
      evaluate(...) at the chosen rate}``.

    Raises:
      ValueError: no candidates, or a non-positive one (named); as ``fit`` and ``evaluate``.
    """
    import optax

    from jmaml import learners
    from jmaml.engine.loop import fit

    candidates = [float(c) for c in candidates]
    if not candidates or not all(math.isfinite(c) and c > 0 for c in candidates):
        raise ValueError(f"candidates must be finite rates > 0, got {candidates!r}")
    learner = learners.maml(loss_fn, inner_lr=candidates[0], num_inner_steps=0)._replace(name=BASELINE,
                                                                                        label=BASELINE)
    state = fit(learner, tasks, optax.adam(1e-3) if optimiser is None else optimiser, params, steps=steps,
                meta_batch_size=meta_batch_size, key=key, run=run, log=log, name=BASELINE)
    higher = metric_higher_is_better(tasks)
    common = {"apply": apply, "metric": metric, "num_steps": num_steps, "shots": shots, "batch_size": batch_size}
    scores = {}
    for lr in candidates:
        report = evaluate(learner, state.params, tasks, num_tasks=num_validation_tasks or num_tasks,
                          key=VALIDATION_SEED, hyper={"inner_lr": lr}, progress=False, **common)
        values = [v for r in report.values() for v in r["mean_all"][1:]]
        score = float(np.mean(values))
        scores[str(lr)] = score if math.isfinite(score) else (-math.inf if higher else math.inf)
    pick = max if higher else min
    best = pick(candidates, key=lambda lr: scores[str(lr)])
    results = evaluate(learner, state.params, tasks, num_tasks=num_tasks, key=EVAL_SEED, hyper={"inner_lr": best},
                       **common)
    return {"params": state.params, "inner_lr": best, "scores": scores, "results": results}
