"""A peer for ``scripts/bench/rl_bench.py``: MAML-RL on 2D navigation as a competent JAX user writes it without
jmaml -- the same algorithm and sizes as jmaml's benchmarked step (one inner policy-gradient step with the LVC
surrogate, the linear feature baseline, Adam on the meta-gradient), written straight: rollouts as one
``lax.scan`` over time with the episodes batched in it, ``vmap`` over tasks, the whole meta-step one ``jit``.
The baseline is the ridge normal equations solved with ``jnp.linalg.solve``, as the MAML-RL references'
``LinearFeatureBaseline`` does (with NumPy). Not part of jmaml; used only to measure it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MAX_ACTION, GOAL_RANGE, GAMMA, REG = 0.1, 0.5, 0.99, 1e-5


def _init(key, sizes):
    params = []
    for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append((jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), jnp.zeros((n,))))
    return {"mlp": params, "log_std": jnp.zeros((sizes[-1],))}


def _mean(params, obs):  # obs (..., 2)
    h = obs
    for i, (w, b) in enumerate(params["mlp"]):
        h = h @ w + b
        if i < len(params["mlp"]) - 1:
            h = jax.nn.relu(h)
    return h


def _log_prob(params, obs, act):
    z = (act - _mean(params, obs)) * jnp.exp(-params["log_std"])
    return jnp.sum(-0.5 * z ** 2 - params["log_std"] - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def _rollout(params, goal, key, episodes, horizon):
    """(obs, actions, rewards), each (horizon, episodes, ...): every episode from the origin."""
    params = jax.lax.stop_gradient(params)

    def body(pos, k):
        noise = jax.random.normal(k, pos.shape)
        act = _mean(params, pos) + jnp.exp(params["log_std"]) * noise
        new = pos + jnp.clip(act, -MAX_ACTION, MAX_ACTION)
        return new, (pos, act, -jnp.linalg.norm(new - goal, axis=-1))

    _, (obs, act, rew) = jax.lax.scan(body, jnp.zeros((episodes, 2)), jax.random.split(key, horizon))
    return obs, act, rew


def _advantages(obs, rew):
    horizon = rew.shape[0]

    def back(acc, r):
        acc = r + GAMMA * acc
        return acc, acc

    _, ret = jax.lax.scan(back, jnp.zeros(rew.shape[1:]), rew, reverse=True)
    o = jnp.clip(obs, -10, 10)
    t = jnp.broadcast_to((jnp.arange(horizon) / 100.0)[:, None, None], rew.shape + (1,))
    f = jnp.concatenate([o, o ** 2, t, t ** 2, t ** 3, jnp.ones_like(t)], -1).reshape(-1, 8)
    w = jnp.linalg.solve(f.T @ f + REG * jnp.eye(8), f.T @ ret.reshape(-1))
    return jax.lax.stop_gradient(ret - (f @ w).reshape(ret.shape))


def _lvc(params, obs, act, adv):
    lp = _log_prob(params, obs, act)
    return -jnp.mean(jnp.exp(lp - jax.lax.stop_gradient(lp)) * adv)


def setup(meta_batch: int, episodes: int, horizon: int, hidden: tuple[int, ...], alpha: float = 0.1,
          meta_lr: float = 1e-2, steps_per_call: int = 5):
    """``run(n) -> seconds`` for ``n`` calls of ``steps_per_call`` meta-steps (one compiled ``lax.scan``), and
    the compiled program (for XLA's cost analysis)."""
    opt = optax.adam(meta_lr)

    def per_task(params, goal, key):
        k_in, k_out = jax.random.split(key)
        obs, act, rew = _rollout(params, goal, k_in, episodes, horizon)
        phi = jax.tree.map(lambda p, g: p - alpha * g, params,
                           jax.grad(_lvc)(params, obs, act, _advantages(obs, rew)))
        obs, act, rew = _rollout(phi, goal, k_out, episodes, horizon)
        return _lvc(phi, obs, act, _advantages(obs, rew)), jnp.mean(jnp.sum(rew, 0))

    def meta_step(carry, _):
        params, opt_state, key = carry
        key, k_goal, k_tasks = jax.random.split(key, 3)
        goals = jax.random.uniform(k_goal, (meta_batch, 2), minval=-GOAL_RANGE, maxval=GOAL_RANGE)

        def loss(p):
            losses, returns = jax.vmap(per_task, (None, 0, 0))(p, goals, jax.random.split(k_tasks, meta_batch))
            return jnp.mean(losses), jnp.mean(returns)

        (_, ret), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), ret

    @jax.jit
    def chunk(carry):
        return jax.lax.scan(meta_step, carry, None, length=steps_per_call)

    params = _init(jax.random.key(0), [2, *hidden, 2])
    carry = (params, opt.init(params), jax.random.key(1))

    def run(calls: int) -> float:
        import time

        t0 = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(chunk(carry))
        return time.perf_counter() - t0

    return run, chunk.lower(carry).compile()
