"""Large meta-batches: jmaml's step on the whole meta-batch, jmaml's step with the task axis in blocks
(``meta_batch_block="auto"``: the block timed on the first compile, as ``jmaml train --meta-batch-block
auto`` chooses it) and the naive JAX step a user writes (``scripts/bench/peers/jax_naive.py``), measured
in one process, interleaved round by round, the best round kept.

    python scripts/bench/blocks_bench.py [--quick] [--rounds 2] [--min-time 2]

Writes ``scripts/bench/results/blocks_<device>.json`` and ``.md``. A benchmark, not a test: nothing
asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _jmaml_runner(meta_batch: int, k: int, block, chunk_len: int):
    from jmaml import train
    from scripts.bench import chunk_runner

    config = train.TrainConfig(meta_batch_size=meta_batch, num_inner_steps=k, log_every=chunk_len,
                               checkpoint_every=chunk_len, steps=chunk_len, meta_batch_block=block).validate()
    return chunk_runner(config, chunk_len)


def _naive_runner(meta_batch: int, k: int, calls: int):
    from scripts.bench.peers import common, jax_naive

    run, _, _ = jax_naive.setup(common.sample_numpy_tasks(meta_batch), k)
    return lambda: run(calls)


def _rate(run, steps_per_call: int, min_time: float) -> float:
    calls, total = 0, 0.0
    while total < min_time and calls < 10_000:
        total += run()
        calls += 1
    return steps_per_call * calls / total


def _auto_block(meta_batch: int, k: int) -> int | None:
    """The block ``meta_batch_block="auto"`` chooses for this cell now (one compile and three timed steps per
    candidate)."""
    from jmaml import engine, recipes, train

    config = train.TrainConfig(meta_batch_size=meta_batch, num_inner_steps=k, log_every=1, checkpoint_every=1,
                               steps=1).validate()
    learner, dist, optimiser = recipes.phase_parts(config, config.algo)
    state = engine.initial_state(learner, recipes.initial_params(config), optimiser, train.task_stream_key(config))
    return engine.choose_block("auto", learner, dist, optimiser, state, meta_batch, run_dir=None, name="maml",
                               resume=False, stream=sys.stderr)


def measure(cells, rounds: int, min_time: float, log) -> list[dict]:
    out = []
    for meta_batch, k in cells:
        chunk_len = 20 if meta_batch <= 1000 else 4
        block = _auto_block(meta_batch, k)
        runners = {"jmaml": (_jmaml_runner(meta_batch, k, None, chunk_len), chunk_len),
                   "jmaml_blocked": (_jmaml_runner(meta_batch, k, block, chunk_len), chunk_len),
                   "jax_naive": (_naive_runner(meta_batch, k, max(1, chunk_len // 4)), max(1, chunk_len // 4))}
        for run, _ in runners.values():
            run()  # compile and warm up
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, (run, per_call) in runners.items():
                best[name] = max(best.get(name, 0.0), _rate(run, per_call, min_time))
        row = {"meta_batch": meta_batch, "k": k, "block": block or meta_batch, **best,
               "blocked_vs_naive": best["jmaml_blocked"] / best["jax_naive"],
               "blocked_vs_unblocked": best["jmaml_blocked"] / best["jmaml"],
               "unblocked_vs_naive": best["jmaml"] / best["jax_naive"]}
        log(json.dumps(row))
        out.append(row)
    return out


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"### Large meta-batches, the task axis in blocks: {m}", "",
             f"{result['date']}, {result['rounds']} interleaved rounds in one process, best kept; meta-steps/s "
             "(higher is better). Block: what `meta_batch_block=\"auto\"` chose for the cell on this machine now.", "",
             "| meta-batch | k | block | jmaml blocked | jmaml whole batch | JAX naive | blocked / naive | "
             "blocked / whole |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["cells"]:
        lines.append(f"| {r['meta_batch']} | {r['k']} | {r['block']} | {r['jmaml_blocked']:.2f} | {r['jmaml']:.2f} | "
                     f"{r['jax_naive']:.2f} | {r['blocked_vs_naive']:.2f}x | {r['blocked_vs_unblocked']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B = 1000 only, short measurements")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--cells", default=None, help="e.g. 1000x1,1000x5 (meta-batch x k)")
    parser.add_argument("--out", default=None, help="output prefix (default scripts/bench/results/blocks_<device>)")
    args = parser.parse_args(argv)
    import jax

    from jmaml._util import machine_description

    cells = [(1000, 1), (1000, 5), (10_000, 1), (10_000, 5)]
    if args.quick:
        cells = cells[:2]
    if args.cells:
        cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device = jax.devices()[0].platform
    result = {"machine": machine_description(), "device": device, "date": time.strftime("%Y-%m-%d"),
              "rounds": args.rounds, "min_time": args.min_time,
              "cells": measure(cells, args.rounds, args.min_time, log)}
    prefix = args.out or os.path.join(ROOT, "scripts", "bench", "results", f"blocks_{device}")
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
