r"""A population of runs trained as one: a sweep is a run.

``fit_population`` trains P runs of one learner on one task distribution as a single compiled
program: the meta-step is ``vmap``-ped over a *population axis* whose points differ in traced
hyperparameters -- the learner's per-call ones (``inner_lr``, ``num_inner_steps`` for a learner
built with ``max_inner_steps``, an inner optimiser's ``inner_hyper.NAME``), the meta rate
(``meta_lr``, injected with ``optax.inject_hyperparams``) -- and in their seed (initial
parameters). Every point sees the same meta-batches (one task stream, sampled once per step), so
comparisons across points are paired.

It is the engine's run, with everything ``jmaml.fit`` gives a single one (the same loop:
``engine.train_loop``): the run dir's ownership, lock and fingerprint (the points are part of it),
checkpoints of the whole population, bitwise resume after an interruption or SIGKILL,
SIGINT/SIGTERM, progress, per-point metrics in ``metrics.jsonl``, and sharding of the population
axis (or of each meta-batch's tasks) over a mesh's devices.

Divergence is per point. After every step a point whose meta-loss or gradient is not finite, or
whose adapted query loss exceeds ``max_loss_ratio`` times the un-adapted one, is *frozen*: it keeps
its last good state, records the step (``diverged_at``) and takes no further updates, while the
other points go on as if it were not there. Only when every point has diverged does the run stop
(``DivergenceError``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jmaml.core import protocols
from jmaml.core._checks import check_max_loss_ratio
from jmaml.core._util import default_float
from jmaml.core.meta import TrainState
from jmaml.core.protocols import MetaLearner, TaskDistribution
from jmaml.core.types import PRNGKey
from jmaml.engine import blocking, distributed, runstore
from jmaml.engine import fingerprint as fp
from jmaml.engine import loop as engine
from jmaml.engine.loop import DivergenceError

SEED, META_LR = "seed", "meta_lr"
INNER_HYPER = "inner_hyper."
SHARD_AXES = ("points", "tasks")


class PopulationState(NamedTuple):
    """The state of a population run.

    Attributes:
      points: a ``TrainState`` whose every leaf has a leading population axis.
      key: the shared task stream's key (each step splits it).
      step: the steps taken by the population.
      alive: per point, False once it has diverged (it is then frozen at its last good state).
      diverged_at: per point, the step at which it diverged (-1: never).
      last_loss: per point, its mean meta-loss over the last chunk (NaN before the first).
    """

    points: TrainState
    key: PRNGKey
    step: jax.Array
    alive: jax.Array
    diverged_at: jax.Array
    last_loss: jax.Array


def point_values(points: Mapping[str, Sequence[Any]], schedules: bool = False) -> tuple[int, dict[str, list]]:
    """Checks a population's table (name -> one value per point) and returns its size and values. With
    ``schedules`` (evaluation), a point's ``inner_lr`` may be a schedule: one rate per test-time step, the
    same count for every point."""
    if not isinstance(points, Mapping) or not points:
        raise TypeError(f"points must be a non-empty dict of name -> one value per point, got {points!r}")
    sizes = set()
    out = {}
    for name, values in points.items():
        if not isinstance(name, str):
            raise TypeError(f"points' names must be strings, got {name!r}")
        values = list(np.asarray(values).reshape(-1).tolist()) if not isinstance(values, list | tuple) else \
            list(values)
        if not values:
            raise ValueError(f"points[{name!r}] is empty")
        numbers = values
        if schedules and name == "inner_lr" and all(isinstance(v, list | tuple) for v in values):
            lengths = {len(v) for v in values}
            if len(lengths) != 1 or 0 in lengths:
                raise ValueError(f"points['inner_lr']: each point's schedule must hold the same number (>= 1) of "
                                 f"rates, got lengths {[len(v) for v in values]}")
            values = [list(v) for v in values]
            numbers = [r for v in values for r in v]
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
                raise TypeError(f"points[{name!r}] must hold numbers, got {v!r}")
            if not math.isfinite(float(v)):
                raise ValueError(f"points[{name!r}] must hold finite numbers, got {v!r}")
        if name == SEED and any(int(v) != v or v < 0 for v in values):
            raise ValueError(f"points['seed'] must hold integers >= 0, got {values}")
        sizes.add(len(values))
        out[name] = values
    if len(sizes) > 1:
        raise ValueError(f"points must give one value per point for every name; got lengths "
                         f"{ {n: len(v) for n, v in out.items()} }")
    return sizes.pop(), out


def split_hyper(learner: MetaLearner, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The learner's per-call hyperparameters among ``names`` and the inner optimiser's (``inner_hyper.X``);
    anything else is named as an error."""
    plain, inner = [], []
    for name in names:
        if name in (SEED, META_LR):
            continue
        if name.startswith(INNER_HYPER):
            if "inner_hyper" not in learner.hyper:
                raise ValueError(f"points[{name!r}] sets an inner optimiser's hyperparameter; learner "
                                 f"{learner.name!r} has none (learners.maml(..., inner_optimiser=...) has)")
            inner.append(name[len(INNER_HYPER):])
        elif name in learner.hyper:
            plain.append(name)
        else:
            raise ValueError(f"points[{name!r}]: learner {learner.name!r} takes the per-call hyperparameters "
                             f"{sorted(learner.hyper)}; a population may also vary 'seed', 'meta_lr' and "
                             "'inner_hyper.NAME'. A setting fixed when the learner is built (a learned rate's "
                             "initial value, k without max_inner_steps) takes one population per value, as "
                             "jmaml.sweep.sweep_learner runs them")
    return plain, inner


def as_array(name: str, values: list) -> jax.Array:
    if name == SEED:
        return jnp.asarray(values, jnp.uint32)
    if name == "num_inner_steps":
        return jnp.asarray(values, jnp.int32)
    return jnp.asarray(values, default_float())  # float64 points in a float64 run


def fit_population(learner: MetaLearner, tasks: TaskDistribution, optimiser: Any, params: Any,
                   points: Mapping[str, Sequence[Any]], *, steps: int, meta_batch_size: int, key: Any = 0,
                   model_state: Any = None, run: engine.RunDir | str | None = None,
                   log: engine.Logging | None = None, name: str | None = None, max_loss_ratio: float = 1000.0,
                   mesh: Mesh | None = None, shard: str = "points",
                   stop_at_step: int | None = None, meta_batch_block: int | None = None) -> PopulationState:
    """Meta-trains a population of runs as one compiled program; returns its ``PopulationState``.

    Args:
      meta_batch_block: each point's meta-batch in blocks of this many tasks (``jmaml.blocking``; part of
        the fingerprint; with ``shard="tasks"`` over a mesh, within each device's shard). ``"auto"`` is
        ``fit``'s alone: time one point with ``fit`` and pass its block.
      learner, tasks, steps, meta_batch_size, key, model_state, run, log, stop_at_step: as in
        ``jmaml.fit`` (the population is checkpointed, fingerprinted and resumed as one run; its
        points are part of its fingerprint; ``log``'s callback gets the ``PopulationState``).
      optimiser: the meta-optimiser: an optax ``GradientTransformation``, or -- when ``points`` has
        ``"meta_lr"`` -- a factory ``make(learning_rate) -> GradientTransformation`` such as
        ``optax.adam`` (each point's rate is injected into its optimiser state).
      params: the model's initial parameters, shared by every point; or, when ``points`` has
        ``"seed"``, a function ``init(key) -> params`` called with ``jax.random.key(seed)``.
      points: the population, as name -> one value per point: ``"seed"``, ``"meta_lr"``, the learner's
        per-call hyperparameters (``learner.hyper``: ``"inner_lr"``; ``"num_inner_steps"`` for MAML/FOMAML
        built with ``max_inner_steps``) and ``"inner_hyper.NAME"`` for an inner optimiser's hyperparameters.
      name: the run's name in files (default ``learner.name + "-population"``).
      max_loss_ratio: a point whose adapted query loss exceeds this many times its un-adapted one at
        a step is frozen as diverged (as is one with a non-finite loss or gradient).
      mesh, shard: spread the population over a mesh's devices: ``"points"`` splits the points (the
        population size must divide evenly), ``"tasks"`` splits every meta-batch's tasks.

    Returns:
      The final ``PopulationState``: ``points`` (a ``TrainState`` per point, stacked), ``alive``,
      ``diverged_at`` and ``last_loss`` per point.

    Raises:
      DivergenceError: every point diverged (the last state is kept).
      Interrupted, ValueError, TypeError, checkpoint.CheckpointError: as ``jmaml.fit``; bad ``points``
        (named).

    Example:
      >>> import jax, optax, jmaml
      >>> from jmaml import learners, make_loss, models, tasks
      >>> model = models.mlp([1, 8, 1])
      >>> learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
      >>> pop = fit_population(learner, tasks.sinusoid.distribution(), optax.adam, model.init,
      ...                      {"inner_lr": [0.01, 0.02], "meta_lr": [1e-3, 1e-3], "seed": [0, 1]},
      ...                      steps=20, meta_batch_size=4, log=jmaml.Logging(every=10, progress=False))
      >>> pop.alive.tolist(), int(pop.step)
      ([True, True], 20)
    """
    engine.check_learner(learner)
    engine.check_distribution(tasks)
    plan = engine.run_plan(run, log, steps, meta_batch_size, name or f"{learner.name}-population", stop_at_step)
    run_dir, where, meta_batch_size, name = plan.path, plan.run, plan.meta_batch_size, plan.name
    stream = plan.log.stream
    size, values = point_values(points)
    plain, inner = split_hyper(learner, values)
    if shard not in SHARD_AXES:
        raise ValueError(f"shard must be one of {SHARD_AXES}, got {shard!r}")
    n_dev = 1 if mesh is None else int(mesh.devices.size)
    if n_dev > 1 and shard == "points" and size % n_dev:
        raise ValueError(f"a population of {size} points cannot be split evenly over {n_dev} devices: give a "
                         f"multiple of {n_dev} points, or shard='tasks'")
    if mesh is not None and n_dev > 1 and shard == "tasks":
        distributed.check_divisible(meta_batch_size, mesh)
    check_max_loss_ratio(max_loss_ratio)
    if META_LR in values:
        if learner.returns_step:
            raise ValueError(f"points['meta_lr'] has no meaning for learner {learner.name!r}: it returns its "
                             "update itself (returns_step=True) and trains with jmaml.apply_step()")
        if not callable(optimiser) or isinstance(optimiser, optax.GradientTransformation):
            raise TypeError("with points['meta_lr'], optimiser must be a factory make(learning_rate) -> "
                            f"GradientTransformation (e.g. optax.adam), got {optimiser!r}")
        opt = optax.inject_hyperparams(optimiser)(learning_rate=values[META_LR][0])
    elif isinstance(optimiser, optax.GradientTransformation):
        opt = optimiser
        protocols.check_optimiser_fits(learner, opt)
    else:
        raise TypeError(f"optimiser must be an optax.GradientTransformation (or, with points['meta_lr'], a factory "
                        f"make(learning_rate)), got {optimiser!r}")
    if SEED in values and not callable(params):
        raise TypeError("with points['seed'], params must be a function init(key) -> params")
    if SEED not in values and callable(params):
        raise TypeError("params is a function init(key): give points['seed'] to say each point's key")
    arrays = {n: as_array(n, v) for n, v in values.items()}
    seeds = arrays.get(SEED, jnp.zeros((size,), jnp.uint32))
    betas = arrays.get(META_LR, jnp.zeros((size,), default_float()))

    def init_point(seed, beta):
        p = params(jax.random.key(seed)) if callable(params) else params
        st = engine.initial_state(learner, p, opt, jax.random.key(0), model_state)
        if META_LR in values:
            hyper = dict(st.opt_state.hyperparams)
            hyper["learning_rate"] = jnp.asarray(beta, hyper["learning_rate"].dtype)
            st = st._replace(opt_state=st.opt_state._replace(hyperparams=hyper))
        return st

    try:
        start = jax.jit(jax.vmap(init_point))(seeds, betas)
    except (TypeError, ValueError) as e:
        raise type(e)(f"learner {learner.name!r} could not initialise from these params: {e}") from e
    state = PopulationState(points=start, key=engine.as_key(key), step=jnp.zeros((), jnp.int32),
                            alive=jnp.ones((size,), bool), diverged_at=jnp.full((size,), -1, jnp.int32),
                            last_loss=jnp.full((size,), jnp.nan, jnp.float32))
    settings = engine.run_settings(learner, tasks, opt, start, meta_batch_size, where.fingerprint)
    task_mesh = mesh if shard == "tasks" and n_dev > 1 else None  # blocks within each device's shard of tasks
    block = blocking.check_block(meta_batch_block, meta_batch_size, task_mesh)
    if block is not None:
        settings["meta_batch_block"] = block
        learner = blocking.blocked(learner, block, task_mesh)
    settings["points"] = values
    settings["key"] = fp.describe(state.key)
    settings["max_loss_ratio"] = fp.describe(float(max_loss_ratio))
    hyper = {n: arrays[n] for n in plain}
    hyper.update({INNER_HYPER + n: arrays[INNER_HYPER + n] for n in inner})
    writer = distributed.is_writer()
    with runstore.lock(run_dir) if run_dir is not None and writer else contextlib.nullcontext():
        ckpt, run_record, state = engine.take_run(plan, state, settings)
        if int(state.step) >= plan.steps:
            return state
        placement = _placement(mesh, shard)
        if placement is not None:
            state = state._replace(points=jax.device_put(state.points, placement))
            hyper = jax.device_put(hyper, placement)
        chunk = _make_chunk(learner, tasks, opt, meta_batch_size=meta_batch_size, mesh=mesh, shard=shard,
                            max_loss_ratio=float(max_loss_ratio), hyper=hyper, inner=inner)
        header = {**(where.meta or {}), "fit": run_record, "points": values}
        saver = engine.Saver(ckpt if writer else None, name, header, int(state.step))
        labels = [", ".join(f"{n}={values[n][i]:g}" for n in values) for i in range(size)]

        def finish(old: PopulationState, new: PopulationState, step: int, metrics: dict, seconds: float,
                   length: int):
            loss = np.asarray(metrics["meta_loss"])
            with np.errstate(all="ignore"):
                chunk_mean = loss.mean(axis=0)
            was, now = np.asarray(old.alive), np.asarray(new.alive)
            frozen = np.flatnonzero(was & ~now)
            at = np.asarray(new.diverged_at)
            if frozen.size and writer:
                for i in frozen.tolist():
                    print(f"jmaml: {name} point {i} ({labels[i]}) diverged at step {int(at[i])}: frozen at its last "
                          f"good state; {int(now.sum())} of {size} points go on", file=_stream(stream))
            new = new._replace(last_loss=jnp.asarray(np.where(now, chunk_mean, np.asarray(old.last_loss)),
                                                     jnp.float32))
            if not now.any():
                saver.keep(new, step + length)
                error = DivergenceError(f"{name}: every point of the population diverged (the last at step "
                                        f"{int(at.max())}); the state is kept{' in ' + ckpt if ckpt else ''}")
                error.state = new  # the population as it stopped (e.g. for a sweep's rows)
                raise error
            return new, population_record(name, step + length, metrics, now, seconds, length)

        return engine.train_loop(state, int(state.step), plan, chunk=chunk, finish=finish, saver=saver)


def _stream(stream: TextIO | None) -> TextIO:
    return stream or sys.stderr


def _placement(mesh: Mesh | None, shard: str) -> Any:
    if mesh is None or mesh.devices.size == 1:
        return None
    return distributed.task_sharding(mesh) if shard == "points" else distributed.replicated(mesh)


def population_record(name: str, step: int, metrics: dict[str, np.ndarray], alive: np.ndarray, seconds: float,
                      length: int) -> dict[str, Any]:
    """One metrics.jsonl line of a population: the mean over the points still alive of each metric (as
    a single run's line has), the number alive, and each point's own chunk mean (``point_NAME``)."""
    record: dict[str, Any] = {"phase": name, "step": step}
    with np.errstate(all="ignore"):
        for key, value in metrics.items():
            per_point = np.asarray(value, np.float64).mean(axis=0)  # (points,)
            record[key] = float(per_point[alive].mean()) if alive.any() else math.nan
            record[f"point_{key}"] = [float(v) for v in per_point]
    record["meta_loss_last"] = float(np.asarray(metrics["meta_loss"])[-1][alive].mean()) if alive.any() else math.nan
    record["points_alive"] = int(alive.sum())
    record["steps_per_s"] = length / seconds
    record["wall_time"] = time.time()
    return record


def _make_chunk(learner: MetaLearner, tasks: TaskDistribution, opt: optax.GradientTransformation, *,
                meta_batch_size: int, mesh: Mesh | None, shard: str, max_loss_ratio: float, hyper: dict[str, Any],
                inner: list[str]) -> Callable:
    """``chunk(state, length) -> (state, metrics)``: ``length`` steps of the whole population, each
    sampling one meta-batch for all points; metrics per step and point (per-task ones averaged)."""
    step = engine.make_learner_step(learner, opt)
    placement = _placement(mesh, shard)
    data = tasks.data if tasks.data is None else distributed.put_replicated(tasks.data, mesh)

    def call(state: TrainState, batch: Any, h: dict[str, Any]):
        kw = {n: v for n, v in h.items() if not n.startswith(INNER_HYPER)}
        if inner:
            kw["inner_hyper"] = {n: h[INNER_HYPER + n] for n in inner}
        return step(state, batch, **kw)

    def one(ps: PopulationState, _, data, hyper):
        key, key_tasks = jax.random.split(ps.key)
        batch = engine.sample_tasks(tasks, key_tasks, meta_batch_size, data)
        if shard == "tasks":
            batch = distributed.shard_tasks(batch, mesh)
        points = ps.points if placement is None else jax.lax.with_sharding_constraint(ps.points, placement)
        new, metrics = jax.vmap(call, in_axes=(0, None, 0))(points, batch, hyper)
        ok = ~engine.diverged_steps(metrics, max_loss_ratio, jnp)  # the rule of a single run, per point
        alive = ps.alive & ok

        def keep(a, b):
            return jnp.where(alive.reshape(alive.shape + (1,) * (a.ndim - 1)), a, b)

        new = new._replace(params=jax.tree.map(keep, new.params, points.params),
                           opt_state=jax.tree.map(keep, new.opt_state, points.opt_state),
                           step=keep(new.step, points.step), key=points.key,
                           model_state=jax.tree.map(keep, new.model_state, points.model_state))
        if placement is not None:
            new = jax.lax.with_sharding_constraint(new, placement)
        diverged_at = jnp.where(ps.alive & ~ok, ps.step + 1, ps.diverged_at)
        scalars = {k: jnp.mean(v.reshape(v.shape[0], -1), axis=1) for k, v in metrics.items()
                   if jnp.issubdtype(v.dtype, jnp.number)}
        return ps._replace(points=new, key=key, step=ps.step + 1, alive=alive, diverged_at=diverged_at), scalars

    @jax.jit
    def _chunk(ps: PopulationState, marker: jax.Array, data: Any, hyper: dict[str, Any]):
        return jax.lax.scan(lambda s, x: one(s, x, data, hyper), ps, None, length=marker.shape[0])

    executables: dict[int, Any] = {}

    def chunk(ps: PopulationState, length: int):
        marker = jnp.zeros((length,), jnp.int8)
        if length not in executables:
            executables[length] = _chunk.lower(ps, marker, data, hyper).compile()
            engine.check_memory(executables[length], f"a chunk of {length} meta-steps of a population of "
                                f"{learner.name!r}")
        return executables[length](ps, marker, data, hyper)

    return chunk


def point(state: PopulationState, i: int) -> TrainState:
    """Point ``i``'s ``TrainState``, e.g. to evaluate or checkpoint it alone."""
    return jax.tree.map(lambda a: a[i], state.points)
