import jax.numpy as jnp
import numpy as np
import pytest

from jmaml import Batch, make_loss
from jmaml.core import losses, models


def test_sse_is_the_seeds_eq1():
    loss = make_loss(models.linear().apply, "sse")
    batch = Batch(jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 4.0, 1.0]))
    # (2-1)^2 + (4-2)^2 + (1-3)^2 = 9
    assert float(loss(jnp.array(1.0), batch)) == pytest.approx(9.0)


def test_mse_is_sse_over_n():
    pred, target = jnp.array([1.0, 2.0, 4.0]), jnp.array([0.0, 2.0, 2.0])
    assert float(losses.mean_squared_error(pred, target)) == pytest.approx(5.0 / 3)
    assert float(losses.sum_squared_error(pred, target)) == pytest.approx(5.0)


def test_softmax_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(5), labels]))
    got = float(losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'l1'"):
        make_loss(models.linear().apply, "l1")


def test_shape_mismatch_between_predictions_and_targets_is_named():
    loss = make_loss(models.mlp([1, 4, 1]).apply, "mse")
    params = models.mlp([1, 4, 1]).init(__import__("jax").random.key(0))
    with pytest.raises(ValueError, match="predictions have shape"):
        loss(params, Batch(jnp.zeros((3, 1)), jnp.zeros((3,))))
