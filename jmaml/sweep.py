r"""Whole hyperparameter studies as one compiled program: meta-training runs vmapped over a grid.

``run_sweep`` trains one MAML run per grid point of (α, β, k, seed) — all of them inside one
jitted ``lax.scan`` over steps with a ``vmap`` over grid points:

* α and k are traced per point: the inner loop is a masked ``lax.scan`` to ``k_max = max(ks)``
  (``jmaml.adapt(..., max_steps=...)``), equal to the plain k-step scan for each k.
* β is traced through ``optax.inject_hyperparams``: each point's optimiser state holds its rate.
* the seed sets each point's initial parameters; the training tasks are the same at every grid
  point (one task stream, from ``task_seed``), so comparisons across the grid are paired.

A grid point equals the single run ``jmaml train`` would do with the same (α, β, k, seed) and
``task_seed`` (to float32 round-off: the masked scan and the injected rate compute the same
numbers in a different order). When the grid does not fit the memory budget it is processed in
chunks of points, transparently; each chunk is padded to the same size so it compiles once.

After training, every point is evaluated with the paper's protocol (held-out tasks, query MSE
after 0..10 steps at its own α) and its stability is diagnosed: λ_max of the support-loss Hessian
at the trained parameters, and the bound 2/λ_max beside α.
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jmaml import distributed, recipes
from jmaml._checks import check_num_steps, check_rate, check_seed
from jmaml.config import OPTIMISERS, TrainConfig
from jmaml.diagnostics import hessian_max_eigenvalue, step_size_bound
from jmaml.engine import (
    as_key,
    check_distribution,
    check_learner,
    device_memory_bytes,
    initial_state,
    make_learner_step,
    sample_tasks,
)
from jmaml.evaluate import EVAL_SEED, MAX_EVAL_STEPS, NUM_EVAL_QUERY, adaptation_curve
from jmaml.evaluate import evaluate as evaluate_learner
from jmaml.meta import init_state, make_step
from jmaml.protocols import MetaLearner, TaskDistribution
from jmaml.recipes import build_model, effective_unroll, task_stream_key
from jmaml.rundir import atomic_write_text

DEFAULT_MEMORY_FRACTION = 0.25
SWEEP_ALGOS = ("maml", "fomaml")


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


def _note_first_non_finite(first_bad: np.ndarray, losses: np.ndarray, step0: int) -> None:
    """Records, for each grid point not yet marked, the first step of a chunk (losses shaped
    ``(steps, points)``, starting after ``step0``) whose meta-loss is not finite."""
    bad = ~np.isfinite(losses)
    for g in np.flatnonzero(bad.any(axis=0) & (first_bad < 0)):
        first_bad[g] = step0 + int(np.argmax(bad[:, g])) + 1


def _make_chunk_fn(config: TrainConfig, k_max: int, mesh: Mesh | None = None, shard: str = "grid"):
    model, loss_fn = build_model(config)
    dist = recipes.build_tasks(config)
    optimiser = optax.inject_hyperparams(OPTIMISERS[config.optimiser])(learning_rate=config.meta_lr)
    step = make_step(optimiser, loss_fn, inner_lr=config.inner_lr, num_inner_steps=0,
                     max_inner_steps=k_max,
                     first_order=config.algo == "fomaml" or config.options.get("first_order", False),
                     remat=config.remat,
                     unroll=effective_unroll(config.unroll, k_max))

    def init(seed, beta):
        params = model.init(jax.random.split(jax.random.key(seed))[0])
        state = init_state(params, optimiser, jax.random.key(0))
        hyper = dict(state.opt_state.hyperparams)
        hyper["learning_rate"] = jnp.asarray(beta, hyper["learning_rate"].dtype)
        return state._replace(opt_state=state.opt_state._replace(hyperparams=hyper))

    def place(states):  # grid points split over the devices, or every device holding all of them
        if mesh is None or mesh.devices.size == 1 or shard != "grid":
            return states
        return jax.lax.with_sharding_constraint(states, distributed.task_sharding(mesh))

    def one(carry, _):
        states, key, alphas, ks = carry
        key, key_tasks = jax.random.split(key)
        tasks = sample_tasks(dist, key_tasks, config.meta_batch_size, dist.data)
        if shard == "tasks":
            tasks = distributed.shard_tasks(tasks, mesh)
        states, metrics = jax.vmap(lambda s, a, k: step(s, tasks, inner_lr=a, num_inner_steps=k))(
            place(states), alphas, ks)
        states = place(states)
        return (states, key, alphas, ks), {"meta_loss": metrics["meta_loss"],
                                           "pre_adapt_loss": metrics["pre_adapt_loss"]}

    @jax.jit
    def chunk(states, key, alphas, ks, length_marker):
        (states, key, _, _), metrics = jax.lax.scan(one, (states, key, alphas, ks), None,
                                                    length=length_marker.shape[0])
        return states, key, metrics

    return jax.jit(jax.vmap(init)), chunk, model, loss_fn


def _evaluate_points(config: TrainConfig, model, params, alphas, *, num_tasks: int, num_diag_tasks: int,
                     budget_bytes: int):
    dist: Any = recipes.build_tasks(config)
    eval_loss = dist.make_metric(model.apply)
    key = jax.random.key(EVAL_SEED)
    tasks = dist.heldout(key, num_tasks) if dist.heldout_data is None else dist.heldout(key, num_tasks,
                                                                                        dist.heldout_data)
    tasks = tasks._replace(support=jax.tree.map(lambda a: a[:, :config.num_support], tasks.support))

    @jax.jit
    def curves(params, alphas):
        return jax.vmap(lambda p, a: adaptation_curve(eval_loss, p, tasks.support, tasks.query, inner_lr=a,
                                                      num_steps=MAX_EVAL_STEPS))(params, alphas)

    _, train_loss = build_model(config)
    diag_support = jax.tree.map(lambda x: x[:num_diag_tasks], tasks.support)

    @jax.jit
    def curvature(params):
        return jax.vmap(lambda p: jax.vmap(lambda b: hessian_max_eigenvalue(train_loss, p, b))(diag_support))(params)

    # evaluation needs far more memory per point than a training step (every held-out task's curve):
    # points go through it in sub-chunks that fit the budget, padded so that they compile once
    n = len(alphas)
    width = 1 + sum(config.hidden) + 1
    point_bytes = num_tasks * (config.num_support + NUM_EVAL_QUERY) * width * 4 * 6 * (MAX_EVAL_STEPS + 2)
    per_call = max(1, min(n, budget_bytes // max(point_bytes, 1)))
    out_curves, out_lam = [], []
    for start in range(0, n, per_call):
        idx = np.minimum(np.arange(start, start + per_call), n - 1)
        part_params = jax.tree.map(lambda a: a[idx], params)
        out_curves.append(np.asarray(curves(part_params, alphas[idx])))
        out_lam.append(np.asarray(curvature(part_params)))
    return np.concatenate(out_curves)[:n], np.concatenate(out_lam)[:n]


def run_sweep(base: TrainConfig, grid: Grid, *, task_seed: int | None = None, eval_tasks: int = 600,
              diag_tasks: int = 50, memory_budget_bytes: int | None = None, keep_params: bool = False,
              evaluate: bool = True, log=None, mesh: Mesh | None = None, shard: str = "grid",
              on_chunk: Callable[[list[dict[str, Any]]], Any] | None = None) -> dict[str, Any]:
    """Meta-trains every grid point (vmapped, one program per chunk) and evaluates each.

    Args:
      base: settings shared by every point (model, shots, meta-batch, steps, optimiser, ...);
        its inner_lr, meta_lr, num_inner_steps and seed are replaced by the grid's.
      grid: the α, β, k and seed axes.
      task_seed: the training-task stream shared by all points (default ``base.seed``).
      eval_tasks: held-out tasks for the evaluation of each point.
      diag_tasks: held-out tasks on which λ_max is measured per point.
      memory_budget_bytes: chunk the grid to stay within this (default: a quarter of the device's
        memory).
      keep_params: also return each point's trained parameters (``result["params"]``, a list).
      evaluate: evaluate and diagnose every point after training (else those fields are NaN).
      log: ``log(str)`` for progress lines (default: silent).
      mesh: spread the work over this mesh's devices (``jmaml.distributed.task_mesh``; one process).
      on_chunk: ``on_chunk(rows)`` with every finished point's row so far, after each chunk of points
        (``jmaml sweep`` writes them to sweep.csv: a sweep that fails later keeps what it finished).
      shard: with a mesh, ``"grid"`` splits the grid points over the devices (each device trains
        whole runs; chunks are rounded to a multiple of the device count) or ``"tasks"`` splits
        every meta-batch's tasks (each run spans all devices; the meta-batch must divide evenly).

    Returns:
      ``{"rows": [one dict per grid point], "meta": {...timings, chunking...}}``. A point is
      ``diverged`` when its training produced a non-finite or exploding meta-loss
      (``train_diverged``, with ``diverged_at_step`` when non-finite) or when adapting it on the
      held-out tasks at its α blows up (``eval_diverged``: a non-finite loss or one above
      ``max_loss_ratio`` times the un-adapted loss).
    """
    base.validate()
    grid.validate()
    if base.algo not in SWEEP_ALGOS:
        raise ValueError(f"sweeps vmap whole runs over a traced k, which algos {', '.join(SWEEP_ALGOS)} take; "
                         f"got algo {base.algo!r}")
    if base.options.get("backend", "xla") != "xla":
        raise ValueError(f"run_sweep vmaps whole runs over a traced k, which backend={base.options['backend']!r} "
                         "does not take (its k is static); sweep a fixed k with "
                         "sweep_learner(learners.maml(loss_fn, ..., backend='fused'), ...)")
    if recipes.build_tasks(base).heldout is None:
        raise ValueError(f"sweeps evaluate every point on held-out tasks; task {base.task!r} has none")
    if shard not in SHARD_AXES:
        raise ValueError(f"shard must be one of {SHARD_AXES}, got {shard!r}")
    n_dev = 1 if mesh is None else mesh.devices.size
    if mesh is not None and n_dev > 1 and shard == "tasks":
        distributed.check_divisible(base.meta_batch_size, mesh)
    points = grid.points()
    task_seed = base.seed if task_seed is None else task_seed
    k_max = max(grid.ks)
    init, chunk, model, _ = _make_chunk_fn(base, k_max, mesh, shard)
    num_params = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(
        jax.eval_shape(model.init, jax.random.key(0))))
    budget = memory_budget_bytes or int(DEFAULT_MEMORY_FRACTION * device_memory_bytes())
    per_chunk = plan_chunks(len(points), estimate_point_bytes(base, k_max, num_params), budget * n_dev)
    if n_dev > 1 and shard == "grid":  # whole grid points per device; padding fills the last chunk
        per_chunk = max(n_dev, per_chunk - per_chunk % n_dev)
    stream = task_stream_key(dataclasses.replace(base, task_seed=task_seed))
    L = base.log_every
    rows: list[dict[str, Any]] = []
    kept: list[Any] = []
    t0 = time.perf_counter()
    for start in range(0, len(points), per_chunk):
        part = points[start:start + per_chunk]
        padded = part + [part[-1]] * (per_chunk - len(part))  # same shape: one compile for all chunks
        alphas = jnp.asarray([p[0] for p in padded], jnp.float32)
        betas = jnp.asarray([p[1] for p in padded], jnp.float32)
        ks = jnp.asarray([p[2] for p in padded], jnp.int32)
        seeds = jnp.asarray([p[3] for p in padded], jnp.uint32)
        states, key = init(seeds, betas), stream
        if mesh is not None and n_dev > 1:
            sharding = distributed.task_sharding(mesh) if shard == "grid" else distributed.replicated(mesh)
            states = jax.device_put(states, sharding)
        first_bad = np.full(len(padded), -1)
        last_loss = np.full(len(padded), np.nan)
        last_ratio = np.full(len(padded), np.nan)
        step = 0
        while step < base.steps:
            length = min(L - step % L, base.steps - step)
            states, key, m = chunk(states, key, alphas, ks, jnp.zeros((length,), jnp.int8))
            loss, pre = np.asarray(m["meta_loss"]), np.asarray(m["pre_adapt_loss"])
            _note_first_non_finite(first_bad, loss, step)
            with np.errstate(all="ignore"):
                last_loss = loss.mean(axis=0)
                last_ratio = loss.mean(axis=0) / np.maximum(pre.mean(axis=0), 1e-30)
            step += length
            if log:
                log(f"sweep points {start + 1}-{start + len(part)} of {len(points)}: step {step}/{base.steps}")
        if evaluate:
            curves, lam = _evaluate_points(base, model, states.params, alphas, num_tasks=eval_tasks,
                                           num_diag_tasks=diag_tasks, budget_bytes=budget)
        else:
            curves = np.full((len(padded), 1, MAX_EVAL_STEPS + 1), np.nan)
            lam = np.full((len(padded), 1), np.nan)
        for g, (alpha, beta, k, seed) in enumerate(part):
            c = curves[g]
            finite = np.isfinite(c)
            with np.errstate(all="ignore"):
                mse = [float(c[finite[:, s], s].mean()) if finite[:, s].any() else math.nan
                       for s in range(c.shape[1])]
            lam_g = lam[g]
            lam_med = float(np.median(lam_g)) if np.isfinite(lam_g).all() else math.nan
            train_diverged = bool(first_bad[g] >= 0 or (np.isfinite(last_ratio[g])
                                                        and last_ratio[g] > base.max_loss_ratio))
            eval_diverged = evaluate and bool(not all(np.isfinite(mse)) or max(mse) > base.max_loss_ratio * mse[0]
                                              or (~finite).any())
            if keep_params:
                kept.append(jax.tree.map(lambda a, g=g: np.asarray(a[g]), states.params))
            rows.append({
                "alpha": alpha, "beta": beta, "k": k, "seed": seed,
                "final_meta_loss": float(last_loss[g]),
                "mse_1": mse[1], "mse_5": mse[5], "mse_10": mse[10], "mse_curve": mse,
                "eval_diverged_tasks": int((~finite[:, -1]).sum()),
                "lambda_max_median": lam_med,
                "alpha_bound": float(step_size_bound(jnp.asarray(lam_med))) if np.isfinite(lam_med) else math.nan,
                "diverged": train_diverged or eval_diverged,
                "train_diverged": train_diverged, "eval_diverged": eval_diverged,
                "diverged_at_step": int(first_bad[g]) if first_bad[g] >= 0 else None,
            })
        if on_chunk is not None:
            on_chunk(list(rows))
    meta = {"num_points": len(points), "points_per_chunk": per_chunk,
            "num_chunks": math.ceil(len(points) / per_chunk), "seconds": time.perf_counter() - t0,
            "task_seed": task_seed, "k_max": k_max, "memory_budget_bytes": budget,
            "base_config": base.to_dict()}
    result = {"rows": rows, "meta": meta}
    if keep_params:
        result["params"] = kept
    return result


def sweep_learner(make_learner: Callable[[int], MetaLearner], tasks: TaskDistribution,
                  make_optimiser: Callable[[float], optax.GradientTransformation],
                  init_params: Callable[[jax.Array], Any], grid: Grid, *, steps: int, meta_batch_size: int,
                  task_key: Any = 0, log_every: int = 1000, evaluate: bool = True, apply: Any = None,
                  metric: Any = None, eval_tasks: int = 600, eval_steps: int = MAX_EVAL_STEPS,
                  eval_key: Any = EVAL_SEED, log: Callable[[str], Any] | None = None,
                  inner_hyper: dict[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """Whole runs of any learner on any task distribution, vmapped over α × β × seed (one compiled
    program per k), every point on the same training tasks; then each point evaluated by its
    learner's own test-time rule at its own α.

    Args:
      make_learner: ``make_learner(k) -> MetaLearner`` taking the per-call hyperparameter ``inner_lr``
        (α is traced per grid point).
      tasks: the ``TaskDistribution`` (held-out tasks for the evaluation).
      make_optimiser: ``make_optimiser(learning_rate) -> GradientTransformation`` (β is injected per
        point with ``optax.inject_hyperparams``), e.g. ``optax.adam``.
      init_params: ``init_params(key) -> params``; each seed's key is ``jax.random.key(seed)``.
      grid: the α, β, k and seed axes.
      steps, meta_batch_size, task_key, log_every: as in ``jmaml.fit``.
      evaluate, apply, metric, eval_tasks, eval_steps, eval_key: the evaluation (``jmaml.evaluate.evaluate``).
      log: ``log(str)`` for progress lines.
      inner_hyper: more grid axes, over the inner optimiser's hyperparameters (e.g. ``{"momentum":
        (0.5, 0.9)}``), for learners with an inner optimiser (``learners.maml(..., inner_optimiser=...)``,
        which take the per-call ``inner_hyper``); each point's values are traced like its α.

    Returns:
      ``{"rows": [one dict per grid point: alpha, beta, k, seed, final_meta_loss, diverged_at_step,
      mse_curve (the metric after 0..eval_steps steps) ...], "params": [each point's trained
      meta-parameters]}``.
    """
    grid.validate()
    check_distribution(tasks)
    inner_hyper = inner_hyper or {}
    names = sorted(inner_hyper)
    for name in names:
        for value in inner_hyper[name]:
            check_rate(value, f"inner_hyper[{name!r}]")
    extra = list(itertools.product(*[tuple(inner_hyper[n]) for n in names])) if names else [()]
    rows: list[dict[str, Any]] = []
    kept: list[Any] = []
    for k in sorted(set(grid.ks)):
        points = [(*p, *e) for p in grid.points() if p[2] == k for e in extra]
        learner = check_learner(make_learner(k))
        if "inner_lr" not in learner.hyper:
            raise ValueError(f"sweeping alpha needs a learner taking the per-call hyperparameter inner_lr; "
                             f"learner {learner.name!r} takes {sorted(learner.hyper)}")
        if names and "inner_hyper" not in learner.hyper:
            raise ValueError(f"sweeping inner_hyper {names} needs a learner with an inner optimiser "
                             f"(learners.maml(..., inner_optimiser=...)); learner {learner.name!r} has none")
        optimiser = optax.inject_hyperparams(make_optimiser)(learning_rate=points[0][1])
        step = make_learner_step(learner, optimiser)

        def init(seed, beta, learner=learner, optimiser=optimiser):
            state = initial_state(learner, init_params(jax.random.key(seed)), optimiser, jax.random.key(0))
            hyper = dict(state.opt_state.hyperparams)
            hyper["learning_rate"] = jnp.asarray(beta, hyper["learning_rate"].dtype)
            return state._replace(opt_state=state.opt_state._replace(hyperparams=hyper))

        @jax.jit
        def chunk(states, key, alphas, hypers, length_marker, step=step):
            def one(carry, _):
                states, key = carry
                key, key_tasks = jax.random.split(key)
                batch = sample_tasks(tasks, key_tasks, meta_batch_size, tasks.data)
                per_point = (lambda s, a, h: step(s, batch, inner_lr=a, inner_hyper=h)) if names else \
                    (lambda s, a, h: step(s, batch, inner_lr=a))
                states, metrics = jax.vmap(per_point)(states, alphas, hypers)
                return (states, key), metrics["meta_loss"]

            (states, key), losses = jax.lax.scan(one, (states, key), None, length=length_marker.shape[0])
            return states, key, losses

        alphas = jnp.asarray([p[0] for p in points], jnp.float32)
        hypers = {n: jnp.asarray([p[4 + i] for p in points], jnp.float32) for i, n in enumerate(names)}
        states = jax.jit(jax.vmap(init))(jnp.asarray([p[3] for p in points], jnp.uint32),
                                         jnp.asarray([p[1] for p in points], jnp.float32))
        key, done, first_bad, last = as_key(task_key), 0, np.full(len(points), -1), np.full(len(points), np.nan)
        while done < steps:
            length = min(log_every - done % log_every, steps - done)
            states, key, losses = chunk(states, key, alphas, hypers, jnp.zeros((length,), jnp.int8))
            losses = np.asarray(losses)
            _note_first_non_finite(first_bad, losses, done)
            last = losses.mean(axis=0)
            done += length
            if log:
                log(f"sweep k = {k}: {len(points)} runs, step {done}/{steps}")
        for g, (alpha, beta, _, seed, *values) in enumerate(points):
            params = jax.tree.map(lambda a, g=g: a[g], states.params)
            kept.append(params)
            point_hyper = dict(zip(names, values))
            row = {"alpha": alpha, "beta": beta, "k": k, "seed": seed, **point_hyper, "final_meta_loss": float(last[g]),
                   "diverged_at_step": int(first_bad[g]) if first_bad[g] >= 0 else None}
            if evaluate:
                call = {"inner_lr": alpha, **({"inner_hyper": point_hyper} if names else {})}
                r = evaluate_learner(learner, params, tasks, apply=apply, metric=metric, num_tasks=eval_tasks,
                                     num_steps=eval_steps, key=eval_key, hyper=call)["all"]
                row.update(mse_curve=r["mean"], ci95=r["ci95"], eval_diverged_tasks=r["diverged"][-1])
            rows.append(row)
    return {"rows": rows, "params": kept}


CSV_FIELDS = ("alpha", "beta", "k", "seed", "final_meta_loss", "mse_1", "mse_5", "mse_10",
              "eval_diverged_tasks", "lambda_max_median", "alpha_bound", "diverged", "train_diverged",
              "eval_diverged", "diverged_at_step")


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


def write_results(result: dict[str, Any], out_dir: str) -> list[str]:
    """Writes sweep.csv and sweep.json (and heatmaps if matplotlib is installed); returns the paths."""
    csv_path, json_path = write_rows(result["rows"], out_dir), os.path.join(out_dir, "sweep.json")
    atomic_write_text(json_path, json.dumps(result, indent=2))
    paths = [csv_path, json_path]
    try:
        paths += plot_heatmaps(result, os.path.join(out_dir, "plots"))
    except ImportError:
        pass
    return paths


def plot_heatmaps(result: dict[str, Any], out_dir: str) -> list[str]:
    """One PNG per k: evaluation MSE after k steps (mean over seeds) over α × β; diverged points marked ×."""
    from jmaml.plot import _pyplot, save_figure

    plt = _pyplot()
    rows = result["rows"]
    os.makedirs(out_dir, exist_ok=True)
    alphas = sorted({r["alpha"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    paths = []
    for k in sorted({r["k"] for r in rows}):
        step = min(max(k, 1), MAX_EVAL_STEPS)
        value = np.full((len(betas), len(alphas)), np.nan)
        diverged = np.zeros_like(value, dtype=bool)
        for i, b in enumerate(betas):
            for j, a in enumerate(alphas):
                sel = [r for r in rows if r["k"] == k and r["alpha"] == a and r["beta"] == b]
                vals = [r["mse_curve"][step] for r in sel if not r["diverged"]]
                diverged[i, j] = any(r["diverged"] for r in sel)
                if vals and np.all(np.isfinite(vals)):
                    value[i, j] = float(np.mean(vals))
        fig, ax = plt.subplots(figsize=(1.2 * len(alphas) + 2.5, 0.9 * len(betas) + 1.8))
        im = ax.imshow(np.log10(value), origin="lower", cmap="viridis_r", aspect="auto")
        for i in range(len(betas)):
            for j in range(len(alphas)):
                text = "×" if diverged[i, j] else (f"{value[i, j]:.3g}" if np.isfinite(value[i, j]) else "nan")
                ax.text(j, i, text, ha="center", va="center", color="red" if diverged[i, j] else "white",
                        fontsize=12 if diverged[i, j] else 8)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_xlabel("inner rate α")
        ax.set_ylabel("meta rate β")
        ax.set_title(f"k = {k}: held-out MSE after {step} step{'s' if step > 1 else ''} (× diverged)")
        fig.colorbar(im, ax=ax, label="log10 MSE")
        fig.tight_layout()
        path = os.path.join(out_dir, f"heatmap_k{k}.png")
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the sweep, one row per grid point."""
    lines = ["| alpha | beta | k | seed | final meta-loss | MSE@1 | MSE@5 | MSE@10 | λ_max (median) | 2/λ_max "
             "| diverged |",
             "|" + " --- |" * 11]
    for r in rows:
        div = ("training, step {}".format(r["diverged_at_step"]) if r["diverged_at_step"]
               else "training" if r["train_diverged"] else "adaptation" if r["eval_diverged"] else "")
        lines.append(f"| {r['alpha']:g} | {r['beta']:g} | {r['k']} | {r['seed']} | {r['final_meta_loss']:.4g} | "
                     f"{r['mse_1']:.4g} | {r['mse_5']:.4g} | {r['mse_10']:.4g} | {r['lambda_max_median']:.4g} | "
                     f"{r['alpha_bound']:.4g} | {div} |")
    return "\n".join(lines)
