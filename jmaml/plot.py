"""Figures for a run dir: the MAML paper's Figure 2 (fits on held-out tasks) and Figure 3
(query MSE vs gradient steps with 95% CI bands). Needs matplotlib (``pip install jmaml[plot]``)."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jmaml.algorithms import ALGORITHM_LABELS
from jmaml.evaluate import adapted_params, heldout_tasks
from jmaml.losses import make_loss
from jmaml.tasks import sinusoid
from jmaml.train import build_algorithm, build_model, load_config, load_params


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'jmaml[plot]' "
                          "(bash scripts/run.sh installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@functools.partial(jax.jit, static_argnames=("loss_fn", "apply_fn", "steps", "prox_lambda"))
def _fits(loss_fn, apply_fn, params, support, grid, step_rates, steps, prox_lambda=0.0):
    """Predictions on ``grid`` after each number of steps in ``steps``, per task: (tasks, len(steps), n, 1).

    ``step_rates`` has one leading entry per test step (at least ``max(steps)``), as
    ``jmaml.algorithms`` gives them."""
    def one(s, g):
        return jnp.stack([apply_fn(adapted_params(loss_fn, params, s, jax.tree.map(lambda r: r[:k], step_rates),
                                                  prox_lambda=prox_lambda), g) for k in steps])
    return jax.vmap(one)(support, grid)


def _label(rate) -> str:
    return f"lr {rate:g}" if isinstance(rate, (int, float)) else f"{rate} rates"


def plot_run(run_dir: str, *, shots: int = 10, num_examples: int = 3) -> list[str]:
    """Writes ``plots/fits.png`` and ``plots/curves.png`` into ``run_dir`` (for image tasks only
    ``plots/curves.png``: accuracy against inner steps); returns their paths."""
    plt = _pyplot()
    config = load_config(run_dir)
    eval_path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(eval_path):
        raise ValueError(f"{run_dir} has no eval.json: run `jmaml eval {run_dir}` first")
    with open(eval_path, encoding="utf-8") as f:
        results = json.load(f)
    if config.task != "sinusoid":
        return [_accuracy_curves(plt, config, results, run_dir)]
    model, _ = build_model(config)
    loss = make_loss(model.apply, "mse")
    fit_steps = (0, 1, 10)
    algo = build_algorithm(config, loss)
    meta = load_params(run_dir, "maml")
    name = ALGORITHM_LABELS[config.algo]
    # name -> (θ, per-step rates, λ, the rate as eval.json records it)
    models = {name: (algo.model_params(meta), algo.step_rates(meta, max(fit_steps)), algo.prox_lambda,
                     results["maml"][str(shots)]["inner_lr"])}
    if "pretrained" in results:
        lr = results["pretrained"][str(shots)]["inner_lr"]
        models["pretrained"] = (load_params(run_dir, "pretrained"), jnp.full((max(fit_steps),), lr, jnp.float32),
                                0.0, lr)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)

    # Figure 2: a few held-out tasks, true curve, the K points, fits after 0, 1 and 10 steps.
    tasks = heldout_tasks(num_tasks=num_examples, max_shots=shots)
    grid = jnp.linspace(-5, 5, 200)[None, :, None].repeat(num_examples, axis=0)
    truth = np.asarray(sinusoid.evaluate(tasks.params, grid))
    fig, axes = plt.subplots(len(models), num_examples, figsize=(4 * num_examples, 3.2 * len(models)),
                             squeeze=False, sharex=True)
    labels = {0: "pre-update", 1: "1 grad step", 10: "10 grad steps"}
    for row, (name, (params, rates, prox, lr)) in enumerate(models.items()):
        preds = np.asarray(_fits(loss, model.apply, params, tasks.support, grid, rates, fit_steps, prox))
        for j in range(num_examples):
            ax = axes[row, j]
            ax.plot(grid[j, :, 0], truth[j, :, 0], color="tab:red", lw=2, label="ground truth")
            for i, (steps, style) in enumerate(zip(fit_steps, (":", "--", "-"))):
                ax.plot(grid[j, :, 0], preds[j, i, :, 0], style, color="tab:green", label=labels[steps])
            ax.scatter(tasks.support.x[j, :, 0], tasks.support.y[j, :, 0], marker="^", color="k", zorder=3,
                       label=f"{shots} points")
            ax.set_title(f"{name}, task {j + 1} ({_label(lr)})")
            if j == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"K = {shots} shots, held-out tasks (MAML paper, Figure 2)")
    fig.tight_layout()
    fits = os.path.join(out_dir, "fits.png")
    fig.savefig(fits, dpi=110)
    plt.close(fig)

    # Figure 3: query MSE vs gradient steps, mean and 95% CI, for each K.
    ks = list(results["maml"])
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for name, key, color in ((ALGORITHM_LABELS[config.algo], "maml", "tab:blue"),
                                 ("pretrained", "pretrained", "tab:orange")):
            if key not in results:
                continue
            r = results[key][k]
            mean, ci = np.array(r["mean"]), np.array(r["ci95"])
            steps = np.arange(len(mean))
            ax.plot(steps, mean, "o-", color=color, ms=3, label=f"{name} ({_label(r['inner_lr'])})")
            ax.fill_between(steps, mean - ci, mean + ci, color=color, alpha=0.25)
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("mean squared error")
        ax.set_title(f"K = {k}")
        ax.legend(fontsize=8)
    fig.suptitle("k-shot regression, 600 held-out tasks, 95% CI (MAML paper, Figure 3)")
    fig.tight_layout()
    curves = os.path.join(out_dir, "curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [fits, curves]


def _accuracy_curves(plt, config, results: dict, run_dir: str) -> str:
    """Query accuracy (mean, 95% CI) against test-time inner steps, for a few-shot classification run."""
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for k, r in results["maml"].items():
        mean, ci = 100 * np.array(r["mean"]), 100 * np.array(r["ci95"])
        steps = np.arange(len(mean))
        ax.plot(steps, mean, "o-", ms=3, label=f"{ALGORITHM_LABELS[config.algo]}, {k}-shot ({_label(r['inner_lr'])})")
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.25)
    ax.axhline(100 / config.ways, color="gray", ls=":", label="chance")
    ax.set_xlabel("inner gradient steps at test time")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"{config.task}, {config.ways}-way, {results['protocol']['test_episodes']} test episodes, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
