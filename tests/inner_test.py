"""adapt / inner_step: against the seed's closed forms (float64), unrolled references, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmaml import Batch, adapt, inner_step, make_loss
from jmaml.core import analytic, models

LOSS = make_loss(models.linear().apply, "sse")


def _random_linear_task(rng, n=4):
    return rng.normal(size=n), rng.normal(size=n)


def test_one_step_is_the_seeds_eq4(x64):
    batch = Batch(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 4.0, 1.0]))
    assert float(inner_step(LOSS, jnp.array(1.0), batch, inner_lr=0.1)) == pytest.approx(0.8, abs=1e-12)


def test_adapt_and_its_derivative_match_the_closed_forms_for_random_tasks(x64):
    rng = np.random.default_rng(42)
    num = 8
    xs, ys = rng.normal(size=(num, 4)), rng.normal(size=(num, 4))
    sxx = np.sum(xs * xs, axis=1)
    alphas = rng.uniform(0.0, 0.4, size=num) / sxx  # most contract ...
    alphas[0] = 1.5 / sxx[0]  # ... and one diverges
    thetas = rng.normal(size=num)
    for k in range(11):
        def phi_and_slope(theta, x, y, alpha, k=k):
            f = lambda th: adapt(LOSS, th, Batch(x, y), inner_lr=alpha, num_steps=k)
            return jax.value_and_grad(f)(theta)

        phis, slopes = jax.jit(jax.vmap(phi_and_slope))(thetas, xs, ys, alphas)
        for j in range(num):
            want = analytic.adapt_k(thetas[j], xs[j], ys[j], alphas[j], k)
            assert float(phis[j]) == pytest.approx(want, rel=1e-10, abs=1e-10)
            want_slope = analytic.dW_dtheta(xs[j], alphas[j], k)
            assert float(slopes[j]) == pytest.approx(want_slope, rel=1e-10, abs=1e-12)


def test_k_zero_returns_params_unchanged():
    params = models.mlp([1, 4, 1]).init(jax.random.key(0))
    batch = Batch(jnp.ones((3, 1)), jnp.zeros((3, 1)))
    loss = make_loss(models.mlp([1, 4, 1]).apply, "mse")
    out, losses = adapt(loss, params, batch, inner_lr=0.1, num_steps=0, return_losses=True)
    assert out is params and losses.shape == (0,)


def test_scan_equals_an_unrolled_python_loop_of_inner_steps():
    model = models.mlp([1, 8, 8, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (10, 1), minval=-5, maxval=5)
    batch = Batch(x, jnp.sin(x))
    ref, ref_losses = params, []
    for _ in range(4):
        ref_losses.append(loss(ref, batch))
        ref = inner_step(loss, ref, batch, inner_lr=0.05)
    for unroll in (1, 2, True):
        got, got_losses = adapt(loss, params, batch, inner_lr=0.05, num_steps=4,
                                return_losses=True, unroll=unroll)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
        np.testing.assert_allclose(got_losses, np.array(ref_losses), rtol=1e-5)


def test_inner_lr_is_traced_not_baked_in():
    batch = Batch(jnp.array([2.0, 3.0]), jnp.array([4.0, 1.0]))
    traces = []

    @jax.jit
    def f(lr):
        traces.append(1)
        return adapt(LOSS, jnp.array(1.0), batch, inner_lr=lr, num_steps=1)

    assert float(f(0.1)) == pytest.approx(0.6, abs=1e-5)
    assert float(f(0.05)) == pytest.approx(analytic.adapt_k(1.0, [2, 3], [4, 1], 0.05, 1), abs=1e-5)
    assert len(traces) == 1


def test_traced_k_equals_plain_k(x64):
    """An identity (the masked scan and the plain one compute the same steps): compared in float64."""
    model = models.mlp([1, 8, 1])
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(0))
    x = jnp.linspace(-3, 3, 6)[:, None]
    batch = Batch(x, jnp.cos(x))
    for unroll in (1, True):
        masked = jax.jit(lambda k, u=unroll: adapt(loss, params, batch, inner_lr=0.1, num_steps=k, max_steps=5,
                                                   unroll=u))
        for k in range(6):
            plain = adapt(loss, params, batch, inner_lr=0.1, num_steps=k)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
                         masked(jnp.asarray(k)), plain)


def test_remat_changes_no_value(x64):
    """An identity (rematerialisation recomputes, it changes no value): compared in float64."""
    model = models.mlp([1, 8, 1])
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(0))
    x = jnp.linspace(-3, 3, 6)[:, None]
    batch = Batch(x, jnp.cos(x))

    for k, kmax in ((3, None), (10, None), (7, 12)):
        def g(remat, k=k, kmax=kmax):
            def f(p):
                phi, losses = adapt(loss, p, batch, inner_lr=0.1, num_steps=k, max_steps=kmax, remat=remat,
                                    return_losses=True)
                return loss(phi, batch), losses
            return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

        (v1, l1), g1 = g(True)
        (v0, l0), g0 = g(False)
        assert v1.dtype == jnp.float64
        np.testing.assert_allclose(v1, v0, rtol=1e-12)
        np.testing.assert_allclose(l1, l0, rtol=1e-12)
        assert l1.shape == (kmax or k,)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), g1, g0)


# ---- bad input: one test each -------------------------------------------------------------

SUPPORT = Batch(jnp.array([2.0, 3.0]), jnp.array([4.0, 1.0]))


def test_mismatched_x_and_y_sizes():
    with pytest.raises(ValueError, match=r"batch.x and batch.y must have the same number of points"):
        adapt(LOSS, jnp.array(1.0), Batch(jnp.ones(3), jnp.ones(2)), inner_lr=0.1, num_steps=1)


def test_empty_support_set():
    with pytest.raises(ValueError, match=r"batch must hold at least one point"):
        adapt(LOSS, jnp.array(1.0), Batch(jnp.ones(0), jnp.ones(0)), inner_lr=0.1, num_steps=1)


def test_negative_k():
    with pytest.raises(ValueError, match=r"num_steps must be >= 0, got -1"):
        adapt(LOSS, jnp.array(1.0), SUPPORT, inner_lr=0.1, num_steps=-1)


@pytest.mark.parametrize("k", [1.5, "2", True])
def test_non_integer_k(k):
    with pytest.raises(TypeError, match=r"num_steps must be a non-negative Python int"):
        adapt(LOSS, jnp.array(1.0), SUPPORT, inner_lr=0.1, num_steps=k)


def test_k_above_max_steps():
    with pytest.raises(ValueError, match=r"num_steps must be in \[0, max_steps=3\], got 4"):
        adapt(LOSS, jnp.array(1.0), SUPPORT, inner_lr=0.1, num_steps=4, max_steps=3)


def test_negative_alpha():
    with pytest.raises(ValueError, match=r"inner_lr must be >= 0, got -0.1"):
        adapt(LOSS, jnp.array(1.0), SUPPORT, inner_lr=-0.1, num_steps=1)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_alpha(alpha):
    with pytest.raises(ValueError, match=r"inner_lr must be finite"):
        adapt(LOSS, jnp.array(1.0), SUPPORT, inner_lr=alpha, num_steps=1)


def test_bad_unroll():
    with pytest.raises(ValueError, match=r"unroll must be"):
        adapt(LOSS, jnp.array(1.0), SUPPORT, inner_lr=0.1, num_steps=1, unroll=0)
