"""The MAML family (first part): each estimator against an oracle that shares no code path."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from jmaml import Batch, Task, batched_objective, init_state, make_loss
from jmaml.core import analytic, estimators, models
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


# ---- MAML++ ------------------------------------------------------------------------------------

def _mamlpp_reference(loss, mp, tasks, weights, multi_step):
    """MAML++'s objective written out in Python loops (no scan, no inner_step, no vmap)."""
    total = 0.0
    for j in range(tasks.support.x.shape[0]):
        support = Batch(tasks.support.x[j], tasks.support.y[j])
        query = Batch(tasks.query.x[j], tasks.query.y[j])
        phi, task_loss = mp.params, 0.0
        for t in range(len(weights)):
            g = jax.grad(loss)(phi, support)
            phi = jax.tree.map(lambda p, gi, r, t=t: p - r[t] * gi, phi, g, mp.inner_lr)
            if multi_step:
                task_loss = task_loss + weights[t] * loss(phi, query)
        total = total + (task_loss if multi_step else loss(phi, query))
    return total / tasks.support.x.shape[0]


def _central_differences(f, tree, eps=1e-6):
    flat, unravel = jax.flatten_util.ravel_pytree(tree)
    flat = np.asarray(flat)
    out = np.zeros_like(flat)
    for i in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        out[i] = (float(f(unravel(jnp.asarray(up)))) - float(f(unravel(jnp.asarray(down))))) / (2 * eps)
    return out


def test_mamlpp_gradient_with_lslr_and_multi_step_loss_against_finite_differences(x64):
    loss, params, tasks = _mlp_setup(num_tasks=2)
    mp = estimators.mamlpp_init(params, 0.1, 3)
    # Rates that differ per step and per tensor, so a mixed-up index would show.
    mp = mp._replace(inner_lr=jax.tree.map(lambda r: r * jnp.array([1.0, 0.7, 1.3]) *
                                           (1 + 0.1 * r.size), mp.inner_lr))
    weights = jnp.array([0.2, 0.3, 0.5])
    est = estimators.mamlpp(loss, num_inner_steps=3, msl_schedule=weights)
    value, grads, metrics = est(mp, tasks, meta_step=0)
    ref = jax.jit(lambda m: _mamlpp_reference(loss, m, tasks, weights, True))
    assert float(value) == pytest.approx(float(ref(mp)), rel=1e-12)
    fd = _central_differences(ref, mp)
    got = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(jax.flatten_util.ravel_pytree(grads.inner_lr)[0])).max() > 1e-3  # rates learn
    assert metrics["task_losses"].shape == (2,) and metrics["final_query_loss"].shape == (2,)


def test_mamlpp_with_one_step_fixed_rates_and_no_multi_step_loss_equals_maml(x64):
    loss, params, tasks = _mlp_setup()
    for k in (1, 3):
        _, g_maml, _ = estimators.maml(loss, num_inner_steps=k)(params, tasks, inner_lr=0.1)
        value, g_pp, _ = estimators.mamlpp(loss, num_inner_steps=k, multi_step_loss=False)(
            estimators.mamlpp_init(params, 0.1, k), tasks, meta_step=0)
        for a, b in zip(jax.tree.leaves(g_maml), jax.tree.leaves(g_pp.params)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # the seed: one step on the single neuron gives MAML's meta-gradient (sum over tasks)
    _, g, _ = estimators.mamlpp(LINEAR, num_inner_steps=1, multi_step_loss=False, reduction="sum")(
        estimators.mamlpp_init(jnp.array(1.0), 0.1, 1), _seed_tasks())
    want = sum(analytic.task_meta_grad(1.0, *t, 0.1, 1) for t in seed.TASKS)  # 3032.96: θ' = -1515.48 at β = 0.5
    assert float(g.params) == pytest.approx(want, rel=1e-12)


def test_mamlpp_derivative_order_annealing_switches_from_first_to_second_order(x64):
    loss, params, tasks = _mlp_setup()
    mp = estimators.mamlpp_init(params, 0.1, 2)
    est = estimators.mamlpp(loss, num_inner_steps=2, multi_step_loss=False, first_order_steps=10)
    _, g_first, _ = estimators.maml(loss, num_inner_steps=2, first_order=True)(params, tasks, inner_lr=0.1)
    _, g_second, _ = estimators.maml(loss, num_inner_steps=2)(params, tasks, inner_lr=0.1)
    step = jax.jit(lambda m, t: est(m, tasks, meta_step=t)[1])
    for t, want in ((0, g_first), (9, g_first), (10, g_second), (500, g_second)):
        got = step(mp, jnp.asarray(t, jnp.int32))
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got.params)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_msl_weights_follow_the_mamlpp_schedule():
    w0 = np.asarray(estimators.msl_weights(4, 0, 100))
    np.testing.assert_allclose(w0, 0.25, rtol=1e-6)
    w_mid = np.asarray(estimators.msl_weights(4, 50, 100))
    np.testing.assert_allclose(w_mid, [0.125, 0.125, 0.125, 0.625], rtol=1e-6)  # 1/4 - 50/(4*100)
    w_end = np.asarray(estimators.msl_weights(4, 10_000, 100))
    np.testing.assert_allclose(w_end, [0.0075, 0.0075, 0.0075, 1 - 3 * 0.0075], rtol=1e-6)
    for w in (w0, w_mid, w_end):
        assert w.sum() == pytest.approx(1.0, rel=1e-6)


def test_mamlpp_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"msl_schedule must have one weight per inner step, shape \(3,\)"):
        estimators.mamlpp(LINEAR, num_inner_steps=3, msl_schedule=[0.5, 0.5])
    with pytest.raises(ValueError, match="needs msl_anneal_steps"):
        estimators.mamlpp(LINEAR, num_inner_steps=3)
    with pytest.raises(ValueError, match="msl_anneal_steps must be"):
        estimators.mamlpp(LINEAR, num_inner_steps=3, msl_anneal_steps=0)
    with pytest.raises(ValueError, match="num_inner_steps must be >= 1 for MAML"):
        estimators.mamlpp(LINEAR, num_inner_steps=0, multi_step_loss=False)
    with pytest.raises(ValueError, match="first_order_steps must be an int >= 0"):
        estimators.mamlpp(LINEAR, num_inner_steps=1, multi_step_loss=False, first_order_steps=-1)
    est = estimators.mamlpp(LINEAR, num_inner_steps=2, multi_step_loss=False)
    with pytest.raises(ValueError, match=r"rates have shape \(2,\)"):
        est(estimators.mamlpp_init(jnp.array(1.0), 0.1, 3), _seed_tasks())


# ---- iMAML -------------------------------------------------------------------------------------

def _linear_vector_loss(w, batch):
    return jnp.sum((batch.x @ w - batch.y) ** 2)


def test_conjugate_gradient_solves_a_spd_system_in_n_iterations(x64):
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    a = m @ m.T + 6 * np.eye(6)
    b = rng.normal(size=6)
    x, res = estimators.conjugate_gradient(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), 6)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(a, b), rtol=1e-9)
    assert float(res) < 1e-10
    # an already solved system (b = 0) stays at zero instead of dividing 0 by 0
    x0, res0 = estimators.conjugate_gradient(lambda v: jnp.asarray(a) @ v, jnp.zeros(6), 3)
    assert np.all(np.asarray(x0) == 0) and float(res0) == 0


def test_imaml_equals_the_exact_gradient_at_the_closed_form_proximal_minimiser(x64):
    rng = np.random.default_rng(1)
    d, lam, num_tasks = 3, 2.0, 2
    xs, xq = rng.normal(size=(num_tasks, 5, d)), rng.normal(size=(num_tasks, 4, d))
    ys, yq = rng.normal(size=(num_tasks, 5)), rng.normal(size=(num_tasks, 4))
    theta = rng.normal(size=d)
    tasks = Task(Batch(jnp.asarray(xs), jnp.asarray(ys)), Batch(jnp.asarray(xq), jnp.asarray(yq)))
    # The inner problem ||Xφ - y||² + λ/2 ||φ - θ||² has Hessian 2XᵀX + λI: its minimiser and the
    # implicit gradient λ (2XᵀX + λI)⁻¹ ∇L_Q(φ*) in closed form, in NumPy.
    want, rate = np.zeros(d), np.inf
    for j in range(num_tasks):
        h = 2 * xs[j].T @ xs[j] + lam * np.eye(d)
        phi = np.linalg.solve(h, 2 * xs[j].T @ ys[j] + lam * theta)
        want += lam * np.linalg.solve(h, 2 * xq[j].T @ (xq[j] @ phi - yq[j])) / num_tasks
        rate = min(rate, 1 / np.linalg.eigvalsh(h).max())
    est = estimators.imaml(_linear_vector_loss, num_inner_steps=3000, lam=lam, cg_iters=d)
    _, g, metrics = jax.jit(lambda t: est(t, tasks, inner_lr=rate))(jnp.asarray(theta))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-9)
    assert float(jnp.max(metrics["cg_residual"])) < 1e-8
    assert float(jnp.max(metrics["inner_grad_norm"])) < 1e-8


def test_imaml_memory_does_not_grow_with_the_inner_steps():
    model = models.mlp([1, 40, 40, 1], "relu")
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(0))
    data = Batch(jnp.ones((25, 10, 1)), jnp.ones((25, 10, 1)))
    tasks = Task(data, data)

    def temp_bytes(k):
        est = estimators.imaml(loss, num_inner_steps=k, lam=1.0, cg_iters=5)
        mem = jax.jit(lambda p: est(p, tasks, inner_lr=0.01)[1]).lower(params).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend reports no memory analysis")
        return mem.temp_size_in_bytes

    assert temp_bytes(1000) <= 1.05 * temp_bytes(10)


def test_imaml_bad_settings_are_named():
    for lam in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="lam .*must be a finite number > 0"):
            estimators.imaml(LINEAR, num_inner_steps=5, lam=lam)
    with pytest.raises(ValueError, match="cg_iters must be"):
        estimators.imaml(LINEAR, num_inner_steps=5, lam=1.0, cg_iters=0)
    with pytest.raises(ValueError, match="num_inner_steps must be >= 1 for iMAML"):
        estimators.imaml(LINEAR, num_inner_steps=0, lam=1.0)
