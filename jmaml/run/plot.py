"""Figures for a run dir: the MAML paper's Figure 2 (fits on held-out tasks) and Figure 3
(query MSE vs gradient steps with 95% CI bands). Needs matplotlib (``pip install jmaml[plot]``)."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmaml import learners, tasks
from jmaml.core.losses import make_loss
from jmaml.engine import checkpoint
from jmaml.run import recipes, rundir
from jmaml.run.config import BASELINE
from jmaml.run.evaluate import learner_results


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'jmaml[plot]' "
                          "(bash scripts/run.sh installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """A PNG written atomically (``checkpoint.atomic_write``): an interrupted write leaves the old figure."""
    checkpoint.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def _fits(learner, apply_fn, meta_params, support, grid, steps):
    """Predictions on ``grid`` after each number of test-time steps in ``steps``, per task:
    shape (tasks, len(steps), n, 1), by the learner's own test-time rule."""
    @jax.jit
    def run(meta_params, support, grid):
        def one(s, g):
            return jnp.stack([apply_fn(learner.adapt(meta_params, s, k), g) for k in steps])
        return jax.vmap(one)(support, grid)

    return run(meta_params, support, grid)


def _label(rate) -> str:
    return f"lr {rate:g}" if isinstance(rate, (int, float)) else f"{rate} rates"


def plot_run(run_dir: str, *, shots: int = 10, num_examples: int = 3) -> list[str]:
    """Writes ``plots/fits.png`` and ``plots/curves.png`` into ``run_dir`` (for image tasks only
    ``plots/curves.png``: accuracy against inner steps); returns their paths."""
    plt = _pyplot()
    config = rundir.load_config(run_dir)
    eval_path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(eval_path):
        raise ValueError(f"{run_dir} has no eval.json: run `jmaml eval {run_dir}` first")
    try:
        with open(eval_path, encoding="utf-8") as f:
            results = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{eval_path} is not valid JSON (truncated?): run `jmaml eval {run_dir}` to rewrite "
                         "it") from None
    algo = results.get("algo", "maml") if isinstance(results, dict) else None
    if not isinstance(results, dict) or not isinstance(results.get(algo), dict) or not all(
            isinstance(r, dict) and "mean" in r for r in results[algo].values()):
        raise ValueError(f"{eval_path} is not a jmaml evaluation of this run (no results for {algo!r}): run "
                         f"`jmaml eval {run_dir}` to rewrite it")
    family = tasks.family(config.task)
    if family.examples is None:  # no ground truth to draw: the metric's curves alone
        return [_accuracy_curves(plt, config, results, run_dir)]
    fit_steps = (0, 1, 10)
    model, _ = recipes.build_model(config)
    learner = recipes.build_learner(config, make_loss(model.apply, "mse"))
    state, _ = rundir.restore_phase(run_dir, config, config.algo, recipes.initial_state(config))
    name = learners.spec(config.algo).label
    # name -> (learner, its apply, meta-parameters, the rate as eval.json records it)
    models = {name: (learner, model.apply, state.params, learner_results(results)[str(shots)]["inner_lr"])}
    if BASELINE in results:
        lr = results[BASELINE][str(shots)]["inner_lr"]
        base_model, _ = recipes.build_model(config, BASELINE)
        base = learners.maml(make_loss(base_model.apply, "mse"), inner_lr=lr, num_inner_steps=0)
        base_state, _ = rundir.restore_phase(run_dir, config, BASELINE, recipes.initial_state(config, BASELINE))
        models[BASELINE] = (base, base_model.apply, base_state.params, lr)
    out_dir = os.path.join(run_dir, rundir.PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)

    # Figure 2: a few held-out tasks, true curve, the K points, fits after 0, 1 and 10 steps.
    support, grid, truth = family.examples(num_examples, shots)
    truth = np.asarray(truth)
    fig, axes = plt.subplots(len(models), num_examples, figsize=(4 * num_examples, 3.2 * len(models)),
                             squeeze=False, sharex=True)
    labels = {0: "pre-update", 1: "1 grad step", 10: "10 grad steps"}
    for row, (name, (learner_, apply_fn, params, lr)) in enumerate(models.items()):
        preds = np.asarray(_fits(learner_, apply_fn, params, support, grid, fit_steps))
        for j in range(num_examples):
            ax = axes[row, j]
            ax.plot(grid[j, :, 0], truth[j, :, 0], color="tab:red", lw=2, label="ground truth")
            for i, (steps, style) in enumerate(zip(fit_steps, (":", "--", "-"))):
                ax.plot(grid[j, :, 0], preds[j, i, :, 0], style, color="tab:green", label=labels[steps])
            ax.scatter(support.x[j, :, 0], support.y[j, :, 0], marker="^", color="k", zorder=3,
                       label=f"{shots} points")
            ax.set_title(f"{name}, task {j + 1} ({_label(lr)})")
            if j == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"K = {shots} shots, held-out tasks (MAML paper, Figure 2)")
    fig.tight_layout()
    fits = os.path.join(out_dir, rundir.FITS_PNG)
    save_figure(fig, fits)
    plt.close(fig)

    # Figure 3: query MSE vs gradient steps, mean and 95% CI, for each K.
    ks = list(learner_results(results))
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for name, rows, color in ((learners.spec(config.algo).label, learner_results(results), "tab:blue"),
                                  (BASELINE, results.get(BASELINE), "tab:orange")):
            if rows is None:
                continue
            r = rows[k]
            mean, ci = np.array(r["mean"]), np.array(r["ci95"])
            steps_axis: Any = np.arange(len(mean))
            ax.plot(steps_axis, mean, "o-", color=color, ms=3, label=f"{name} ({_label(r['inner_lr'])})")
            ax.fill_between(steps_axis, mean - ci, mean + ci, color=color, alpha=0.25)
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("mean squared error")
        ax.set_title(f"K = {k}")
        ax.legend(fontsize=8)
    fig.suptitle("k-shot regression, 600 held-out tasks, 95% CI (MAML paper, Figure 3)")
    fig.tight_layout()
    curves = os.path.join(out_dir, rundir.CURVES_PNG)
    save_figure(fig, curves)
    plt.close(fig)
    return [fits, curves]


def _accuracy_curves(plt, config, results: dict, run_dir: str) -> str:
    """Query accuracy (mean, 95% CI) against test-time inner steps, for a few-shot classification run."""
    out_dir = os.path.join(run_dir, rundir.PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for k, r in learner_results(results).items():
        mean, ci = 100 * np.array(r["mean"]), 100 * np.array(r["ci95"])
        steps = np.arange(len(mean))
        label = f"{learners.spec(config.algo).label}, {k}-shot ({_label(r['inner_lr'])})"
        ax.plot(steps, mean, "o-", ms=3, label=label)
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.25)
    ax.axhline(100 / config.ways, color="gray", ls=":", label="chance")
    ax.set_xlabel("inner gradient steps at test time")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"{config.task}, {config.ways}-way, {results['protocol']['test_episodes']} test episodes, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, rundir.CURVES_PNG)
    save_figure(fig, path)
    plt.close(fig)
    return path
