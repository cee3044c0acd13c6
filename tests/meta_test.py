"""The meta-objective and meta-step: seed numbers, oracles, transform invariance, bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jmaml import Batch, Task, batched_objective, init_state, make_loss, make_step, maml_value_and_grad, task_objective
from jmaml.core import analytic, models
from jmaml.tasks import seed

LOSS = make_loss(models.linear().apply, "sse")


def _seed_tasks():
    return jax.tree.map(jnp.asarray, seed.meta_tasks())


def test_seed_meta_gradients_and_meta_step(x64):
    tasks = _seed_tasks()
    grads = jax.vmap(jax.grad(lambda th, t: task_objective(LOSS, th, t, inner_lr=0.1,
                                                           num_inner_steps=1)),
                     in_axes=(None, 0))(jnp.array(1.0), tasks)
    np.testing.assert_allclose(grads, [4.48, 3028.48], rtol=0, atol=1e-9)
    opt = optax.sgd(0.5)
    step = jax.jit(make_step(opt, LOSS, inner_lr=0.1, num_inner_steps=1, reduction="sum"))
    state, metrics = step(init_state(jnp.array(1.0), opt, jax.random.key(0)), tasks)
    assert float(state.params) == pytest.approx(-1515.48, abs=1e-9)
    assert float(metrics["grad_norm"]) == pytest.approx(4.48 + 3028.48, abs=1e-9)
    assert int(state.step) == 1


def _random_linear_tasks(rng, num_tasks=3, n_s=4, n_q=3):
    return Task(Batch(jnp.asarray(rng.normal(size=(num_tasks, n_s))),
                      jnp.asarray(rng.normal(size=(num_tasks, n_s)))),
                Batch(jnp.asarray(rng.normal(size=(num_tasks, n_q))),
                      jnp.asarray(rng.normal(size=(num_tasks, n_q)))))


def test_second_order_and_first_order_match_their_closed_forms(x64):
    rng = np.random.default_rng(7)
    for k in (1, 2, 5):
        tasks = _random_linear_tasks(rng)
        alpha, theta = float(rng.uniform(0.01, 0.1)), float(rng.normal())
        np_tasks = [tuple(np.asarray(a[j]) for a in (tasks.support.x, tasks.support.y,
                                                     tasks.query.x, tasks.query.y))
                    for j in range(3)]
        for first_order, oracle in ((False, analytic.task_meta_grad),
                                    (True, analytic.task_fomaml_grad)):
            _, g, _ = maml_value_and_grad(LOSS, jnp.asarray(theta), tasks, inner_lr=alpha,
                                          num_inner_steps=k, reduction="sum",
                                          first_order=first_order)
            want = sum(oracle(theta, *t, alpha, k) for t in np_tasks)
            assert float(g) == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_first_order_differs_from_second_order(x64):
    tasks = _seed_tasks()
    _, g2, _ = maml_value_and_grad(LOSS, jnp.array(1.0), tasks, inner_lr=0.1, num_inner_steps=1,
                                   reduction="sum")
    _, g1, _ = maml_value_and_grad(LOSS, jnp.array(1.0), tasks, inner_lr=0.1, num_inner_steps=1,
                                   reduction="sum", first_order=True)
    # FOMAML drops the factors (1 - 2*alpha*sum x^2) = -1.6 and -11.2.
    assert float(g1) == pytest.approx(4.48 / -1.6 + 3028.48 / -11.2, abs=1e-9)
    assert abs(float(g1) - float(g2)) > 1.0


def _mlp_setup(num_tasks=4, key=0):
    model = models.mlp([1, 6, 6, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    params = model.init(k1)
    xs = jax.random.uniform(k2, (num_tasks, 5, 1), minval=-3, maxval=3)
    xq = jax.random.uniform(k3, (num_tasks, 4, 1), minval=-3, maxval=3)
    amp = jnp.linspace(0.5, 2.0, num_tasks)[:, None, None]
    tasks = Task(Batch(xs, amp * jnp.sin(xs)), Batch(xq, amp * jnp.sin(xq)))
    return loss, params, tasks


@pytest.mark.parametrize("k", [1, 3])
def test_check_grads_of_batched_second_order_objective_for_an_mlp(x64, k):
    loss, params, tasks = _mlp_setup()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float64), tasks)
    f = lambda p: batched_objective(loss, p, tasks, inner_lr=0.1, num_inner_steps=k)  # noqa: E731
    check_grads(jax.jit(f), (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_vmap_over_tasks_equals_a_python_loop():
    loss, params, tasks = _mlp_setup()
    total, per_task = batched_objective(loss, params, tasks, inner_lr=0.1, num_inner_steps=2,
                                        return_per_task=True)
    one = jax.jit(lambda p, t: task_objective(loss, p, t, inner_lr=0.1, num_inner_steps=2))
    looped = [one(params, jax.tree.map(lambda a, j=j: a[j], tasks)) for j in range(4)]
    np.testing.assert_allclose(per_task, np.array(looped), rtol=1e-5)
    np.testing.assert_allclose(total, np.mean(np.array(looped)), rtol=1e-5)


def test_jit_equals_no_jit():
    loss, params, tasks = _mlp_setup(num_tasks=2)
    opt = optax.adam(1e-3)
    step = make_step(opt, loss, inner_lr=0.05, num_inner_steps=1)
    state = init_state(params, opt, jax.random.key(0))
    a, ma = step(state, tasks)
    b, mb = jax.jit(step)(state, tasks)
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ma["meta_loss"], mb["meta_loss"], rtol=1e-5)


def test_repeated_jitted_step_does_not_retrace():
    loss, params, tasks = _mlp_setup()
    opt = optax.adam(1e-3)
    step = make_step(opt, loss, inner_lr=0.05, num_inner_steps=1)
    jitted = jax.jit(chex.assert_max_traces(step, n=1))
    state = init_state(params, opt, jax.random.key(0))
    losses = []
    for _ in range(5):
        state, m = jitted(state, tasks)
        losses.append(float(m["meta_loss"]))
    assert losses[-1] < losses[0]  # and it learns


def test_inner_lr_override_is_traced_in_the_step():
    loss, params, tasks = _mlp_setup()
    opt = optax.sgd(1e-2)
    step = make_step(opt, loss, inner_lr=0.05, num_inner_steps=1)
    state = init_state(params, opt, jax.random.key(0))
    jitted = jax.jit(chex.assert_max_traces(lambda s, t, lr: step(s, t, inner_lr=lr), n=1))
    _, m1 = jitted(state, tasks, 0.05)
    _, m2 = jitted(state, tasks, 0.2)
    np.testing.assert_allclose(m1["meta_loss"], step(state, tasks)[1]["meta_loss"], rtol=1e-5)
    assert float(m1["meta_loss"]) != float(m2["meta_loss"])


# ---- bad input ----------------------------------------------------------------------------

def test_task_batch_without_a_task_axis():
    single = seed.task_list()[0]
    with pytest.raises(ValueError, match=r"tasks.support.x must have shape \(num_tasks, num_points"):
        batched_objective(LOSS, jnp.array(1.0), single, inner_lr=0.1, num_inner_steps=1)


def test_task_batch_with_inconsistent_task_axis():
    t = seed.meta_tasks()
    bad = Task(t.support, Batch(t.query.x[:1], t.query.y[:1]))
    with pytest.raises(ValueError, match="leading task axis of one size"):
        batched_objective(LOSS, jnp.array(1.0), bad, inner_lr=0.1, num_inner_steps=1)


def test_empty_query_set():
    t = seed.task_list()[0]
    bad = Task(t.support, Batch(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match=r"task.query must hold at least one point"):
        task_objective(LOSS, jnp.array(1.0), bad, inner_lr=0.1, num_inner_steps=1)


def test_unknown_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\), got 'max'"):
        make_step(optax.sgd(0.1), LOSS, inner_lr=0.1, num_inner_steps=1, reduction="max")


def test_optimiser_must_be_optax():
    with pytest.raises(TypeError, match="optimiser must be an optax.GradientTransformation"):
        make_step("adam", LOSS, inner_lr=0.1, num_inner_steps=1)
