"""Where does jmaml's meta-step time go relative to the naive JAX peer? A variant-by-variant profile.

Each variant runs the same sinusoid second-order MAML meta-step (MLP 1-40-40-1, Adam) and is timed
per step (best of 3 repeats). Usage (repository root): python scripts/bench/profile_step.py B k
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jmaml import Batch, Task, init_state, make_loss, make_step, maml_value_and_grad  # noqa: E402
from jmaml.core import models
from jmaml.run import train
from scripts.bench.peers import common, jax_naive  # noqa: E402


def best_of(fn, n, repeats=3):
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def main(meta_batch: int, k: int) -> None:
    n = 50 if meta_batch <= 1000 else 10
    arrays = common.sample_numpy_tasks(meta_batch)
    xs, ys, xq, yq = (jnp.asarray(a) for a in arrays)
    tasks = Task(Batch(xs, ys), Batch(xq, yq))
    model = models.mlp([1, 40, 40, 1])
    loss = make_loss(model.apply, "mse")
    opt = optax.adam(1e-3)
    state = {"s": init_state(model.init(jax.random.key(0)), opt, jax.random.key(1))}
    results = {}

    def loop(step):
        def run():
            state["s"] = step(state["s"], tasks)
            return state["s"].params
        return run

    _, nstep, (p, o, b) = jax_naive.setup(arrays, k)
    pn = {"p": p, "o": o}

    def naive_run():
        pn["p"], pn["o"], _ = nstep(pn["p"], pn["o"], b)
        return pn["p"]

    results["naive peer (fixed tasks, 1 call/step)"] = best_of(naive_run, n)
    for unroll in (1, True):
        full = jax.jit(lambda s, t, u=unroll: make_step(opt, loss, inner_lr=0.01, num_inner_steps=k, unroll=u)(s, t)[0])
        results[f"jmaml make_step, all metrics, unroll={unroll}"] = best_of(loop(full), n)

    def lean(s, t):
        _, g, _ = maml_value_and_grad(loss, s.params, t, inner_lr=0.01, num_inner_steps=k, unroll=True)
        u, os_ = opt.update(g, s.opt_state, s.params)
        return s._replace(params=optax.apply_updates(s.params, u), opt_state=os_)

    results["jmaml maml_value_and_grad + adam (no metrics)"] = best_of(loop(jax.jit(lean)), n)
    for length in (2, 20):
        cfg = train.TrainConfig(meta_batch_size=meta_batch, num_inner_steps=k, log_every=length,
                                checkpoint_every=length, steps=length)
        chunk = train.make_chunk(cfg)
        st = {"s": train.initial_state(cfg)}

        def run_chunk(chunk=chunk, st=st, length=length):
            st["s"], m = chunk(st["s"], length)
            return m["meta_loss"]

        name = f"jmaml train chunk (sampling + metrics), {length} steps/call"
        results[name] = best_of(run_chunk, max(1, n // length)) / length
    print(f"meta-batch {meta_batch}, k {k}, device {jax.devices()[0].device_kind}: microseconds per meta-step")
    for name, us in results.items():
        print(f"  {us:12.1f}  {name}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
