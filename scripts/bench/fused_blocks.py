"""The fused kernel's tasks-per-program, measured: correctness against autodiff, then meta-gradients/s.

For the sinusoid MLP (1-40-40-1 ReLU, K = 10 + 10), on one fixed meta-batch: first the fused
meta-gradient is compared with autodiff's on 64 tasks (the largest relative difference is printed,
and the run stops above 1e-3: TF32 matmuls on a GPU give about 1e-4); then, for each block size, the
fused estimator's meta-gradients per second against the autodiff estimator's (``backend="xla"``), each
jitted alone, best of 3. Writes a JSON line per measurement to stdout. Usage (repository root):

    PYTHONPATH=. python3 scripts/bench/fused_blocks.py 100000 5 8,32,128
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jmaml import learners, make_loss  # noqa: E402
from jmaml.core import fused, models
from jmaml.tasks import sinusoid  # noqa: E402


def per_second(fn, *args, repeats=3, min_time=1.0):
    jax.block_until_ready(fn(*args))
    best = 0.0
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_time:
            out = fn(*args)
            calls += 1
        jax.block_until_ready(out)
        best = max(best, calls / (time.perf_counter() - t0))
    return best


def main(meta_batch: int, k: int, blocks: list[int]) -> int:
    net = models.mlp([1, 40, 40, 1])
    loss = make_loss(net.apply, "mse")
    params = net.init(jax.random.key(0))
    device = jax.devices()[0].device_kind
    small = sinusoid.sample_tasks(jax.random.key(1), 64)
    want = jax.jit(learners.maml(loss, inner_lr=0.01, num_inner_steps=k).estimate)(params, small)[1]
    got = jax.jit(lambda p, t: fused.maml_estimator(loss, num_inner_steps=k)(p, t, inner_lr=0.01)[1])(params, small)
    error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in
                zip(jax.tree.leaves(want), jax.tree.leaves(got)))
    print(json.dumps({"check": "fused vs autodiff, 64 tasks", "k": k, "max_relative_difference": error,
                      "device": device}), flush=True)
    if not error < 1e-3:
        return 1
    tasks = sinusoid.sample_tasks(jax.random.key(2), meta_batch)
    xla = jax.jit(lambda p, t: learners.maml(loss, inner_lr=0.01, num_inner_steps=k, unroll=True).estimate(p, t)[1])
    base = per_second(xla, params, tasks)
    print(json.dumps({"meta_batch": meta_batch, "k": k, "impl": "xla", "grads_per_s": base, "device": device}),
          flush=True)
    for block in blocks:
        est = fused.maml_estimator(loss, num_inner_steps=k, block_tasks=block)
        rate = per_second(jax.jit(lambda p, t, est=est: est(p, t, inner_lr=0.01)[1]), params, tasks)
        print(json.dumps({"meta_batch": meta_batch, "k": k, "impl": "fused", "block_tasks": block,
                          "grads_per_s": rate, "vs_xla": rate / base, "device": device}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]))
