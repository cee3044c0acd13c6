"""Mixed precision (``models.mixed_precision``, ``TrainConfig.precision``, ``--precision bf16``)."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmaml import Batch, cli, make_loss
from jmaml.core import models
from jmaml.run import rundir, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dtypes_of(jaxpr, primitive):
    """The operand dtypes of every ``primitive`` equation, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            out.append({str(v.aval.dtype) for v in eqn.invars})
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                out += _dtypes_of(inner, primitive)
    return out


def test_bf16_computes_the_matmuls_in_bfloat16_and_keeps_float32_around_them():
    net = models.mlp([1, 40, 40, 1])
    low = models.mixed_precision(net, "bf16")
    params = net.init(jax.random.key(0))
    batch = Batch(jnp.linspace(-5, 5, 10)[:, None], jnp.sin(jnp.linspace(-5, 5, 10))[:, None])
    loss32, loss16 = make_loss(net.apply), make_loss(low.apply)
    grad_fn = jax.value_and_grad(loss16)
    value, grads = grad_fn(params, batch)
    assert value.dtype == jnp.float32
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    dots = _dtypes_of(jax.make_jaxpr(grad_fn)(params, batch).jaxpr, "dot_general")
    assert dots and all(d == {"bfloat16"} for d in dots), dots  # forward and backward matmuls
    # bfloat16 keeps 8 bits of mantissa: the loss and gradient agree with float32 to about 1%
    want_value, want_grads = jax.value_and_grad(loss32)(params, batch)
    np.testing.assert_allclose(value, want_value, rtol=2e-2)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=0.1, atol=0.02 * float(jnp.max(jnp.abs(w))))
    assert models.mixed_precision(net, "float32") is net


def test_bf16_model_with_state_keeps_its_state_dtype():
    net = models.mixed_precision(models.mlp_batchnorm([2, 6, 1]))
    params, state = net.init(jax.random.key(0)), net.init_state()
    pred, new_state = net.apply(params, jnp.ones((4, 2)), state)
    assert pred.dtype == jnp.float32
    assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)


def test_bad_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of float32, bf16, got 'fp8'"):
        models.mixed_precision(models.mlp([1, 4, 1]), "fp8")
    with pytest.raises(ValueError, match="precision must be one of float32, bf16, got 'half'"):
        train.TrainConfig(precision="half").validate()


def test_a_bf16_run_trains_with_float32_state_and_the_default_fingerprint_is_unchanged():
    config = train.TrainConfig(steps=5, log_every=5, checkpoint_every=5, precision="bf16").validate()
    state, metrics = train.make_chunk(config)(train.initial_state(config), 5)
    assert {a.dtype for a in jax.tree.leaves((state.params, state.opt_state)) if a.ndim} == {jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(metrics["meta_loss"]))
    # a run written before the field existed keeps its fingerprint: this is the committed sinusoid run's
    # config as the code before `precision` fingerprinted it
    committed = train.load_config(os.path.join(ROOT, "experiments", "sinusoid", "results"))
    assert committed.precision == "float32"
    assert rundir.run_fingerprint(committed) == "b16bdc8239450d06"
    assert rundir.run_fingerprint(config) != rundir.run_fingerprint(dataclasses.replace(config, precision="float32"))


def test_cli_precision_flag(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--precision", "bf16", "--steps", "4", "--no-pretrain", "--out", str(out),
                     "--eval-inner-steps", "1"])
    assert code == 0
    assert train.load_config(str(out)).precision == "bf16"
