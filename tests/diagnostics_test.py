import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jmaml import Batch, make_loss
from jmaml.core import analytic, diagnostics, models
from jmaml.tasks import seed


def test_lambda_max_on_the_seeds_tasks_is_the_exact_bound(x64):
    loss = make_loss(models.linear().apply, "sse")
    tasks = jax.tree.map(jnp.asarray, seed.meta_tasks())
    out = diagnostics.support_curvature(loss, jnp.array(1.0), tasks, num_iters=3)
    np.testing.assert_allclose(out["lambda_max"], [2 * 13.0, 2 * 61.0], rtol=1e-12)
    want = [analytic.stable_inner_lr_bound(x) for x in ([2.0, 3.0], [5.0, 6.0])]
    np.testing.assert_allclose(out["alpha_bound"], want, rtol=1e-12)
    # alpha = 0.1 is above both bounds: both of the seed's inner loops diverge.
    assert np.all(0.1 > np.asarray(out["alpha_bound"]))


def test_lambda_max_matches_eigvalsh_of_the_full_hessian_on_a_small_mlp(x64):
    model = models.mlp([1, 5, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(3)))
    x = jnp.linspace(-2, 2, 8, dtype=jnp.float64)[:, None]
    batch = Batch(x, jnp.sin(2 * x))
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda f: loss(unravel(f), batch)))(flat)
    eig = np.linalg.eigvalsh(np.asarray(hess))
    dominant = eig[np.argmax(np.abs(eig))]
    got = jax.jit(lambda p: diagnostics.hessian_max_eigenvalue(loss, p, batch, num_iters=500))(params)
    assert float(got) == pytest.approx(dominant, rel=1e-6)


def test_bound_is_infinite_for_non_positive_curvature():
    np.testing.assert_array_equal(diagnostics.step_size_bound(jnp.array([-1.0, 0.0, 4.0])),
                                  [np.inf, np.inf, 0.5])


def test_bad_iteration_count():
    loss = make_loss(models.linear().apply, "sse")
    with pytest.raises(ValueError, match="num_iters must be >= 1"):
        diagnostics.hessian_max_eigenvalue(loss, jnp.array(1.0), Batch(jnp.ones(2), jnp.ones(2)), num_iters=0)
