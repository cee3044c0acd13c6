"""Large meta-batches: jmaml's step on the whole meta-batch, jmaml's step with the task axis in blocks
(``meta_batch_block="auto"``: the block timed on the first compile, as ``jmaml train --meta-batch-block
auto`` chooses it), the step as it was before (every task's un-adapted loss measured) and the naive JAX
step a user writes (``scripts/bench/peers/jax_naive.py``), measured in one process, interleaved round by
round, the best round kept; for the sinusoid MLP at B = 1000 and 10,000 and the Conv-4 image steps at their
meta-batch (ResNet-12 with ``--cells resnet12-miniimagenet``), with the roofline: each step's FLOPs (XLA's
cost analysis) times its rate, as a fraction of the peak.

    python scripts/bench/blocks_bench.py [--quick] [--rounds 2] [--min-time 2] [--cells 1000x1,conv4-omniglot]

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


# Image cells: the paper's two Conv-4 settings at their meta-batch (``images_bench.SETTINGS``) and ResNet-12
# on the miniImageNet shapes, on synthetic classes (the shapes are what matters for speed)
IMAGE_CELLS = {
    "conv4-omniglot": dict(setting="omniglot 5-way 1-shot", backbone="conv4"),
    "conv4-miniimagenet": dict(setting="miniImageNet 5-way 1-shot", backbone="conv4"),
    "resnet12-miniimagenet": dict(setting="miniImageNet 5-way 1-shot", backbone="resnet12"),
}


# conv4-miniimagenet and resnet12-miniimagenet take about a minute per meta-step on this CPU: by --cells only
CELLS = [(1000, 1), (1000, 5), (10_000, 1), (10_000, 5)]  # image cells by --cells (minutes per step on CPU)


def _config(cell, block=None, steps: int = 1):
    """The ``TrainConfig`` of a cell: ``(meta_batch, k)`` for the sinusoid MLP, or an ``IMAGE_CELLS`` name."""
    from jmaml.run import train

    common = dict(log_every=steps, checkpoint_every=steps, steps=steps, meta_batch_block=block, pretrain=False)
    if isinstance(cell, str):
        import jax
        import numpy as np

        from jmaml.tasks import images as image_tasks
        from scripts.bench.images_bench import SETTINGS

        s = SETTINGS[IMAGE_CELLS[cell]["setting"]]
        images = np.random.default_rng(0).integers(0, 256, (64, 20, s["size"], s["size"], s["channels"]), np.uint8)
        image_tasks.config_split = lambda config, split="train": jax.numpy.asarray(images)  # synthetic classes
        return train.TrainConfig(task=s["task"], data_dir="synthetic", ways=s["ways"], num_support=s["shots"],
                                 num_query=s["queries"], meta_batch_size=s["batch"], num_inner_steps=s["k"],
                                 inner_lr=s["alpha"], image_size=s["size"], backbone=IMAGE_CELLS[cell]["backbone"],
                                 **common).validate()
    meta_batch, k = cell
    return train.TrainConfig(meta_batch_size=meta_batch, num_inner_steps=k, **common).validate()


def _cell_name(cell) -> tuple[str, int, int]:
    config = _config(cell)
    return (cell if isinstance(cell, str) else "sinusoid MLP"), config.meta_batch_size, config.num_inner_steps


class _every_task_measured:
    """The step as it was before the un-adapted loss was subsampled: every task measured (while tracing)."""

    def __enter__(self):
        from jmaml.core import meta

        self.saved, meta.PRE_ADAPT_TASKS = meta.PRE_ADAPT_TASKS, 1 << 40

    def __exit__(self, *exc):
        from jmaml.core import meta

        meta.PRE_ADAPT_TASKS = self.saved


def _jmaml_runner(cell, block, chunk_len: int, before: bool = False):
    """A compiled chunk of the cell's meta-learner; ``before``: the whole batch, every task's un-adapted loss
    measured (a chunk of its own, compiled now under ``_every_task_measured``)."""
    from jmaml.engine import loop as engine
    from jmaml.run import recipes, train
    from scripts.bench import chunk_runner

    config = _config(cell, block, chunk_len)
    if not before:
        return chunk_runner(config, chunk_len)
    learner, dist, optimiser = recipes.phase_parts(config, config.algo)
    own = learner._replace(estimate=lambda *a, **kw: learner.estimate(*a, **kw))  # not the cached chunk's
    chunk = engine.make_chunk(own, dist, optimiser, meta_batch_size=config.meta_batch_size,
                              host_loop=train._host_loop(config))
    run = chunk_runner(config, chunk_len, chunk)
    with _every_task_measured():
        run()  # traced and compiled with every task measured
    return run


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


def _auto_block(cell) -> int | None:
    """The block ``meta_batch_block="auto"`` chooses for this cell now (one compile and three timed steps per
    candidate, in interleaved rounds)."""
    from jmaml.engine import loop as engine
    from jmaml.run import recipes, train

    config = _config(cell)
    learner, dist, optimiser = recipes.phase_parts(config, config.algo)
    state = engine.initial_state(learner, recipes.initial_params(config), optimiser, train.task_stream_key(config))
    return engine.choose_block("auto", learner, dist, optimiser, state, config.meta_batch_size, run_dir=None,
                               name="maml", resume=False, stream=sys.stderr, host_loop=train._host_loop(config))


def costs(cell) -> dict:
    """XLA's cost analysis (FLOPs, bytes accessed) of one compiled meta-step: jmaml's engine step on the whole
    batch now and before (every task's un-adapted loss), and the naive peer's for the MLP cells. A blocked
    step does the whole batch's arithmetic in a loop, whose body XLA's analysis counts once: its roofline
    uses the whole batch's count."""
    import jax

    from jmaml.engine import loop as engine
    from jmaml.run import recipes, train
    from scripts.bench.roofline import program_cost

    config = _config(cell)
    learner, dist, optimiser = recipes.phase_parts(config, config.algo)
    out = {}
    for name, context in (("jmaml", None), ("before", _every_task_measured())):
        own = learner._replace(estimate=lambda *a, **kw: learner.estimate(*a, **kw))
        one = engine.make_sampled_step(own, dist, optimiser, meta_batch_size=config.meta_batch_size)
        if context is not None:
            context.__enter__()
        try:
            out[name] = program_cost(jax.jit(one).lower(train.initial_state(config), dist.data).compile())
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    if not isinstance(cell, str):
        from scripts.bench.peers import common, jax_naive

        _, naive_step, args = jax_naive.setup(common.sample_numpy_tasks(cell[0]), cell[1])
        out["jax_naive"] = program_cost(naive_step.lower(*args).compile())
    return out


def measure(cells, rounds: int, min_time: float, log, ceil: dict | None = None) -> list[dict]:
    """Each cell: the auto block, then every implementation timed round by round (interleaved), the best kept;
    with ``ceil`` (``roofline.ceilings``) each implementation's fraction of the peak FLOP/s and bytes/s."""
    from scripts.bench.roofline import point

    out = []
    for cell in cells:
        model, meta_batch, k = _cell_name(cell)
        image = isinstance(cell, str)
        chunk_len = 4 if image or meta_batch > 1000 else 20
        block = _auto_block(cell)
        runners = {"before": (_jmaml_runner(cell, None, chunk_len, before=True), chunk_len),
                   "jmaml": (_jmaml_runner(cell, None, chunk_len), chunk_len),
                   "jmaml_blocked": (_jmaml_runner(cell, block, chunk_len), chunk_len)}
        if not image:
            calls = max(1, chunk_len // 4)
            runners["jax_naive"] = (_naive_runner(meta_batch, k, calls), calls)
        for run, _ in runners.values():
            run()  # compile and warm up
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, (run, per_call) in runners.items():
                best[name] = max(best.get(name, 0.0), _rate(run, per_call, min_time))
        row = {"model": model, "meta_batch": meta_batch, "k": k, "block": block or meta_batch, **best,
               "blocked_vs_unblocked": best["jmaml_blocked"] / best["jmaml"],
               "blocked_vs_before": best["jmaml_blocked"] / best["before"]}
        if "jax_naive" in best:
            row.update(blocked_vs_naive=best["jmaml_blocked"] / best["jax_naive"],
                       unblocked_vs_naive=best["jmaml"] / best["jax_naive"])
        if ceil:
            row["costs"] = costs(cell)
            row["roofline"] = {}
            for name, rate in best.items():
                c = row["costs"]["jmaml" if name == "jmaml_blocked" else name]
                row["roofline"][name] = {"flops": c["flops"], "bytes": c["bytes"],
                                         **point(c["flops"], c["bytes"], rate, ceil)}
        log(json.dumps(row))
        out.append(row)
    return out


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"### Large meta-batches, the task axis in blocks: {m}", "",
             f"{result['date']}, {result['rounds']} interleaved rounds in one process, best kept; meta-steps/s "
             "(higher is better). Block: what `meta_batch_block=\"auto\"` chose for the cell on this machine now "
             "(tasks per block). *Before*: the whole batch with every task's un-adapted loss measured, the step "
             "as it was before this change (`jmaml.meta.PRE_ADAPT_TASKS`); *jmaml whole batch*: one vmap over the "
             "meta-batch; *blocked*: `meta_batch_block` at the chosen block. In brackets: the fraction of the peak "
             "FLOP/s (XLA's count of the step's FLOPs x steps/s; a blocked step does the whole batch's arithmetic).",
             "", "| model | meta-batch | k | block | blocked | whole batch | before | JAX naive | blocked / naive | "
             "blocked / whole | blocked / before |", "|" + " --- |" * 11]

    def rate(r, name):
        if name not in r:
            return "-"
        frac = r.get("roofline", {}).get(name, {}).get("fraction_peak_flops")
        return f"{r[name]:.2f}" + (f" ({100 * frac:.0f}%)" if frac is not None else "")

    for r in result["cells"]:
        naive = f"{r['blocked_vs_naive']:.2f}x" if "blocked_vs_naive" in r else "-"
        vs_before = f"{r['blocked_vs_before']:.2f}x" if "blocked_vs_before" in r else "-"
        lines.append(f"| {r.get('model', 'sinusoid MLP')} | {r['meta_batch']} | {r['k']} | {r['block']} | "
                     f"{rate(r, 'jmaml_blocked')} | {rate(r, 'jmaml')} | {rate(r, 'before')} | {rate(r, 'jax_naive')} "
                     f"| {naive} | {r['blocked_vs_unblocked']:.2f}x | {vs_before} |")
    if result.get("ceilings"):
        c = result["ceilings"]
        lines += ["", f"Peak FLOP/s: {c.get('peak_source')}; measured {c['measured_flops'] / 1e9:.1f} GFLOP/s "
                      f"({c['measured_how']}); fractions are of the larger."]
    return "\n".join(lines) + "\n"


def parse_cells(text: str) -> list:
    """``1000x1,conv4-omniglot`` -> ``[(1000, 1), "conv4-omniglot"]``."""
    cells: list = []
    for c in text.split(","):
        if c in IMAGE_CELLS:
            cells.append(c)
        else:
            try:
                cells.append(tuple(int(v) for v in c.split("x")))
            except ValueError:
                raise SystemExit(f"--cells: {c!r} is neither METAxK nor one of {sorted(IMAGE_CELLS)}") from None
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="B = 1000 only, short measurements")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--cells", default=None, help="e.g. 1000x1,1000x5,conv4-omniglot (meta-batch x k, or an "
                        "image cell: " + ", ".join(IMAGE_CELLS) + ")")
    parser.add_argument("--no-roofline", action="store_true", help="skip the ceilings and cost analysis")
    parser.add_argument("--out", default=None, help="output prefix (default scripts/bench/results/blocks_<device>)")
    args = parser.parse_args(argv)
    import jax

    from jmaml.core._util import machine_description
    from scripts.bench import write_result
    from scripts.bench.roofline import ceilings

    cells = list(CELLS)
    if args.quick:
        cells = cells[:2]
    if args.cells:
        cells = parse_cells(args.cells)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device = jax.devices()[0].platform
    result = {"machine": machine_description(), "device": device, "date": time.strftime("%Y-%m-%d"),
              "rounds": args.rounds, "min_time": args.min_time,
              "ceilings": None if args.no_roofline else ceilings(log)}
    result["cells"] = measure(cells, args.rounds, args.min_time, log, result["ceilings"])
    write_result(result, args.out or os.path.join(ROOT, "scripts", "bench", "results", f"blocks_{device}"),
                 to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
