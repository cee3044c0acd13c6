"""The MAML family (first part): each estimator against an oracle that shares no code path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jmaml import Batch, Task, analytic, batched_objective, estimators, init_state, make_loss, models
from jmaml.tasks import seed

LINEAR = make_loss(models.linear().apply, "sse")


def _seed_tasks():
    return jax.tree.map(jnp.asarray, seed.meta_tasks())


def _mlp_setup(num_tasks=3):
    model = models.mlp([1, 5, 5, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(k1))
    xs = jax.random.uniform(k2, (num_tasks, 4, 1), jnp.float64, -2, 2)
    xq = jax.random.uniform(k3, (num_tasks, 3, 1), jnp.float64, -2, 2)
    amp = jnp.linspace(0.5, 1.5, num_tasks, dtype=jnp.float64)[:, None, None]
    return loss, params, Task(Batch(xs, amp * jnp.sin(xs)), Batch(xq, amp * jnp.sin(xq)))


@pytest.mark.parametrize("k", [1, 3])
def test_reptile_equals_theta_minus_W_k_on_the_seed(x64, k):
    tasks = _seed_tasks()
    _, direction, _ = estimators.reptile(LINEAR, num_inner_steps=k)(jnp.array(1.0), tasks, inner_lr=0.01)
    want = np.mean([1.0 - analytic.adapt_k(1.0, np.concatenate([xs, xq]), np.concatenate([ys, yq]), 0.01, k)
                    for xs, ys, xq, yq in seed.TASKS])
    assert float(direction) == pytest.approx(want, rel=1e-12)


def test_fomaml_estimator_equals_its_closed_form(x64):
    tasks = _seed_tasks()
    _, g, _ = estimators.maml(LINEAR, num_inner_steps=2, first_order=True, reduction="sum")(
        jnp.array(1.0), tasks, inner_lr=0.01)
    want = sum(analytic.task_fomaml_grad(1.0, *t, 0.01, 2) for t in seed.TASKS)
    assert float(g) == pytest.approx(want, rel=1e-12)


def test_meta_sgd_with_equal_rates_gives_mamls_gradient_exactly(x64):
    loss, params, tasks = _mlp_setup()
    _, g_maml, _ = estimators.maml(loss, num_inner_steps=2)(params, tasks, inner_lr=0.1)
    _, g_msgd, _ = estimators.meta_sgd(loss, num_inner_steps=2)(estimators.meta_sgd_init(params, 0.1), tasks)
    for a, b in zip(jax.tree.leaves(g_maml), jax.tree.leaves(g_msgd.params)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_meta_sgd_gradient_including_the_rates_against_finite_differences(x64):
    loss, params, tasks = _mlp_setup()
    mp = estimators.meta_sgd_init(params, 0.1)
    f = jax.jit(lambda m: batched_objective(loss, m.params, tasks, inner_lr=m.inner_lr, num_inner_steps=2))
    check_grads(f, (mp,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    _, g, _ = estimators.meta_sgd(loss, num_inner_steps=2)(mp, tasks)
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g.inner_lr))


def test_anil_with_the_full_mask_is_maml(x64):
    loss, params, tasks = _mlp_setup()
    full = jax.tree.map(lambda _: True, params)
    _, g_maml, _ = estimators.maml(loss, num_inner_steps=2)(params, tasks, inner_lr=0.1)
    _, g_anil, _ = estimators.anil(loss, num_inner_steps=2, mask=full)(params, tasks, inner_lr=0.1)
    for a, b in zip(jax.tree.leaves(g_maml), jax.tree.leaves(g_anil)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_anil_freezes_the_body_and_matches_finite_differences(x64):
    loss, params, tasks = _mlp_setup()
    est = estimators.anil(loss, num_inner_steps=2)  # default: only the last layer adapts
    _, g_anil, _ = est(params, tasks, inner_lr=0.1)
    _, g_maml, _ = estimators.maml(loss, num_inner_steps=2)(params, tasks, inner_lr=0.1)
    assert not np.allclose(g_anil[0]["w"], g_maml[0]["w"])  # the body's gradient differs from MAML's

    def objective(p):  # written independently: adapt only the head, with the body held fixed
        def one(task):
            head = p[-1]
            for _ in range(2):
                gh = jax.grad(lambda h: loss([*p[:-1], h], task.support))(head)
                head = jax.tree.map(lambda a, b: a - 0.1 * b, head, gh)
            return loss([*p[:-1], head], task.query)
        return jnp.mean(jax.vmap(one)(tasks))

    want = jax.grad(objective)(params)
    for a, b in zip(jax.tree.leaves(g_anil), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    check_grads(jax.jit(objective), (params,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_anil_mask_that_selects_nothing(x64):
    loss, params, tasks = _mlp_setup()
    none = jax.tree.map(lambda _: False, params)
    with pytest.raises(ValueError, match="mask selects no parameters"):
        estimators.anil(loss, num_inner_steps=1, mask=none)(params, tasks, inner_lr=0.1)


def test_reptile_needs_an_inner_step():
    with pytest.raises(ValueError, match="num_inner_steps must be >= 1 for Reptile"):
        estimators.reptile(LINEAR, num_inner_steps=0)


def test_estimator_step_with_sgd_is_the_seeds_meta_step(x64):
    opt = optax.sgd(0.5)
    step = jax.jit(estimators.make_estimator_step(
        opt, estimators.maml(LINEAR, num_inner_steps=1, reduction="sum"), inner_lr=0.1))
    state, metrics = step(init_state(jnp.array(1.0), opt, jax.random.key(0)), _seed_tasks())
    assert float(state.params) == pytest.approx(-1515.48, abs=1e-9)
    assert metrics["task_losses"].shape == (2,)


def test_negative_rate_in_a_rate_tree_is_named(x64):
    loss, params, tasks = _mlp_setup()
    mp = estimators.meta_sgd_init(params, 0.1)
    bad = mp._replace(inner_lr=jax.tree.map(lambda r: -r, mp.inner_lr))
    with pytest.raises(ValueError, match="inner_lr must be >= 0"):
        estimators.meta_sgd(loss, num_inner_steps=1)(bad, tasks)
