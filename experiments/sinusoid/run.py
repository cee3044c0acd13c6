"""Sinusoid reproduction (Finn, Abbeel & Levine 2017, Section 5.1, Figures 2-3).

Runs `jmaml train` with its defaults (MLP 1-40-40-1 ReLU, K = 10, alpha = 1e-3 as the reference code runs, one inner
step, Adam 1e-3, 25 tasks per meta-batch, 70,000 meta-steps) plus the pretrained baseline, evaluates
on 600 held-out tasks for K = 5, 10, 20, and writes RESULTS.md beside this file with the table, the
wall time, the machine and the command. Run from the repository root:

    .venv/bin/python experiments/sinusoid/run.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_DIR = os.path.join(HERE, "results")


def machine() -> str:
    from jmaml.core._util import machine_description

    return machine_description()


def median_table(results: dict) -> str:
    lines = ["| model | K | 1 step | 5 steps | 10 steps |", "| --- | --- | --- | --- | --- |"]
    for model in ("maml", "pretrained"):
        for k, r in results.get(model, {}).items():
            lines.append(f"| {model} | {k} | " + " | ".join(f"{r['median'][s]:.3f}" for s in (1, 5, 10)) + " |")
    return "\n".join(lines)


def curvature_stats() -> dict:
    """λ_max of each held-out task's support loss at the meta-learned θ, and which tasks run away."""
    import jax
    import numpy as np

    from jmaml import make_loss
    from jmaml.core import diagnostics
    from jmaml.run import evaluate, train

    config = train.load_config(RUN_DIR)
    model, _ = train.build_model(config)
    loss = make_loss(model.apply, "mse")
    params = train.load_params(RUN_DIR)
    tasks = evaluate.heldout_tasks()
    stats = {}
    for k in evaluate.SHOTS:
        support = jax.tree.map(lambda a, k=k: a[:, :k], tasks.support)
        lam = np.asarray(jax.jit(jax.vmap(lambda b: diagnostics.hessian_max_eigenvalue(
            loss, params, b, num_iters=100)))(support))
        curves = np.asarray(evaluate.adaptation_curve(loss, params, support, tasks.query, inner_lr=config.inner_lr))
        runaway = np.flatnonzero(~np.isfinite(curves).all(axis=1) | (np.nan_to_num(curves, nan=np.inf).max(axis=1)
                                                                     > 10 * curves[:, 0]))
        stats[k] = {"median": float(np.median(lam)), "max": float(lam.max()),
                    "above_bound": float(np.mean(lam > 2 / config.inner_lr)), "runaway": runaway.tolist(),
                    "runaway_lambda": lam[runaway].round(0).tolist()}
    return stats


def stability_text(results: dict) -> str:
    from jmaml.run import train

    stats = curvature_stats()
    diverged = {k: r["diverged"][-1] for k, r in results["maml"].items()}
    parts = ", ".join(f"K = {k}: {d}" for k, d in diverged.items())
    alpha = train.load_config(RUN_DIR).inner_lr
    lam = "; ".join(f"K = {k}: median {s['median']:.0f}, max {s['max']:.0f}, above {2 / alpha:g} on "
                    f"{100 * s['above_bound']:.0f}% of tasks" for k, s in stats.items())
    run = "; ".join(f"K = {k}: tasks {s['runaway']} with λ_max {s['runaway_lambda']}"
                    for k, s in stats.items() if s["runaway"])
    return (f"Held-out tasks whose loss diverged after 10 steps (non-finite or over 1000× their un-adapted loss; "
            f"left out of that cell's mean): {parts} of 600. Measured with `jmaml.diagnostics` at the "
            f"meta-learned θ, the support-loss curvature λ_max against the stability bound 2/α = "
            f"{2 / alpha:g} ({lam}): MAML learns an initialisation near the edge of stability for its own "
            f"rate — the seed's |1 − αλ| > 1 lesson at scale — yet at this rate the tasks above the bound "
            f"settle as ReLU units switch and the curvature drops; tasks whose loss climbs above 10× its "
            f"start: {run or 'none'}.")

def main() -> int:
    command = [sys.executable, "-m", "jmaml", "train", "--out", RUN_DIR, "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        return proc.returncode
    train_line = next((line for line in proc.stderr.splitlines() if line.startswith("trained in")), "")
    return report(wall, train_line)


def report(wall: float, train_line: str) -> int:
    with open(os.path.join(RUN_DIR, "eval.md"), encoding="utf-8") as f:
        table = f.read().strip()
    with open(os.path.join(RUN_DIR, "eval.json"), encoding="utf-8") as f:
        results = json.load(f)
    text = f"""# Sinusoid reproduction (MAML paper, Section 5.1)

Command: `python experiments/sinusoid/run.py`, i.e. `jmaml train --out experiments/sinusoid/results`
with every default: MLP 1-40-40-1 ReLU, K = 10 support + 10 query points, alpha = 1e-3, one inner
step, second-order MAML, Adam (beta = 1e-3), 25 tasks per meta-batch, MSE, 70,000 meta-steps, seed 0;
the pretrained baseline is the same network trained by regression for 70,000 steps on the same task
distribution, fine-tuned with SGD at a rate chosen on 600 separate validation tasks.

Evaluation: 600 held-out tasks (fixed seed), MSE on 100 query points after 0, 1, 5 and 10 SGD steps
on the same K points, mean ± 95% CI (1.96 standard errors). The MAML model is the one trained with
K = 10; it is adapted with its training rate alpha = 1e-3 at every K.

The inner rate: the paper's text gives alpha = 0.01, but its reference code's sinusoid command runs
with the code's default, 1e-3. At 1e-3 the mean curves fall with every extra step as the paper's
Figure 3 does (K = 5 and 10, 3 seeds: every step from 1 to 10 but one last step, K = 5 seed 2,
0.251 -> 0.253, inside its ±0.029 CI) and no held-out task diverges; at 0.01 the learned θ sits past
the inner loop's stability edge: 4 of 6 mean curves rise somewhere (K = 10 seed 0 to 4.09 after 5
steps, K = 5 seed 2 to 7.06 after 10) and 3 adaptations diverge (3 seeds each, K = 5/10/20, λ_max
against 2/alpha: [FIDELITY.md](FIDELITY.md)). `--inner-lr 0.01` runs the paper's text.

{table}

The meta-learned network adapts in one step far better than the baseline, as in the paper's
Figure 3, and keeps improving with every further step. {stability_text(results)} The medians over
tasks show the typical task:

{median_table(results)}

Wall time: {wall:.0f} s for the whole command (training, evaluation, plots); {train_line.split(';')[0]}.
Machine: {machine()}.

![fits](results/plots/fits.png)
![curves](results/plots/curves.png)
"""
    with open(os.path.join(HERE, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
