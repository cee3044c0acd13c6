"""The open engine: a user's own task distribution (dict data, not jmaml.Batch) and model through
fit / resume / evaluate / 4 devices; CAVIA against an independently written oracle; the metrics
contract; clear errors for the parts a user brings."""

import dataclasses
import io
import json
import math
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import procs
import pytest

import jmaml
from jmaml import Task, TaskDistribution, fit, learners, make_loss
from jmaml.core import models
from jmaml.engine import checkpoint
from jmaml.run.config import TrainConfig
from jmaml.run.evaluate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, Q = 6, 8


# ---- a task family and a model jmaml does not ship ----------------------------------------------

def _points(key, a, b, c, n):
    x = jax.random.uniform(key, (a.shape[0], n, 2), minval=-2.0, maxval=2.0)
    y = a[:, None] * jnp.sin(b[:, None] * x[..., 0]) + c[:, None] * x[..., 1]
    return {"inputs": x, "targets": y}


def plane_sample(key, num_tasks, num_support=K, num_query=Q):
    """y = a sin(b x1) + c x2: each task's data is a dict of arrays (any pytree will do)."""
    ka, kb, kc, ks, kq = jax.random.split(key, 5)
    a = jax.random.uniform(ka, (num_tasks,), minval=0.5, maxval=2.0)
    b = jax.random.uniform(kb, (num_tasks,), minval=0.5, maxval=1.5)
    c = jax.random.uniform(kc, (num_tasks,), minval=-1.0, maxval=1.0)
    return Task(_points(ks, a, b, c, num_support), _points(kq, a, b, c, num_query))


def plane_distribution():
    one = lambda n: {"inputs": (n, 2), "targets": (n,)}
    mse = lambda apply: lambda p, d: jnp.mean((apply(p, d["inputs"]) - d["targets"]) ** 2)
    return TaskDistribution(sample=plane_sample, heldout=lambda key, n: plane_sample(key, n, K, 30), make_metric=mse,
                            task_shapes=Task(one(K), one(Q)), name="plane", metric_name="mse")


def two_layer_init(key, width=12):
    k1, k2 = jax.random.split(key)
    return {"hidden": {"kernel": jax.random.normal(k1, (2, width)) * 0.5, "bias": jnp.zeros((width,))},
            "out": {"kernel": jax.random.normal(k2, (width,)) * 0.3, "bias": jnp.zeros(())}}


def two_layer_apply(p, x):
    hidden = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"][None, :])  # explicit broadcast: rank promotion
    return hidden @ p["out"]["kernel"] + p["out"]["bias"]


def plane_loss(p, d):
    return jnp.mean((two_layer_apply(p, d["inputs"]) - d["targets"]) ** 2)


def _fit(learner, run_dir=None, *, resume=False, callback=None, **kw):
    run = None if run_dir is None else jmaml.RunDir(run_dir, checkpoint_every=10, resume=resume)
    return fit(learner, plane_distribution(), optax.adam(3e-3), two_layer_init(jax.random.key(1)),
               **{"steps": 30, "meta_batch_size": 4, "key": 7, "run": run,
                  "log": jmaml.Logging(every=10, progress=False, callback=callback), **kw})


def test_a_users_tasks_and_model_train_resume_bitwise_and_evaluate(tmp_path):
    learner = learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=2)
    seen = []
    straight = _fit(learner, str(tmp_path / "a"), callback=lambda record, state: seen.append(record["step"]))
    assert seen == [10, 20, 30] and int(straight.step) == 30
    with pytest.raises(jmaml.Interrupted):
        _fit(learner, str(tmp_path / "b"), stop_at_step=10)
    assert checkpoint.read_header(tmp_path / "b" / "maml.ckpt.npz")["step"] == 10
    resumed = _fit(learner, str(tmp_path / "b"), resume=True)
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)
    # metrics.jsonl holds every metric the learner reports, per chunk, once after the resume too
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [10, 20, 30]
    assert {"meta_loss", "grad_norm", "task_losses", "pre_adapt_loss", "steps_per_s"} <= set(lines[-1])
    # evaluation by the learner's own rule, against a loop written here
    report = evaluate(learner, straight.params, plane_distribution(), apply=two_layer_apply, num_tasks=12,
                      num_steps=3, key=3)
    held = plane_sample(jax.random.key(3), 12, K, 30)
    want = []
    for j in range(12):
        task = jax.tree.map(lambda a, j=j: a[j], held)
        phi = straight.params
        for _ in range(3):
            phi = jax.tree.map(lambda p, g: p - 0.05 * g, phi, jax.grad(plane_loss)(phi, task.support))
        want.append(float(plane_loss(phi, task.query)))
    np.testing.assert_allclose(report["all"]["mean"][3], np.mean(want), rtol=1e-5)
    assert report["all"]["mean"][3] < report["all"]["mean"][0]  # adapting helps
    assert report["all"]["num_tasks"] == 12 and len(report["all"]["ci95"]) == 4


def test_a_users_tasks_on_four_devices_equal_one_device():
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from engine_test import _fit
        from jmaml import learners
        from jmaml.engine import distributed
        from engine_test import plane_loss
        assert jax.device_count() == 4
        learner = learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=2)
        one = _fit(learner)
        four = _fit(learner, mesh=distributed.task_mesh())
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        print("ok")
    """)
    proc = procs.run_python(script, env=procs.clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---- CAVIA against an oracle written another way ----------------------------------------------

def _cavia_oracle_loss(theta, support, query, alpha, k):
    """CAVIA on f(x; w, v, b) = w x + v c + b with SSE, written out by hand in NumPy float64: the
    context c starts at 0 and takes k steps c <- c - alpha * dL_S/dc, dL_S/dc = 2 v sum(r)."""
    w, v, b = theta
    xs, ys = support
    c = 0.0
    for _ in range(k):
        c = c - alpha * 2.0 * v * np.sum(w * xs + v * c + b - ys)
    xq, yq = query
    return np.sum((w * xq + v * c + b - yq) ** 2)


@pytest.mark.parametrize("k", [1, 2])
def test_cavia_meta_gradient_equals_finite_differences_of_an_independent_oracle(x64, k):
    alpha, theta = 0.05, (0.7, -0.4, 0.3)
    rng = np.random.default_rng(k)
    xs, xq = rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
    ys, yq = np.sin(xs) + 0.5, np.sin(xq) + 0.5
    base = models.Model(lambda key: None, lambda p, x: x @ p["w"] + p["b"][None, :])  # x: (n, 1 + 1 context)
    model = learners.with_context(base, 1)
    learner = learners.cavia(make_loss(model.apply, "sse"), inner_lr=alpha, num_inner_steps=k, num_context=1,
                             reduction="sum")
    params = {"w": jnp.array([[theta[0]], [theta[1]]]), "b": jnp.array([theta[2]])}
    batch = lambda x, y: jmaml.Batch(jnp.asarray(x)[..., None], jnp.asarray(y)[..., None])
    tasks = Task(batch(xs, ys), batch(xq, yq))
    loss, grads, metrics = learner.estimate(learner.init(params), tasks)
    oracle = lambda th: sum(_cavia_oracle_loss(th, (xs[j], ys[j]), (xq[j], yq[j]), alpha, k) for j in range(3))
    assert float(loss) == pytest.approx(oracle(theta), rel=1e-12)
    eps, fd = 1e-6, []
    for i in range(3):
        up, down = list(theta), list(theta)
        up[i] += eps
        down[i] -= eps
        fd.append((oracle(up) - oracle(down)) / (2 * eps))
    got = [float(grads.params["w"][0, 0]), float(grads.params["w"][1, 0]), float(grads.params["b"][0])]
    np.testing.assert_allclose(got, fd, rtol=1e-6)
    np.testing.assert_array_equal(grads.context, 0.0)  # the context is adapted, never meta-learned
    assert metrics["task_losses"].shape == (3,)
    # and the library's own check agrees
    report = jmaml.check_meta_gradient(learner, learner.init(params), tasks)
    assert report["ok"] and report["exact_gradient"]


def test_check_meta_gradient_catches_a_wrong_gradient_and_names_estimators():
    loss = make_loss(models.linear().apply, "sse")
    right = learners.maml(loss, inner_lr=0.1, num_inner_steps=2, reduction="sum")
    estimate = lambda p, tasks, meta_step=None: (lambda v, g, m: (v, 1.01 * g, m))(*right.estimate(p, tasks))
    wrong = right._replace(estimate=estimate)
    tasks = jmaml.tasks.seed.meta_tasks()
    report = jmaml.check_meta_gradient(wrong, jnp.array(0.3), tasks)
    assert report["ok"] is False and report["max_rel_error"] == pytest.approx(0.01, rel=0.05)
    assert jmaml.check_meta_gradient(right, jnp.array(0.3), tasks)["ok"] is True
    reptile = jmaml.check_meta_gradient(learners.reptile(loss, inner_lr=0.01, num_inner_steps=2), jnp.array(0.3),
                                        tasks)
    assert reptile["ok"] is None and "does not claim the exact gradient" in reptile["note"]


def test_cavia_trains_through_train_config(tmp_path):
    config = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=20, log_every=10,
                         checkpoint_every=20, pretrain=False, algo="cavia", algo_options={"cavia_num_context": 2})
    state = jmaml.train.train(config, str(tmp_path), stream=io.StringIO())["cavia"]
    assert state.params.params[0]["w"].shape == (1 + 2, 8)  # the sinusoid MLP takes the context as inputs
    np.testing.assert_array_equal(state.params.context, 0.0)
    results = jmaml.evaluate.evaluate_run(str(tmp_path), num_tasks=20, write=False)
    curve = results["cavia"]["10"]["mean"]
    assert len(curve) == 11 and all(math.isfinite(v) for v in curve)


# ---- the contract, and clear errors for what a user brings -------------------------------------

def test_every_learners_metrics_reach_metrics_jsonl(tmp_path):
    for algo, extras in (("imaml", ("cg_residual", "inner_grad_norm")), ("mamlpp", ("final_query_loss",))):
        config = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=10, log_every=10,
                             checkpoint_every=10, pretrain=False, algo=algo, num_inner_steps=2)
        jmaml.train.train(config, str(tmp_path / algo), stream=io.StringIO())
        with open(tmp_path / algo / "metrics.jsonl") as f:
            record = json.loads(f.readline())
        assert record["phase"] == algo
        assert all(math.isfinite(record[name]) for name in ("meta_loss", "pre_adapt_loss", *extras))


def _bad_sampler_dist(sample):
    return plane_distribution()._replace(sample=sample)


@pytest.mark.parametrize("sample, match", [
    (lambda key, n: jax.tree.map(lambda a: a[0], plane_sample(key, n)), "single task without a task axis"),
    (lambda key, n: plane_sample(key, n)._replace(query={"inputs": jnp.zeros((n + 1, Q, 2)),
                                                         "targets": jnp.zeros((n + 1, Q))}),
     "leading task axis of one size on every leaf"),
    (lambda key, n: plane_sample(key, n, K + 1), "the distribution's task_shapes"),
])
def test_a_bad_sampler_is_named(sample, match):
    learner = learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=1)
    with pytest.raises(ValueError, match=match):
        fit(learner, _bad_sampler_dist(sample), optax.adam(1e-3), two_layer_init(jax.random.key(0)), steps=10,
            meta_batch_size=4, log=jmaml.Logging(progress=False))


def test_a_learner_missing_a_metric_params_that_do_not_fit_and_wrong_types_are_named():
    good = learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=1)
    def lacking_estimate(p, t, s=None):
        value, grads, metrics = good.estimate(p, t, s)
        return value, grads, {"task_losses": metrics["task_losses"]}

    lacking = good._replace(estimate=lacking_estimate, name="mine")
    with pytest.raises(ValueError, match=r"learner 'mine': its metrics lack \['pre_adapt_loss'\]"):
        _fit(lacking)
    wrong_params = two_layer_init(jax.random.key(0))
    wrong_params["hidden"]["kernel"] = jnp.zeros((3, 12))  # the data has 2 inputs
    with pytest.raises(TypeError, match="do the params fit the model"):
        fit(good, plane_distribution(), optax.adam(1e-3), wrong_params, steps=10, meta_batch_size=4,
            log=jmaml.Logging(progress=False))
    with pytest.raises(TypeError, match="learner must be a jmaml.MetaLearner"):
        fit(plane_loss, plane_distribution(), optax.adam(1e-3), wrong_params, steps=10, meta_batch_size=4)
    with pytest.raises(TypeError, match="tasks must be a jmaml.TaskDistribution"):
        fit(good, plane_sample, optax.adam(1e-3), wrong_params, steps=10, meta_batch_size=4)
    with pytest.raises(ValueError, match="no checkpoint"):
        _fit(good, "/nonexistent/jmaml-run", resume=True)


def test_rate_trees_and_checks_accept_any_params_pytree():
    # a NamedTuple / dataclass-like pytree, not a list or dict: Meta-SGD's rates and the checks walk it
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Params:
        w: jax.Array
        b: jax.Array

    loss = lambda p, batch: jnp.mean((batch.x[:, 0] * p.w + p.b - batch.y[:, 0]) ** 2)
    learner = learners.meta_sgd(loss, inner_lr=0.01, num_inner_steps=1)
    meta = learner.init(Params(jnp.array(0.5), jnp.array(0.1)))
    tasks = jmaml.tasks.sinusoid.sample_tasks(jax.random.key(0), 3, num_support=4, num_query=4)
    loss_value, grads, _ = learner.estimate(meta, tasks)
    assert isinstance(grads.inner_lr, Params) and math.isfinite(float(loss_value))
    with pytest.raises(ValueError, match="inner_lr must be >= 0"):
        learners.meta_sgd(loss, inner_lr=0.01, num_inner_steps=1).estimate(
            meta._replace(inner_lr=Params(jnp.array(-1.0), jnp.array(0.1))), tasks)


# ---- a model with state: batch norm's running statistics ---------------------------------------

def _bn_fit(run_dir, **kw):
    model = models.mlp_batchnorm([1, 16, 16, 1], "relu")
    learner = learners.maml(make_loss(model.apply, "mse", stateful=True), inner_lr=0.01, num_inner_steps=1)
    tasks = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    stop_at_step = kw.pop("stop_at_step", None)
    return fit(learner, tasks, optax.adam(1e-3), model.init(jax.random.key(0)), model_state=model.init_state(),
               steps=30, meta_batch_size=4, key=3, run=jmaml.RunDir(run_dir, checkpoint_every=10, **kw),
               log=jmaml.Logging(every=10, progress=False), stop_at_step=stop_at_step), model, learner


def test_a_batch_norm_model_with_running_statistics_trains_and_resumes(tmp_path):
    straight, model, learner = _bn_fit(str(tmp_path / "a"))
    start = model.init_state()
    # the running statistics moved (they are carried and updated), and are not parameters
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start["stats"]),
                                                      jax.tree.leaves(straight.model_state["stats"]))]
    assert all(moved) and jax.tree.structure(straight.params) == jax.tree.structure(model.init(jax.random.key(0)))
    with pytest.raises(jmaml.Interrupted):
        _bn_fit(str(tmp_path / "b"), stop_at_step=20)
    resumed, _, _ = _bn_fit(str(tmp_path / "b"), resume=True)
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)  # parameters, optimiser state and running statistics


def test_model_state_gets_no_gradient_and_matches_a_hand_threaded_state(x64):
    # oracle: one task, k = 1, the state threaded by hand through support step and query pass
    model = models.mlp_batchnorm([1, 4, 1], "tanh", momentum=0.5)
    loss = make_loss(model.apply, "mse", stateful=True)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(1)))
    state0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init_state())
    tasks = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         jmaml.tasks.sinusoid.sample_tasks(jax.random.key(2), 2, num_support=5, num_query=5))
    learner = learners.maml(loss, inner_lr=0.1, num_inner_steps=1)
    value, grads, metrics, new_state = learner.estimate(params, tasks, None, model_state=state0)

    def by_hand(p, j):
        task = jax.tree.map(lambda a: a[j], tasks)
        g = jax.grad(lambda q: loss(q, task.support, state0)[0])(p)
        _, s1 = loss(p, task.support, state0)
        phi = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
        return loss(phi, task.query, s1)

    want_value = np.mean([float(by_hand(params, j)[0]) for j in range(2)])
    want_grads = jax.grad(lambda p: (by_hand(p, 0)[0] + by_hand(p, 1)[0]) / 2)(params)
    want_state = jax.tree.map(lambda a, b: (a + b) / 2, by_hand(params, 0)[1], by_hand(params, 1)[1])
    assert float(value) == pytest.approx(want_value, rel=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert metrics["task_losses"].shape == (2,)


def test_a_learner_without_model_state_support_is_named():
    model = models.mlp_batchnorm([1, 8, 1])
    learner = learners.reptile(make_loss(model.apply, "mse", stateful=True), inner_lr=0.01, num_inner_steps=1)
    with pytest.raises(TypeError, match="learner 'reptile'"):
        fit(learner, jmaml.tasks.sinusoid.distribution(), optax.adam(1e-3), model.init(jax.random.key(0)),
            model_state=model.init_state(), steps=10, meta_batch_size=4, log=jmaml.Logging(progress=False))


# ---- sweeps of a user's learner and tasks ----------------------------------------------------------

def test_a_users_tasks_and_model_through_a_sweep_equal_single_runs():
    from jmaml.run import sweep

    grid = sweep.Grid(alphas=(0.02, 0.05), betas=(1e-3, 3e-3), ks=(1, 2), seeds=(0, 1))
    result = sweep.sweep_learner(lambda k: learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=k),
                                 plane_distribution(), optax.adam, lambda key: two_layer_init(key), grid, steps=20,
                                 meta_batch_size=4, task_key=7, log_every=10, apply=two_layer_apply, eval_tasks=20,
                                 eval_steps=3)
    assert len(result["rows"]) == 16
    for i in (0, 5, 15):  # spot checks against the single run with the same settings
        row, params = result["rows"][i], result["params"][i]
        alpha, beta, k, seed = row["alpha"], row["beta"], row["k"], row["seed"]
        single = fit(learners.maml(plane_loss, inner_lr=alpha, num_inner_steps=k), plane_distribution(),
                     optax.adam(beta), two_layer_init(jax.random.key(seed)), steps=20, meta_batch_size=4, key=7,
                     log=jmaml.Logging(every=10, progress=False))
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # injected beta: float32 round-off
        assert len(row["mse_curve"]) == 4 and all(math.isfinite(v) for v in row["mse_curve"])
    # Meta-SGD learns its rate: the sweep builds it per alpha (its initial value), and says how
    with pytest.raises(TypeError, match=r"make_learner must accept make_learner\(k, inner_lr=alpha\)"):
        sweep.sweep_learner(lambda k: learners.meta_sgd(plane_loss, inner_lr=0.05, num_inner_steps=k),
                            plane_distribution(), optax.adam, two_layer_init, grid, steps=10, meta_batch_size=4)
    small = sweep.Grid(alphas=(0.02, 0.05), betas=(1e-3,), ks=(1,), seeds=(0,))
    result = sweep.sweep_learner(lambda k, inner_lr=0.05: learners.meta_sgd(plane_loss, inner_lr=inner_lr,
                                                                            num_inner_steps=k),
                                 plane_distribution(), optax.adam, two_layer_init, small, steps=10, meta_batch_size=4,
                                 task_key=7, log_every=10, evaluate=False)
    for row, params in zip(result["rows"], result["params"]):
        single = fit(learners.meta_sgd(plane_loss, inner_lr=row["alpha"], num_inner_steps=1), plane_distribution(),
                     optax.adam(1e-3), two_layer_init(jax.random.key(0)), steps=10, meta_batch_size=4, key=7,
                     log=jmaml.Logging(every=10, progress=False))
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_explosion_rule_needs_a_loss_that_is_not_negative():
    """The adapted/un-adapted ratio is a scale only for a non-negative loss: minus a return (meta-RL) that
    goes from -1 to +5 is a worse policy, not an exploding inner loop; a positive loss that grows 1e4-fold is."""
    from jmaml.engine.loop import divergence

    def chunk(pre, post):
        return {"meta_loss": np.array([post]), "grad_norm": np.array([1.0]), "pre_adapt_loss": np.array([pre]),
                "task_losses": np.array([[post, post]])}

    assert divergence(0, chunk(-1.0, 5.0), max_loss_ratio=1e3) is None
    assert "exploding inner loop at step 1:" in divergence(0, chunk(1e-3, 10.0), max_loss_ratio=1e3)
    assert divergence(0, chunk(1e-3, 0.5), max_loss_ratio=1e3) is None
    nan = divergence(4, {**chunk(-1.0, np.nan), "return_post": np.array([np.nan]), "return_pre": np.array([1.0])},
                     max_loss_ratio=1e3)
    assert "at step 5" in nan and nan.endswith("non-finite in tasks [0, 1] of the meta-batch; the learner's metrics "
                                                "non-finite there: return_post)")


def test_sweep_learner_resume_continues_the_recorded_sweep_or_fails_naming_why(tmp_path):
    from jmaml.run import sweep

    def run(grid, **kw):
        return sweep.sweep_learner(lambda k: learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=k),
                                   plane_distribution(), optax.adam, two_layer_init, grid, steps=10,
                                   meta_batch_size=4, task_key=7, log_every=10, evaluate=False, **kw)

    grid = sweep.Grid(alphas=(0.02, 0.05), betas=(1e-3,), ks=(1,), seeds=(0,))
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        run(grid, resume=True)
    with pytest.raises(ValueError, match=r"holds no sweep to resume \(no sweep-plan.json\)"):
        run(grid, run_dir=str(tmp_path / "new"), resume=True)  # a fresh start is only ever explicit
    assert not (tmp_path / "new" / "sweep-k1.ckpt.npz").exists()
    first = run(grid, run_dir=str(tmp_path / "s"))
    again = run(grid, run_dir=str(tmp_path / "s"), resume=True)  # finished: the same points, not retrained
    for a, b in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(again["params"])):
        np.testing.assert_array_equal(a, b)
    other = sweep.Grid(alphas=(0.02, 0.1), betas=(1e-3,), ks=(1,), seeds=(0,))  # same size, another grid
    with pytest.raises(ValueError, match=r"alpha \[0.02, 0.1\] \(recorded \[0.02, 0.05\]\)"):
        run(other, run_dir=str(tmp_path / "s"), resume=True)
    with pytest.raises(ValueError, match="contradict"):
        run(grid, run_dir=str(tmp_path / "s"), resume=True, overwrite=True)


@pytest.mark.parametrize("path", ["", None])
def test_a_run_folder_must_be_a_path(path):
    with pytest.raises(ValueError, match="run's folder must be a non-empty path"):
        fit(learners.maml(plane_loss, inner_lr=0.05, num_inner_steps=1), plane_distribution(), optax.adam(1e-3),
            two_layer_init(jax.random.key(0)), steps=10, meta_batch_size=4, run=jmaml.RunDir(path, resume=True))


def test_check_meta_gradient_names_a_task_without_its_task_axis_and_reports_the_tasks_taken():
    loss = make_loss(models.linear().apply, "sse")
    learner = learners.maml(loss, inner_lr=0.1, num_inner_steps=1)
    tasks = jmaml.tasks.seed.meta_tasks()
    report = jmaml.check_meta_gradient(learner, jnp.array(1.0), tasks)
    n = jax.tree.leaves(tasks)[0].shape[0]
    assert report["ok"] and report["num_tasks"] == n and report["note"].startswith(f"on {n} task(s)")
    one = jmaml.Task(jmaml.Batch(jnp.ones((3, 1)), jnp.ones((3, 1))), jmaml.Batch(jnp.ones((5, 1)), jnp.ones((5, 1))))
    with pytest.raises(ValueError, match="Is it a single task without a task axis"):
        jmaml.check_meta_gradient(learner, jnp.array(1.0), one)


def test_a_run_records_its_xla_flags_and_the_jmaml_command_resumes_under_them(tmp_path, monkeypatch, capsys):
    """fit records XLA_FLAGS in its checkpoint's run record; a resume under other flags says so on stderr (the
    arithmetic is the same, XLA:CPU's kernels may not be); the jmaml command, where XLA_FLAGS is unset, resumes
    under the recorded ones, and leaves a user's own alone."""
    from jmaml import cli
    from jmaml.engine import checkpoint, runstore

    learner = jmaml.learners.maml(plane_loss, inner_lr=0.1, num_inner_steps=1)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_xnnpack=false")
    _fit(learner, str(tmp_path), steps=10)
    header = checkpoint.read_header(tmp_path / "maml.ckpt.npz")
    assert runstore.recorded_xla_flags(header) == "--xla_cpu_use_xnnpack=false"
    capsys.readouterr()
    monkeypatch.delenv("XLA_FLAGS")
    _fit(learner, str(tmp_path), resume=True, steps=20)
    err = capsys.readouterr().err
    assert "under XLA_FLAGS=''; it was written under XLA_FLAGS='--xla_cpu_use_xnnpack=false'" in err, err
    assert runstore.recorded_xla_flags(checkpoint.read_header(tmp_path / "maml.ckpt.npz")) == ""
    # the command: a run recorded under flags, resumed from a process that sets none
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_xnnpack=false")
    _fit(learner, str(tmp_path / "cli"), steps=10)
    monkeypatch.delenv("XLA_FLAGS")
    args = cli.build_parser().parse_args(["train", "--out", str(tmp_path / "cli"), "--resume"])
    cli._use_recorded_xla_flags(args)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_xnnpack=false"
    assert "resuming with the run's recorded XLA_FLAGS='--xla_cpu_use_xnnpack=false'" in capsys.readouterr().err
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")  # the user's own: kept
    cli._use_recorded_xla_flags(args)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"
    monkeypatch.delenv("XLA_FLAGS")
    cli._use_recorded_xla_flags(cli.build_parser().parse_args(["train", "--out", str(tmp_path / "cli")]))
    assert "XLA_FLAGS" not in os.environ  # a fresh start: nothing recorded applies
