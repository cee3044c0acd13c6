"""Equinox and Flax (linen, nnx) models through jmaml: with the same weights they give the plain
``mlp``'s meta-gradient (float64), and the learners whose rate trees and masks walk the parameters
(Meta-SGD, MAML++, ANIL) run on the libraries' own parameter pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmaml import learners, make_loss
from jmaml.core import adapters, estimators, models
from jmaml.tasks import sinusoid

eqx = pytest.importorskip("equinox")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

SIZES = [1, 8, 8, 1]


def _reference():
    model = models.mlp(SIZES, "tanh")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(3)))
    return model, params


def _tasks():
    tasks = sinusoid.sample_tasks(jax.random.key(4), 3, num_support=5, num_query=6)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tasks)


def _meta_grad(model, params, k=2):
    learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.05, num_inner_steps=k)
    loss, grads, _ = learner.estimate(params, _tasks())
    return float(loss), grads


def _equinox(ref):
    net = eqx.nn.MLP(1, 1, 8, 2, activation=jnp.tanh, key=jax.random.key(0))
    for i, layer in enumerate(ref):
        net = eqx.tree_at(lambda n, i=i: (n.layers[i].weight, n.layers[i].bias), net, (layer["w"].T, layer["b"]))
    return adapters.equinox(net), lambda p: [{"w": lay.weight.T, "b": lay.bias} for lay in p.layers]


class _Linen(nn.Module):
    param_dtype: type = jnp.float32

    @nn.compact
    def __call__(self, x):
        for width in SIZES[1:-1]:
            x = jnp.tanh(nn.Dense(width, param_dtype=self.param_dtype)(x))
        return nn.Dense(SIZES[-1], param_dtype=self.param_dtype)(x)


def _linen(ref):
    model = adapters.flax_linen(_Linen(jnp.float64), jnp.zeros((1, 1)))
    params = {f"Dense_{i}": {"kernel": layer["w"], "bias": layer["b"]} for i, layer in enumerate(ref)}
    return model, params, lambda p: [{"w": p[f"Dense_{i}"]["kernel"], "b": p[f"Dense_{i}"]["bias"]}
                                     for i in range(len(ref))]


class _Nnx(nnx.Module):
    def __init__(self, rngs, param_dtype=jnp.float32):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs, param_dtype=param_dtype)
                                for a, b in zip(SIZES[:-1], SIZES[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def _nnx(ref):
    net = _Nnx(nnx.Rngs(0), jnp.float64)
    for layer, values in zip(net.layers, ref):
        layer.kernel[...] = values["w"]
        layer.bias[...] = values["b"]
    model = adapters.flax_nnx(net)
    # the State's leaves in flatten order: layers/i/bias, layers/i/kernel
    return model, lambda p: [{"w": w, "b": b} for b, w in zip(*[iter(jax.tree.leaves(p))] * 2)]


@pytest.mark.parametrize("library", ["equinox", "linen", "nnx"])
def test_adapters_give_the_plain_mlps_meta_gradient(x64, library):
    ref_model, ref_params = _reference()
    want_loss, want = _meta_grad(ref_model, ref_params)
    if library == "equinox":
        model, back = _equinox(ref_params)
        params = model.init(jax.random.key(0))
    elif library == "linen":
        model, params, back = _linen(ref_params)
    else:
        model, back = _nnx(ref_params)
        params = model.init(jax.random.key(0))
    got_loss, got = _meta_grad(model, params)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    for a, b in zip(jax.tree.leaves(back(got)), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("library", ["equinox", "linen", "nnx"])
def test_rate_trees_and_masks_walk_library_params(library):
    if library == "equinox":
        model = adapters.equinox(make=lambda key: eqx.nn.MLP(1, 1, 8, 2, key=key))
    elif library == "linen":
        model = adapters.flax_linen(_Linen(), jnp.zeros((1, 1)))
    else:
        model = adapters.flax_nnx(make=_Nnx)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), model.init(jax.random.key(0)))
    loss = make_loss(model.apply, "mse")
    tasks = sinusoid.sample_tasks(jax.random.key(4), 3, num_support=5, num_query=6)
    for learner in (learners.meta_sgd(loss, inner_lr=0.01, num_inner_steps=1),
                    learners.mamlpp(loss, inner_lr=0.01, num_inner_steps=2, msl_anneal_steps=10),
                    learners.anil(loss, inner_lr=0.01, num_inner_steps=1)):
        value, grads, _ = learner.estimate(learner.init(params), tasks, 0)
        assert np.isfinite(float(value))
        assert jax.tree.structure(grads) == jax.tree.structure(learner.init(params))
    # ANIL's default mask selects the last layer only, for each library's layout
    mask = estimators.last_layer_mask(params)
    assert 0 < sum(map(bool, jax.tree.leaves(mask))) < len(jax.tree.leaves(params))
    # the last layer's weight and bias: last in flatten order for each layout here
    assert [bool(m) for m in jax.tree.leaves(mask)] == [False] * (len(jax.tree.leaves(params)) - 2) + [True, True]


def test_a_mask_that_is_a_module_is_a_tree_not_a_function():
    model = adapters.equinox(make=lambda key: eqx.nn.MLP(1, 1, 8, 2, key=key))
    params = model.init(jax.random.key(0))
    mask = jax.tree.map(lambda _: False, params)
    mask = eqx.tree_at(lambda m: m.layers[0].bias, mask, True)  # an Equinox module of bools (callable!)
    rates = estimators.anil_rates(params, 0.1, mask)
    np.testing.assert_allclose([float(r) for r in jax.tree.leaves(rates)], [0.0, 0.1, 0.0, 0.0, 0.0, 0.0], rtol=1e-6)


def test_adapter_errors_are_named():
    with pytest.raises(ValueError, match="exactly one of module"):
        adapters.equinox()
    with pytest.raises(TypeError, match="must be an equinox.Module"):
        adapters.equinox(lambda x: x)

    class WithStats(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(x)

    with pytest.raises(ValueError, match=r"has batch norm \(batch_stats\) and its __call__ must take train=True/False"):
        adapters.flax_linen(WithStats(), jnp.zeros((2, 1)))

    class WithCounter(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.variable("counters", "n", lambda: jnp.zeros(()))
            return nn.Dense(1)(x)

    with pytest.raises(ValueError, match=r"keeps variables \['counters'\] besides params and batch_stats"):
        adapters.flax_linen(WithCounter(), jnp.zeros((2, 1))).init(jax.random.key(0))
