"""Mixed precision (bfloat16) against float32 on the sinusoid table (issue 16).

Trains the sinusoid MAML run twice with every default (MLP 1-40-40-1 ReLU, K = 10, alpha = 1e-3, one
inner step, Adam 1e-3, 25 tasks per meta-batch, 70,000 meta-steps, seed 0) -- once in float32, once with
`--precision bf16` (the model's forward and backward passes in bfloat16; parameters, optimiser state
and meta-gradient in float32) -- evaluates both on the same 600 held-out tasks for K = 5, 10, 20 after
1, 5 and 10 steps, and writes RESULTS.md beside this file: both tables with their 95% CIs, whether each
bf16 cell is within the CI of the difference, and each run's training speed (meta-steps/s, the median
over its logged chunks). The pretrained baseline is left out (it does not depend on the meta-learner).
Run from the repository root:

    .venv/bin/python experiments/precision/run.py
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PRECISIONS = ("float32", "bf16")
SHOTS = ("5", "10", "20")
STEPS = (1, 5, 10)


def train(precision: str) -> dict:
    out = os.path.join(RESULTS, precision)
    command = [sys.executable, "-m", "jmaml", "train", "--out", out, "--overwrite", "--no-pretrain",
               "--precision", precision]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{' '.join(command)} failed")
    with open(os.path.join(out, "eval.json"), encoding="utf-8") as f:
        results = json.load(f)["maml"]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        speeds = [json.loads(line)["steps_per_s"] for line in f if line.strip()]
    return {"wall_s": wall, "steps_per_s": statistics.median(speeds), "results": results}


def compare(runs: dict) -> tuple[str, int, int]:
    """The side-by-side table; a cell is "same" when the difference of the means is inside the 95% CI
    of the difference (sqrt(ci_a^2 + ci_b^2), the two runs' CIs combined as independent)."""
    lines = ["| K | steps | float32 | bf16 | difference | within the CI |", "| --- | --- | --- | --- | --- | --- |"]
    same = total = 0
    for k in SHOTS:
        for s in STEPS:
            a, b = (runs[p]["results"][k] for p in PRECISIONS)
            diff = b["mean"][s] - a["mean"][s]
            bound = math.hypot(a["ci95"][s], b["ci95"][s])
            ok = abs(diff) <= bound
            same, total = same + ok, total + 1
            lines.append(f"| {k} | {s} | {a['mean'][s]:.3f} ± {a['ci95'][s]:.3f} | {b['mean'][s]:.3f} ± "
                         f"{b['ci95'][s]:.3f} | {diff:+.3f} (± {bound:.3f}) | {'yes' if ok else 'NO'} |")
    return "\n".join(lines), same, total


def main(argv: list[str]) -> int:
    from jmaml.core._util import machine_description

    summary = os.path.join(RESULTS, "summary.json")
    if "--report" in argv:  # rewrite RESULTS.md from the last run's summary
        with open(summary, encoding="utf-8") as f:
            runs = json.load(f)
    else:
        os.makedirs(RESULTS, exist_ok=True)
        runs = {p: train(p) for p in PRECISIONS}
        runs["machine"] = machine_description()
        with open(summary, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=2)
    table, same, total = compare(runs)
    worse = sum(runs["bf16"]["results"][k]["mean"][s] > runs["float32"]["results"][k]["mean"][s]
                for k in SHOTS for s in STEPS)
    speed = runs["bf16"]["steps_per_s"] / runs["float32"]["steps_per_s"]
    text = f"""# Mixed precision on the sinusoid table

Command: `python experiments/precision/run.py`: `jmaml train --no-pretrain` with every default, once in
float32 and once with `--precision bf16` (`jmaml.models.mixed_precision`: the network's matmuls and
activations, forward and backward, in bfloat16; parameters, the inner loop's updates, optimiser state and
the meta-gradient summed over tasks in float32; losses reduced in float32). Evaluation as in
experiments/sinusoid: 600 held-out tasks, query MSE after 1, 5 and 10 SGD steps, mean ± 95% CI; each
run is evaluated in its own precision.

{table}

{same} of {total} cells agree within the CI of the difference; the bf16 mean is the higher (worse) one in
{worse} of {total}. The two runs are scored on the same tasks, so a paired comparison would be sharper
than these unpaired CIs: read "within the CI" as "no difference this evaluation can resolve", not as
"identical".

Training speed (median meta-steps/s over the logged chunks): float32 {runs['float32']['steps_per_s']:.0f},
bf16 {runs['bf16']['steps_per_s']:.0f} ({speed:.2f}x). Wall time (training, evaluation, plots): float32
{runs['float32']['wall_s']:.0f} s, bf16 {runs['bf16']['wall_s']:.0f} s. Machine: {runs['machine']}.
"""
    with open(os.path.join(HERE, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
