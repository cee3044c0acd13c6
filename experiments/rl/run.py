"""Meta-RL as the MAML paper's §5.3 reports it: average return on held-out tasks after 0-3 policy-gradient
steps, MAML against a multi-task "pretrained" policy fine-tuned the same way and a random initialisation,
over 3 seeds, with 95% confidence intervals.

Environments (``jmaml.rl.envs``): ``navigation2d`` (the paper's 2D navigation: goals uniform in
[-0.5, 0.5]^2, reward minus the distance, horizon 100, actions clipped to ±0.1) and ``pendulum``
(gymnax's Pendulum-v1 with mass and length drawn per task, horizon 100). Policy: a Gaussian MLP (2 x 100
ReLU, the paper's). Inner loop: one REINFORCE step (α = 0.1, 20 episodes, the linear feature baseline,
γ = 0.99); meta-gradient: ProMP's low-variance curvature estimator through the inner step, 20 episodes of
the adapted policy; outer step TRPO as the paper's (the analytic KL between the old and new adapted Gaussians
at most 0.01, 10 CG iterations, line search; ``--outer adam`` for Adam at 0.01); meta-batch 20 tasks; 2D
navigation's episodes end within 0.01 of the goal (cbfinn/maml_rl's point environment). The pretrained
policy: multi-task policy gradient (Adam at 0.01) on the same tasks.

Evaluation, the paper's protocol (App. A.2 and cbfinn/maml_rl's test script): 40 held-out tasks per seed, 40
episodes per step; MAML's test-time rates α = 0.1 then α/2; MAML scored at its last meta-step and at its
best validation return (the paper's "best policy seen in training"), the pretrained and random policies at
their own rates chosen on separate validation tasks (``recipe.RLConfig``).

Every run goes through ``jmaml.fit`` with a run folder (checkpoints, resume: rerunning continues or
reuses finished runs). Writes ``RESULTS.md``, ``results.json`` and ``results/curves_<env>.png`` beside this
file. Run from the repository root:

    .venv/bin/python experiments/rl/run.py [--envs navigation2d,pendulum] [--steps 100] [--seeds 0,1,2]
        [--outer trpo|adam]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from jmaml import rl  # noqa: E402
from jmaml.core._util import machine_description  # noqa: E402
from jmaml.run import rl_recipe as recipe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = recipe.METHODS


def config(env_name: str, seed: int, steps: int, outer: str, raw_actions: bool = False) -> recipe.RLConfig:
    """The paper's settings (``RLConfig``'s defaults) for an environment, seed, length and outer step;
    ``raw_actions``: 2D navigation's action is the velocity itself (jmaml's earlier environment)."""
    return recipe.RLConfig(env=env_name, seed=seed, steps=steps, outer=outer,
                           normalized_actions=False if raw_actions else None).validate()


def run_seed(cfg: recipe.RLConfig, out: str) -> tuple[dict, dict, float]:
    """Trains (or resumes, or reuses) one seed's runs in ``out``; every method's per-task returns and test-time
    rates, and the seconds it took."""
    t0 = time.perf_counter()
    resume = os.path.exists(os.path.join(out, "rl_config.json"))
    trained = recipe.train(cfg, out, resume=resume)
    results = recipe.evaluate(cfg, trained, out)
    return ({m: np.asarray(r["per_task"]) for m, r in results.items()}, {m: r["test_lr"] for m, r in results.items()},
            time.perf_counter() - t0)


PAPER = {"navigation2d": (-40.41, -11.68, -3.33, -3.23)}  # MAML's average return after 0-3 steps
PAPER_SOURCE = "Finn, Abbeel & Levine, ICML 2017, Appendix Table 4"


def verdicts(r: dict) -> list[str]:
    """What the table says, by the 95% CIs: whether MAML (last and best) is above both baselines at every step
    >= 1, and whether its steps 2, 3 fall below step 1."""
    lines = []
    for m in ("maml", "maml_best"):
        if m not in r:
            continue
        mean, ci = np.asarray(r[m]["mean"]), np.asarray(r[m]["ci95"])
        above = [s for s in range(1, len(mean)) if all(mean[s] - ci[s] > r[b]["mean"][s] + r[b]["ci95"][s]
                                                       for b in ("pretrained", "random") if b in r)]
        below = [s for s in range(2, len(mean)) if mean[s] + ci[s] < mean[1] - ci[1]]
        lines.append(f"{m}: after 1 step {mean[1]:.2f} ± {ci[1]:.2f}; above both baselines beyond the CIs at steps "
                     f"{above or 'none'} of 1..{len(mean) - 1}; steps below step 1's beyond the CIs: "
                     f"{below or 'none'}.")
    return lines


def table(env_name: str, result: dict) -> str:
    lines = recipe.format_table(env_name, result).splitlines()
    return "\n".join(line.replace("| maml |", "| **maml** |") for line in lines)


def plot(env_name: str, result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in [m for m in METHODS if m in result]:
        mean, ci = np.asarray(result[method]["mean"]), np.asarray(result[method]["ci95"])
        x = np.arange(len(mean))
        ax.plot(x, mean, marker="o", label=method)
        ax.fill_between(x, mean - ci, mean + ci, alpha=0.2)
    ax.set_xlabel("policy-gradient steps on the held-out task")
    ax.set_ylabel("average return")
    ax.set_xticks(range(len(result["maml"]["mean"])))
    ax.set_title(f"{env_name}, mean and 95% CI over tasks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", default="navigation2d,pendulum")
    parser.add_argument("--steps", type=int, default=200, help="meta-steps per run")
    parser.add_argument("--outer", default="trpo", choices=("trpo", "adam"), help="MAML's outer step")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--raw-actions", action="store_true",
                        help="2D navigation's action is the velocity (not in units of the box): a deviation, "
                             "tabled apart as navigation2d-raw")
    parser.add_argument("--out", default=os.path.join(HERE, "runs"), help="run folders (checkpoints)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    envs = args.envs.split(",")
    for name in envs:
        if name not in ("navigation2d", "pendulum"):
            raise SystemExit(f"--envs: {name!r} is not navigation2d or pendulum")
        if args.raw_actions and name != "navigation2d":
            raise SystemExit("--raw-actions is navigation2d's")
    keys = {name: name + ("-raw" if args.raw_actions else "") for name in envs}
    results, timings = {}, {}
    path = os.path.join(HERE, "results.json")
    if os.path.exists(path):  # environments run before (with their own settings) stay in the table
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        results = {k: v for k, v in before.get("results", {}).items() if k not in keys.values()}
        timings = {k: v for k, v in before.get("train_seconds", {}).items()
                   if k.split("/")[0] not in keys.values()}
    for env_name in envs:
        runs, rates = {}, {}
        for seed in seeds:
            cfg = config(env_name, seed, args.steps, args.outer, args.raw_actions)
            runs[seed], rates[seed], timings[f"{keys[env_name]}/seed{seed}"] = run_seed(
                cfg, os.path.join(args.out, args.outer, keys[env_name], f"seed{seed}"))
        per_method = {}
        for method in METHODS:
            pooled = np.concatenate([runs[seed][method] for seed in seeds])  # (seeds x tasks, steps + 1)
            per_method[method] = {**rl.evaluation.summarize(pooled),
                                  "per_seed_mean": [runs[seed][method].mean(axis=0).tolist() for seed in seeds],
                                  "test_lr": [rates[seed][method] for seed in seeds]}
        results[keys[env_name]] = {**per_method, "steps": args.steps, "outer": args.outer, "seeds": seeds,
                                   "settings": dataclasses.asdict(cfg)}
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        plot(keys[env_name], per_method, os.path.join(HERE, "results", f"curves_{keys[env_name]}.png"))
        print(table(keys[env_name], per_method), flush=True)
    settings = {k: v for k, v in dataclasses.asdict(config(envs[0], 0, args.steps, args.outer)).items()
                if k not in ("env", "seed")}
    record = {"settings": {**settings, "seeds": seeds, "pretrained_outer": "adam"},
              "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "results": results, "train_seconds": timings}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    md = ["# Meta-RL: average return after policy-gradient steps on held-out tasks", "",
          f"`python experiments/rl/run.py --envs ENV --steps STEPS --outer {args.outer}`; {len(seeds)} seeds x "
          f"{settings['eval_tasks']} held-out tasks each, {settings['eval_episodes']} episodes per evaluation; "
          f"mean ± 95% CI over the {len(seeds) * settings['eval_tasks']} tasks. {record['machine']}, "
          f"{record['date']}.", "",
          "Settings: " + ", ".join(f"{k} {v}" for k, v in record["settings"].items() if k != "steps") + ".", ""]
    for env_name in sorted(results):
        r = results[env_name]
        md += [f"**{env_name}**, {r.get('steps')} meta-steps ({r.get('outer')} outer step):", "", table(env_name, r),
               ""]
        if "settings" in r:
            md += ["Environment: " + ", ".join(f"{k} {v}" for k, v in
                                               recipe.RLConfig.from_json(r["settings"]).env_settings().items())
                   + "; MAML's test-time rates " + ", ".join(map(str, r["maml"]["test_lr"][0])) + ".", ""]
        if env_name.endswith("-raw"):
            md += ["A deviation from the reference environment, measured: the policy's action is the velocity itself "
                   "(clipped to ±0.1), not in units of the box; everything else as above.", ""]
        if env_name in PAPER:
            md += [f"The paper's Table 4 ({PAPER_SOURCE}), MAML: " + " → ".join(f"{v:.2f}" for v in PAPER[env_name])
                   + " after 0, 1, 2, 3 steps.", ""]
        rates = {m: r[m].get("test_lr") for m in METHODS if m in r and r[m].get("test_lr")}
        md += ["Test-time rates per step (the baselines' chosen on the validation tasks, per seed): "
               + "; ".join(f"{m} {v}" for m, v in rates.items()) + ".", ""]
        md += [f"![{env_name}](results/curves_{env_name}.png)", ""] + [f"- {line}" for line in verdicts(r)] + [""]
    per_env = {e: sum(v for k, v in timings.items() if k.split("/")[0] == e) / 60 for e in sorted(results)}
    md.append("Wall time of each environment's last invocation (training, validation and evaluation; a rerun "
              "reuses finished runs and only evaluates), 2 CPU cores: "
              + ", ".join(f"{e} {m:.1f} min" for e, m in per_env.items()) + ".")
    with open(os.path.join(HERE, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
