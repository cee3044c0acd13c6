"""Meta-step time of each algorithm of the MAML family on the sinusoid benchmark (one device).

Trains each algorithm for ``--steps`` meta-steps (chunks of 500) with the paper's sinusoid settings
and reports the median milliseconds per meta-step over the chunks after the first (which compiles).
Writes ``--out``/algo_step_time_<platform>.{json,md}:

    .venv/bin/python scripts/algo_step_time.py --k 1 --steps 3000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jmaml import learners  # noqa: E402
from jmaml.run import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "results"))
    args = parser.parse_args(argv)
    device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}), JAX {jax.__version__}"
    rows = []
    for algo in learners.names():
        config = train.TrainConfig(algo=algo, num_inner_steps=args.k, steps=args.steps, log_every=500,
                                   checkpoint_every=args.steps, pretrain=False, max_loss_ratio=float("inf"))
        with tempfile.TemporaryDirectory() as d:
            try:
                train.train(config, d, stream=io.StringIO())
            except train.DivergenceError as e:
                print(f"{algo}: {e}", file=sys.stderr)
            with open(os.path.join(d, "metrics.jsonl"), encoding="utf-8") as f:
                rates = [json.loads(line)["steps_per_s"] for line in f][1:]
        ms = 1e3 / float(np.median(rates)) if rates else float("nan")
        rows.append({"algo": algo, "k": args.k, "ms_per_meta_step": ms})
        print(f"{algo}: {ms:.3f} ms/meta-step", file=sys.stderr, flush=True)
    lines = [f"# Meta-step time per algorithm (sinusoid, meta-batch 25, k = {args.k})\n\nDevice: {device}.\n",
             "| algorithm | ms / meta-step |", "| --- | --- |"]
    lines += [f"| {r['algo']} | {r['ms_per_meta_step']:.3f} |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    name = f"algo_step_time_{jax.devices()[0].platform}"
    with open(os.path.join(args.out, name + ".json"), "w", encoding="utf-8") as f:
        json.dump({"device": device, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, name + ".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
