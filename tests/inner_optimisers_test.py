"""Differentiable inner optimisers: any optax transformation in the inner loop, second order through
its updates and state, meta-learned hyperparameters; oracles written without optax (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jmaml
from jmaml import Batch, Task, adapt, learners, make_loss
from jmaml.core import inner_optimisers, models
from jmaml.tasks import seed, sinusoid

K = 3


def _problem(num_tasks=3):
    model = models.mlp([1, 6, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    real = jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 under the x64 fixture, else float32
    params = jax.tree.map(lambda a: jnp.asarray(a, real), model.init(jax.random.key(1)))
    tasks = jax.tree.map(lambda a: jnp.asarray(a, real),
                         sinusoid.sample_tasks(jax.random.key(2), num_tasks, num_support=5, num_query=6))
    return loss, params, tasks


def _hand_momentum(loss, params, support, lr, mu, k):
    """Heavy-ball momentum written out: v <- g + mu v, p <- p - lr v."""
    v = jax.tree.map(jnp.zeros_like, params)
    for _ in range(k):
        g = jax.grad(loss)(params, support)
        v = jax.tree.map(lambda vi, gi: gi + mu * vi, v, g)
        params = jax.tree.map(lambda p, vi: p - lr * vi, params, v)
    return params


def _hand_adam(loss, params, support, lr, k, b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-12):
    """Adam written out, with eps_root under the root."""
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    for t in range(1, k + 1):
        g = jax.grad(loss)(params, support)
        m = jax.tree.map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = jax.tree.map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
        params = jax.tree.map(lambda p, mi, vi: p - lr * (mi / (1 - b1**t)) / (
            jnp.sqrt(vi / (1 - b2**t) + eps_root) + eps), params, m, v)
    return params


def _fd_grad(fn, params, eps=1e-6):
    """Central finite differences of a scalar function of a parameter tree, coordinate by coordinate."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, leaf in enumerate(leaves):
        flat = np.asarray(leaf).ravel()
        g = np.zeros_like(flat)
        for j in range(flat.size):
            for sign in (1, -1):
                moved = flat.copy()
                moved[j] += sign * eps
                trial = list(leaves)
                trial[i] = jnp.asarray(moved.reshape(leaf.shape))
                g[j] += sign * float(fn(jax.tree.unflatten(treedef, trial))) / (2 * eps)
        out.append(g.reshape(leaf.shape))
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_meta_gradient_through_k3_stateful_inner_steps_equals_finite_differences(x64, name):
    loss, params, tasks = _problem()
    if name == "momentum":
        opt, hand = inner_optimisers.momentum(0.05, 0.8), lambda p, s: _hand_momentum(loss, p, s, 0.05, 0.8, K)
    else:
        opt, hand = inner_optimisers.adam(0.01), lambda p, s: _hand_adam(loss, p, s, 0.01, K)
    learner = learners.maml(loss, inner_lr=None, num_inner_steps=K, inner_optimiser=opt)
    value, grads, _ = learner.estimate(params, tasks)

    def oracle(p):
        return np.mean([float(loss(hand(p, jax.tree.map(lambda a, j=j: a[j], tasks.support)),
                                   jax.tree.map(lambda a, j=j: a[j], tasks.query))) for j in range(3)])

    assert float(value) == pytest.approx(oracle(params), rel=1e-10)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(_fd_grad(oracle, params))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-8)


def test_heavy_ball_on_the_seeds_neuron_equals_its_linear_recurrence(x64):
    # f(x) = theta x, SSE: g(theta) = 2 (Sxx theta - Sxy); heavy ball is linear in (theta, v):
    # [theta, v]_{t+1} = A [theta, v]_t + b with A = [[1 - 2 a Sxx, -a mu], [2 Sxx, mu]], b = [2 a Sxy, -2 Sxy]
    loss = make_loss(models.linear().apply, "sse")
    task = seed.task_list()[0]
    xs, ys = np.asarray(task.support.x), np.asarray(task.support.y)
    sxx, sxy = float(xs @ xs), float(xs @ ys)
    a, mu, theta0 = 0.02, 0.7, 1.0
    A = np.array([[1 - 2 * a * sxx, -a * mu], [2 * sxx, mu]])
    b = np.array([2 * a * sxy, -2 * sxy])
    for k in range(1, 7):
        z = np.array([theta0, 0.0])
        for _ in range(k):
            z = A @ z + b
        d_theta = np.linalg.matrix_power(A, k)[0, 0]  # d theta_k / d theta_0 (v_0 = 0 does not depend on it)
        run = lambda th, k=k: adapt(loss, th, task.support, inner_lr=None, num_steps=k,
                                    inner_optimiser=inner_optimisers.momentum(a, mu))
        assert float(run(jnp.asarray(theta0))) == pytest.approx(z[0], rel=1e-12)
        assert float(jax.grad(run)(jnp.asarray(theta0))) == pytest.approx(d_theta, rel=1e-12)


def test_meta_gradient_with_respect_to_learned_hyperparameters_equals_finite_differences(x64):
    loss, params, tasks = _problem(2)
    learner = learners.maml(loss, inner_lr=0.05, num_inner_steps=K, inner_optimiser="momentum",
                            inner_settings="momentum=0.8", learn_inner_hyper="learning_rate,momentum")
    meta = learner.init(params)
    assert isinstance(meta, learners.InnerHyperParams) and set(meta.hyper) == {"learning_rate", "momentum"}
    _, grads, metrics = learner.estimate(meta, tasks)

    def oracle(lr, mu):
        return np.mean([float(loss(_hand_momentum(loss, params, jax.tree.map(lambda a, j=j: a[j], tasks.support),
                                                  lr, mu, K), jax.tree.map(lambda a, j=j: a[j], tasks.query)))
                        for j in range(2)])

    eps = 1e-6
    fd_lr = (oracle(0.05 + eps, 0.8) - oracle(0.05 - eps, 0.8)) / (2 * eps)
    fd_mu = (oracle(0.05, 0.8 + eps) - oracle(0.05, 0.8 - eps)) / (2 * eps)
    assert float(grads.hyper["learning_rate"]) == pytest.approx(fd_lr, rel=1e-5)
    assert float(grads.hyper["momentum"]) == pytest.approx(fd_mu, rel=1e-5)
    assert float(metrics["inner_momentum"]) == pytest.approx(0.8)


def test_sgd_inner_optimiser_equals_the_built_in_sgd_path():
    loss, params, tasks = _problem()
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float32), tasks)
    plain = learners.maml(loss, inner_lr=0.05, num_inner_steps=K).estimate(params, tasks)
    viaopt = learners.maml(loss, inner_lr=0.05, num_inner_steps=K, inner_optimiser="sgd").estimate(params, tasks)
    # p + (-a g) equals p - a g exactly in floating point: bitwise the same loss and meta-gradient
    assert float(plain[0]) == float(viaopt[0])
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(viaopt[1])):
        np.testing.assert_array_equal(a, b)


def test_meta_sgd_and_mamlpp_rates_are_instances_of_learned_hyperparameters():
    loss, params, tasks = _problem()
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float32), tasks)
    # Meta-SGD: SGD whose learning rate is learned per parameter
    msgd = learners.meta_sgd(loss, inner_lr=0.05, num_inner_steps=2)
    inst = learners.maml(loss, inner_lr=0.05, num_inner_steps=2, inner_optimiser="sgd",
                         learn_inner_hyper="learning_rate", per_parameter_hyper=True)
    ref, got = msgd.estimate(msgd.init(params), tasks), inst.estimate(inst.init(params), tasks)
    assert float(ref[0]) == float(got[0])
    for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves((got[1].params, got[1].hyper["learning_rate"]))):
        np.testing.assert_array_equal(a, b)
    # MAML++'s learned per-step, per-tensor rates (without the multi-step loss)
    mpp = learners.mamlpp(loss, inner_lr=0.05, num_inner_steps=3, multi_step_loss=False)
    rates = jax.tree.map(lambda p: jnp.full((3,), 0.05, p.dtype), params)
    inst = learners.maml(loss, inner_lr=None, num_inner_steps=3,
                         inner_optimiser=inner_optimisers.sgd(rates, per_step=True), learn_inner_hyper="learning_rate")
    ref, got = mpp.estimate(mpp.init(params), tasks, 0), inst.estimate(inst.init(params), tasks)
    assert float(ref[0]) == pytest.approx(float(got[0]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves((got[1].params, got[1].hyper["learning_rate"]))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_traced_k_equals_plain_k_with_a_stateful_optimiser():
    loss, params, tasks = _problem()
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    tasks = jax.tree.map(lambda a: a.astype(jnp.float32), tasks)
    plain = learners.maml(loss, inner_lr=0.01, num_inner_steps=3, inner_optimiser="adam")
    masked = learners.maml(loss, inner_lr=0.01, num_inner_steps=0, max_inner_steps=5, inner_optimiser="adam")
    want = plain.estimate(params, tasks)
    got = jax.jit(lambda k: masked.estimate(params, tasks, num_inner_steps=k))(jnp.asarray(3))
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(want[1]), jax.tree.leaves(got[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_second_order_through_adam_is_finite_where_plain_optax_gives_nan():
    # a dead ReLU unit: its weights' gradients are exactly zero, and sqrt(nu) has an infinite
    # derivative at nu = 0, so the second-order meta-gradient through plain optax.adam is NaN
    model = models.mlp([1, 6, 1], "relu")
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(1))
    params[0]["b"] = params[0]["b"].at[0].set(-100.0)
    tasks = sinusoid.sample_tasks(jax.random.key(0), 2, num_support=5, num_query=5)
    task = jax.tree.map(lambda a: a[0], tasks)
    through = lambda p: loss(jmaml.adapt(loss, p, task.support, inner_lr=None, num_steps=2,
                                         inner_optimiser=optax.adam(0.01)), task.query)
    assert np.isnan(np.asarray(jax.grad(through)(params)[1]["w"])).all()  # the trap, documented
    # a learner refuses it when built, naming the cause and the cure, instead of "diverged at step 1"
    with pytest.raises(ValueError, match=r"square root at 0.*jmaml.inner_optimisers.adam.*eps_root=1e-12"):
        learners.maml(loss, inner_lr=None, num_inner_steps=2, inner_optimiser=optax.adam(0.01))
    safe = learners.maml(loss, inner_lr=0.01, num_inner_steps=2, inner_optimiser="adam")
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(safe.estimate(params, tasks)[1]))


def test_test_time_adaptation_uses_the_same_inner_optimiser(x64):
    loss, params, tasks = _problem(1)
    learner = learners.maml(loss, inner_lr=0.05, num_inner_steps=K, inner_optimiser="momentum")
    task = jax.tree.map(lambda a: a[0], tasks)
    _, curve = learner.adapt(params, task.support, K, observe=lambda p: loss(p, task.query))
    want = loss(_hand_momentum(loss, params, task.support, 0.05, 0.9, K), task.query)
    assert float(curve[-1]) == pytest.approx(float(want), rel=1e-10)
    value, _, metrics = learner.estimate(params, tasks)
    assert float(value) == pytest.approx(float(want), rel=1e-10)


def test_bad_inner_optimisers_are_named():
    loss, params, tasks = _problem(1)
    support = jax.tree.map(lambda a: a[0], tasks.support)
    with pytest.raises(TypeError, match="inner_optimiser must be an optax.GradientTransformation"):
        adapt(loss, params, support, inner_lr=None, num_steps=1, inner_optimiser="adam")
    with pytest.raises(ValueError, match="give inner_lr or inner_optimiser, not both"):
        adapt(loss, params, support, inner_lr=0.1, num_steps=1, inner_optimiser=optax.sgd(0.1))
    with pytest.raises(TypeError, match="not injectable"):
        adapt(loss, params, support, inner_lr=None, num_steps=1, inner_optimiser=optax.sgd(0.1),
              inner_hyper={"learning_rate": 0.2})
    with pytest.raises(TypeError, match="does not hold as injectable hyperparameters"):
        learners.maml(loss, inner_lr=None, num_inner_steps=1, inner_optimiser=optax.sgd(0.1),
                      learn_inner_hyper="learning_rate").init(params)
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        inner_optimisers.momentum(0.1, -0.5)
    with pytest.raises(ValueError, match="eps_root must be > 0"):
        inner_optimisers.adam(0.1, eps_root=0.0)
    with pytest.raises(ValueError, match="inner_optimiser must be one of sgd, momentum"):
        inner_optimisers.make("lion", 0.1)
    with pytest.raises(ValueError, match="takes settings"):
        inner_optimisers.make("adam", 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="name=number pairs"):
        learners.maml(loss, inner_lr=0.1, num_inner_steps=1, inner_optimiser="momentum", inner_settings="momentum")


def test_inner_optimiser_through_train_config_and_cli(tmp_path):
    import io

    from jmaml import cli
    from jmaml.run import train

    args = cli.build_parser().parse_args(["train", "--inner-optimiser", "momentum", "--inner-settings",
                                          "momentum=0.5", "--learn-inner-hyper", "learning_rate",
                                          "--out", str(tmp_path / "x")])
    config = cli._train_config(args)
    assert config.options == {"inner_optimiser": "momentum", "inner_settings": "momentum=0.5",
                              "learn_inner_hyper": "learning_rate"}
    config = jmaml.TrainConfig(**{**config.to_dict(), "hidden": (8,), "meta_batch_size": 4, "num_support": 5,
                                  "num_query": 5, "steps": 20, "log_every": 10, "checkpoint_every": 10,
                                  "pretrain": False})
    state = train.train(config, str(tmp_path / "run"), stream=io.StringIO())["maml"]
    assert float(state.params.hyper["learning_rate"]) != pytest.approx(config.inner_lr)  # it was learned
    info = train.load_config(str(tmp_path / "run"))
    assert info.options["inner_optimiser"] == "momentum"
    with pytest.raises(ValueError, match="inner_optimiser = 'adam' applies to algos 'maml', 'fomaml' only"):
        jmaml.TrainConfig(algo="reptile", algo_options={"inner_optimiser": "adam"}).validate()


def test_seed_batch_helper_is_unchanged():
    # the seed's tasks stay jmaml.Batch data; the inner optimisers never change them
    assert isinstance(seed.meta_tasks(), Task) and isinstance(seed.meta_tasks().support, Batch)


def test_a_sweep_varies_the_inner_optimisers_settings_and_equals_single_runs():
    from jmaml import fit
    from jmaml.run import sweep

    loss, params, _ = _problem()
    init = lambda key: jax.tree.map(lambda a: a.astype(jnp.float32), params)
    make = lambda k: learners.maml(loss, inner_lr=0.01, num_inner_steps=k, inner_optimiser="momentum")
    grid = sweep.Grid(alphas=(0.01,), betas=(1e-3,), ks=(2,), seeds=(0,))
    result = sweep.sweep_learner(make, sinusoid.distribution(num_support=5, num_query=5), optax.adam, init, grid,
                                 steps=10, meta_batch_size=4, log_every=10, evaluate=False,
                                 inner_hyper={"momentum": (0.0, 0.9)})
    assert [r["momentum"] for r in result["rows"]] == [0.0, 0.9]
    for row, swept in zip(result["rows"], result["params"]):
        single = fit(learners.maml(loss, inner_lr=0.01, num_inner_steps=2, inner_optimiser="momentum",
                                   inner_settings=f"momentum={row['momentum']}"),
                     sinusoid.distribution(num_support=5, num_query=5), optax.adam(1e-3), init(None), steps=10,
                     meta_batch_size=4, log=jmaml.Logging(every=10, progress=False))
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(swept)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ---- inner optimisers: the documented combinations work, the nonsense is named ----------

@pytest.mark.parametrize("opt,learn", [("momentum", "momentum"), ("adam", "b1,b2"), ("rmsprop", "decay"),
                                       ("nesterov", "momentum,learning_rate")])
def test_per_parameter_learned_hyperparameters_of_every_kind(opt, learn):
    """--inner-optimiser momentum --learn-inner-hyper momentum --per-parameter-hyper was a TypeError (Adam b1 too)."""
    model = models.mlp([1, 8, 1])
    loss = make_loss(model.apply, "mse")
    tasks = jmaml.tasks.sinusoid.distribution().sample(jax.random.key(3), 4)
    per = learners.maml(loss, inner_lr=0.01, num_inner_steps=2, inner_optimiser=opt, learn_inner_hyper=learn,
                        per_parameter_hyper=True)
    one = learners.maml(loss, inner_lr=0.01, num_inner_steps=2, inner_optimiser=opt, learn_inner_hyper=learn)
    params = model.init(jax.random.key(0))
    mp = per.init(params)
    assert jax.tree.structure(mp.hyper[learn.split(",")[0]]) == jax.tree.structure(params)
    # per-parameter values all equal to the scalar: the same loss as one learned value (the oracle: optax's rule)
    assert float(per.estimate(mp, tasks)[0]) == pytest.approx(float(one.estimate(one.init(params), tasks)[0]),
                                                              rel=1e-6)
    report = jmaml.check_meta_gradient(per, mp, tasks, num_directions=2, max_coordinates=8)
    assert report["ok"] is True, report["note"]


@pytest.mark.parametrize("kwargs,match", [
    ({"inner_settings": "momentum=0.9"}, "without inner_optimiser: plain SGD has no settings"),
    ({"per_parameter_hyper": True}, "per_parameter_hyper=True without learn_inner_hyper"),
    ({"inner_optimiser": "adam", "inner_settings": "b1=2"}, r"b1 must be in \[0, 1\)"),
    ({"inner_optimiser": "momentum", "inner_settings": "momentum=1"}, r"momentum must be in \[0, 1\)"),
    ({"inner_optimiser": "momentum", "inner_settings": "momentum=nan"}, "momentum must be finite"),
    ({"inner_optimiser": "adam", "inner_settings": "learning_rate=-1"}, "learning_rate is the inner rate"),
])
def test_inner_optimiser_nonsense_is_named(kwargs, match):
    loss = make_loss(models.mlp([1, 4, 1]).apply, "mse")
    with pytest.raises(ValueError, match=match):
        learners.maml(loss, inner_lr=0.01, num_inner_steps=1, **kwargs)
