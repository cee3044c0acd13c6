r"""Whole hyperparameter studies as runs: populations of meta-training runs, each one compiled program.

A sweep is a run (``jmaml.population.fit_population``): its points train together, ``vmap``-ped over
a population axis inside one jitted ``lax.scan`` over steps, with a single run's guarantees --
checkpoints in a run dir, bitwise resume after an interruption or SIGKILL, progress, per-point
metrics, and a point that diverges frozen and reported while the others go on.

* α is traced per point (the learner's per-call ``inner_lr``), β through
  ``optax.inject_hyperparams`` (each point's optimiser state holds its rate), the seed sets each
  point's initial parameters; the training tasks are the same at every point (one task stream), so
  comparisons across the grid are paired.
* k: MAML and FOMAML trace it (a masked ``lax.scan`` to ``k_max = max(ks)``, equal to the plain
  k-step scan for each k), so the whole grid is one population. The other learners build k into
  their program (Reptile's and iMAML's inner solves, MAML++'s per-step rates and weights, ...): one
  population per k. Tracing k everywhere would run every point at ``k_max`` steps' cost; a loop of
  populations costs one compile per k and each runs at its own k.
* Learners whose inner rate is learned (Meta-SGD, MAML++) fix its initial value when built: one
  population per (k, α).

A grid point equals the single run ``jmaml train`` would do with the same (α, β, k, seed) and
``task_seed`` (to float32 round-off: the masked scan and the injected rate compute the same numbers in
a different order). When the grid does not fit the memory budget it is split into populations of
equal size (padded, so they compile once).

After training, every point is evaluated with the paper's protocol (held-out tasks, query MSE after
0..10 steps at its own α, by its learner's own test-time rule) and, for MAML's plain-SGD rule, its
stability is diagnosed: λ_max of the support-loss Hessian at the trained parameters, and the bound
2/λ_max beside α.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jmaml import learners
from jmaml import tasks as task_families
from jmaml.core import protocols
from jmaml.core._checks import check_num_steps, check_rate, check_seed
from jmaml.core._util import default_float
from jmaml.core.diagnostics import hessian_max_eigenvalue, step_size_bound
from jmaml.core.protocols import MetaLearner, TaskDistribution, metric_higher_is_better
from jmaml.engine import distributed
from jmaml.engine.evaluation import evaluate_population
from jmaml.engine.loop import (
    DivergenceError,
    Logging,
    RunDir,
    check_distribution,
    check_learner,
    device_memory_bytes,
)
from jmaml.engine.population import INNER_HYPER, PopulationState, fit_population
from jmaml.engine.runstore import atomic_write_text, refuse_other_kind
from jmaml.run import recipes
from jmaml.run.config import OPTIMISERS, TrainConfig
from jmaml.run.evaluate import EVAL_SEED, MAX_EVAL_STEPS, NUM_EVAL_QUERY, adaptation_curve, learner_curves
from jmaml.run.recipes import build_model, effective_unroll, task_stream_key
from jmaml.run.rundir import data_fingerprint, run_fingerprint

DEFAULT_MEMORY_FRACTION = 0.25
PLAN_FILE = "sweep-plan.json"


@dataclasses.dataclass(frozen=True)
class Grid:
    """The axes of a sweep; the grid is their Cartesian product, in this order."""

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    ks: tuple[int, ...]
    seeds: tuple[int, ...]

    def validate(self) -> Grid:
        for name in ("alphas", "betas", "ks", "seeds"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values:
                raise ValueError(f"{name} must be a non-empty tuple, got {values!r}")
        for a in self.alphas:
            check_rate(a, "alpha")
        for b in self.betas:
            check_rate(b, "beta", allow_zero=False)
        for k in self.ks:
            check_num_steps(k, "k")
        for s in self.seeds:
            check_seed(s, "seeds")
        return self

    def points(self) -> list[tuple[float, float, int, int]]:
        return list(itertools.product(self.alphas, self.betas, self.ks, self.seeds))


def estimate_point_bytes(config: TrainConfig, k_max: int, num_params: int) -> int:
    """A generous estimate of one grid point's working memory in a meta-step.

    Second-order MAML keeps, per task and inner step, the activations of the support pass and of
    its backward pass (for the Hessian-vector products of the outer gradient); each point also
    carries its parameters, optimiser state and gradients.
    """
    width = 1 + sum(config.hidden) + 1
    points = config.num_support + config.num_query
    activations = config.meta_batch_size * points * width * 4 * 6 * (k_max + 2)
    per_task_params = config.meta_batch_size * num_params * 4 * (k_max + 2)
    state = num_params * 4 * 8
    return activations + per_task_params + state


def plan_chunks(num_points: int, point_bytes: int, budget_bytes: int) -> int:
    """How many grid points to run at once within ``budget_bytes``.

    Raises:
      ValueError: if a single point does not fit.
    """
    if point_bytes > budget_bytes:
        raise ValueError(f"the grid is too large even for chunking: one grid point needs about "
                         f"{point_bytes / 2**20:.1f} MiB, more than the memory budget of "
                         f"{budget_bytes / 2**20:.1f} MiB; lower k, the meta-batch size or the widths, "
                         "or raise memory_budget_bytes")
    return max(1, min(num_points, budget_bytes // point_bytes))


SHARD_AXES = ("grid", "tasks")


def _heldout(config: TrainConfig, dist: Any, num_tasks: int) -> Any:
    """The held-out tasks every point is evaluated on, with ``config.num_support`` support points."""
    key = jax.random.key(EVAL_SEED)
    tasks = dist.heldout(key, num_tasks) if dist.heldout_data is None else dist.heldout(key, num_tasks,
                                                                                        dist.heldout_data)
    return tasks._replace(support=jax.tree.map(lambda a: a[:, :config.num_support], tasks.support))


def _eval_task_chunk(config: TrainConfig, num_tasks: int) -> int:
    """Held-out tasks per compiled evaluation call: the family's protocol's batch size where it has one (an
    image family's held-out curves for all tasks at once need tens of GiB: 600 tasks x 75 query images x
    the conv's 28 x 28 x 64 activations), else all of them."""
    batch = task_families.family(config.task).protocol(config).batch_size
    return num_tasks if batch is None else max(1, min(num_tasks, int(batch)))


def _padded_slices(n: int, size: int) -> list[np.ndarray]:
    """Indices of ``n`` items in slices of ``size``, the last one padded (repeating item ``n - 1``) so that
    every call has the same shape and compiles once; the caller drops the results past ``n``."""
    return [np.minimum(np.arange(start, start + size), n - 1) for start in range(0, n, size)]


def _chunked_curves(fn: Callable[[Any], Any], tasks: Any, chunk: int, axis: int) -> np.ndarray:
    """``fn(task_chunk)`` over the held-out tasks ``chunk`` at a time, the results joined on ``axis`` (the
    task axis of ``fn``'s output) with the padding dropped."""
    num_tasks = jax.tree.leaves(tasks)[0].shape[0]
    parts = [np.asarray(fn(jax.tree.map(lambda a, i=idx: a[i], tasks))) for idx in _padded_slices(num_tasks, chunk)]
    return np.take(np.concatenate(parts, axis=axis), np.arange(num_tasks), axis=axis)


def _evaluate_points(config: TrainConfig, model, params, alphas, *, num_tasks: int, num_diag_tasks: int,
                     budget_bytes: int):
    dist: Any = recipes.build_tasks(config)
    eval_loss = dist.make_metric(model.apply)
    tasks = _heldout(config, dist, num_tasks)
    chunk = _eval_task_chunk(config, num_tasks)

    @jax.jit
    def curves(params, alphas, part):
        return jax.vmap(lambda p, a: adaptation_curve(eval_loss, p, part.support, part.query, inner_lr=a,
                                                      num_steps=MAX_EVAL_STEPS))(params, alphas)

    _, train_loss = build_model(config)
    diag_support = jax.tree.map(lambda x: x[:num_diag_tasks], tasks.support)

    @jax.jit
    def curvature(params):
        return jax.vmap(lambda p: jax.vmap(lambda b: hessian_max_eigenvalue(train_loss, p, b))(diag_support))(params)

    # evaluation needs far more memory per point than a training step (every held-out task's curve):
    # points go through it in sub-chunks that fit the budget, padded so that they compile once, and the
    # held-out tasks in chunks of the family's evaluation batch
    n = len(alphas)
    width = 1 + sum(config.hidden) + 1
    point_bytes = chunk * (config.num_support + NUM_EVAL_QUERY) * width * 4 * 6 * (MAX_EVAL_STEPS + 2)
    per_call = max(1, min(n, budget_bytes // max(point_bytes, 1)))
    out_curves, out_lam = [], []
    for idx in _padded_slices(n, per_call):
        part_params = jax.tree.map(lambda a: a[idx], params)
        part_alphas = alphas[idx]
        out_curves.append(_chunked_curves(lambda part: curves(part_params, part_alphas, part), tasks, chunk,
                                          axis=1))
        out_lam.append(np.asarray(curvature(part_params)))
    return np.concatenate(out_curves)[:n], np.concatenate(out_lam)[:n]


def _shard_axis(shard: str) -> str:
    if shard not in SHARD_AXES:
        raise ValueError(f"shard must be one of {SHARD_AXES}, got {shard!r}")
    return "points" if shard == "grid" else shard


class _Populations(NamedTuple):
    """How a sweep trains each of its populations: the settings every population shares (its run folder and
    how it owns it, its length, task stream, logging, divergence rule and placement)."""

    run_dir: str | None
    resume: bool
    overwrite: bool
    fingerprint: dict | None
    steps: int
    meta_batch_size: int
    key: Any
    log_every: int
    checkpoint_every: int | None
    max_loss_ratio: float
    mesh: Mesh | None
    shard: str
    progress: bool
    stream: Any
    log: Callable[[str], Any] | None


def _train_population(name: str, learner: MetaLearner, tasks: TaskDistribution, make_optimiser: Callable,
                      init_params: Callable, part: Sequence[dict[str, Any]], traced: Sequence[str], label: str,
                      how: _Populations) -> PopulationState:
    """One population of the sweep: ``part``'s points (dicts of alpha, beta, k, seed, inner_hyper.NAME),
    with ``traced`` naming the learner's per-call hyperparameters the points set."""
    run_dir, resume, overwrite, steps, log = how.run_dir, how.resume, how.overwrite, how.steps, how.log
    column = {"inner_lr": "alpha", "num_inner_steps": "k"}
    points: dict[str, list] = {"seed": [p["seed"] for p in part], "meta_lr": [p["beta"] for p in part]}
    if learner.returns_step:  # the learner's estimate is its update (TRPO, PPO): no meta rate to inject
        betas = sorted({p["beta"] for p in part})
        if len(betas) > 1:
            raise ValueError(f"beta {betas}: learner {learner.name!r} returns its update itself (its outer step, "
                             "e.g. TRPO, has no meta rate), so a sweep of it takes one beta, which it ignores")
        del points["meta_lr"]
        make_optimiser = protocols.apply_step()
    for h in traced:
        points[h] = [p[column.get(h, h)] for p in part]
    callback = None
    if log is not None:
        callback = lambda record, _: log(f"sweep {label}: step {record['step']}/{steps}, "  # noqa: E731
                                         f"{record['points_alive']} of {len(part)} points alive")
    if run_dir is not None and resume and not os.path.exists(os.path.join(run_dir, f"{name}.ckpt.npz")):
        # a resumed sweep's populations not yet checkpointed start (again) now: nothing of theirs to keep
        resume, overwrite = False, True
    where = None if run_dir is None else RunDir(run_dir, checkpoint_every=how.checkpoint_every, resume=resume,
                                                   overwrite=overwrite, fingerprint=how.fingerprint)
    logging = Logging(every=how.log_every, progress=how.progress, stream=how.stream, callback=callback)
    try:
        return fit_population(learner, tasks, make_optimiser, init_params, points, steps=steps,
                              meta_batch_size=how.meta_batch_size, key=how.key, name=name, run=where, log=logging,
                              max_loss_ratio=how.max_loss_ratio, mesh=how.mesh, shard=how.shard)
    except DivergenceError as e:  # every point diverged: rows say so; the sweep goes on
        if e.state is None:
            raise
        return e.state


def _point_rows(part: Sequence[dict[str, Any]], state: PopulationState) -> list[dict[str, Any]]:
    at, loss = np.asarray(state.diverged_at), np.asarray(state.last_loss)
    return [{**p, "final_meta_loss": float(loss[g]), "diverged_at_step": int(at[g]) if at[g] >= 0 else None,
             "train_diverged": bool(at[g] >= 0)} for g, p in enumerate(part)]


def _chunks(points: list[dict[str, Any]], per_chunk: int) -> list[tuple[list[dict[str, Any]], int]]:
    """The points in chunks of ``per_chunk``, each padded with copies of its last point (one compile for
    all); yields (padded chunk, number of real points)."""
    out = []
    for start in range(0, len(points), per_chunk):
        part = points[start:start + per_chunk]
        out.append((part + [part[-1]] * (per_chunk - len(part)), len(part)))
    return out


def _open_sweep(run_dir: str | None, *, resume: bool, overwrite: bool, record: dict[str, Any],
                per_chunk: int | None = None) -> int | None:
    """The one resume rule of a sweep, for ``run_sweep`` and ``sweep_learner`` alike: a new sweep records what it
    sweeps (``record``: its grid and meta-batch) and its points per population in ``run_dir/PLAN_FILE``;
    ``resume`` continues exactly that, or fails naming why (no folder, nothing recorded, another grid). Returns
    the points per population (on resume, the recorded one, so a different memory budget or device cannot
    regroup and so re-fingerprint its populations)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pick one")
    if run_dir is None:
        if resume:
            raise ValueError("resume=True needs run_dir, the folder of the sweep to continue")
        return per_chunk
    refuse_other_kind(run_dir, "sweep", "run_dir")
    path = os.path.join(run_dir, PLAN_FILE)
    record = json.loads(json.dumps(record))  # as it reads back (tuples are lists)
    if resume:
        if not os.path.exists(path):
            raise ValueError(f"resume: {run_dir} holds no sweep to resume (no {PLAN_FILE}); leave out resume "
                             "(--resume) to start one there")
        try:
            with open(path, encoding="utf-8") as f:
                plan = json.load(f)
            recorded_chunk = int(plan["points_per_population"]) if per_chunk is not None else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"resume: {path} is not a sweep plan jmaml wrote ({e})") from None
        old = plan.get("sweep")
        if isinstance(old, dict):  # plans written before the grid was recorded carry none to compare
            diff = [f"{k} {record[k]!r} (recorded {old.get(k)!r})" for k in record if old.get(k) != record[k]]
            if diff:
                raise ValueError(f"resume continues the sweep recorded in {path}; these settings differ: "
                                 f"{'; '.join(diff)}. Resume it as recorded, or start over with overwrite "
                                 "(--overwrite) or another folder")
        return recorded_chunk
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(path, json.dumps({"points_per_population": per_chunk, "sweep": record}) + "\n")
    return per_chunk


def _grid_record(grid: Grid, meta_batch_size: int, **more: Any) -> dict[str, Any]:
    return {"alpha": list(grid.alphas), "beta": list(grid.betas), "k": list(grid.ks), "seed": list(grid.seeds),
            "meta_batch_size": meta_batch_size, **more}


def _traced_k(algo: str) -> bool:
    return learners.spec(algo).traced_k


def run_sweep(base: TrainConfig, grid: Grid, *, task_seed: int | None = None, eval_tasks: int = 600,
              diag_tasks: int = 50, memory_budget_bytes: int | None = None, keep_params: bool = False,
              evaluate: bool = True, log=None, mesh: Mesh | None = None, shard: str = "grid",
              on_chunk: Callable[[list[dict[str, Any]]], Any] | None = None, run_dir: str | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = False,
              stream: Any = None) -> dict[str, Any]:
    """Meta-trains every grid point of a ``TrainConfig``'s learner and task family -- populations of
    runs, each one compiled program (``jmaml.population.fit_population``) -- and evaluates each point.

    Every registered learner sweeps. MAML and FOMAML (``learners.spec(algo).traced_k``) trace k: one
    population holds every (α, β, k, seed) (a masked inner scan to ``max(ks)``). The others build k
    into their program: one population per k; a learner that learns its inner rate (Meta-SGD, MAML++)
    builds α (the rate's initial value) in too: one population per (k, α). A population larger than
    the memory budget is split into populations of equal size (padded: one compile for all).

    With ``run_dir`` the sweep is a run: each population checkpoints there every ``base.checkpoint_every``
    steps (``NAME.ckpt.npz`` and ``metrics.jsonl``, its fingerprint the config, the task seed and its
    points) and ``resume=True`` continues an interrupted sweep (SIGINT/SIGTERM, SIGKILL, pre-emption)
    bitwise where it stopped; finished populations are not trained again.

    Args:
      base: settings shared by every point (model, shots, meta-batch, steps, optimiser, ...);
        its inner_lr, meta_lr, num_inner_steps and seed are replaced by the grid's.
      grid: the α, β, k and seed axes.
      task_seed: the training-task stream shared by all points (default ``base.seed``).
      eval_tasks: held-out tasks for the evaluation of each point.
      diag_tasks: held-out tasks on which λ_max is measured per point (learners whose test-time rule is
        plain SGD at α; NaN for the others).
      memory_budget_bytes: split the grid to stay within this (default: a quarter of the device's
        memory).
      keep_params: also return each point's trained meta-parameters (``result["params"]``, a list).
      evaluate: evaluate and diagnose every point after training (else those fields are NaN).
      log: ``log(str)`` for progress lines (default: silent).
      mesh: spread the work over this mesh's devices (``jmaml.distributed.task_mesh``; one process).
      shard: with a mesh, ``"grid"`` splits the points over the devices (each device trains whole
        runs; populations are rounded to a multiple of the device count) or ``"tasks"`` splits every
        meta-batch's tasks (each run spans all devices; the meta-batch must divide evenly).
      on_chunk: ``on_chunk(rows)`` with every finished point's row so far, after each population
        (``jmaml sweep`` writes them to sweep.csv: a sweep that fails later keeps what it finished).
      run_dir, resume, overwrite: the sweep's run dir (see above); ``overwrite`` starts its populations
        again.
      progress, stream: as ``jmaml.fit`` (a progress bar per population).

    Returns:
      ``{"rows": [one dict per grid point], "meta": {...timings, populations...}}``. A point is
      ``diverged`` when its training diverged (``train_diverged``, at ``diverged_at_step``: a
      non-finite loss or gradient, or an adapted loss above ``base.max_loss_ratio`` times the
      un-adapted one; the point is then frozen at its last good state while the others go on) or when
      adapting it on the held-out tasks at its α blows up (``eval_diverged``).
    """
    base.validate()
    grid.validate()
    traced_k = _traced_k(base.algo)
    dist = recipes.build_tasks(base)
    if dist.heldout is None:
        raise ValueError(f"sweeps evaluate every point on held-out tasks; task {base.task!r} has none")
    axis = _shard_axis(shard)
    n_dev = 1 if mesh is None else mesh.devices.size
    if mesh is not None and n_dev > 1 and axis == "tasks":
        distributed.check_divisible(base.meta_batch_size, mesh)
    for k in grid.ks:
        if k < learners.spec(base.algo).min_inner_steps:
            raise ValueError(f"algo {base.algo!r} needs k >= {learners.spec(base.algo).min_inner_steps}; the grid "
                             f"has k = {k}")
    task_seed = base.seed if task_seed is None else task_seed
    model, loss_fn = build_model(base)
    num_params = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(
        jax.eval_shape(model.init, jax.random.key(0))))
    budget = memory_budget_bytes or int(DEFAULT_MEMORY_FRACTION * device_memory_bytes())
    everything = [{"alpha": a, "beta": b, "k": k, "seed": s} for a, b, k, s in grid.points()]
    per_chunk = plan_chunks(len(everything), estimate_point_bytes(base, max(grid.ks), num_params), budget * n_dev)
    if n_dev > 1 and axis == "points":  # whole points per device; padding fills the last population
        per_chunk = max(n_dev, per_chunk - per_chunk % n_dev)
    stream_key = task_stream_key(dataclasses.replace(base, task_seed=task_seed))
    fingerprint = {"config": run_fingerprint(base), "task_seed": task_seed, "data": data_fingerprint(base)}

    def own_optimiser(learning_rate):  # the learner's combination (learned inner rates at their own rate)
        return learners.meta_optimiser(base.algo, OPTIMISERS[base.optimiser], learning_rate, base.options)

    # a plain meta-optimiser is injected as the factory itself (every numeric setting of optax's becomes a
    # traced hyperparameter), as sweeps always did: the default sweep's table stays bitwise what it was
    plain = learners.spec(base.algo).meta_optimiser is None
    make_optimiser = OPTIMISERS[base.optimiser] if plain else own_optimiser

    def init_params(key):
        return model.init(jax.random.split(key)[0])

    def build(k: int, alpha: float | None = None) -> MetaLearner:
        cfg = dataclasses.replace(base, num_inner_steps=k, inner_lr=base.inner_lr if alpha is None else alpha)
        extra = {"max_inner_steps": k} if traced_k else {}
        try:
            return learners.make(base.algo, loss_fn, inner_lr=cfg.inner_lr, num_inner_steps=k, options=cfg.options,
                                 run_steps=cfg.steps, remat=cfg.remat, unroll=effective_unroll(cfg.unroll, k),
                                 **extra)
        except ValueError as e:
            if not traced_k:
                raise
            raise ValueError(f"run_sweep traces k for algo {base.algo!r} (learners built with max_inner_steps), "
                             f"which these settings do not take: {e}. Sweep a fixed k with "
                             "sweep_learner(lambda k: learners.maml(loss_fn, ..., num_inner_steps=k), ...)") from None

    groups: list[tuple[str, MetaLearner, list[dict[str, Any]], list[str]]] = []
    if traced_k:
        groups.append(("sweep", build(max(grid.ks)), everything, ["inner_lr", "num_inner_steps"]))
    else:
        for k in sorted(set(grid.ks)):
            learner = build(k)
            at_k = [p for p in everything if p["k"] == k]
            if "inner_lr" in learner.hyper:
                groups.append((f"sweep-k{k}", learner, at_k, ["inner_lr"]))
            else:
                for alpha in sorted(set(grid.alphas)):
                    groups.append((f"sweep-k{k}-alpha{alpha:g}", build(k, alpha),
                                   [p for p in at_k if p["alpha"] == alpha], []))
    if distributed.is_writer():  # process 0 owns the folder (the others train what it plans)
        per_chunk = _open_sweep(run_dir, resume=resume, overwrite=overwrite, per_chunk=per_chunk,
                                record=_grid_record(grid, base.meta_batch_size, task_seed=task_seed)) or per_chunk
    how = _Populations(run_dir, resume, overwrite, fingerprint, base.steps, base.meta_batch_size, stream_key,
                       base.log_every, base.checkpoint_every if run_dir else None, base.max_loss_ratio, mesh, axis,
                       progress, stream, log)
    rows: list[dict[str, Any]] = []
    kept: list[Any] = []
    t0 = time.perf_counter()
    num_populations = 0
    higher = metric_higher_is_better(dist)
    for prefix, learner, group, traced in groups:
        for i, (part, real) in enumerate(_chunks(group, per_chunk)):
            name = prefix if len(group) <= per_chunk else f"{prefix}-{i}"
            state = _train_population(name, learner, dist, make_optimiser, init_params, part, traced,
                                      f"{name} ({real} points)", how)
            num_populations += 1
            new = _point_rows(part, state)[:real]
            params = state.points.params
            if evaluate:
                curves, lam = _evaluate_sweep_points(base, model, learner, params, part, dist, eval_tasks=eval_tasks,
                                                     diag_tasks=diag_tasks, budget=budget)
            else:
                curves = np.full((len(part), 1, MAX_EVAL_STEPS + 1), np.nan)
                lam = np.full((len(part), 1), np.nan)
            for g, row in enumerate(new):
                row.update(_evaluation_fields(curves[g], lam[g], row["train_diverged"], evaluate, base.max_loss_ratio,
                                              higher))
                if keep_params:
                    kept.append(jax.tree.map(lambda a, g=g: np.asarray(a[g]), params))
            rows += new
            if on_chunk is not None:
                on_chunk(list(rows))
    order = {(p["alpha"], p["beta"], p["k"], p["seed"]): i for i, p in enumerate(everything)}
    ranks = sorted(range(len(rows)), key=lambda i: order[(rows[i]["alpha"], rows[i]["beta"], rows[i]["k"],
                                                          rows[i]["seed"])])
    rows = [rows[i] for i in ranks]
    meta = {"metric": dist.metric_name, "higher_is_better": higher, "eval_tasks": eval_tasks if evaluate else 0,
            "num_points": len(everything), "points_per_chunk": per_chunk, "num_chunks": num_populations,
            "seconds": time.perf_counter() - t0, "task_seed": task_seed, "k_max": max(grid.ks),
            "traced_k": traced_k, "memory_budget_bytes": budget, "base_config": base.to_dict()}
    result = {"rows": rows, "meta": meta}
    if keep_params:
        result["params"] = [kept[i] for i in ranks]
    return result


def _sgd_rule(learner: MetaLearner) -> bool:
    """Whether the learner's test-time rule is plain SGD at α on the model's parameters (MAML's), which
    ``_evaluate_points`` vectorises over points (and whose curvature bound 2/λ_max applies)."""
    return learner.name in learners.REGISTRY and _traced_k(learner.name) and "inner_hyper" not in learner.hyper


def _evaluate_sweep_points(base: TrainConfig, model: Any, learner: MetaLearner, params: Any,
                           part: Sequence[dict[str, Any]], dist: Any, *, eval_tasks: int,
                           diag_tasks: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's held-out curve (tasks, steps + 1) and λ_max per diagnostic task."""
    alphas = jnp.asarray([p["alpha"] for p in part], default_float())
    if _sgd_rule(learner):
        return _evaluate_points(base, model, params, alphas, num_tasks=eval_tasks, num_diag_tasks=diag_tasks,
                                budget_bytes=budget)
    metric = dist.make_metric(model.apply)
    tasks = _heldout(base, dist, eval_tasks)
    uses_alpha = "inner_lr" in learner.hyper

    chunk = _eval_task_chunk(base, eval_tasks)
    point_curves = jax.jit(lambda meta_params, alpha, batch: learner_curves(  # the learner's own rule, as evaluate's
        learner, meta_params, batch, metric, MAX_EVAL_STEPS, hyper={"inner_lr": alpha} if uses_alpha else None))

    def one_point(g: int) -> np.ndarray:
        meta_params = jax.tree.map(lambda a: a[g], params)
        return _chunked_curves(lambda batch: point_curves(meta_params, alphas[g], batch), tasks, chunk, axis=0)

    curves = [one_point(g) for g in range(len(part))]
    return np.stack(curves), np.full((len(part), 1), np.nan)


def _evaluation_fields(c: np.ndarray, lam_g: np.ndarray, train_diverged: bool, evaluated: bool,
                       max_loss_ratio: float, higher_is_better: bool = False) -> dict[str, Any]:
    """A point's row fields from its held-out curves ``c`` (tasks, steps + 1): per step the mean and 95%
    CI half-width over the tasks whose value is finite, where evaluation diverged, and λ_max."""
    finite = np.isfinite(c)
    count = finite.sum(axis=0)
    with np.errstate(all="ignore"):
        mean = [float(c[finite[:, s], s].mean()) if count[s] else math.nan for s in range(c.shape[1])]
        ci = [float(1.96 * c[finite[:, s], s].std(ddof=1) / np.sqrt(count[s])) if count[s] > 1 else math.nan
              for s in range(c.shape[1])]
    lam_med = float(np.median(lam_g)) if np.isfinite(lam_g).all() else math.nan
    bad_steps = [s for s in range(c.shape[1]) if not finite[:, s].all()]
    return {**curve_fields(mean, ci, int((~finite[:, -1]).sum()), bad_steps, train_diverged=train_diverged,
                           evaluated=evaluated, max_loss_ratio=max_loss_ratio, higher_is_better=higher_is_better),
            "lambda_max_median": lam_med,
            "alpha_bound": float(step_size_bound(jnp.asarray(lam_med))) if np.isfinite(lam_med) else math.nan}


def curve_fields(mean: Sequence[float], ci95: Sequence[float], diverged_tasks: int, bad_steps: Sequence[int], *,
                 train_diverged: bool, evaluated: bool, max_loss_ratio: float,
                 higher_is_better: bool) -> dict[str, Any]:
    """The evaluation fields of every sweep row, from a point's per-step mean and 95% CI: the metric after
    1, 5 and 10 steps, and ``eval_diverged_step``, the first step at which evaluation diverged or None:
    a step in ``bad_steps`` (a task's value not finite there), a non-finite mean, or for a loss a mean
    past ``max_loss_ratio`` times the un-adapted one (a score's tasks never diverge by size)."""
    n = len(mean)
    bad = set(bad_steps) | {s for s in range(n) if not math.isfinite(mean[s])}
    if not higher_is_better and math.isfinite(mean[0]) and mean[0] >= 0:
        bad |= {s for s in range(n) if mean[s] > max_loss_ratio * max(mean[0], 1e-30)}
    at = min(bad) if evaluated and bad else None
    pad = [math.nan] * (MAX_EVAL_STEPS + 1 - n)
    mean, ci95 = [float(v) for v in mean] + pad, [float(v) for v in ci95] + pad
    return {"mse_1": mean[1], "mse_5": mean[5], "mse_10": mean[10], "mse_curve": mean[:max(n, 1)],
            "ci95": ci95[:max(n, 1)], "eval_diverged_tasks": diverged_tasks, "eval_diverged_step": at,
            "diverged": train_diverged or at is not None, "eval_diverged": at is not None}


def sweep_learner(make_learner: Callable[..., MetaLearner], tasks: TaskDistribution,
                  make_optimiser: Callable[[float], optax.GradientTransformation],
                  init_params: Callable[[jax.Array], Any], grid: Grid, *, steps: int, meta_batch_size: int,
                  task_key: Any = 0, log_every: int = 1000, evaluate: bool = True, apply: Any = None,
                  metric: Any = None, eval_tasks: int = 600, eval_steps: int = MAX_EVAL_STEPS,
                  eval_key: Any = EVAL_SEED, log: Callable[[str], Any] | None = None,
                  inner_hyper: dict[str, Sequence[float]] | None = None, run_dir: str | None = None,
                  resume: bool = False, overwrite: bool = False, checkpoint_every: int | None = None,
                  max_loss_ratio: float = 1000.0, mesh: Mesh | None = None, shard: str = "grid",
                  progress: bool = False, stream: Any = None,
                  eval_lr: Callable[[float], Sequence[float]] | None = None) -> dict[str, Any]:
    """Whole runs of any learner on any task distribution over α × β × seed (× inner-optimiser settings),
    every point on the same training tasks, as populations (``jmaml.population.fit_population``: one
    compiled program per k); then each point evaluated by its learner's own test-time rule at its α.

    Args:
      make_learner: ``make_learner(k) -> MetaLearner``. A learner taking the per-call hyperparameter
        ``inner_lr`` has α traced per point; one that fixes its rate when built (Meta-SGD, MAML++: the
        learned rate's initial value) is built per α: ``make_learner(k, inner_lr=alpha)`` (one
        population per (k, α)).
      tasks: the ``TaskDistribution`` (held-out tasks for the evaluation).
      make_optimiser: ``make_optimiser(learning_rate) -> GradientTransformation`` (β is injected per
        point with ``optax.inject_hyperparams``), e.g. ``optax.adam``.
      init_params: ``init_params(key) -> params``; each seed's key is ``jax.random.key(seed)``.
      grid: the α, β, k and seed axes.
      steps, meta_batch_size, task_key, log_every, checkpoint_every, max_loss_ratio, progress, stream: as
        in ``jmaml.fit``.
      evaluate, apply, metric, eval_tasks, eval_steps, eval_key: the evaluation (``jmaml.evaluate.evaluate``).
      eval_lr: ``eval_lr(alpha) -> rates``, the test-time rates of steps 1..``eval_steps`` of a point trained
        at ``alpha`` (a learner taking the per-call ``inner_lr``); default: ``alpha`` at every step. E.g.
        ``lambda a: [a] + [a / 2] * (eval_steps - 1)``, the MAML-RL paper's schedule.
      log: ``log(str)`` for progress lines.
      inner_hyper: more grid axes, over the inner optimiser's hyperparameters (e.g. ``{"momentum":
        (0.5, 0.9)}``), for learners with an inner optimiser (``learners.maml(..., inner_optimiser=...)``,
        which take the per-call ``inner_hyper``); each point's values are traced like its α.
      run_dir, resume, overwrite: the sweep as a run (checkpoints of each population, bitwise resume;
        see ``run_sweep``).
      mesh, shard: as ``run_sweep`` (``"grid"`` splits the points: each population's size must then be a
        multiple of the device count).

    Returns:
      ``{"rows": [one dict per grid point: alpha, beta, k, seed, final_meta_loss, diverged_at_step,
      mse_curve (the metric after 0..eval_steps steps), ci95 ... as ``run_sweep``'s rows], "meta": {metric,
      ...}, "params": [each point's trained meta-parameters]}``; with ``run_dir`` also written there
      (``write_results``: the files ``jmaml sweep`` writes). A point that diverged in training is frozen
      at its last good state (``diverged_at_step``) while the others go on.
    """
    grid.validate()
    check_distribution(tasks)
    axis = _shard_axis(shard)
    inner_hyper = inner_hyper or {}
    names = sorted(inner_hyper)
    for name in names:
        for value in inner_hyper[name]:
            check_rate(value, f"inner_hyper[{name!r}]")
    extra = list(itertools.product(*[tuple(inner_hyper[n]) for n in names])) if names else [()]
    _open_sweep(run_dir, resume=resume, overwrite=overwrite,
                record=_grid_record(grid, meta_batch_size, inner_hyper={n: list(inner_hyper[n]) for n in names}))
    how = _Populations(run_dir, resume, overwrite, None, steps, meta_batch_size, task_key, log_every,
                       checkpoint_every, max_loss_ratio, mesh, axis, progress, stream, log)
    rows: list[dict[str, Any]] = []
    kept: list[Any] = []
    t0 = time.perf_counter()
    beta_ignored = False  # a learner that returns its own update (TRPO, PPO) has no meta rate
    for k in sorted(set(grid.ks)):
        at_k = [{"alpha": a, "beta": b, "k": k, "seed": s, **{INNER_HYPER + n: v for n, v in zip(names, e)}}
                for a, b, kk, s in grid.points() if kk == k for e in extra]
        learner = check_learner(make_learner(k))
        if names and "inner_hyper" not in learner.hyper:
            raise ValueError(f"sweeping inner_hyper {names} needs a learner with an inner optimiser "
                             f"(learners.maml(..., inner_optimiser=...)); learner {learner.name!r} has none")
        traced = [INNER_HYPER + n for n in names]
        if "inner_lr" in learner.hyper:
            groups = [(f"sweep-k{k}", learner, at_k, ["inner_lr", *traced])]
        else:
            groups = [(f"sweep-k{k}-alpha{alpha:g}", _learner_at(make_learner, k, alpha),
                       [p for p in at_k if p["alpha"] == alpha], traced) for alpha in sorted(set(grid.alphas))]
        for name, group_learner, group, group_traced in groups:
            beta_ignored = beta_ignored or group_learner.returns_step
            state = _train_population(name, group_learner, tasks, make_optimiser, init_params, group, group_traced,
                                      f"{name} ({len(group)} runs)", how)
            evaluated = None
            if evaluate:  # every point of the population in one compiled program, each at its own rates
                table: dict[str, list[Any]] = {n: [p[n] for p in group] for n in traced if n != "inner_lr"}
                if "inner_lr" in group_learner.hyper:
                    table["inner_lr"] = [p["alpha"] if eval_lr is None else _schedule(eval_lr, p["alpha"], eval_steps)
                                         for p in group]
                evaluated = evaluate_population(group_learner, state, tasks, table or None, apply=apply,
                                                metric=metric, num_tasks=eval_tasks, num_steps=eval_steps,
                                                key=eval_key)
            for g, row in enumerate(_point_rows(group, state)):
                kept.append(jax.tree.map(lambda a, g=g: a[g], state.points.params))
                row.update({n: row.pop(INNER_HYPER + n) for n in names})
                if evaluated is not None:
                    r = evaluated[g]["all"]
                    bad = [s for s, a in enumerate(r["mean_all"]) if not np.isfinite(a)]  # a task not finite
                    row.update(curve_fields(r["mean"], r["ci95"], r["diverged"][-1], bad,
                                            train_diverged=row["train_diverged"], evaluated=True,
                                            max_loss_ratio=max_loss_ratio, higher_is_better=r["higher_is_better"]))
                else:
                    row.update(curve_fields([math.nan] * (eval_steps + 1), [math.nan] * (eval_steps + 1), 0, [],
                                            train_diverged=row["train_diverged"], evaluated=False,
                                            max_loss_ratio=max_loss_ratio, higher_is_better=False))
                row.update(lambda_max_median=math.nan, alpha_bound=math.nan)
                rows.append(row)
    meta = {"metric": tasks.metric_name, "higher_is_better": metric_higher_is_better(tasks),
            "eval_tasks": eval_tasks if evaluate else 0, "num_points": len(rows), "seconds": time.perf_counter() - t0,
            "beta_ignored": beta_ignored}
    result = {"rows": rows, "meta": meta, "params": kept}
    if run_dir is not None and distributed.is_writer():  # the CLI's files, from Python too
        write_results(result, run_dir)
    return result


def _schedule(eval_lr: Callable[[float], Sequence[float]], alpha: float, eval_steps: int) -> list[float]:
    rates = [float(r) for r in eval_lr(alpha)]
    if len(rates) != eval_steps:
        raise ValueError(f"eval_lr({alpha:g}) gave {len(rates)} rates {rates}; evaluation takes eval_steps = "
                         f"{eval_steps} steps, one rate each")
    return rates


def _learner_at(make_learner: Callable[..., MetaLearner], k: int, alpha: float) -> MetaLearner:
    try:
        learner = make_learner(k, inner_lr=alpha)
    except TypeError as e:
        raise TypeError(f"the learner fixes its inner rate when built (it takes no per-call inner_lr), so the "
                        f"sweep builds it per alpha: make_learner must accept make_learner(k, inner_lr=alpha) "
                        f"({e})") from None
    return check_learner(learner)


CSV_FIELDS = ("alpha", "beta", "k", "seed", "final_meta_loss", "mse_1", "mse_5", "mse_10",
              "eval_diverged_tasks", "lambda_max_median", "alpha_bound", "diverged", "train_diverged",
              "eval_diverged", "diverged_at_step", "eval_diverged_step")


def write_rows(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """sweep.csv with these rows (atomically); returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    path = os.path.join(out_dir, "sweep.csv")
    atomic_write_text(path, text.getvalue())
    return path


SUMMARY_FIELDS = ("alpha", "beta", "k", "seeds", "final_meta_loss", "final_meta_loss_ci95", "mse_1", "mse_1_ci95",
                  "mse_5", "mse_5_ci95", "mse_10", "mse_10_ci95", "diverged_seeds", "train_diverged_seeds",
                  "eval_diverged_seeds")
_POINT_KEYS = ("final_meta_loss", "diverged_at_step", "train_diverged", "mse_1", "mse_5", "mse_10", "mse_curve",
               "ci95", "eval_diverged_tasks", "eval_diverged_step", "diverged", "eval_diverged", "lambda_max_median",
               "alpha_bound", "seed")


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean of the finite values and its 95% CI half-width (1.96 standard errors; NaN for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def summarize_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (every field but the seed and the point's results: α, β, k and any swept inner
    hyperparameter): over its seeds, the mean and 95% CI of the final meta-loss and of the metric after
    1, 5 and 10 steps (over the seeds whose value is finite), and how many seeds diverged, and why."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        setting = tuple((k, v) for k, v in r.items() if k not in _POINT_KEYS)
        groups.setdefault(setting, []).append(r)
    out = []
    for setting, group in groups.items():
        row: dict[str, Any] = dict(setting)
        row["seeds"] = len(group)
        for name in ("final_meta_loss", "mse_1", "mse_5", "mse_10"):
            row[name], row[f"{name}_ci95"] = _mean_ci([g[name] for g in group])
        length = max(len(g.get("mse_curve") or []) for g in group)
        per_step = [_mean_ci([_at(g, s) for g in group]) for s in range(length)]
        row["curve"], row["curve_ci95"] = [m for m, _ in per_step], [c for _, c in per_step]
        row["diverged_seeds"] = sum(bool(g["diverged"]) for g in group)
        row["train_diverged_seeds"] = sum(bool(g["train_diverged"]) for g in group)
        row["eval_diverged_seeds"] = sum(bool(g["eval_diverged"]) for g in group)
        out.append(row)
    return out


def _metric_label(result: dict[str, Any]) -> str:
    return str(result.get("meta", {}).get("metric") or "MSE")


def write_results(result: dict[str, Any], out_dir: str) -> list[str]:
    """Writes a sweep's results into ``out_dir``, the same from ``jmaml sweep``, ``run_sweep`` and
    ``sweep_learner``: ``sweep.csv`` (one row per point), ``sweep-summary.csv`` (one row per setting,
    mean ± 95% CI over seeds: ``summarize_seeds``, and the metric after every step, ``at_step_S``),
    ``sweep.md`` (both tables), ``sweep.json`` (rows and
    meta) and, if matplotlib is installed, ``plots/heatmap_kK.png``; returns the paths."""
    rows = result["rows"]
    paths = [write_rows(rows, out_dir)]
    summary = summarize_seeds(rows)
    text = io.StringIO()
    length = max((len(r["curve"]) for r in summary), default=0)
    at_step = [f"at_step_{s}{ci}" for s in range(length) for ci in ("", "_ci95")]  # every step of the curve
    flat = [{**{k: v for k, v in r.items() if k not in ("curve", "curve_ci95")},
             **{f"at_step_{s}": _at(r, s, "curve") for s in range(length)},
             **{f"at_step_{s}_ci95": _at(r, s, "curve_ci95") for s in range(length)}} for r in summary]
    w = csv.DictWriter(text, fieldnames=[f for f in SUMMARY_FIELDS if f in (summary[0] if summary else {})]
                       + sorted({k for r in flat for k in r} - set(SUMMARY_FIELDS) - set(at_step)) + at_step,
                       extrasaction="ignore")
    w.writeheader()
    w.writerows(flat)
    paths.append(os.path.join(out_dir, "sweep-summary.csv"))
    atomic_write_text(paths[-1], text.getvalue())
    metric = _metric_label(result)
    paths.append(os.path.join(out_dir, "sweep.md"))
    atomic_write_text(paths[-1], f"## Over seeds (mean ± 95% CI)\n\n{format_summary(summary, metric)}\n\n"
                                 f"## Every point\n\n{format_rows(rows, metric)}\n")
    paths.append(os.path.join(out_dir, "sweep.json"))
    atomic_write_text(paths[-1], json.dumps({k: v for k, v in result.items() if k != "params"}, indent=2))
    try:
        paths += plot_heatmaps(result, os.path.join(out_dir, "plots"))
    except ImportError:
        pass
    return paths


def _cell_causes(sel: Sequence[dict[str, Any]]) -> str:
    """Why a heatmap cell's seeds diverged: in training (at its first step) or in evaluation (at its
    first test-time step); empty when none did."""
    causes = []
    train = [r["diverged_at_step"] for r in sel if r["train_diverged"]]
    if train:
        known = [s for s in train if s is not None]
        causes.append(f"× train@{min(known)}" if known else "× train")
    evals = [r.get("eval_diverged_step") for r in sel if r["eval_diverged"] and not r["train_diverged"]]
    if evals:
        known = [s for s in evals if s is not None]
        causes.append(f"× eval@{min(known)}" if known else "× eval")
    return " ".join(causes)


def heatmap_cells(rows: Sequence[dict[str, Any]], k: int,
                  step: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """What ``plot_heatmaps`` draws for ``k``: the step shown (default k, at least 1), and over β × α
    (rows × columns, each sorted) the mean over seeds of the finite values there and each cell's causes
    of divergence (``× train@S``, ``× eval@S`` or "")."""
    alphas = sorted({r["alpha"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    at_k = [r for r in rows if r["k"] == k]
    at = min(max(k, 1), len(at_k[0]["mse_curve"]) - 1) if step is None else int(step)
    value = np.full((len(betas), len(alphas)), np.nan)
    causes = np.full(value.shape, "", dtype=object)
    for i, b in enumerate(betas):
        for j, a in enumerate(alphas):
            sel = [r for r in at_k if r["alpha"] == a and r["beta"] == b]
            vals = [r["mse_curve"][at] for r in sel if at < len(r["mse_curve"])]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                value[i, j] = float(np.mean(vals))
            causes[i, j] = _cell_causes(sel)
    return at, value, causes


def plot_heatmaps(result: dict[str, Any], out_dir: str, step: int | None = None) -> list[str]:
    """One PNG per k: the metric after ``step`` test-time steps (default k, at least 1) over α × β, the
    mean over the seeds whose value there is finite -- shown whatever happened elsewhere -- and under it
    the cause of any divergence: ``× train@S`` (training stopped at step S; the point was evaluated from
    its last good state) or ``× eval@S`` (adapting it diverged at test-time step S)."""
    from jmaml.run.plot import _pyplot, save_figure

    plt = _pyplot()
    rows = result["rows"]
    metric = _metric_label(result)
    os.makedirs(out_dir, exist_ok=True)
    alphas = sorted({r["alpha"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    paths = []
    for k in sorted({r["k"] for r in rows}):
        at, value, causes = heatmap_cells(rows, k, step)
        fig, ax = plt.subplots(figsize=(1.5 * len(alphas) + 2.5, 0.9 * len(betas) + 1.8))
        finite = value[np.isfinite(value)]
        log = finite.size > 0 and bool((finite > 0).all())  # a loss on a log scale; a score or signed value not
        shown = np.log10(np.where(value > 0, value, np.nan)) if log else value
        im = ax.imshow(shown, origin="lower", cmap="viridis_r" if not result.get("meta", {}).get("higher_is_better")
                       else "viridis", aspect="auto")
        for i in range(len(betas)):
            for j in range(len(alphas)):
                text = f"{value[i, j]:.3g}" if np.isfinite(value[i, j]) else "nan"
                if causes[i, j]:
                    text += "\n" + causes[i, j]
                r, g, b_, _ = im.cmap(im.norm(shown[i, j])) if np.isfinite(shown[i, j]) else (1, 1, 1, 1)
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b_ > 0.5 else "white"  # readable on its cell
                ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=8)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_xlabel("inner rate α")
        ax.set_ylabel("meta rate β (unused: the outer step is the learner's own)"
                      if result.get("meta", {}).get("beta_ignored") else "meta rate β")
        ax.set_title(f"k = {k}: held-out {metric} after {at} step{'s' if at != 1 else ''} (mean over seeds)")
        fig.colorbar(im, ax=ax, label=f"log10 {metric}" if log else metric)
        fig.tight_layout()
        path = os.path.join(out_dir, f"heatmap_k{k}.png")
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _diverged_text(r: dict[str, Any]) -> str:
    if r["train_diverged"]:
        return f"training, step {r['diverged_at_step']}" if r["diverged_at_step"] else "training"
    if r["eval_diverged"]:
        at = r.get("eval_diverged_step")
        return f"evaluation, step {at}" if at is not None else "evaluation"
    return ""


def shown_steps(length: int) -> tuple[int, ...]:
    """The test-time steps a sweep's tables show of curves of ``length`` values (steps 0..length - 1): 1, 5
    and 10 of a 10-step curve (the sinusoid protocol's), every step of a short one (an RL protocol's 3), else
    1, 5 and the last."""
    n = length - 1
    if n >= MAX_EVAL_STEPS:
        return 1, 5, MAX_EVAL_STEPS
    return tuple(range(1, n + 1)) if n <= 5 else (1, 5, n)


def _at(r: dict[str, Any], s: int, key: str = "mse_curve") -> float:
    curve = r.get(key) or []
    return float(curve[s]) if s < len(curve) and curve[s] is not None else math.nan


def format_rows(rows: Sequence[dict[str, Any]], metric: str = "MSE") -> str:
    """A Markdown table of the sweep, one row per grid point; ``metric`` names the evaluation's metric (the
    steps shown: ``shown_steps``; the curvature columns only where some point has them)."""
    steps = shown_steps(max((len(r["mse_curve"]) for r in rows), default=MAX_EVAL_STEPS + 1))
    curvature = any(math.isfinite(r.get("lambda_max_median", math.nan)) for r in rows)
    head = ["alpha", "beta", "k", "seed", "final meta-loss", *[f"{metric}@{s}" for s in steps],
            *(["λ_max (median)", "2/λ_max"] if curvature else []), "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{r['alpha']:g}", f"{r['beta']:g}", str(r["k"]), str(r["seed"]), f"{r['final_meta_loss']:.4g}",
                 *[f"{_at(r, s):.4g}" for s in steps],
                 *([f"{r['lambda_max_median']:.4g}", f"{r['alpha_bound']:.4g}"] if curvature else []),
                 _diverged_text(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(mean: float, ci: float) -> str:
    if not math.isfinite(mean):
        return "nan"
    return f"{mean:.4g} ± {ci:.2g}" if math.isfinite(ci) else f"{mean:.4g}"


def format_summary(summary: Sequence[dict[str, Any]], metric: str = "MSE") -> str:
    """A Markdown table of ``summarize_seeds``: one row per setting, mean ± 95% CI over its seeds (the steps
    shown: ``shown_steps``)."""
    extra = sorted({k for r in summary for k in r} - set(SUMMARY_FIELDS) - {"curve", "curve_ci95"})
    steps = shown_steps(max((len(r.get("curve") or ()) for r in summary), default=0) or MAX_EVAL_STEPS + 1)
    head = ["alpha", "beta", "k", *extra, "seeds", "final meta-loss", *[f"{metric}@{s}" for s in steps],
            "diverged (train / eval)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in summary:
        cells = [f"{r['alpha']:g}", f"{r['beta']:g}", str(r["k"]), *[str(r.get(e, "")) for e in extra], str(r["seeds"]),
                 _pm(r["final_meta_loss"], r["final_meta_loss_ci95"]),
                 *[_pm(_at(r, s, "curve"), _at(r, s, "curve_ci95")) for s in steps],
                 f"{r['diverged_seeds']} ({r['train_diverged_seeds']} / {r['eval_diverged_seeds']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
