"""Float64 end to end under x64: MAML++ against a hand-written reference of the seed's neuron, and
test-time rates kept in float64."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmaml
from jmaml import Batch, Task, learners, make_loss
from jmaml.core import models


def _seed_loss(theta, batch):  # the seed's single neuron f(x) = θ x, sum of squares, in Python floats
    return sum((theta * x - y) ** 2 for x, y in zip(batch[0], batch[1]))


def _seed_grad(theta, batch):
    return sum(2 * x * (theta * x - y) for x, y in zip(batch[0], batch[1]))


def test_mamlpp_is_float64_end_to_end_and_equals_a_hand_written_reference():
    from jmaml.core._util import enable_x64
    k, anneal, t = 3, 7, 4
    rates = [0.011, 0.0123, 0.0097]
    sx, sy, qx, qy = [0.3, -1.1, 2.2], [0.7, -2.0, 4.1], [1.3, -0.4], [2.5, -0.9]
    # the reference, in Python floats (float64): weights as MAML++'s paper code, steps by hand
    early = max(1 / k - t / (k * anneal), 0.03 / k)
    last = min(1 / k + t * (k - 1) / (k * anneal), 1 - (k - 1) * 0.03 / k)
    weights = [early] * (k - 1) + [last]
    theta, want = 0.8, 0.0
    for step in range(k):
        theta = theta - rates[step] * _seed_grad(theta, (sx, sy))
        want += weights[step] * _seed_loss(theta, (qx, qy))
    with enable_x64():
        loss = make_loss(models.linear().apply, "sse")
        learner = learners.mamlpp(loss, inner_lr=0.01, num_inner_steps=k, msl_anneal_steps=anneal)
        mp = learner.init(jnp.array(0.8, jnp.float64))
        mp = mp._replace(inner_lr=jnp.asarray(rates, jnp.float64))
        col = lambda v: jnp.asarray(v, jnp.float64)[None, :, None]
        tasks = Task(Batch(col(sx), col(sy)), Batch(col(qx), col(qy)))
        got, grads, metrics = learner.estimate(mp, tasks, jnp.asarray(t))
        from jmaml.core.estimators import msl_weights
        w = msl_weights(k, t, anneal)
        assert w.dtype == jnp.float64 and got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(w), weights, rtol=1e-15)
        assert float(got) == pytest.approx(want, rel=1e-14)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(grads))


def test_test_time_rates_are_float64_under_x64():
    """The test-time schedules (fixed rates of MAML's rule, CAVIA's context rates) were float32: 3-7e-8 lost."""
    from jmaml.core._util import enable_x64
    sx, sy, qx, qy = [0.3, -1.1, 2.2], [0.7, -2.0, 4.1], [1.3, -0.4], [2.5, -0.9]
    alpha = 0.0123456789  # not a float32 number
    theta, want = 0.8, [_seed_loss(0.8, (qx, qy))]
    for _ in range(3):
        theta -= alpha * _seed_grad(theta, (sx, sy))
        want.append(_seed_loss(theta, (qx, qy)))
    with enable_x64():
        loss = make_loss(models.linear().apply, "sse")
        col = lambda v: jnp.asarray(v, jnp.float64)[:, None]
        query = Batch(col(qx), col(qy))
        anil_loss = lambda p, b: loss(p[0]["w"][0, 0], b)  # the neuron as the last (only) layer of a list
        for name in ("maml", "reptile", "fomaml", "anil"):
            learner_loss = anil_loss if name == "anil" else loss
            learner = learners.make(name, learner_loss, inner_lr=alpha, num_inner_steps=1)
            params = [{"w": jnp.array([[0.8]], jnp.float64)}] if name == "anil" else jnp.array(0.8, jnp.float64)
            _, seen = learner.adapt(params, Batch(col(sx), col(sy)), 3, observe=lambda p: learner_loss(p, query))
            assert seen.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(seen), want, rtol=1e-14, err_msg=name)
        # CAVIA: a context c added to the input, f(x) = θ (x + c)
        ctx_model = learners.with_context(jmaml.Model(None, lambda p, x: p * (x[..., :1] + x[..., 1:])), 1)
        ctx_loss = make_loss(ctx_model.apply, "sse")
        cav = learners.cavia(ctx_loss, inner_lr=alpha, num_inner_steps=1, num_context=1)
        mp = cav.init(jnp.array(0.8, jnp.float64))
        _, seen = cav.adapt(mp, Batch(col(sx), col(sy)), 3, observe=lambda p: ctx_loss(p, query))
        c, ref = 0.0, []
        for _ in range(4):
            ref.append(sum((0.8 * (x + c) - y) ** 2 for x, y in zip(qx, qy)))
            c -= alpha * sum(2 * 0.8 * (0.8 * (x + c) - y) for x, y in zip(sx, sy))
        assert seen.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(seen), ref, rtol=1e-14)
