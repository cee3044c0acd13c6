"""A sweep is a run: ``jmaml.population.fit_population`` trains many points as one program, with a
single run's guarantees (checkpoints, resume, ownership) and per-point divergence."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import procs
import pytest

import jmaml
from jmaml import learners, make_loss
from jmaml.core import models
from jmaml.engine import checkpoint
from jmaml.engine.population import fit_population, point

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = models.mlp([1, 8, 1])
LOSS = make_loss(MODEL.apply, "mse")
TASKS = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
POINTS = {"inner_lr": [0.01, 0.03, 0.01, 0.03], "meta_lr": [1e-3, 1e-3, 3e-3, 3e-3], "seed": [0, 1, 2, 0]}


def _pop(points=POINTS, run_dir=None, steps=30, learner=None, stream=None, stop_at_step=None, **kw):
    learner = learner or learners.maml(LOSS, inner_lr=0.01, num_inner_steps=1)
    opt = optax.adam if "meta_lr" in points else optax.adam(1e-3)
    run = None if run_dir is None else jmaml.RunDir(str(run_dir), **kw)  # checkpoint_every, resume, ...
    return fit_population(learner, TASKS, opt, MODEL.init, points, steps=steps, meta_batch_size=4, key=5, run=run,
                          log=jmaml.Logging(every=10, progress=False, stream=stream), stop_at_step=stop_at_step)


def _leaves(tree):
    return checkpoint.host_leaves(tree)


def test_each_point_equals_the_single_run_fit_trains():
    pop = _pop()
    for i in range(4):
        a, b, seed = POINTS["inner_lr"][i], POINTS["meta_lr"][i], POINTS["seed"][i]
        single = jmaml.fit(learners.maml(LOSS, inner_lr=a, num_inner_steps=1), TASKS, optax.adam(b),
                           MODEL.init(jax.random.key(seed)), steps=30, meta_batch_size=4, key=5,
                           log=jmaml.Logging(every=10, progress=False))
        for u, v in zip(_leaves(point(pop, i).params), _leaves(single.params)):
            np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-7)
    assert pop.alive.all() and (np.asarray(pop.diverged_at) == -1).all() and np.isfinite(pop.last_loss).all()


def test_every_learner_runs_as_a_population():
    for name in learners.REGISTRY:
        model = learners.with_context(models.mlp([5, 8, 1]), 4) if name == "cavia" else MODEL
        learner = learners.make(name, make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=2)
        points = {"meta_lr": [1e-3, 3e-3], "seed": [0, 1]}
        if "inner_lr" in learner.hyper:  # Meta-SGD and MAML++ learn their rates: set when built
            points["inner_lr"] = [0.01, 0.02]
        pop = fit_population(learner, TASKS, optax.adam, model.init, points, steps=10, meta_batch_size=4,
                             log=jmaml.Logging(every=5, progress=False))
        assert int(pop.step) == 10 and pop.alive.all(), name
        assert all(np.isfinite(leaf).all() for leaf in _leaves(pop.points.params)), name


def test_traced_k_points_equal_single_runs_at_their_k():
    learner = learners.maml(LOSS, inner_lr=0.01, num_inner_steps=1, max_inner_steps=3)
    pop = _pop({"num_inner_steps": [1, 3], "seed": [0, 0]}, learner=learner, steps=20)
    for i, k in enumerate((1, 3)):
        single = jmaml.fit(learners.maml(LOSS, inner_lr=0.01, num_inner_steps=k), TASKS, optax.adam(1e-3),
                           MODEL.init(jax.random.key(0)), steps=20, meta_batch_size=4, key=5,
        log=jmaml.Logging(every=10, progress=False))
        for u, v in zip(_leaves(point(pop, i).params), _leaves(single.params)):
            np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"points\['num_inner_steps'\].*one population per value"):
        _pop({"num_inner_steps": [1, 3], "seed": [0, 0]}, steps=20)


def test_a_population_resumes_bitwise_and_owns_its_run_dir(tmp_path):
    straight = _pop(run_dir=tmp_path / "a")
    with pytest.raises(jmaml.Interrupted):
        _pop(run_dir=tmp_path / "b", stop_at_step=10, checkpoint_every=10)
    resumed = _pop(run_dir=tmp_path / "b", resume=True)
    for u, v in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(u, v)
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [10, 20, 30] and len(lines[-1]["point_meta_loss"]) == 4
    assert lines[-1]["points_alive"] == 4
    with pytest.raises(ValueError, match="already holds a finished run"):
        _pop(run_dir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"points changed"):
        _pop({**POINTS, "inner_lr": [0.5, 0.03, 0.01, 0.03]}, run_dir=tmp_path / "b", resume=True, steps=40)


def test_a_run_and_the_same_run_as_a_population_point_stop_at_the_same_step_with_the_same_state(tmp_path):
    """One divergence rule (engine.diverged_steps), per step: a run stops at the step its population point
    stops at, inside a chunk too, and keeps the state before it, as the point is frozen at it."""
    learner = learners.maml(LOSS, inner_lr=0.01, num_inner_steps=1)
    log = jmaml.Logging(every=10, progress=False)
    pop = fit_population(learner, TASKS, optax.sgd, MODEL.init, {"meta_lr": [0.05, 0.3], "seed": [0, 0]}, steps=30,
                         meta_batch_size=4, key=5, log=log)  # plain SGD at 0.3: the parameters blow up in steps
    at = int(pop.diverged_at[1])
    assert pop.alive.tolist() == [True, False] and 1 < at < 10  # inside the first chunk, not at its start
    with pytest.raises(jmaml.DivergenceError, match=rf"at step {at}\b") as e:
        jmaml.fit(learner, TASKS, optax.sgd(0.3), MODEL.init(jax.random.key(0)), steps=30, meta_batch_size=4, key=5,
                  run=jmaml.RunDir(str(tmp_path / "run"), checkpoint_every=10), log=log)
    assert f"The last good state (step {at - 1})" in str(e.value)
    path = tmp_path / "run" / "maml.ckpt.npz"
    assert checkpoint.read_header(path)["step"] == at - 1 == int(point(pop, 1).step)
    for u, v in zip(_leaves(checkpoint.restore_params(path, like=point(pop, 1).params)), _leaves(point(pop, 1).params)):
        np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-7)


def test_evaluate_population_scores_every_point_as_evaluate_does_in_one_program():
    from jmaml.engine.evaluation import evaluate, evaluate_population

    points = {"inner_lr": [0.01, 0.03, 0.3], "seed": [0, 1, 2]}
    pop = _pop(points, steps=20)
    learner = learners.maml(LOSS, inner_lr=0.01, num_inner_steps=1)
    traces = []
    counted = learner._replace(adapt=lambda *a, **k: (traces.append(1), learner.adapt(*a, **k))[1])
    results = evaluate_population(counted, pop, TASKS, points, apply=MODEL.apply, num_tasks=30, num_steps=3,
                                  batch_size=10)
    assert len(traces) == 1  # one trace, one compiled program, for all points and all three chunks of tasks
    assert len(results) == 3 and [r["train_diverged_at"] for r in results] == [None] * 3
    for i, result in enumerate(results):  # each point as evaluate scores it alone, at its own inner rate
        alone = evaluate(learner, point(pop, i).params, TASKS, apply=MODEL.apply, num_tasks=30, num_steps=3,
                         batch_size=10, hyper={"inner_lr": points["inner_lr"][i]})
        got, want = result["all"], alone["all"]
        assert (got["metric"], got["diverged"]) == (want["metric"], want["diverged"])
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-5)
        np.testing.assert_allclose(got["ci95"], want["ci95"], rtol=1e-4)
    assert results[0]["all"]["mean"] != results[2]["all"]["mean"]  # the points' own rates are used
    with pytest.raises(ValueError, match="points has 2 values per name but the population has 3 points"):
        evaluate_population(learner, pop, TASKS, {"inner_lr": [0.01, 0.03]}, apply=MODEL.apply, num_tasks=4)
    with pytest.raises(ValueError, match="no point axis"):
        evaluate_population(learner, point(pop, 0), TASKS, apply=MODEL.apply, num_tasks=4)


def test_a_diverging_point_is_frozen_reported_and_leaves_the_others_alone(capsys):
    bad = {k: [*v, v[0]] for k, v in POINTS.items()}
    bad["inner_lr"][-1] = 50.0  # an exploding inner loop
    pop = _pop(bad, stream=sys.stderr)
    alive = np.asarray(pop.alive)
    assert alive.tolist() == [True] * 4 + [False]
    at = int(pop.diverged_at[4])
    assert 1 <= at <= 30
    err = capsys.readouterr().err
    assert f"point 4 (inner_lr=50, meta_lr=0.001, seed=0) diverged at step {at}" in err
    frozen = point(pop, 4)
    assert all(np.isfinite(leaf).all() for leaf in _leaves(frozen.params))  # its last good state
    assert int(frozen.step) == at - 1
    # the other points are the population without it (same programs per point; the vmapped batch is
    # one wider, so XLA may order a reduction differently: equal to float32 round-off)
    ref = _pop()
    for i in range(4):
        for u, v in zip(_leaves(point(pop, i).params), _leaves(point(ref, i).params)):
            # float32 training, 30 steps: ~2 ulps per step of the same program compiled for another batch width
            np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-7)


def test_every_point_diverging_stops_the_run():
    with pytest.raises(jmaml.DivergenceError, match="every point of the population diverged"):
        _pop({"inner_lr": [50.0, 80.0], "seed": [0, 1]})


@pytest.mark.parametrize("points, err, match", [
    ({}, TypeError, "non-empty dict"),
    ({"inner_lr": [0.1, 0.2], "seed": [0]}, ValueError, "one value per point"),
    ({"inner_lr": [float("nan")], "seed": [0]}, ValueError, "finite numbers"),
    ({"seed": [-1]}, ValueError, "integers >= 0"),
    ({"momentum": [0.9], "seed": [0]}, ValueError, "takes the per-call hyperparameters"),
    ({"inner_hyper.momentum": [0.9], "seed": [0]}, ValueError, "has none"),
])
def test_bad_points_are_named(points, err, match):
    with pytest.raises(err, match=match):
        _pop(points)


def test_a_population_on_four_devices_equals_one_device():
    script = textwrap.dedent("""
        import jax, numpy as np, optax, jmaml
        from jmaml import learners, make_loss
        from jmaml.engine import checkpoint
        from jmaml.engine import distributed
        from jmaml.core import models
        from jmaml.engine.population import fit_population
        model = models.mlp([1, 8, 1])
        learner = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)
        tasks = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
        points = {"inner_lr": [0.01, 0.02, 0.03, 0.04], "seed": [0, 1, 2, 3]}
        run = lambda **kw: checkpoint.host_leaves(fit_population(
            learner, tasks, optax.adam(1e-3), model.init, points, steps=20, meta_batch_size=8, key=3,
            log=jmaml.Logging(every=10, progress=False), **kw).points.params)
        one = run()
        assert len(jax.devices()) == 4
        mesh = distributed.task_mesh(4)
        for shard in ("points", "tasks"):
            four = run(mesh=mesh, shard=shard)
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(one, four))
            bitwise = all(np.array_equal(a, b) for a, b in zip(one, four))
            print(shard, bitwise, diff)
            assert diff < 1e-6, (shard, diff)
    """)
    proc = procs.run_python(script, env=procs.clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert set(lines) == {"points", "tasks"}
    # not bitwise: one point per device is a vmap of width 1, which XLA lowers to other kernels than a
    # vmap of width 4 (measured: 7.5e-9 apart after 20 steps)


def test_a_loss_that_can_be_negative_does_not_freeze_a_point():
    """The population's explosion rule is engine.divergence's: a ratio to the un-adapted loss only when that
    is not negative (minus a return, in meta-RL). A learner whose un-adapted loss is -1 and whose adapted loss
    is positive is not exploding; every point stays alive (before the fix: every point frozen at step 1)."""
    model = models.mlp([1, 8, 1])
    base = learners.maml(make_loss(model.apply, "mse"), inner_lr=0.01, num_inner_steps=1)

    def estimate(params, tasks, meta_step=None, **hyper):
        loss, grads, metrics = base.estimate(params, tasks, meta_step, **hyper)
        return loss, grads, {**metrics, "pre_adapt_loss": -jnp.ones_like(metrics["pre_adapt_loss"])}

    dist = jmaml.tasks.sinusoid.distribution(num_support=5, num_query=5)
    pop = fit_population(base._replace(estimate=estimate), dist, optax.adam(1e-3), model.init(jax.random.key(0)),
                         {"inner_lr": [0.01, 0.02]}, steps=4, meta_batch_size=4, key=0,
                         log=jmaml.Logging(every=2, progress=False, stream=io.StringIO()))
    assert np.asarray(pop.alive).tolist() == [True, True] and (np.asarray(pop.diverged_at) == -1).all()
    assert (np.asarray(pop.last_loss) > 0).all()  # the adapted loss is positive: the old rule's ratio was huge
