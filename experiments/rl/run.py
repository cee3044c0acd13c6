"""Meta-RL as the MAML paper's §5.3 reports it: average return on held-out tasks after 0-3 policy-gradient
steps, MAML against a multi-task "pretrained" policy fine-tuned the same way and a random initialisation,
over 3 seeds, with 95% confidence intervals.

Environments (``jmaml.rl.envs``): ``navigation2d`` (the paper's 2D navigation: goals uniform in
[-0.5, 0.5]^2, reward minus the distance, horizon 100, actions clipped to ±0.1) and ``pendulum``
(gymnax's Pendulum-v1 with mass and length drawn per task, horizon 100). Policy: a Gaussian MLP (2 x 100
ReLU, the paper's). Inner loop: one REINFORCE step (α = 0.1, 20 episodes, the linear feature baseline,
γ = 0.99); meta-gradient: ProMP's low-variance curvature estimator through the inner step, 20 episodes of
the adapted policy; outer step TRPO as the paper's (KL 0.01, 10 CG iterations, line search; ``--outer adam``
for Adam at 0.01); meta-batch 20 tasks. The pretrained policy: multi-task policy gradient (Adam at 0.01) on
the same tasks. Evaluation: 40 held-out tasks per seed, 20 episodes per step.

Every run goes through ``jmaml.fit`` with a run folder (checkpoints, resume: rerunning continues or
reuses finished runs). Writes ``RESULTS.md``, ``results.json`` and ``results/curves_<env>.png`` beside this
file. Run from the repository root:

    .venv/bin/python experiments/rl/run.py [--envs navigation2d,pendulum] [--steps 100] [--seeds 0,1,2]
        [--outer trpo|adam]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jmaml  # noqa: E402
from jmaml import rl  # noqa: E402
from jmaml._util import machine_description  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"inner_lr": 0.1, "inner_episodes": 20, "outer_episodes": 20, "gamma": 0.99, "meta_batch": 20,
            "meta_lr": 0.01, "hidden": (100, 100), "eval_tasks": 40, "eval_episodes": 20, "eval_steps": 3}
ENVS = {"navigation2d": lambda: rl.envs.navigation2d(horizon=100), "pendulum": lambda: rl.envs.pendulum(horizon=100)}
METHODS = ("maml", "pretrained", "random")


def parts(env_name: str, outer: str = "trpo"):
    env = ENVS[env_name]()
    obs, act = env.observation_shape[0], env.action_shape[0]
    policy = rl.policies.gaussian_mlp(obs, act, hidden=SETTINGS["hidden"])
    common = dict(inner_lr=SETTINGS["inner_lr"], inner_episodes=SETTINGS["inner_episodes"],
                  outer_episodes=SETTINGS["outer_episodes"], gamma=SETTINGS["gamma"])
    maml = rl.maml_rl(env, policy, outer="trpo" if outer == "trpo" else "gradient", **common)
    return env, policy, maml, rl.maml_rl(env, policy, num_inner_steps=0, **common)


def train(env_name: str, method: str, seed: int, steps: int, out: str, outer: str):
    env, policy, maml, pretrained = parts(env_name, outer)
    params = policy.init(jax.random.key(seed))
    if method == "random":
        return params
    learner = maml if method == "maml" else pretrained
    run_dir = os.path.join(out, env_name, f"seed{seed}", method)
    resume = os.path.exists(os.path.join(run_dir, f"{learner.name}.ckpt.npz"))
    optimiser = rl.trpo_optimiser() if method == "maml" and outer == "trpo" else optax.adam(SETTINGS["meta_lr"])
    state = jmaml.fit(learner, rl.task_distribution(env), optimiser, params, steps=steps,
                      meta_batch_size=SETTINGS["meta_batch"], key=seed, run=jmaml.RunDir(run_dir, resume=resume),
                      log=jmaml.Logging(every=max(1, steps // 20), progress=True))
    return state.params


def evaluate(env_name: str, params, seed: int) -> np.ndarray:
    env, policy, maml, _ = parts(env_name)
    return rl.returns_after_steps(maml, env, policy, params, key=10_000 + seed, num_tasks=SETTINGS["eval_tasks"],
                                  num_steps=SETTINGS["eval_steps"], eval_episodes=SETTINGS["eval_episodes"])


def table(env_name: str, result: dict) -> str:
    steps = SETTINGS["eval_steps"]
    lines = [f"| {env_name} | " + " | ".join(f"after {s} step{'s' if s != 1 else ''}" for s in range(steps + 1)) + " |",
             "|" + " --- |" * (steps + 2)]
    for method in METHODS:
        r = result[method]
        cells = [f"{m:.2f} ± {c:.2f}" for m, c in zip(r["mean"], r["ci95"])]
        if method == "maml":
            cells = [f"**{c}**" for c in cells]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(env_name: str, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in METHODS:
        mean, ci = np.asarray(result[method]["mean"]), np.asarray(result[method]["ci95"])
        x = np.arange(len(mean))
        ax.plot(x, mean, marker="o", label=method)
        ax.fill_between(x, mean - ci, mean + ci, alpha=0.2)
    ax.set_xlabel("policy-gradient steps on the held-out task")
    ax.set_ylabel("average return")
    ax.set_xticks(range(SETTINGS["eval_steps"] + 1))
    ax.set_title(f"{env_name}: MAML vs pretrained vs random (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", default="navigation2d,pendulum")
    parser.add_argument("--steps", type=int, default=100, help="meta-steps per run")
    parser.add_argument("--outer", default="trpo", choices=("trpo", "adam"), help="MAML's outer step")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=os.path.join(HERE, "runs"), help="run folders (checkpoints)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    envs = args.envs.split(",")
    for name in envs:
        if name not in ENVS:
            raise SystemExit(f"--envs: {name!r} is not one of {sorted(ENVS)}")
    results, timings = {}, {}
    for env_name in envs:
        per_method = {}
        for method in METHODS:
            returns = []
            for seed in seeds:
                t0 = time.perf_counter()
                params = train(env_name, method, seed, args.steps, os.path.join(args.out, args.outer), args.outer)
                timings[f"{env_name}/{method}/seed{seed}"] = time.perf_counter() - t0
                returns.append(evaluate(env_name, params, seed))
            pooled = np.concatenate(returns)  # (seeds x tasks, steps + 1)
            per_method[method] = {**rl.evaluation.summarize(pooled),
                                  "per_seed_mean": [r.mean(axis=0).tolist() for r in returns]}
        results[env_name] = per_method
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        plot(env_name, per_method, os.path.join(HERE, "results", f"curves_{env_name}.png"))
        print(table(env_name, per_method), flush=True)
    record = {"settings": {**SETTINGS, "hidden": list(SETTINGS["hidden"]), "steps": args.steps, "seeds": seeds,
                           "estimator": "lvc", "maml_outer": args.outer, "pretrained_outer": "adam"},
              "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "results": results, "train_seconds": timings}
    with open(os.path.join(HERE, "results.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    md = ["# Meta-RL: average return after policy-gradient steps on held-out tasks", "",
          f"`python experiments/rl/run.py --steps {args.steps} --outer {args.outer}`; {len(seeds)} seeds x "
          f"{SETTINGS['eval_tasks']} held-out tasks each, {SETTINGS['eval_episodes']} episodes per evaluation; "
          f"mean ± 95% CI over the {len(seeds) * SETTINGS['eval_tasks']} tasks. {record['machine']}, "
          f"{record['date']}.", "",
          "Settings: " + ", ".join(f"{k} {v}" for k, v in record["settings"].items()) + ".", ""]
    for env_name in envs:
        md += [table(env_name, results[env_name]), "", f"![{env_name}](results/curves_{env_name}.png)", ""]
        one = {m: (results[env_name][m]["mean"][1], results[env_name][m]["ci95"][1]) for m in METHODS}
        beats = all(one["maml"][0] - one["maml"][1] > one[m][0] + one[m][1] for m in ("pretrained", "random"))
        md.append(f"After one step MAML's return {'is' if beats else 'is not'} above both baselines' beyond the "
                  "confidence intervals.")
        md.append("")
    total = sum(timings.values())
    md.append(f"Training and evaluation took {total / 60:.1f} minutes on this machine (2 CPU cores).")
    with open(os.path.join(HERE, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
