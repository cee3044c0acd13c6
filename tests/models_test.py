import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmaml.core import models


def test_linear_is_theta_times_x():
    m = models.linear()
    np.testing.assert_allclose(m.apply(jnp.array(2.0), jnp.array([1.0, -3.0])), [2.0, -6.0])
    assert m.init(jax.random.key(0)).shape == ()


def test_mlp_shapes_and_forward_against_numpy():
    m = models.mlp([1, 40, 40, 1])
    params = m.init(jax.random.key(1))
    assert [p["w"].shape for p in params] == [(1, 40), (40, 40), (40, 1)]
    x = np.linspace(-5, 5, 7, dtype=np.float32)[:, None]
    h = np.asarray(x)
    for layer in params[:-1]:
        h = np.maximum(h @ np.asarray(layer["w"]) + np.asarray(layer["b"]), 0)
    expected = h @ np.asarray(params[-1]["w"]) + np.asarray(params[-1]["b"])
    # Full float32 matmuls: on GPUs JAX's default precision may use TF32 (about 1e-3 relative).
    with jax.default_matmul_precision("highest"):
        got = m.apply(params, jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_mlp_init_is_deterministic_by_key():
    m = models.mlp([2, 3, 1])
    a, b = m.init(jax.random.key(3)), m.init(jax.random.key(3))
    c = m.init(jax.random.key(4))
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a[0]["w"], c[0]["w"])


@pytest.mark.parametrize("sizes", [[1], [1, 0, 1], [1, -2]])
def test_mlp_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes"):
        models.mlp(sizes)


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of .*'swish'"):
        models.mlp([1, 4, 1], activation="swish")
