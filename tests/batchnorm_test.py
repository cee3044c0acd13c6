"""Batch norm done right: test-time modes chosen at evaluation and recorded, running statistics
inductive and transductive mode not, per-step statistics as MAML++, nnx and linen models."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmaml
from jmaml import learners, make_loss
from jmaml.core import models
from jmaml.run import evaluate


def _bn_learner(model, k=1, inner_lr=0.01):
    return learners.maml(make_loss(model.apply, "mse", stateful=True), inner_lr=inner_lr, num_inner_steps=k)


def _fit_bn(model, run_dir, *, k=1, steps=20, **run):
    import optax
    return jmaml.fit(_bn_learner(model, k), jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5),
                     optax.adam(1e-3), model.init(jax.random.key(0)), model_state=model.init_state(), steps=steps,
                     meta_batch_size=4, key=3, run=jmaml.RunDir(str(run_dir), checkpoint_every=10, **run),
                     log=jmaml.Logging(every=10, progress=False))


def _by_hand(params, x, mean, var, act=jax.nn.relu):
    """mlp_batchnorm's forward pass with given statistics, written out."""
    h = x @ params["layers"][0]["w"] + params["layers"][0]["b"][None, :]
    h = (h - mean[None, :]) / jnp.sqrt(var + models.BATCH_NORM_EPS)[None, :]
    h = act(h * params["norm"][0]["scale"][None, :] + params["norm"][0]["offset"][None, :])
    return h @ params["layers"][1]["w"] + params["layers"][1]["b"][None, :]


def test_batch_norm_test_time_modes_are_chosen_at_evaluation_and_recorded(tmp_path):
    model = models.mlp_batchnorm([1, 16, 1])
    state = _fit_bn(model, tmp_path / "run")
    stats = state.model_state["stats"][0]
    assert float(jnp.abs(stats["mean"]).max()) > 0  # the running statistics were learned
    dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    learner = _bn_learner(model)
    report = {}
    for mode in models.BN_MODES:
        ms = models.batch_norm_mode(state.model_state, mode)
        report[mode] = evaluate.evaluate(learner, state.params, dist, apply=model.apply, num_tasks=20, num_steps=2,
                                         model_state=ms)["all"]
        assert report[mode]["batch_norm"] == mode
    assert report["running"]["mean"][0] != report["transductive"]["mean"][0]
    # the oracle, step 0: the query MSE with the running statistics (running) or each query set's own (transductive)
    tasks = dist.heldout(jax.random.key(evaluate.EVAL_SEED), 20)
    running = [float(jnp.mean((_by_hand(state.params, q.x, stats["mean"], stats["var"]) - q.y) ** 2))
               for q in (jax.tree.map(lambda a: a[j], tasks.query) for j in range(20))]
    assert report["running"]["mean"][0] == pytest.approx(np.mean(running), rel=1e-5)

    def own(q):
        h = q.x @ state.params["layers"][0]["w"] + state.params["layers"][0]["b"][None, :]
        return _by_hand(state.params, q.x, h.mean(0), h.var(0))

    transductive = [float(jnp.mean((own(q) - q.y) ** 2)) for q in (jax.tree.map(lambda a: a[j], tasks.query)
                                                                  for j in range(20))]
    assert report["transductive"]["mean"][0] == pytest.approx(np.mean(transductive), rel=1e-5)


def test_running_mode_is_inductive_and_transductive_mode_is_not():
    """The leakage the trackers ask about: in transductive mode one query point's prediction depends on the
    other query points; with running statistics it does not."""
    model = models.mlp_batchnorm([1, 8, 1])
    params = model.init(jax.random.key(0))
    x = jnp.linspace(-3, 3, 6)[:, None]
    moved = x.at[5].set(40.0)
    for mode, leaks in (("transductive", True), ("running", False)):
        s = models.batch_norm_mode(model.init_state(), mode)
        a, b = model.apply(params, x, s)[0][:5], model.apply(params, moved, s)[0][:5]
        assert bool(jnp.any(a != b)) is leaks, mode
        if mode == "running":
            for a, b in zip(jax.tree.leaves(model.apply(params, x, s)[1]["stats"]), jax.tree.leaves(s["stats"])):
                np.testing.assert_array_equal(a, b)  # the running statistics are not updated


def test_per_step_statistics_as_maml_plus_plus(tmp_path):
    k = 2
    model = models.mlp_batchnorm([1, 8, 1], per_step=k)
    state = _fit_bn(model, tmp_path / "run", k=k)
    ms = state.model_state
    assert ms["stats"][0]["mean"].shape == (k + 1, 8)
    assert int(ms["bn_step"]) == 0  # every meta-step's tasks start at step 0: k support passes + 1 query wrap
    slots = np.asarray(ms["stats"][0]["mean"])
    assert not np.allclose(slots[0], slots[1]) and not np.allclose(slots[1], slots[2])  # one set per step
    # test time, running mode: step t's support pass uses slot t (the oracle threads the slots by hand)
    learner = _bn_learner(model, k)
    dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    task = jax.tree.map(lambda a: a[0], dist.heldout(jax.random.key(0), 1))
    running = models.batch_norm_mode(ms, "running")
    _, seen = learner.adapt(state.params, task.support, 3, model_state=running,
                            observe=lambda p, s: make_loss(model.apply, "mse", stateful=True)(p, task.query, s)[0])
    loss = make_loss(model.apply, "mse", stateful=True)
    p, want = state.params, []
    for t in range(4):
        at_t = {**running, "bn_step": jnp.asarray(t, jnp.int32)}
        want.append(float(loss(p, task.query, at_t)[0]))
        g = jax.grad(lambda q: loss(q, task.support, at_t)[0])(p)
        p = jax.tree.map(lambda a, b: a - 0.01 * b, p, g)
    np.testing.assert_allclose(np.asarray(seen), want, rtol=1e-5)


def _nnx_bn(rngs):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.bn, self.b = nnx.Linear(1, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs), nnx.Linear(16, 1,
                                                                                                         rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.bn(self.a(x))))
    return Net(rngs)


def test_an_nnx_batch_norm_model_through_fit_resume_and_evaluate(tmp_path):
    """adapters.flax_nnx crashed on BatchNorm (TraceContextError: Cannot mutate BatchStat ...)."""
    model = jmaml.adapters.flax_nnx(make=_nnx_bn)
    assert model.init_state is not None
    straight = _fit_bn(model, tmp_path / "a")
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model.init_state()["stats"]),
                                                      jax.tree.leaves(straight.model_state["stats"]))]
    assert any(moved)
    with pytest.raises(jmaml.Interrupted):
        import optax
        jmaml.fit(_bn_learner(model), jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5),
                  optax.adam(1e-3), model.init(jax.random.key(0)), model_state=model.init_state(), steps=20,
                  meta_batch_size=4, key=3, run=jmaml.RunDir(str(tmp_path / "b"), checkpoint_every=10),
                  log=jmaml.Logging(every=10, progress=False), stop_at_step=10)
    resumed = _fit_bn(model, tmp_path / "b", resume=True)
    from jmaml.engine import checkpoint
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)
    dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    out = {mode: evaluate.evaluate(_bn_learner(model), straight.params, dist, apply=model.apply, num_tasks=20,
                                   num_steps=2, model_state=models.batch_norm_mode(straight.model_state, mode))["all"]
           for mode in models.BN_MODES}
    assert out["running"]["batch_norm"] == "running" and out["running"]["mean"] != out["transductive"]["mean"]
    assert all(np.isfinite(out[m]["mean"]).all() for m in out)


def test_a_linen_batch_norm_model_takes_batch_stats(tmp_path):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            h = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
            return nn.Dense(1)(h)

    model = jmaml.adapters.flax_linen(Net(), jnp.zeros((5, 1)))
    state = _fit_bn(model, tmp_path / "run")
    assert not np.array_equal(jax.tree.leaves(state.model_state["stats"])[0],
                              jax.tree.leaves(model.init_state()["stats"])[0])
    params = state.params
    x = jnp.linspace(-3, 3, 6)[:, None]
    running = models.batch_norm_mode(state.model_state, "running")
    want = Net().apply({"params": params, "batch_stats": state.model_state["stats"]}, x, train=False)
    # float32, two routes through Dense -> BatchNorm -> ReLU -> Dense (jmaml's adapter and flax's own apply), which
    # XLA may fuse differently per CPU: a 16-term dot, the normalisation and a second dot are ~40 roundings of
    # eps = 1.2e-7 (measured 1.5e-6 apart on an Intel Xeon, 0 here), so rtol 1e-5 and atol 1e-6 (outputs ~0.04)
    np.testing.assert_allclose(model.apply(params, x, running)[0], want, rtol=1e-5, atol=1e-6)
    got = evaluate.evaluate(_bn_learner(model), params, jmaml.tasks.sinusoid.distribution(), apply=model.apply,
                            num_tasks=10, num_steps=1, model_state=running)["all"]
    assert got["batch_norm"] == "running" and np.isfinite(got["mean"]).all()


def test_conv4_with_running_statistics_equals_the_transductive_model_in_training_mode():
    plain = models.conv4(5, filters=4, image_size=28)
    stateful = models.conv4(5, filters=4, image_size=28, running_stats=True)
    params = plain.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 28, 28, 1))
    y, state = stateful.apply(params, x, stateful.init_state())
    np.testing.assert_array_equal(y, plain.apply(params, x))
    assert not np.array_equal(state["stats"][0]["mean"], 0.0)
    y_running, _ = stateful.apply(params, x, models.batch_norm_mode(state, "running"))
    assert not np.allclose(y_running, y)
    with pytest.raises(ValueError, match="mode must be one of transductive, running"):
        models.batch_norm_mode(state, "eval")
    with pytest.raises(ValueError, match="this state has no batch-norm mode"):
        models.batch_norm_mode({"mean": 0}, "running")


def test_per_step_batch_norm_weights_as_maml_plus_plus():
    """BNWB: a scale and offset per inner step, each slot trained by the pass that uses it."""
    k = 2
    model = models.mlp_batchnorm([1, 8, 1], per_step=k, per_step_weights=True)
    params = model.init(jax.random.key(0))
    assert params["norm"][0]["scale"].shape == (k + 1, 8)
    learner = _bn_learner(model, k, inner_lr=0.05)
    tasks = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5).sample(jax.random.key(1), 3)
    _, grads, _, new_state = learner.estimate(params, tasks, None, model_state=model.init_state())
    slots = np.asarray(grads["norm"][0]["scale"])
    assert all(np.abs(slots[t]).max() > 0 for t in range(k + 1))  # support steps 0, 1 and the query pass
    assert not np.allclose(slots[0], slots[2])
    report = jmaml.check_meta_gradient(learner._replace(
        estimate=lambda p, t, m=None, **h: learner.estimate(p, t, m, model_state=model.init_state(), **h)[:3]),
        params, tasks, num_directions=2, max_coordinates=8)
    assert report["ok"] is True, report["note"]
    conv = models.conv4(5, filters=4, image_size=28, running_stats=True, per_step=k, per_step_weights=True)
    assert conv.init(jax.random.key(0))["blocks"][0]["scale"].shape == (k + 1, 4)
    with pytest.raises(ValueError, match="per_step_weights .* needs per_step=k"):
        models.mlp_batchnorm([1, 8, 1], per_step_weights=True)
