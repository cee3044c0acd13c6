"""The gradient check is right about right gradients (every exact learner, every model library, at
initialisation and after training) and fails wrong ones."""


import jax
import jax.numpy as jnp
import pytest

import jmaml
from jmaml import learners, make_loss
from jmaml.core import models

EXACT = ("maml", "anil", "metasgd", "mamlpp", "cavia")


def _model(kind, extra_inputs=0):
    import equinox as eqx
    import flax.linen as nn
    from flax import nnx
    d = 1 + extra_inputs
    if kind == "plain":
        return models.mlp([d, 8, 8, 1])
    if kind == "equinox":
        return jmaml.adapters.equinox(make=lambda key: eqx.nn.MLP(d, 1, 8, 2, activation=jax.nn.relu, key=key))
    if kind == "linen":
        net = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(1)])
        return jmaml.adapters.flax_linen(net, jnp.zeros((1, d)))

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(d, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)
            self.c = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))
    return jmaml.adapters.flax_nnx(make=MLP)


def _learner(name, kind):
    if name == "cavia":
        model = learners.with_context(_model(kind, extra_inputs=2), 2)
        return model, learners.cavia(make_loss(model.apply, "mse"), inner_lr=0.1, num_inner_steps=2, num_context=2)
    model = _model(kind)
    return model, learners.make(name, make_loss(model.apply, "mse"), inner_lr=0.05, num_inner_steps=2)


def _trained(learner, meta_params, dist, steps=10):
    import optax
    opt = optax.adam(1e-2)

    @jax.jit
    def step(carry, key):
        p, s = carry
        _, g, _ = learner.estimate(p, dist.sample(key, 8))
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    carry = (meta_params, opt.init(meta_params))
    for i in range(steps):
        carry = step(carry, jax.random.key(100 + i))
    return carry[0]


@pytest.mark.parametrize("kind", ["plain", "equinox", "linen", "nnx"])
def test_gradient_check_passes_every_exact_learner_at_init_and_after_training(kind):
    dist = jmaml.tasks.sinusoid.distribution()
    tasks = dist.sample(jax.random.key(3), 4)
    for name in EXACT:
        model, learner = _learner(name, kind)
        assert learner.exact_gradient
        start = learner.init(model.init(jax.random.key(0)))
        for where, meta_params in (("init", start), ("trained", _trained(learner, start, dist))):
            report = jmaml.check_meta_gradient(learner, meta_params, tasks, num_directions=2, max_coordinates=8)
            assert report["ok"] is True, (name, kind, where, report["note"])
            assert all(r["ok"] for r in report["per_leaf"].values())


def test_the_relative_only_rule_failed_a_right_meta_sgd_gradient():
    """The false alarm itself: Meta-SGD on an Equinox ReLU MLP at initialisation. Its largest purely relative
    error (the old pass rule, 1e-5) comes from a coordinate whose derivative is ~0: the mixed tolerance passes it."""
    import equinox as eqx
    model = jmaml.adapters.equinox(make=lambda key: eqx.nn.MLP(1, 1, 40, 2, activation=jax.nn.relu, key=key))
    learner = learners.make("metasgd", make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
    tasks = jmaml.tasks.sinusoid.distribution().sample(jax.random.key(0), 4)
    report = jmaml.check_meta_gradient(learner, learner.init(model.init(jax.random.key(0))), tasks)
    assert report["max_rel_error"] > 1e-5  # the old rule's verdict: ok=False
    assert report["ok"] is True and report["max_abs_error"] < 1e-8


@pytest.mark.parametrize("scale", [1.01, 1.0001])
def test_gradient_check_fails_a_wrong_gradient(scale):
    model, right = _learner("maml", "equinox")

    def wrong_estimate(p, tasks, meta_step=None, **hyper):
        loss, grads, metrics = right.estimate(p, tasks, meta_step, **hyper)
        return loss, jax.tree.map(lambda g: scale * g, grads), metrics

    wrong = right._replace(estimate=wrong_estimate)
    tasks = jmaml.tasks.sinusoid.distribution().sample(jax.random.key(3), 4)
    meta_params = right.init(model.init(jax.random.key(0)))
    report = jmaml.check_meta_gradient(wrong, meta_params, tasks, num_directions=2, max_coordinates=8)
    assert report["ok"] is False and "failing leaves" in report["note"]
    # one wrong coordinate among many is caught as well
    def one_wrong(p, tasks, meta_step=None, **hyper):
        loss, grads, metrics = right.estimate(p, tasks, meta_step, **hyper)
        leaves, tree = jax.tree.flatten(grads)
        leaves[-1] = leaves[-1].at[0].add(1e-3 * scale * jnp.sqrt(sum(jnp.sum(g**2) for g in leaves)))
        return loss, jax.tree.unflatten(tree, leaves), metrics

    report = jmaml.check_meta_gradient(right._replace(estimate=one_wrong), meta_params, tasks, num_directions=2,
                                       max_coordinates=16)
    assert report["ok"] is False and report["worst"] > 1


def test_gradient_check_refuses_bad_tolerances():
    model, learner = _learner("maml", "plain")
    for kw, match in (({"rtol": -1.0}, "rtol must be"), ({"atol": float("nan")}, "atol must be"),
                      ({"eps": 0.0}, "eps must be")):
        with pytest.raises(ValueError, match=match):
            jmaml.check_meta_gradient(learner, model.init(jax.random.key(0)), None, **kw)
