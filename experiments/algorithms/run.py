"""The MAML family on sinusoid regression, same budget for every algorithm.

Trains all seven algorithms of ``jmaml.learners`` (MAML, FOMAML, Reptile, Meta-SGD, ANIL, MAML++,
iMAML) with the MAML paper's sinusoid settings (MLP 1-40-40-1 ReLU, K = 10, alpha = 0.01, Adam 1e-3,
25 tasks per meta-batch) for the same number of meta-steps on the same task stream, once with k = 1
inner step (the paper's setting) and once with k = 5; evaluates each with the paper's protocol (600
held-out tasks, MSE after 1, 5 and 10 steps of the algorithm's own test-time rule, mean ± 95% CI at
K = 5 and 10) and measures each algorithm's meta-step time (median over the chunks after the first,
which includes compilation). Writes RESULTS.md, results.json and the run dirs under results/.
Run from the repository root:

    .venv/bin/python experiments/algorithms/run.py [--steps 15000] [--k 1,5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
STEPS_SHOWN = (1, 5, 10)
SHOTS_SHOWN = ("5", "10")


def _suffix(inner_lr: float, rate_meta_lr: float | None) -> str:
    return ("" if inner_lr == 0.01 else f"-lr{inner_lr:g}") + ("" if rate_meta_lr is None else f"-rlr{rate_meta_lr:g}")


def run_one(algo: str, k: int, steps: int, inner_lr: float = 0.01, rate_meta_lr: float | None = None) -> dict:
    from jmaml import learners
    from jmaml.run import evaluate, train

    takes_rate = "rate_meta_lr" in {o.name for o in learners.spec(algo).options}
    rate_meta_lr = rate_meta_lr if takes_rate else None
    config = train.TrainConfig(algo=algo, num_inner_steps=k, steps=steps, log_every=1000,
                               checkpoint_every=steps, pretrain=False, inner_lr=inner_lr,
                               algo_options={} if rate_meta_lr is None else {"rate_meta_lr": rate_meta_lr})
    run_dir = os.path.join(RESULTS, f"k{k}" + _suffix(inner_lr, rate_meta_lr), algo)
    t0 = time.perf_counter()
    record: dict = {"algo": algo, "k": k, "steps": steps, "settings": config.algorithm_settings()}
    try:
        train.train(config, run_dir, overwrite=True, stream=io.StringIO())
    except train.DivergenceError as e:
        record["diverged"] = str(e).split(". The last good state")[0]
        return record
    record["train_s"] = time.perf_counter() - t0
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rates = [json.loads(line)["steps_per_s"] for line in f][1:]
    record["ms_per_meta_step"] = 1e3 / float(np.median(rates))
    results = evaluate.evaluate_run(run_dir)
    record["eval"] = {k_: evaluate.learner_results(results)[k_] for k_ in SHOTS_SHOWN}
    return record


def table(records: list[dict]) -> str:
    head = ["algorithm"] + [f"K={s}, {n} step{'s' if n > 1 else ''}" for s in SHOTS_SHOWN for n in STEPS_SHOWN]
    lines = ["| " + " | ".join(head + ["ms / meta-step"]) + " |", "|" + " --- |" * (len(head) + 1)]
    for r in records:
        if "diverged" in r:
            lines.append(f"| {r['algo']} | " + " | ".join(["—"] * (len(head) - 1)) + f" | {r['diverged']} |")
            continue
        cells = []
        for s in SHOTS_SHOWN:
            e = r["eval"][s]
            for n in STEPS_SHOWN:
                cell = f"{e['mean'][n]:.3f} ± {e['ci95'][n]:.3f}"
                if e["diverged"][n]:
                    cell += f" ({e['diverged'][n]} div.)"
                cells.append(cell)
        lines.append(f"| {r['algo']} | " + " | ".join(cells) + f" | {r['ms_per_meta_step']:.2f} |")
    return "\n".join(lines)


def machine() -> str:
    from jmaml.core._util import machine_description

    return machine_description()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15_000, help="meta-steps per algorithm (default 15000)")
    parser.add_argument("--k", default="1,5", help="inner-step settings to run (default 1,5)")
    parser.add_argument("--algos", default=None, help="comma-separated subset (default: all seven)")
    parser.add_argument("--inner-lr", type=float, default=0.01,
                        help="alpha for every algorithm (default 0.01, the paper's); another value writes "
                             "RESULTS-lr<alpha>.md and results-lr<alpha>.json beside the default ones")
    parser.add_argument("--rate-meta-lr", type=float, default=None,
                        help="Meta-SGD's and MAML++'s meta rate for their learned inner rates (default: beta, "
                             "as the others); given, the files get the suffix -rlr<value>")
    args = parser.parse_args(argv)
    from jmaml.learners import names

    seven = [n for n in names() if n != "cavia"]  # the seven of the committed tables
    algos = args.algos.split(",") if args.algos else seven
    ks = [int(v) for v in args.k.split(",")]
    t0 = time.perf_counter()
    records = []
    for k in ks:
        for algo in algos:
            r = run_one(algo, k, args.steps, args.inner_lr, args.rate_meta_lr)
            records.append(r)
            status = r.get("diverged") or f"{r['ms_per_meta_step']:.2f} ms/step, " \
                f"K=10 1-step MSE {r['eval']['10']['mean'][1]:.3f}"
            print(f"k={k} {algo}: {status}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    suffix = _suffix(args.inner_lr, args.rate_meta_lr)
    rlr = "" if args.rate_meta_lr is None else f" --rate-meta-lr {args.rate_meta_lr:g}"
    rates = ("learned rates start at alpha" if args.rate_meta_lr is None else
             f"learned rates start at alpha and move with Adam at {args.rate_meta_lr:g}")
    with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
        json.dump({"steps": args.steps, "machine": machine(), "wall_s": wall, "runs": records}, f, indent=2)
    sections = "\n\n".join(f"### k = {k} inner step{'s' if k > 1 else ''} at training\n\n"
                           + table([r for r in records if r["k"] == k]) for k in ks)
    text = f"""# The MAML family on sinusoid regression

Command: `python experiments/algorithms/run.py --steps {args.steps} --k {args.k} --inner-lr {args.inner_lr:g}{rlr}`.
Every algorithm meta-trains the MAML paper's sinusoid network (MLP 1-40-40-1 ReLU, K = 10 support + 10 query
points, alpha = {args.inner_lr:g}, Adam with beta = 1e-3, 25 tasks per meta-batch, MSE) for {args.steps:,} meta-steps on
the same stream of training tasks (seed 0), with each algorithm's defaults: Meta-SGD's and MAML++'s
{rates}; ANIL adapts the last layer; MAML++ uses the multi-step loss annealed
over the first tenth of training and second-order gradients throughout; iMAML uses lambda = 1 and 5
conjugate-gradient iterations; Reptile's direction feeds the same Adam.

Evaluation (the paper's): 600 held-out tasks, query MSE (100 points) after 1, 5 and 10 steps of
each algorithm's own test-time rule on K points (SGD at alpha; ANIL's head only; Meta-SGD's learned
rates; MAML++'s learned per-step rates, its last step's beyond the k it trained with; iMAML's
proximal steps), mean ± 95% CI; "div." counts tasks left out of a mean as diverged (non-finite or
over 1000x their un-adapted loss). Meta-step time: the median over 1000-step chunks after the first,
this machine, one algorithm at a time.

{sections}

Wall time {wall / 60:.1f} min on {machine()}.
"""
    with open(os.path.join(HERE, f"RESULTS{suffix}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
