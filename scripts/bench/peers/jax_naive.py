"""Peer (a): the JAX MAML a user writes first.

A Python ``for`` loop over inner steps (unrolled into the trace), ``jax.vmap`` over tasks,
``jax.jit`` of the whole meta-step, optax Adam; one jitted call per meta-step from a Python
loop, on a fixed meta-batch already on the device. Independent of jmaml.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scripts.bench.peers.common import HIDDEN, INNER_LR, META_LR


def init_params(key):
    sizes = [1, *HIDDEN, 1]
    params = []
    for k, (i, o) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        kw, kb = jax.random.split(k)
        bound = 1 / np.sqrt(i)
        params.append((jax.random.uniform(kw, (i, o), minval=-bound, maxval=bound),
                       jax.random.uniform(kb, (o,), minval=-bound, maxval=bound)))
    return params


def forward(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def mse(params, x, y):
    return jnp.mean((forward(params, x) - y) ** 2)


def make_step(num_inner_steps: int):
    opt = optax.adam(META_LR)

    def task_loss(params, xs, ys, xq, yq):
        for _ in range(num_inner_steps):
            grads = jax.grad(mse)(params, xs, ys)
            params = jax.tree.map(lambda p, g: p - INNER_LR * g, params, grads)
        return mse(params, xq, yq)

    def meta_loss(params, batch):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, *batch))

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(meta_loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step


def setup(num_tasks_batch, num_inner_steps: int):
    """Returns ``(run(n) -> seconds for n meta-steps, step, args)``."""
    params = init_params(jax.random.key(0))
    opt, step = make_step(num_inner_steps)
    batch = tuple(jnp.asarray(a) for a in num_tasks_batch)
    state = {"params": params, "opt": opt.init(params)}

    def run(n: int) -> float:
        import time
        t0 = time.perf_counter()
        p, o = state["params"], state["opt"]
        for _ in range(n):
            p, o, loss = step(p, o, batch)
        loss.block_until_ready()
        state["params"], state["opt"] = p, o
        return time.perf_counter() - t0

    return run, step, (params, opt.init(params), batch)
